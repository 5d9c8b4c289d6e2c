"""Memory checked at spawn (issue 18, item 5). On CUDA, spawn_train allocates the optimizer
state and runs one forward/backward of max_batch_size tokens, failing at once with the
largest max_batch_size that fits; spawn_inference's KV cache takes gpu_memory_fraction of
the memory left after the weights. CPU: the AdamW state allocated ahead is the state AdamW
makes itself, and the check does nothing."""
import gc
import re

import pytest
import torch

import engine
from engine.infer.cache import bytes_per_token
from engine.models import load_model
from engine.models.presets import save_random_checkpoint
from engine.train.memory import check_training_memory, init_optimizer_state
from engine.train.trainer import Trainer

VOCAB = 1031  # the tiny presets' vocabulary


def _data(total: int, vocab: int, length: int = 4096, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, total, length):
        n = min(length, total - start)
        tokens = torch.randint(0, vocab, (n + 1,), generator=g)
        out.append(engine.Datum(engine.ModelInput.from_ints(tokens[:-1].tolist()), {"target_tokens": tokens[1:]}))
    return out


def test_adamw_state_allocated_ahead_changes_nothing(checkpoint):
    """init_optimizer_state's zeros at step 0 give bit for bit the steps of AdamW's own."""
    folder = checkpoint("llama")
    data = [(s, {"target_tokens": torch.tensor(s[1:] + [3]), "weights": torch.rand(len(s))})
            for s in ([5, 9, 1, 7, 300, 2], [11, 4, 1000])]
    a, b = (Trainer(load_model(folder), max_batch_size=32) for _ in range(2))
    init_optimizer_state(b)
    assert check_training_memory(b) == {}  # CPU: nothing to check
    for _ in range(2):
        for t in (a, b):
            t.run(data, "cross_entropy", None, True)
            t.optim_step(1e-2, 0.9, 0.95, 1e-8, 0.01, 1.0)
    for (n, pa), (_, pb) in zip(a.params, b.params):
        assert torch.equal(pa, pb), n


# -- CUDA ---------------------------------------------------------------------------------------------
SMALL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("small"), "llama", dtype=torch.bfloat16, **SMALL)


def _release():
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_spawn_train_fails_at_spawn_with_the_largest_batch_that_fits(small):
    _release()
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(free - 6 * 2**30, dtype=torch.uint8, device="cuda")  # leave 6 GiB
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError, match="the largest max_batch_size that fits is about") as err:
            engine.model(small).spawn_train(max_batch_size=4_000_000)
        largest = int(re.search(r"fits is about (\d+)", str(err.value)).group(1))
        del err
        _release()
        assert 4096 < largest < 4_000_000, largest
        with pytest.raises(torch.cuda.OutOfMemoryError, match="does not fit"):
            engine.model(small).spawn_train(max_batch_size=int(1.25 * largest))
        _release()
        # 90% of the estimate fits, at spawn and in training on a full micro-batch.
        size = int(0.9 * largest)
        trainer = engine.model(small).spawn_train(max_batch_size=size)
        inner = trainer._trainer
        assert all(inner.optimizer.state[p]["exp_avg"].dtype == torch.float32 for _, p in inner.optim_params)
        out = trainer.forward_backward(_data(size, SMALL["vocab_size"]), "cross_entropy").result()
        assert out.metrics["micro_batches:sum"] == 1 and out.metrics["tokens:sum"] == size
        assert trainer.optim_step(engine.AdamParams(1e-4)).result().metrics["step"] == 1
        trainer.close()
        del trainer, inner
    finally:
        del ballast
        _release()


@pytest.mark.gpu
def test_spawn_inference_sizes_the_kv_cache_from_free_memory(small):
    _release()
    cfg = SMALL
    per_token = bytes_per_token(cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                                cfg["hidden_size"] // cfg["num_attention_heads"], torch.bfloat16)
    sizes = {}
    for fraction in (0.9, 0.45):
        _release()
        free, _ = torch.cuda.mem_get_info()
        sampler = engine.model(small).spawn_inference(max_batch_size=256, **({} if fraction == 0.9 else
                                                                             {"gpu_memory_fraction": fraction}))
        sizes[fraction] = sampler.cache.capacity_tokens * per_token
        assert sizes[fraction] <= fraction * free  # of what was free before the weights, less the weights
        assert sizes[fraction] > 0.85 * fraction * free  # the weights (0.25 GB) are a small part here
        sampler.close()
        del sampler
    assert sizes[0.45] / sizes[0.9] == pytest.approx(0.5, rel=0.05)
