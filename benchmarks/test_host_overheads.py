"""Host-side overheads, timed with pytest-benchmark:
``python -m pytest benchmarks/test_host_overheads.py --benchmark-json=out.json``."""
import statistics
import time

import pytest
import torch

from engine.models import PackedBatch


def _documents(n_docs: int, max_len: int, vocab: int = 128256):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, max_len + 1, (n_docs,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


def test_pack_64_documents(benchmark):
    docs = _documents(64, 2048)
    batch = benchmark(PackedBatch.from_sequences, docs, vocab_size=128256)
    assert batch.num_tokens == sum(map(len, docs))


def test_pack_1024_short_documents(benchmark):
    docs = _documents(1024, 64)
    batch = benchmark(PackedBatch.from_sequences, docs, vocab_size=128256)
    assert batch.cu_seqlens.numel() == 1025


class _HostOnly:
    """An executor that does a step's host work (StepBatch.build, the sampling inputs)
    and answers token 1 for every sample without running a model: the engine's step rate
    with it is the rate its host side alone allows."""

    overlaps = True

    def __init__(self, block_size: int):
        self.block_size = block_size

    def launch(self, spec, after=None):
        from engine.infer.cache import host_to_device
        from engine.infer.forward import StepBatch
        from engine.infer.runner import LaunchedStep, StepResult

        StepBatch.build(spec.chunks, self.block_size, "cpu", spec.adapter_ids)
        host_to_device("cpu", torch.int64, spec.rows, spec.expand, spec.top_k, spec.seeds, spec.steps)
        host_to_device("cpu", torch.float32, spec.temps, spec.top_p)
        return LaunchedStep(result=StepResult([], [(1, -1.0, -1.0)] * len(spec.expand)))

    def close(self):
        pass


@pytest.mark.parametrize("batch", [1, 32])
def test_engine_host_work_per_decode_step(benchmark, tmp_path, batch):
    """Everything the engine thread does per step except the model: scheduling, the step's
    lists, the batch tensors, handing out the tokens. A step overlaps the previous one's
    device work, so this is hidden as long as it is shorter than a step on the device."""
    from engine.infer import InferenceModel, SamplingParams
    from engine.models.presets import TINY, save_random_checkpoint

    folder = save_random_checkpoint(tmp_path / "model", TINY["llama"])
    with InferenceModel(folder, max_batch_size=4096, block_size=16, kv_cache_tokens=batch * 1024) as engine:
        core = engine._core  # the engine core, its executor replaced (it still overlaps steps)
        core.executor = _HostOnly(engine.cache.block_size)
        params = SamplingParams(max_tokens=256, temperature=0.0)
        spent = []  # seconds inside each step (the thread's wake-ups excluded)
        step = core.step

        def timed_step():
            start = time.perf_counter()
            step()
            spent.append(time.perf_counter() - start)

        core.step = timed_step

        def run():
            futs = [engine.sample(list(range(2, 258)), 1, params) for _ in range(batch)]
            for f in futs:
                f.result(timeout=300)

        benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    per_step = statistics.median(spent[len(spent) // 4:]) * 1e6  # the measured rounds
    benchmark.extra_info["host_us_per_step_median"] = per_step
    print(f"\nbatch {batch}: {per_step:.0f} us of host work per step (median of {len(spent) * 3 // 4} steps)")
