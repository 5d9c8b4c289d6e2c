"""LoRA layers: this engine's kernels against the frozen base linear, the eager formula and
peft's LoRA layer, measured in the same process.

Training (issue 5's shapes): N=8192 tokens, bf16, forward+backward with the base weight
frozen (x and the adapter get gradients), 4096->4096 at r=16 and 4096->14336 at r=64;
the number that matters is the overhead over the base linear (target: <= 10% at r=16,
<= 8% at r=64). peft's layer runs with bf16 adapters (autocast_adapter_dtype=False), like
the others; it is skipped with a line if peft is not installed.

Multi-adapter inference: decode (64 tokens spread over 16 adapters, target <= 1.3x the
same batch on one adapter) and prefill (8192 tokens, 16 adapters of 512 tokens each),
beside a Python loop over the adapters (what one writes without the kernels).

    python benchmarks/bench_lora.py            # GPU
    python benchmarks/bench_lora.py --smoke    # tiny CPU run of the same code paths
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import peak_memory_bytes, save, table, time_ms  # noqa: E402
import kernels.lowrank_gemm as lowrank_gemm  # noqa: E402
from kernels import lora_linear, lora_linear_multi, pack_lora_adapters  # noqa: E402

TRAIN_SHAPES = [(4096, 4096, 16), (4096, 14336, 64)]  # (in, out, r)
# The schemes lora_linear chooses between (from the device's config table; cuBLAS without an entry).
FORCED_GEMM = {"engine, cuBLAS + pre-written term": "cublas", "engine, fused-epilogue GEMM": "fused",
               "engine, fused-epilogue GEMM (TMA)": "fused-tma"}


def _peft_layer(weight, a, b, alpha):
    """peft's lora.Linear around an nn.Linear holding ``weight``, adapters set to a, b."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                            dtype=weight.dtype))
    with torch.no_grad():
        base.proj.weight.copy_(weight)
    model = get_peft_model(base, LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=["proj"]),
                           autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return layer


def train_rows(n: int, shapes, device, dtype) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for k, m, r in shapes:
        x = torch.randn(n, k, device=device, dtype=dtype, generator=g).requires_grad_()
        w = torch.randn(m, k, device=device, dtype=dtype, generator=g) * k**-0.5  # frozen
        a = (torch.randn(r, k, device=device, dtype=dtype, generator=g) * k**-0.5).requires_grad_()
        b = (torch.randn(m, r, device=device, dtype=dtype, generator=g) * 0.01).requires_grad_()
        dy = torch.randn(n, m, device=device, dtype=dtype, generator=g)
        alpha = 2 * r
        scale = alpha / r
        runs = {
            "base linear (frozen)": lambda: F.linear(x, w),
            "eager LoRA formula": lambda: F.linear(x, w) + scale * F.linear(F.linear(x, a), b),
            "engine lora_linear": lambda: lora_linear(x, w, a, b, scale),
            # The schemes lora_linear picks between (the config table's choice is the line above).
            "engine, cuBLAS + pre-written term": lambda: lora_linear(x, w, a, b, scale),
            "engine, fused-epilogue GEMM": lambda: lora_linear(x, w, a, b, scale),
            "engine, fused-epilogue GEMM (TMA)": lambda: lora_linear(x, w, a, b, scale),
        }
        layer = _peft_layer(w, a.detach(), b.detach(), alpha)
        if layer is None:
            print("peft is not installed: skipping peft's LoRA layer", flush=True)
        else:
            runs["peft LoRA layer"] = lambda: layer(x)
        for name, fn in runs.items():
            for mode in ("fwd", "fwd+bwd"):
                def step(fn=fn, mode=mode, gemm=FORCED_GEMM.get(name)):
                    lowrank_gemm.GEMM = gemm
                    try:
                        y = fn()
                        if mode == "fwd+bwd":
                            y.backward(dy)
                    finally:
                        lowrank_gemm.GEMM = None
                    return y
                ms = time_ms(step)
                peak = peak_memory_bytes(step)
                flops = 2 * n * k * m * (1 if mode == "fwd" else 2)  # base GEMMs only: x @ W.T, dy @ W
                rows.append({"case": f"{k}->{m} r={r}", "mode": mode, "impl": name, "tokens": n, "ms": ms,
                             "base_tflops": flops / ms * 1e-9, "peak_gib": None if peak is None else peak / 2**30})
                x.grad = a.grad = b.grad = None
                print(table(rows[-1:], ["case", "mode", "impl", "ms", "base_tflops", "peak_gib"]), flush=True)
    for r in rows:
        base = next(q["ms"] for q in rows if q["case"] == r["case"] and q["mode"] == r["mode"]
                    and q["impl"] == "base linear (frozen)")
        r["overhead_pct"] = 100 * (r["ms"] / base - 1)
    return rows


def _loop_over_adapters(x, w, stack_a, stack_b, scales, ids):
    """What one writes without the kernels: gather each adapter's tokens, one LoRA each
    (host syncs on the unique ids and the boolean indexing)."""
    y = F.linear(x, w)
    for i in ids.unique().tolist():
        if i < 0:
            continue
        rows = (ids == i).nonzero()[:, 0]
        y[rows] += scales[i] * F.linear(F.linear(x[rows], stack_a[i]), stack_b[i])
    return y


def multi_rows(cases, k, m, r, n_adapters, device, dtype) -> list[dict]:
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    w = torch.randn(m, k, device=device, dtype=dtype, generator=g) * k**-0.5
    adapters = [(torch.randn(max(1, r >> (i % 3)), k, device=device, dtype=dtype, generator=g) * k**-0.5,
                 torch.randn(m, max(1, r >> (i % 3)), device=device, dtype=dtype, generator=g) * 0.01, 2.0)
                for i in range(n_adapters)]  # ranks r, r/2, r/4: zero-padded to r
    stack_a, stack_b, scales = pack_lora_adapters(adapters)
    for label, n, layout in cases:
        x = torch.randn(n, k, device=device, dtype=dtype, generator=g)
        if layout == "spread":
            spread = torch.arange(n, device=device) % n_adapters
            spread = spread[torch.randperm(n, device=device, generator=g)]
        else:  # contiguous segments, one per adapter (packed prefill)
            spread = torch.arange(n, device=device) * n_adapters // n
        ids_many = spread.to(torch.int32)
        ids_one = torch.zeros(n, dtype=torch.int32, device=device)
        runs = {
            "base linear": lambda: F.linear(x, w),
            "engine multi, 1 adapter": lambda: lora_linear_multi(x, w, stack_a, stack_b, scales, ids_one),
            f"engine multi, {n_adapters} adapters": lambda: lora_linear_multi(x, w, stack_a, stack_b, scales, ids_many),
            f"loop over {n_adapters} adapters": lambda: _loop_over_adapters(x, w, stack_a, stack_b, scales, ids_many),
        }
        for name, fn in runs.items():
            with torch.inference_mode():
                ms = time_ms(fn)
            rows.append({"case": label, "impl": name, "tokens": n, "ms": ms})
            print(table(rows[-1:], ["case", "impl", "tokens", "ms"]), flush=True)
        one = next(q["ms"] for q in rows if q["case"] == label and q["impl"] == "engine multi, 1 adapter")
        for q in rows:
            if q["case"] == label:
                q["vs_one_adapter"] = q["ms"] / one
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script, not a measurement)")
    p.add_argument("--tokens", type=int, default=8192)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_lora needs a CUDA GPU (run with --smoke for a tiny CPU check of the script)")
        return []
    if cuda:
        device, dtype, n = "cuda", torch.bfloat16, args.tokens
        shapes, (k, m, r, n_adapters) = TRAIN_SHAPES, (4096, 4096, 16, 16)
        cases = [("decode 64 tokens", 64, "spread"), (f"prefill {n} tokens", n, "segments")]
    else:
        device, dtype, n = "cpu", torch.float32, 64
        shapes, (k, m, r, n_adapters) = [(48, 80, 4)], (48, 80, 4, 3)
        cases = [("decode 8 tokens", 8, "spread"), ("prefill 40 tokens", 40, "segments")]
    rows = train_rows(n, shapes, device, dtype)
    rows += multi_rows(cases, k, m, r, n_adapters, device, dtype)
    train = [q for q in rows if "mode" in q and q["mode"] == "fwd+bwd"]
    save("lora", rows, x="case", y="overhead_pct", series="impl", ylabel="% over the frozen base linear (fwd+bwd)",
         title=f"LoRA fwd+bwd, N={n} tokens, {dtype}", plot_rows=train,
         meta={"tokens": n, "dtype": str(dtype), "train_shapes": shapes, "multi": dict(in_features=k, out_features=m,
               rank=r, adapters=n_adapters, cases=cases), "peft_adapter_dtype": "same as the base (bf16)"})
    print(table(train, ["case", "impl", "ms", "overhead_pct", "base_tflops", "peak_gib"]))
    print(table([q for q in rows if "mode" not in q], ["case", "impl", "tokens", "ms", "vs_one_adapter"]))
    return rows


if __name__ == "__main__":
    main()
