"""Attention kernels against the attention a user would pick instead, in one process on the
same inputs.

Packed batch (training / prefill; causal, GQA, bf16): forward and forward + backward of
this engine's Triton ``varlen_attention``; ``flash_attn.flash_attn_varlen_func``;
``torch.nn.attention.varlen.varlen_attn``; FlexAttention (compiled) with a document block
mask; and torch SDPA in a loop over the documents. TFLOP/s count the causal work:
4·Σ L²/2·Hq·D forward, 2.5x that for the backward.

Decode (one query per sequence over a paged cache): ``paged_attention`` against torch
gathering the pages then calling SDPA, and ``varlen_attn`` with its own ``block_table``
where the installed torch has it. GB/s count the K and V bytes read.

    python benchmarks/bench_attention.py            # GPU: 16k tokens, Hq=32, Hkv=8, D=128
    python benchmarks/bench_attention.py --smoke    # CPU: tiny shapes, checks the plumbing
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_forward import document_lengths  # noqa: E402
from benchmarks.harness import peak_memory_bytes, save, table, time_ms  # noqa: E402
from kernels import paged_attention, varlen_attention  # noqa: E402
from kernels.triton_base import interpreting  # noqa: E402


def varlen_peers(lens, hq, hkv, d, device, engine_impl) -> dict:
    """name -> attention (q [T,Hq,D], k, v [T,Hkv,D]) -> out [T,Hq,D], or a string saying
    why that peer is skipped."""
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    longest, scale = max(lens), d**-0.5
    peers = {"engine": lambda q, k, v: varlen_attention(q, k, v, cu, cu, longest, longest, softmax_scale=scale,
                                                         impl=engine_impl)}
    try:
        from flash_attn import flash_attn_varlen_func

        peers["flash_attn"] = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest,
                                                                     softmax_scale=scale, causal=True)
    except ImportError:
        peers["flash_attn"] = "skipped: flash_attn not installed"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        peers["torch varlen_attn"] = f"skipped: torch {torch.__version__} has no torch.nn.attention.varlen"
    else:
        params = inspect.signature(varlen_attn).parameters
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch 2.10 had is_causal
        if device == "cpu":
            peers["torch varlen_attn"] = "skipped: torch varlen_attn runs on CUDA only"
        elif "enable_gqa" in params:
            peers["torch varlen_attn"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale,
                                                                     enable_gqa=True, **kw)
        else:  # older torch: expand the key/value heads (inside the timing: it is part of the cost)
            group = hq // hkv
            peers["torch varlen_attn"] = lambda q, k, v: varlen_attn(
                q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), cu, cu, longest, longest,
                scale=scale, **kw)
    if device == "cpu":
        peers["flex_attention"] = "skipped: the FlexAttention run needs CUDA (compiled)"
    else:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            peers["flex_attention"] = "skipped: torch has no FlexAttention"
        else:
            doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))

            def document_causal(b, h, q_idx, kv_idx):
                return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

            total = sum(lens)
            # Built once per batch shape, outside the timing (a trainer builds it per batch).
            mask = create_block_mask(document_causal, None, None, total, total, device=device)
            flex = torch.compile(flex_attention, dynamic=False)
            peers["flex_attention"] = lambda q, k, v: flex(
                q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask,
                scale=scale, enable_gqa=True)[0].transpose(0, 1)

    def sdpa_loop(q, k, v):
        outs, start = [], 0
        for n in lens:
            qb, kb, vb = (t[start:start + n].transpose(0, 1)[None] for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                                       enable_gqa=True)[0].transpose(0, 1))
            start += n
        return torch.cat(outs)

    peers["sdpa per sequence"] = sdpa_loop
    return peers


def bench_varlen(total, lo, hi, hq, hkv, d, device, dtype, engine_impl, timing) -> list[dict]:
    lens = document_lengths(total, lo, hi, seed=total)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(total, h, d, device=device, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq))
    flops_fwd = 4 * sum(n * n for n in lens) / 2 * hq * d
    rows = []
    for name, fn in varlen_peers(lens, hq, hkv, d, device, engine_impl).items():
        if isinstance(fn, str):
            print(f"{name}: {fn}", flush=True)
            continue
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        runs = {
            "fwd": (lambda: fn(q, k, v), flops_fwd),
            "fwd+bwd": (lambda: torch.autograd.grad(fn(*leaves), leaves, dout), 3.5 * flops_fwd),
        }
        for mode, (run, flops) in runs.items():
            try:
                with torch.set_grad_enabled(mode != "fwd"):
                    ms, peak = time_ms(run, **timing), peak_memory_bytes(run)
            except Exception as e:  # a peer that breaks on this torch/GPU must not end the run
                if name == "engine":
                    raise
                print(f"{name} {mode}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append({"bench": "varlen", "impl": name, "mode": mode, "series": f"{name} {mode}", "tokens": total,
                         "documents": len(lens), "ms": ms, "tflops": flops / ms / 1e9,
                         "peak_gib": None if peak is None else peak / 2**30})
            print(table(rows[-1:], ["impl", "mode", "tokens", "documents", "ms", "tflops", "peak_gib"]), flush=True)
    for mode in ("fwd", "fwd+bwd"):
        base = next((r["ms"] for r in rows if r["impl"] == "engine" and r["mode"] == mode), None)
        for r in rows:
            if r["mode"] == mode and base:
                r["ms_over_engine"] = r["ms"] / base
    return rows


def bench_decode(batch, context, hq, hkv, d, device, dtype, engine_impl, timing, block_size=16) -> list[dict]:
    pages = -(-context // block_size)
    g = torch.Generator(device=device).manual_seed(1)
    k_cache = torch.randn(batch * pages, block_size, hkv, d, device=device, dtype=dtype, generator=g)
    v_cache = torch.randn(batch * pages, block_size, hkv, d, device=device, dtype=dtype, generator=g)
    perm = torch.randperm(batch * pages, device=device, generator=g).to(torch.int32)
    block_table = perm.view(batch, pages)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, hq, d, device=device, dtype=dtype, generator=g)

    def gather_sdpa():
        keys = k_cache[block_table.long()].flatten(1, 2)[:, :context].transpose(1, 2)  # [B, Hkv, L, D]
        values = v_cache[block_table.long()].flatten(1, 2)[:, :context].transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]

    runs = {"engine": lambda: paged_attention(q, k_cache, v_cache, block_table, seq_lens, impl=engine_impl),
            "torch gather + sdpa": gather_sdpa}
    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        if device != "cpu" and "block_table" in params and "enable_gqa" in params:
            cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
            cu_k = cu_q * context
            runs["torch varlen_attn (paged)"] = lambda: varlen_attn(
                q, k_cache, v_cache, cu_q, cu_k, 1, context, enable_gqa=True, seqused_k=seq_lens,
                block_table=block_table)
        else:
            print("torch varlen_attn (paged): skipped: needs CUDA and a torch with block_table/enable_gqa")
    except ImportError:
        print(f"torch varlen_attn (paged): skipped: torch {torch.__version__} has no torch.nn.attention.varlen")
    kv_bytes = 2 * batch * context * hkv * d * k_cache.element_size()
    rows = []
    for name, run in runs.items():
        try:
            with torch.no_grad():
                ms, peak = time_ms(run, **timing), peak_memory_bytes(run)
        except Exception as e:
            if name == "engine":
                raise
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        rows.append({"bench": "decode", "impl": name, "series": f"{name} B={batch}", "batch": batch,
                     "context": context, "ms": ms, "gb_s": kv_bytes / ms / 1e6,
                     "peak_gib": None if peak is None else peak / 2**30})
        print(table(rows[-1:], ["impl", "batch", "context", "ms", "gb_s", "peak_gib"]), flush=True)
    base = rows[0]["ms"]
    for r in rows:
        r["ms_over_engine"] = r["ms"] / base
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (or GPU): checks the plumbing only")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="packed tokens per batch (one row each)")
    p.add_argument("--doc-lengths", type=int, nargs=2, default=(64, 2048), metavar=("MIN", "MAX"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench_attention: needs a CUDA GPU (run with --smoke for a tiny CPU plumbing check)")
        return []
    device = "cuda" if cuda else "cpu"
    if args.smoke:
        dtype = torch.bfloat16 if cuda else torch.float32
        hq, hkv, d = 2, 1, 16
        tokens, (lo, hi) = args.tokens or [24], (3, 16)
        decode = [(2, 20)]
        timing = dict(warmup=1, rep=3)
    else:
        dtype, (hq, hkv, d) = torch.bfloat16, (32, 8, 128)
        tokens, (lo, hi) = args.tokens or [4096, 16384], args.doc_lengths
        decode = [(b, n) for b in (1, 16, 64) for n in (1024, 4096, 16384)]
        timing = dict(warmup=25, rep=100)
    # On CPU the Triton kernels only run under the interpreter; otherwise the reference stands in.
    engine_impl = "triton" if cuda or interpreting() else "torch"
    print(f"engine backend: {engine_impl}; Hq={hq} Hkv={hkv} D={d} {dtype}", flush=True)
    varlen_rows = [r for total in tokens for r in bench_varlen(total, lo, hi, hq, hkv, d, device, dtype, engine_impl,
                                                               timing)]
    decode_rows = [r for b, n in decode for r in bench_decode(b, n, hq, hkv, d, device, dtype, engine_impl, timing)]
    meta = {"Hq": hq, "Hkv": hkv, "D": d, "dtype": str(dtype), "doc_lengths": [lo, hi], "engine_impl": engine_impl,
            "flops": "causal: 4*sum(L^2)/2*Hq*D forward, backward 2.5x forward"}
    save("attention", varlen_rows, x="tokens", y="tflops", series="series", ylabel="TFLOP/s (causal)",
         title=f"Packed causal attention, Hq={hq} Hkv={hkv} D={d} ({dtype}), documents of {lo}-{hi}", meta=meta)
    save("attention_decode", decode_rows, x="context", y="gb_s", series="series", ylabel="K/V GB/s",
         title=f"Paged decode attention, Hq={hq} Hkv={hkv} D={d} ({dtype}), block 16", meta=meta)
    print(table(varlen_rows, ["impl", "mode", "tokens", "ms", "tflops", "peak_gib", "ms_over_engine"]))
    print(table(decode_rows, ["impl", "batch", "context", "ms", "gb_s", "ms_over_engine"]))
    return varlen_rows + decode_rows


if __name__ == "__main__":
    main()
