"""Fused linear cross-entropy, forward + backward: this engine against the ops a user would
pick instead, in one process on the same inputs.

Peers: torch eager (bf16 logits, float32 loss), torch.compile of the same function,
Liger-Kernel's fused linear cross-entropy, Cut Cross-Entropy, and torch's own chunked
``F.linear_cross_entropy(..., options=...)`` where the installed torch has it (2.13+).
A peer that is not installed is skipped with a line saying so. Reported per shape: median
ms (do_bench), TFLOP/s counted as 6·N·H·V (the matmul work of forward + backward), peak
memory above the inputs (gradients included), that peak over the bytes of dx + dW, and the
time ratio to torch.compile.

    python benchmarks/bench_cross_entropy.py            # GPU: both issue shapes + a sweep of N
    python benchmarks/bench_cross_entropy.py --smoke    # CPU: tiny shape, checks the plumbing
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import peak_memory_bytes, save, table, time_ms  # noqa: E402
from kernels import linear_cross_entropy  # noqa: E402

SHAPES = {"llama3-8b": (8192, 4096, 128256), "qwen": (16384, 2048, 151936)}
SWEEP_N = (1024, 2048, 4096, 16384)  # with llama3-8b's H and V; 8192 is the headline shape


def _eager(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t)


def peers() -> dict:
    """name -> loss function (x, w, t) -> scalar, or a string saying why it is skipped."""
    out = {"engine": lambda x, w, t: linear_cross_entropy(x, w, t), "torch eager": _eager}
    if torch.cuda.is_available():
        out["torch.compile"] = torch.compile(_eager, dynamic=False)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def liger_fn(x, w, t):
            loss = liger(w, x, t)
            return loss[0] if isinstance(loss, tuple) else loss

        out["liger-kernel"] = liger_fn
    except ImportError as e:
        out["liger-kernel"] = f"skipped: liger-kernel not installed ({e})"
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cut-cross-entropy"] = lambda x, w, t: cce(x, w, t)
    except ImportError as e:
        out["cut-cross-entropy"] = f"skipped: cut-cross-entropy not installed ({e})"
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None:
        out["torch F.linear_cross_entropy"] = f"skipped: torch {torch.__version__} has no chunked F.linear_cross_entropy"
    else:
        out["torch F.linear_cross_entropy"] = lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options())
    return out


def inputs(n, h, v, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, h, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(v, h, device=device, dtype=dtype, generator=g) * h**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device=device, generator=g)
    return x, w, t


def measure(name, fn, n, h, v, device, dtype, shape_name) -> dict:
    data = list(inputs(n, h, v, device, dtype))
    grads_bytes = (data[0].numel() + data[1].numel()) * data[0].element_size()
    row = {"impl": name, "shape": shape_name, "N": n, "H": h, "V": v}

    def step():
        x, w, t = data
        return torch.autograd.grad(fn(x, w, t), (x, w))

    try:
        step()  # compile / autotune outside the timings
        row["ms"] = time_ms(step, warmup=200, rep=600)
        peak = peak_memory_bytes(step)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    except Exception as e:  # a peer's failure is a result too, not a crash of the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return row
    finally:
        data.clear()  # free the inputs before the next peer runs
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["tflops"] = 6 * n * h * v / row["ms"] * 1e-9
    if peak is not None:
        row["peak_gib"] = peak / 2**30
        row["peak_over_grads"] = peak / grads_bytes
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shape (CPU or GPU), for checking the script")
    p.add_argument("--no-sweep", action="store_true", help="only the two issue shapes")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_cross_entropy: needs a CUDA GPU (use --smoke for a CPU run of the plumbing)")
        return []
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if args.smoke:
        cases = [("smoke", 96, 32, 1000)]
    else:
        cases = [(name, *shape) for name, shape in SHAPES.items()]
        if not args.no_sweep:
            _, h, v = SHAPES["llama3-8b"]
            cases += [("llama3-8b sweep", n, h, v) for n in SWEEP_N]
    fns = peers()
    for name, fn in fns.items():
        if isinstance(fn, str):
            print(f"{name}: {fn}")
    rows = []
    for shape_name, n, h, v in cases:
        floor_ms = 6 * n * h * v / 793e12 * 1e3  # the bf16 GEMM rate measured on the H100 (issue 3)
        print(f"== {shape_name}: N={n} H={h} V={v} {dtype}; matmul floor {floor_ms:.1f} ms at 793 TFLOP/s", flush=True)
        for name, fn in fns.items():
            if isinstance(fn, str):
                continue
            row = measure(name, fn, n, h, v, device, dtype, shape_name)
            row["floor_ms"] = floor_ms if cuda else None
            rows.append(row)
            print(table([row], [c for c in ("impl", "ms", "tflops", "peak_gib", "peak_over_grads", "error") if c in row]),
                  flush=True)
        base = next((r.get("ms") for r in rows if r["N"] == n and r["shape"] == shape_name and r["impl"] == "torch.compile"), None)
        for r in rows:
            if r["N"] == n and r["shape"] == shape_name and base and r.get("ms"):
                r["vs_compile"] = r["ms"] / base
    _, h, v = SHAPES["llama3-8b"] if cuda and not args.smoke else cases[0][1:]
    save("cross_entropy", rows, x="N", y="ms", series="impl", ylabel="ms (forward + backward)",
         title=f"Linear cross-entropy, H={h} V={v}, {dtype}", plot_rows=[r for r in rows if (r["H"], r["V"]) == (h, v)],
         meta={"shapes": SHAPES, "sweep_n": SWEEP_N, "dtype": str(dtype), "flops": "6*N*H*V"})
    print(table(rows, ["shape", "N", "impl", "ms", "tflops", "peak_gib", "peak_over_grads", "vs_compile", "error"]))
    return rows


if __name__ == "__main__":
    main()
