"""Tensor parallelism on CPU (gloo): TP=2 against TP=1 on the tiny model of every family,
and the worker pool's failure handling."""
import os
import signal
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from engine.models import PackedBatch, load_config, load_model
from engine.models.config import ConfigError
from engine.parallel import (WorkerError, WorkerPool, check_tp, full_state, load_tp_model, shard_entries, shutdown,
                             tp_group)
from kernels import linear_cross_entropy, linear_logprobs

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
LENGTHS = (11, 1, 19, 6)
STEPS = 5


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (n + 1,), generator=g).tolist() for n in LENGTHS]
    batch = PackedBatch.from_sequences([s[:-1] for s in seqs], vocab_size=vocab)
    targets = torch.tensor([t for s in seqs for t in s[1:]])
    targets[3] = -100
    return batch, targets


def gloo_threads() -> int:
    """gloo's worker threads alive in this process (Linux: /proc names them)."""
    count = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            count += f.read().startswith(("pt_gloo", "gloo"))
    return count


def end_torchrun_script() -> None:
    """The end of a script that torchrun launched: ``shutdown()``, which must leave no group
    referenced (a warning fails the run) and no gloo thread to outlive the interpreter."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shutdown()
    assert gloo_threads() == 0, f"{gloo_threads()} gloo threads outlive shutdown()"


def _loss(model, batch, targets):
    group = tp_group(model)
    hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    lp, lse = linear_logprobs(hidden, model.lm_head_weight, targets, return_lse=True, process_group=group)
    loss = linear_cross_entropy(hidden, model.lm_head_weight, targets, reduction="sum", z_loss=1e-3,
                                process_group=group)
    return hidden, lp, lse, loss


def _check_and_train(model, batch, targets):
    """Forward/backward once (outputs and gathered gradients), then STEPS AdamW steps."""
    model.train()
    hidden, lp, lse, loss = _loss(model, batch, targets)
    (loss + (lp * torch.linspace(-1, 1, len(lp))).sum()).backward()
    grads = full_state(model, grads=True)
    first = dict(hidden=hidden.detach(), lp=lp.detach(), lse=lse.detach(), loss=loss.detach(), grads=grads)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    curve = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, batch, targets)[3]
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return first, curve


def _setup(ctx, folder):
    torch.backends.cuda.matmul.allow_tf32 = False
    return load_tp_model(folder, ctx.group, device=ctx.device)


def _run_step(model, vocab):
    first, curve = _check_and_train(model, *_batch(vocab))
    return first, curve, dist.get_rank()


@pytest.mark.parametrize("family, overrides", [(f, {}) for f in FAMILIES] + [
    ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),  # row-parallel biases
])
def test_tp2_equals_tp1(checkpoint, family, overrides):
    folder = checkpoint(family, **overrides)
    vocab = load_config(folder).vocab_size
    ref_first, ref_curve = _check_and_train(load_model(folder), *_batch(vocab))
    with WorkerPool(2, _setup, folder) as pool:
        results = pool.run(_run_step, vocab)
    assert [r[2] for r in results] == [0, 1]
    for first, curve, _ in results:
        for key in ("hidden", "lp", "lse", "loss"):
            torch.testing.assert_close(first[key], ref_first[key], rtol=1e-5, atol=1e-5)
        assert first["grads"].keys() == ref_first["grads"].keys()
        for name, ref in ref_first["grads"].items():
            got = first["grads"][name]
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 1e-5, f"{family} {name}: relative error {err:.2e}"
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(ref_curve), rtol=1e-4, atol=1e-4)
    assert ref_curve[-1] < ref_curve[0]


def test_shard_map_covers_every_weight_once(checkpoint):
    """The slices of the two ranks tile each stored tensor exactly."""
    config = load_config(checkpoint("qwen2"))
    for e0, e1 in zip(shard_entries(config, 2, 0), shard_entries(config, 2, 1)):
        assert e0.hf_name == e1.hf_name
        if e0.shard is not None:
            dim, start0, len0, full = e0.shard
            assert start0 == 0 and e1.shard[1] == len0 and len0 + e1.shard[2] == full


def test_tp_that_does_not_divide(checkpoint):
    config = load_config(checkpoint("llama"))  # 4 query heads, 2 KV heads, FFN 96
    with pytest.raises(ConfigError, match="tp=4 does not divide num_key_value_heads=2"):
        check_tp(config, 4)
    with pytest.raises(ConfigError, match="tp=3 does not divide num_attention_heads=4"):
        check_tp(config, 3)


def _fail_on_rank1(model):
    if dist.get_rank() == 1:
        raise RuntimeError("injected failure")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 waits in a collective rank 1 never joins
    return t


def _die_on_rank0(model):
    if dist.get_rank() == 0:
        os._exit(3)
    dist.barrier()


def _noop_setup(ctx):
    return None


@pytest.mark.parametrize("fn, match", [(_fail_on_rank1, "rank 1 raised RuntimeError: injected failure"),
                                       (_die_on_rank0, r"rank 0 died \(exit code 3\)")])
def test_worker_failure_surfaces_quickly(fn, match, assert_no_children):
    pool = WorkerPool(2, _noop_setup, timeout_s=60)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=match):
        pool.run(fn)
    assert time.monotonic() - start < 30
    assert_no_children()
    with pytest.raises(WorkerError, match="closed"):
        pool.run(_fail_on_rank1)


def _interrupt_self(state):
    os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C in the terminal reaches every process of its group
    time.sleep(0.1)
    return dist.get_rank()


def test_workers_leave_ctrl_c_to_the_caller(assert_no_children):
    """Workers ignore SIGINT (the caller handles it and closes the pool): no KeyboardInterrupt
    in a worker, and the pool keeps serving."""
    with WorkerPool(2, _noop_setup, timeout_s=60) as pool:
        assert pool.run(_interrupt_self) == [0, 1]
        assert pool.run(_interrupt_self) == [0, 1]
    assert_no_children()


def test_same_code_under_torchrun(checkpoint, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    folder = checkpoint("qwen3")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "result.pt"
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    from engine.parallel.workers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(root / "tests" / "torchrun_tp_script.py"), str(folder), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out)
    ref = _loss(load_model(folder), *_batch(load_config(folder).vocab_size))[3]
    assert result["world"] == 2
    torch.testing.assert_close(result["loss"], ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_worker_pool_tp1_on_gpu(checkpoint):
    """TP=1 from a worker process (NCCL, one rank) runs the same code as in-process on the GPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = checkpoint("qwen3")
    vocab = load_config(folder).vocab_size
    batch, targets = _batch(vocab)
    ref_first, ref_curve = _check_and_train(load_model(folder, device="cuda"), batch.to("cuda"), targets.cuda())
    with WorkerPool(1, _setup, folder) as pool:
        (first, curve, rank), = pool.run(_run_step_cuda, vocab)
    torch.testing.assert_close(first["loss"].cpu(), ref_first["loss"].cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(ref_curve), rtol=1e-4, atol=1e-4)


def _run_step_cuda(model, vocab):
    batch, targets = _batch(vocab)
    first, curve = _check_and_train(model, batch.to("cuda"), targets.cuda())
    return {k: v for k, v in first.items() if k == "loss"}, curve, dist.get_rank()


def _lora_grads(model):
    """The adapter's gradients under PEFT names, gathered over the ranks (test helper)."""
    from engine.models import lora_state_dict_to_peft

    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad
    try:
        return lora_state_dict_to_peft(model)
    finally:
        for p, d in zip(params, saved):
            p.data = d


def _lora_setup(ctx, folder, adapter):
    from engine.models import load_peft_lora

    model = _setup(ctx, folder)
    load_peft_lora(model, adapter)
    return model


def _lora_step(model, vocab):
    from engine.models import lora_state_dict_to_peft

    first, curve = _check_and_train(model, *_batch(vocab))
    first["lora_grads"] = _lora_grads_now(model, vocab)
    return first, curve, lora_state_dict_to_peft(model)


def _lora_grads_now(model, vocab):
    model.zero_grad()
    hidden, lp, lse, loss = _loss(model, *_batch(vocab))
    (loss + (lp * torch.linspace(-1, 1, len(lp))).sum()).backward()
    return _lora_grads(model)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_tp2_equals_tp1(checkpoint, tmp_path, family):
    """An adapter on every projection: same outputs, adapter gradients (gathered under PEFT
    names) and AdamW curve at tp=2 as at tp=1, and the trained adapter exports the same."""
    from engine.models import add_lora, load_peft_lora, save_peft_lora

    folder = checkpoint(family)
    vocab = load_config(folder).vocab_size
    model = load_model(folder)
    add_lora(model, rank=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.05)  # B nonzero, so A gets a gradient too
    adapter = save_peft_lora(model, tmp_path / "adapter")
    ref = load_model(folder)
    load_peft_lora(ref, adapter)
    ref_first, ref_curve = _check_and_train(ref, *_batch(vocab))
    ref_grads = _lora_grads_now(ref, vocab)
    from engine.models import lora_state_dict_to_peft

    ref_trained = lora_state_dict_to_peft(ref)
    with WorkerPool(2, _lora_setup, folder, adapter) as pool:
        results = pool.run(_lora_step, vocab)
    for first, curve, trained in results:
        for key in ("hidden", "lp", "loss"):
            torch.testing.assert_close(first[key], ref_first[key], rtol=1e-5, atol=1e-5)
        assert first["lora_grads"].keys() == ref_grads.keys() and ref_grads
        for name, g in ref_grads.items():
            err = ((first["lora_grads"][name] - g).norm() / g.norm()).item()
            assert err < 1e-5, f"{name}: relative error {err:.2e}"
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(ref_curve), rtol=1e-4, atol=1e-4)
        for name, t in ref_trained.items():
            torch.testing.assert_close(trained[name], t, rtol=1e-4, atol=1e-5)
