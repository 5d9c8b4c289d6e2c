"""The launches ``kernels.launch_check`` compiles: each op's public entry point (forward and
backward) at the issue's target shapes, on tensors that carry the target's specialisation.

A launch's specialisation is made of its tensors' dtypes and 16-byte alignment, its integer
arguments' widths (i32 or i64), their divisibility by 16 and whether they equal 1, and its
constexprs (tiles, flags, warps, stages) chosen from shapes. Tensors are CPU tensors where
the host work is cheap (their slices keep the alignment a GPU allocation gives), meta
tensors where a real size would cost host matmuls (LoRA); sizes the kernels never see are
cut down. How each target is reached:

* cross_entropy: N 16384, H 2048/4096, V 128256/151936. The kernels see V (the row stride,
  the vocab, BLOCK_V 2048 / 4096 for both), vocab_start and row slices of [N] vectors; N
  and H only set the grid and the chunk starts (multiples of 64 rows, so slices stay
  16-byte aligned). Run with N = 64, H = 16 and the real V, bf16 and fp32, forward and
  backward: plain, entropy, softcap, bias, all three, label smoothing (the sum), label
  smoothing with softcap and bias, and a token loss of every statistic.
* attention: 32768 packed tokens in 4 sequences, Hq 32, Hkv 8, d 64 and 128: causal plain,
  with window 4096, with softcap 50, and not causal; bf16 forward and backward, fp32 (d
  128, causal), and 32749 tokens (a count not divisible by 16: another specialisation).
  Real sizes (empty tensors: their pages are never touched).
* paged_attention: contexts to 131072 in blocks of 16 with the block table the CUDA graphs
  use ([128, 8192] static, sliced to the batch), batch 1, 32 and 128 (split-K with the
  combine at 33 and 2 splits; one split at 128), an eager batch of 1 at context 4096 (16
  splits), window 4096 with softcap 50 at batch 32, d 64 and 128, bf16, fp32 at d 128;
  and append_kv. The cache holds 64 blocks: its strides do not depend on the count.
* lora (meta tensors): x 8192 x 4096 into 4096 and 14336, ranks 8, 16, 32, 64, dropout 0
  and 0.1, forward and backward (its dy pass included), bf16, and fp32 at rank 16; 8191
  rows (not divisible by 16) at rank 16; the fused GEMM in every config of
  lowrank_gemm.CONFIGS with and without dropout at rank 16; lora_linear_multi decode (1, 8 and 32 rows: one-token row blocks) and prefill (2048
  rows). Meta tensors have address 0, 16-byte aligned as every GPU allocation is. Off a
  CUDA device lora_triton splits its loops for 4 programs, not 2 per SM: the split lengths
  stay multiples of the tile (divisible by 16), so the specialisation holds. The fused
  GEMM launches only where a tuned table picks it: each config is forced in turn.
* fused_ops: rms_norm at hidden 2048, 4096, 5120, 8192 with and without the residual;
  rope of 32 query and 8 key heads of a packed qkv at d 64 and 128, with and without the
  q/k norm; silu_mul at intermediate 8192 and 14336; bf16, fp16 and fp32.
"""
from __future__ import annotations

import torch

from . import configs, lowrank_gemm
from .fused_ops import rms_norm, rope, silu_mul
from .linear_logprobs import linear_cross_entropy, linear_logprobs, linear_token_loss
from .lora import lora_linear, lora_linear_multi
from .paged_attention import append_kv, paged_attention
from .varlen_attention import varlen_attention

WINDOW, SOFTCAP = 4096, 50.0


def attempt(name: str, fn) -> list[str]:
    """Run one scenario; an error after the (compile-only) launches is a note, not a failure:
    the kernels wrote nothing, so later host code may trip on the garbage."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return [f"{name}: stopped after the launches above ({type(e).__name__}: {str(e)[:160]})"]
    return []


def _every_statistic(stats):
    """A token-local loss of every statistic (its gradient reaches each one)."""
    return stats.lse - stats.logprob - 0.1 * stats.entropy + 1e-3 * stats.sum


def cross_entropy() -> list[str]:
    notes = []
    variants = [("logprobs", {}), ("entropy", dict(return_entropy=True)), ("softcap", dict(softcap=30.0)),
                ("bias", dict(bias=True)), ("entropy+softcap+bias", dict(return_entropy=True, softcap=30.0, bias=True)),
                ("smoothing", dict(label_smoothing=0.1)),
                ("smoothing+softcap+bias", dict(label_smoothing=0.1, softcap=30.0, bias=True)),
                ("token loss, every statistic", dict(with_entropy=True, with_sum=True, softcap=30.0, bias=True))]
    for dtype in (torch.bfloat16, torch.float32):
        for vocab in (128256, 151936):
            for name, kw in variants:
                x = torch.randn(64, 16, dtype=dtype, requires_grad=True)
                w = torch.randn(vocab, 16, dtype=dtype, requires_grad=True)
                t = torch.randint(0, vocab, (64,))
                kw = dict(kw, bias=torch.randn(vocab, dtype=dtype, requires_grad=True) if kw.get("bias") else None)

                def run(x=x, w=w, t=t, kw=kw):
                    if "label_smoothing" in kw:
                        linear_cross_entropy(x, w, t, impl="triton", **kw).backward()
                    elif "with_sum" in kw:
                        linear_token_loss(x, w, t, _every_statistic, impl="triton", **kw).backward()
                    else:
                        out = linear_logprobs(x, w, t, impl="triton", **kw)
                        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
                notes += attempt(f"cross_entropy {name} {dtype} V={vocab}", run)
    return notes


def attention() -> list[str]:
    notes = []
    tokens, hq, hkv = 32768, 32, 8
    cases = [(torch.bfloat16, d, True, w, s, tokens) for d in (64, 128)
             for w, s in ((None, None), (WINDOW, None), (None, SOFTCAP))]
    cases += [(torch.bfloat16, d, False, None, None, tokens) for d in (64, 128)]
    cases += [(torch.float32, 128, True, None, None, tokens), (torch.bfloat16, 128, True, None, None, tokens - 19)]
    for dtype, d, causal, window, softcap, total in cases:
        cu = torch.tensor([0, 4096, 12288, 20480, total], dtype=torch.int32)
        q = torch.empty(total, hq, d, dtype=dtype, requires_grad=True)
        k = torch.empty(total, hkv, d, dtype=dtype, requires_grad=True)
        v = torch.empty(total, hkv, d, dtype=dtype, requires_grad=True)

        def run(q=q, k=k, v=v, cu=cu, causal=causal, window=window, softcap=softcap):
            out = varlen_attention(q, k, v, cu, cu, 8192, 8192, causal=causal, window=window, softcap=softcap,
                                   impl="triton")
            out.backward(torch.empty_like(out))
        notes += attempt(f"varlen {dtype} d={d} causal={causal} window={window} softcap={softcap} T={total}", run)
    return notes


def paged() -> list[str]:
    notes = []
    hq, hkv, block_size = 32, 8, 16
    static_table = torch.zeros(128, 131072 // block_size, dtype=torch.int32)  # as engine/infer/cuda_graphs pads it
    cases = [(torch.bfloat16, d, b, static_table[:b], None, None) for d in (64, 128) for b in (1, 32, 128)]
    cases += [(torch.bfloat16, d, 1, torch.zeros(1, 4096 // block_size, dtype=torch.int32), None, None)
              for d in (64, 128)]
    cases += [(torch.bfloat16, d, 32, static_table[:32], WINDOW, SOFTCAP) for d in (64, 128)]
    cases += [(torch.float32, 128, b, static_table[:b], None, None) for b in (1, 128)]
    for dtype, d, batch, table, window, softcap in cases:
        kc = torch.empty(64, block_size, hkv, d, dtype=dtype)
        vc = torch.empty(64, block_size, hkv, d, dtype=dtype)
        q = torch.empty(batch, hq, d, dtype=dtype)
        lens = torch.full((batch,), table.shape[1] * block_size, dtype=torch.int32)
        notes += attempt(f"paged {dtype} d={d} batch={batch}", lambda: paged_attention(
            q, kc, vc, table, lens, window=window, softcap=softcap, impl="triton"))
        new = torch.empty(batch, hkv, d, dtype=dtype)
        notes += attempt(f"append_kv {dtype} d={d}", lambda: append_kv(
            kc, vc, new, new, torch.zeros(batch, dtype=torch.int64), impl="triton"))
    return notes


def _lora_step(dtype, rank, out_features, dropout, bias=False, rows=8192) -> None:
    meta = dict(dtype=dtype, device="meta")
    x = torch.empty(rows, 4096, requires_grad=True, **meta)
    a = torch.empty(rank, 4096, requires_grad=True, **meta)
    b = torch.empty(out_features, rank, requires_grad=True, **meta)
    y = lora_linear(x, torch.empty(out_features, 4096, **meta), a, b, 2.0,
                    bias=torch.empty(out_features, **meta) if bias else None, dropout=dropout, impl="triton")
    y.backward(torch.empty_like(y))


def lora() -> list[str]:
    notes = []
    for dtype, ranks in ((torch.bfloat16, (8, 16, 32, 64)), (torch.float32, (16,))):
        for rank in ranks:
            for out_features in (4096, 14336):
                for dropout in (0.0, 0.1):
                    notes += attempt(f"lora {dtype} r={rank} out={out_features} p={dropout}",
                                     lambda: _lora_step(dtype, rank, out_features, dropout))
    notes += attempt("lora 8191 rows", lambda: _lora_step(torch.bfloat16, 16, 14336, 0.0, rows=8191))
    for config in lowrank_gemm.CONFIGS:  # the fused candidates a tuned table may pick
        with configs.forced({"lora.gemm": config}):
            for dropout, bias in ((0.0, True), (0.1, False)):
                notes += attempt(f"lora fused {config} p={dropout}",
                                 lambda: _lora_step(torch.bfloat16, 16, 14336, dropout, bias))
    meta = dict(dtype=torch.bfloat16, device="meta")
    for rows in (1, 8, 32, 2048):
        ids = torch.empty(rows, dtype=torch.int32, device="meta")
        notes += attempt(f"lora_multi rows={rows}", lambda: lora_linear_multi(
            torch.empty(rows, 4096, **meta), torch.empty(14336, 4096, **meta), torch.empty(4, 16, 4096, **meta),
            torch.empty(4, 14336, 16, **meta), torch.empty(4, dtype=torch.float32, device="meta"), ids,
            impl="triton"))
    return notes


def fused_ops() -> list[str]:
    notes = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for hidden in (2048, 4096, 5120, 8192):
            x = torch.randn(4, hidden, dtype=dtype)
            w = torch.ones(hidden, dtype=dtype)
            notes += attempt(f"rms_norm {dtype} {hidden}", lambda: rms_norm(x, w, 1e-5, impl="triton"))
            notes += attempt(f"rms_norm+res {dtype} {hidden}",
                             lambda: rms_norm(x, w, 1e-5, residual=x.clone(), impl="triton"))
        for d in (64, 128):
            qkv = torch.randn(4, 48 * d, dtype=dtype)
            q, k = qkv[:, :32 * d].view(4, 32, d), qkv[:, 32 * d:40 * d].view(4, 8, d)
            cos, sin = torch.randn(4, 1, d, dtype=dtype), torch.randn(4, 1, d, dtype=dtype)
            norm = torch.ones(d, dtype=dtype)
            notes += attempt(f"rope {dtype} d={d}", lambda: rope(q, k, cos, sin, impl="triton"))
            notes += attempt(f"rope+norm {dtype} d={d}",
                             lambda: rope(q, k, cos, sin, q_weight=norm, k_weight=norm, impl="triton"))
        for inter in (8192, 14336):
            notes += attempt(f"silu_mul {dtype} {inter}",
                             lambda: silu_mul(torch.randn(4, 2 * inter, dtype=dtype), impl="triton"))
    return notes


# Relative compile cost of each family (lora ~ 2 minutes on 2 cores without the cache): the
# check starts the costliest first.
COST = {"lora": 4, "attention": 3, "cross_entropy": 1, "paged_attention": 1, "fused_ops": 1}
FAMILIES = {"cross_entropy": cross_entropy, "attention": attention, "paged_attention": paged, "lora": lora,
            "fused_ops": fused_ops}
