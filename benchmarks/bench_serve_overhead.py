"""What ``python -m engine serve`` adds to one ``forward_backward``: the real ``tinker`` SDK
against the server on loopback, minus the same call in-process.

Issue 17's setting: a tiny random Qwen3 (engine.models.presets.TINY, with its byte
tokenizer), LoRA rank 8, one ``forward_backward`` of 8 data x 128 tokens with
``cross_entropy``, waited for before the next (``.result()``), median over 50 calls after 5
warm-up calls: in-process, then through the server, then in-process again (their mean is
the baseline), on the same machine. The added latency covers the SDK's protobuf
encoding and HTTP posts, the server's decode, seq_id queue and result encoding, and the
``retrieve_future`` long-poll. Target: <= 15 ms on a CPU. A figure from a loaded machine
(other jobs on its cores) is not a measurement.

    python benchmarks/bench_serve_overhead.py [--calls 50] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from benchmarks.harness import save, table  # noqa: E402
from engine.models.presets import save_random_checkpoint  # noqa: E402
from engine.serve.process import launch  # noqa: E402

KEY = "tml-bench"
NAME = "bench/tiny-qwen3"


def median_ms(fn, *, calls: int, warmup: int = 5) -> tuple[float, float]:
    """Median and minimum wall time of ``fn()`` over ``calls`` calls after ``warmup`` (the
    minimum is the less noisy figure on a machine with other load)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--data", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    import tinker
    from tinker import types

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    model = save_random_checkpoint(tmp / "model", "qwen3", tokenizer=True)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (args.tokens + 1,), generator=g).tolist() for _ in range(args.data)]

    local = engine.model(model).with_adapter(rank=8).spawn_train(max_batch_size=8192)
    local_data = [engine.Datum(engine.ModelInput(s[:-1]), {"target_tokens": s[1:]}) for s in seqs]
    proc, url = launch({NAME: model}, checkpoint_dir=tmp / "checkpoints", api_key=KEY)
    try:
        client = tinker.ServiceClient(base_url=url, api_key=KEY)
        trainer = client.create_lora_training_client(base_model=NAME, rank=8).result()
        remote_data = [types.Datum(model_input=types.ModelInput.from_ints(s[:-1]),
                                   loss_fn_inputs={"target_tokens": s[1:]}) for s in seqs]
        # In-process, served, in-process again (a drift of the machine's speed shows as a gap
        # between the two in-process medians). Not interleaved call by call: each side's
        # OpenMP threads spin a while after their work and would slow the other side's call.
        local_call = lambda: local.forward_backward(local_data, "cross_entropy").result()  # noqa: E731
        before = median_ms(local_call, calls=args.calls)
        served = median_ms(lambda: trainer.forward_backward(remote_data, "cross_entropy").result(), calls=args.calls)
        after = median_ms(local_call, calls=args.calls)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        local.close()

    in_process = [(a + b) / 2 for a, b in zip(before, after)]
    added = [s - i for s, i in zip(served, in_process)]
    rows = [{"side": side, "median_ms": v[0], "min_ms": v[1]} for side, v in (
        ("in-process, before", before), ("server (tinker SDK)", served), ("in-process, after", after),
        ("added by the server", added))]
    print(table(rows, ["side", "median_ms", "min_ms"]))
    print(f"added latency per forward_backward: {added[0]:.2f} ms median, {added[1]:.2f} ms min (target <= 15 ms)")
    path = save("serve_overhead", rows, x="side", y="median_ms", series="side",
                title=f"forward_backward of {args.data} x {args.tokens} tokens, median of {args.calls}",
                ylabel="ms", meta={"data": args.data, "tokens": args.tokens, "calls": args.calls, "lora_rank": 8,
                                   "model": "TINY qwen3", "target_added_ms": 15.0})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
