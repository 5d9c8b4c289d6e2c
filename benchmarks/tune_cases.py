"""The sweep of ``benchmarks/tune.py``: one :class:`Case` per (kernel, shape class) at the
target shapes of issue 16 (item 1), in priority order within each family, each with its
kernel module's candidate list and a ``setup`` that builds, on the GPU, the inputs, the
float32/float64 truth and the check bounds (see tune.py).

Target shapes: LoRA x [8192, 4096] to 4096 and 14336 at padded ranks 16, 64, 32 (rank 8
pads to 16), with and without dropout; varlen attention over 32768 packed tokens (six
sequences of 4096, three of 2048, two of 1024), Hq 32, Hkv 8, d 128 and 64, causal;
cross-entropy N 16384, H 4096, V 128256 and 151936, plain and with entropy (one chunk of
logits, the unit each launch works on, so the GEMM that writes it is not in the timing);
paged decode at batch 32 x context 8192 and batch 1 x context 131072 (blocks of 16, tables
as wide as the longest context, as CUDA graphs pad them); fused ops over 4096 rows at
hidden 2048, 4096, 8192.
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from kernels import lowrank_gemm, lora_triton, varlen_attention_triton
from kernels import fused_ops as fused
from kernels import linear_logprobs_triton as ce
from kernels.triton_base import dot_block

paged = importlib.import_module("kernels.paged_attention")  # the package's name is bound to the op

@dataclass(frozen=True)
class Shapes:
    """The target shapes of the sweep (GPU), or tiny ones for a CPU smoke run (SMOKE)."""
    device: str = "cuda"
    dtype: torch.dtype = torch.bfloat16
    lora_rows: int = 8192
    lora_features: tuple = ((4096, 4096), (4096, 14336))  # (in, out)
    lora_ranks: tuple = (16, 64, 32)  # rank 8 pads to 16
    attn_lengths: tuple = (4096,) * 6 + (2048,) * 3 + (1024,) * 2  # 32768 tokens
    heads: tuple = (32, 8)  # Hq, Hkv
    head_dims: tuple = (128, 64)
    ce: tuple = (16384, 4096, (151936, 128256))  # N, H, vocabularies
    decode: tuple = ((32, 8192), (1, 131072))  # (batch, context)
    rows: int = 4096  # rows of the fused ops
    fused: tuple = (("rms_norm", (4096, 2048, 8192)), ("silu_mul", (14336, 8192)), ("rope", (128, 64)))


# float32: the interpreter's bf16 tl.dot is wrong (paged attention gives ~1e9 in bf16 on CPU,
# on main too; triton_base.dot has the workaround the attention kernels do not use).
SMOKE = Shapes(device="cpu", dtype=torch.float32, lora_rows=40, lora_features=((48, 40), (48, 72)), lora_ranks=(16, 64),
               attn_lengths=(33, 16, 1), heads=(4, 2), head_dims=(64,), ce=(64, 32, (300,)), decode=((3, 64), (1, 128)),
               rows=8, fused=(("rms_norm", (40,)), ("silu_mul", (24,)), ("rope", (64,))))


@dataclass
class Case:
    kernel: str
    shape_class: str
    shape: str  # the target shapes, for the plan
    candidates: list
    setup: Callable[[], list] = field(repr=False)  # GPU: [(run, truth, bounds)] per target shape
    also_forced: dict = field(default_factory=dict)  # other kernels pinned while this one is swept


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; inf for NaN (an unwritten, poisoned element)."""
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def bounds(ref, truth, atol: float | None = None) -> list[float]:
    """2x the torch reference's own error (in the working dtype) plus ``atol``, per output
    (default: 1e-2 for bf16/fp16 references, 1e-4 for float32)."""
    if atol is None:
        atol = 1e-2 if ref[0].dtype in (torch.bfloat16, torch.float16) else 1e-4
    return [2 * rel_err(r, t) + atol for r, t in zip(ref, truth)]


def _gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------
# LoRA: the scheme of the base GEMMs (lora.gemm) and the rank-r kernels' blocks


@functools.lru_cache(maxsize=1)
def _lora_data(dev: str, dt: torch.dtype, n: int, k: int, m: int, r: int, p: float) -> dict:
    g, scale, seed = _gen(dev, 0), 2.0, 1234
    x32 = torch.randn(n, k, device=dev, generator=g)
    w32 = torch.randn(m, k, device=dev, generator=g) * k**-0.5
    a32 = torch.randn(r, k, device=dev, generator=g) * k**-0.5
    b32 = torch.randn(m, r, device=dev, generator=g) * 0.1
    dy32 = torch.randn(n, m, device=dev, generator=g)
    from kernels import lora_dropout_mask

    keep = lora_dropout_mask((n, k), p, seed, device=dev, impl="triton") if p else None

    def formula(dtype):  # the torch formula under the Triton mask: y, dx, dA, dB
        x, a, b = (t.to(dtype).requires_grad_() for t in (x32, a32, b32))
        xd = x * keep / (1 - p) if p else x
        y = x @ w32.to(dtype).t() + scale * (xd @ a.t()) @ b.t()
        return (y.detach(), *torch.autograd.grad(y, (x, a, b), dy32.to(dtype)))

    truth, ref = formula(torch.float32), formula(dt)
    x, a, b = (t.to(dt).requires_grad_() for t in (x32, a32, b32))
    w, dy = w32.to(dt), dy32.to(dt)
    from kernels import lora_linear

    def fwd():
        with torch.no_grad():
            return (lora_linear(x, w, a, b, scale, dropout=p, dropout_seed=seed, impl="triton"),)

    y = lora_linear(x, w, a, b, scale, dropout=p, dropout_seed=seed, impl="triton")
    return dict(fwd=(fwd, truth[:1], bounds(ref[:1], truth[:1])),
                bwd=(lambda: torch.autograd.grad(y, (x, a, b), dy, retain_graph=True), truth[1:],
                     bounds(ref[1:], truth[1:])))


def lora_cases(s: Shapes) -> list[Case]:
    gemm, blocks, n = [], [], s.lora_rows
    for r in s.lora_ranks:
        for k, m in s.lora_features:
            for kind, p in (("fwd", 0.0), ("dx", 0.0), ("dx", 0.1)):
                cls = (lowrank_gemm.shape_class("fwd", n, m, k, dot_block(r), s.dtype, (False,), True)
                       if kind == "fwd" else
                       lowrank_gemm.shape_class("dx", n, k, m, dot_block(r), s.dtype, (p > 0,), True))
                setup = functools.partial(lambda *a, kind=kind: [_lora_data(*a)[kind if kind == "fwd" else "bwd"]],
                                          s.device, s.dtype, n, k, m, r, p)
                gemm.append(Case("lora.gemm", cls, f"x [{n}, {k}] -> {m}, rank {r}, dropout {p}",
                                 lowrank_gemm.candidates(True), setup))
    for r in s.lora_ranks[:2]:
        k, m = s.lora_features[0]
        for kind in ("shrink", "expand", "dy", "dx"):
            if kind == "dy" and dot_block(r) > lora_triton.FUSED_DY_MAX_RANK:
                continue  # the dy pass is cuBLAS above that rank
            part = "fwd" if kind in ("shrink", "expand") else "bwd"
            setup = functools.partial(lambda *a, part=part: [_lora_data(*a)[part]], s.device, s.dtype, n, k, m, r,
                                      0.0)
            blocks.append(Case(f"lora.{kind}", lowrank_gemm.block_class(dot_block(r), s.dtype, False),
                               f"x [{n}, {k}] -> {m}, rank {r}, cuBLAS scheme",
                               lora_triton.block_candidates(kind, dot_block(r), False), setup,
                               also_forced={"lora.gemm": "cublas"}))
    return gemm + blocks


# ---------------------------------------------------------------------------------------
# varlen attention


@functools.lru_cache(maxsize=1)
def _attention_data(s: Shapes, d: int) -> dict:
    from kernels import varlen_attention

    g, lengths, (hq, hkv), dev = _gen(s.device, 1), s.attn_lengths, s.heads, s.device
    total, longest, scale = sum(lengths), max(lengths), d**-0.5
    q32, dout32 = (torch.randn(total, hq, d, device=dev, generator=g) for _ in range(2))
    k32, v32 = (torch.randn(total, hkv, d, device=dev, generator=g) for _ in range(2))
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    def reference(dtype):  # one sequence at a time: the float32 scores of all would not fit
        parts = []
        for s, e in zip(starts[:-1], starts[1:]):
            q, k, v = (t[s:e].to(dtype).requires_grad_() for t in (q32, k32, v32))
            cu = torch.tensor([0, e - s], dtype=torch.int32, device=dev)
            out = varlen_attention(q, k, v, cu, cu, e - s, e - s, softmax_scale=scale, impl="torch")
            parts.append((out.detach(), *torch.autograd.grad(out, (q, k, v), dout32[s:e].to(dtype))))
        return [torch.cat(p) for p in zip(*parts)]

    truth, ref = reference(torch.float32), reference(s.dtype)
    bnd = bounds(ref, truth)
    cu = torch.tensor(starts, dtype=torch.int32, device=dev)
    q, k, v = (t.to(s.dtype).requires_grad_() for t in (q32, k32, v32))
    dout = dout32.to(s.dtype)

    def attend():
        return varlen_attention(q, k, v, cu, cu, longest, longest, softmax_scale=scale, impl="triton")

    def fwd():
        with torch.no_grad():
            return (attend(),)

    out = attend()
    return dict(fwd=(fwd, truth[:1], bnd[:1]),
                bwd=(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), truth[1:], bnd[1:]))


def attention_cases(s: Shapes) -> list[Case]:
    cases, lengths = [], s.attn_lengths
    for d in s.head_dims:
        for kind in ("fwd", "dkdv", "dq"):
            part = "fwd" if kind == "fwd" else "bwd"
            cases.append(Case(f"varlen_attention.{kind}", varlen_attention_triton.shape_class(d, s.dtype, True),
                              f"{sum(lengths)} packed tokens in {len(lengths)} sequences, Hq, Hkv {s.heads}",
                              varlen_attention_triton.candidates(kind, d, s.dtype),
                              functools.partial(lambda d, part: [_attention_data(s, d)[part]], d, part)))
    return cases


# ---------------------------------------------------------------------------------------
# cross-entropy statistics and gradient kernels (one chunk of logits)


def _ce_setup(s: Shapes, v: int, entropy: bool, kernel: str) -> list:
    # _Problem is the launchers' own unit of work: timing it leaves out the logits GEMM,
    # which is the same for every candidate and would drown the differences.
    from kernels.linear_logprobs_triton import _Problem

    (n, h, _), dev = s.ce, s.device
    g = _gen(dev, 2)
    x = torch.randn(n, h, device=dev, generator=g).to(s.dtype)
    w = (torch.randn(v, h, device=dev, generator=g) * h**-0.5).to(s.dtype)
    t = torch.randint(0, v, (n,), device=dev, generator=g)
    opts = ce.Options(want_entropy=entropy)
    base = _Problem(x, w, None, t, opts)
    z = base.logits(0, base.rows).clone()
    c = z.shape[0]
    zd, tc = z.double(), t[:c]
    lse = torch.logsumexp(zd, -1)
    p = torch.exp(zd - lse[:, None])
    if kernel == "stats":
        truth = [lse, zd.gather(1, tc[:, None])[:, 0] - lse] + ([(p * zd).sum(-1)] if entropy else [])

        def run():
            out = _Problem(x, w, None, t, opts).stats(z, 0, c)
            return [out["lse"], out["logprob"]] + ([out["expected"]] if entropy else [])

        return [(run, truth, [1e-4] * len(truth))]  # float32 arithmetic on the same logits
    a, k, cc = (torch.randn(c, device=dev, generator=g) for _ in range(3))
    grad = p * (k[:, None] - cc[:, None] * zd) if entropy else p * k[:, None]
    grad.scatter_add_(1, tc[:, None], a.double()[:, None])
    lse32 = lse.float()

    def run():
        zz = z.clone()
        _Problem(x, w, None, t, opts).grad_logits(zz, 0, c, lse32, a, k, cc if entropy else None)
        return [zz]

    return [(run, [grad], bounds([grad.to(s.dtype)], [grad], 1e-4))]


def ce_cases(s: Shapes) -> list[Case]:
    cases, (n, h, vocabs) = [], s.ce
    for v in vocabs:
        for entropy in (False, True):
            cls = ce.shape_class(v, s.dtype, ce.Options(want_entropy=entropy), False)
            for kernel in ("stats", "grad"):
                cases.append(Case(f"linear_logprobs.{kernel}", cls, f"one chunk of N {n} x V {v}, H {h}",
                                  ce.candidates(kernel, v), functools.partial(_ce_setup, s, v, entropy, kernel)))
    return cases


# ---------------------------------------------------------------------------------------
# paged decode


def _paged_setup(s: Shapes, d: int) -> list:
    from kernels import paged_attention as attend

    probes, block, (hq, hkv), dev = [], 16, s.heads, s.device
    for batch, context in s.decode:
        g = _gen(dev, 3)
        width = context // block
        kc, vc = (torch.randn(batch * width + 8, block, hkv, d, device=dev, generator=g).to(s.dtype) for _ in range(2))
        table = torch.randperm(batch * width + 8, device=dev, generator=g)[:batch * width].view(batch, width).int()
        lens = torch.randint(context // 2, context + 1, (batch,), device=dev, generator=g).int()
        lens[-1] = context
        q = torch.randn(batch, hq, d, device=dev, generator=g).to(s.dtype)
        truth = [attend(q.float(), kc.float(), vc.float(), table, lens, impl="torch")]
        ref = [attend(q, kc, vc, table, lens, impl="torch")]
        probes.append((functools.partial(lambda *a: [attend(*a, impl="triton")], q, kc, vc, table, lens), truth,
                       bounds(ref, truth)))
    return probes


def paged_cases(s: Shapes) -> list[Case]:
    return [Case("paged_attention.decode", paged.decode_shape_class(d, s.dtype, s.heads[0] // s.heads[1]),
                 ", ".join(f"batch {b} x context {c}" for b, c in s.decode), paged.decode_candidates(d, s.dtype),
                 functools.partial(_paged_setup, s, d)) for d in s.head_dims]


# ---------------------------------------------------------------------------------------
# fused ops


def _fused_setup(s: Shapes, op: str, size: int) -> list:
    rows, dev, (hq, hkv) = s.rows, s.device, s.heads
    g = _gen(dev, 4)
    if op == "rms_norm":
        x, res = (torch.randn(rows, size, device=dev, generator=g) for _ in range(2))
        w = torch.randn(size, device=dev, generator=g)
        args = (lambda dt: (x.to(dt), w.to(dt), 1e-6), lambda dt: dict(residual=res.to(dt)))
        fn = fused.rms_norm
    elif op == "silu_mul":
        gu = torch.randn(rows, 2 * size, device=dev, generator=g)
        args, fn = (lambda dt: (gu.to(dt),), lambda dt: {}), fused.silu_mul
    else:
        q, k = (torch.randn(rows, heads, size, device=dev, generator=g) for heads in (hq, hkv))
        ang = torch.rand(rows, 1, size, device=dev, generator=g) * 6.28
        args = (lambda dt: (q.to(dt), k.to(dt), ang.cos().to(dt), ang.sin().to(dt)), lambda dt: {})
        fn = fused.rope

    def call(dt, impl):
        out = fn(*args[0](dt), **args[1](dt), impl=impl)
        return list(out) if isinstance(out, tuple) else [out]

    truth, ref = call(torch.float32, "torch"), call(s.dtype, "torch")
    return [(lambda: call(s.dtype, "triton"), truth, bounds(ref, truth))]


def fused_cases(s: Shapes) -> list[Case]:
    cases = []
    for op, sizes in s.fused:
        for size in sizes:
            cases.append(Case(f"fused_ops.{op}", fused.shape_class(size, s.dtype), f"{s.rows} rows of {size}",
                              list(fused.WARPS[op]), functools.partial(_fused_setup, s, op, size)))
    return cases


def release() -> None:
    """Drop the cached inputs and truths of the last LoRA and attention classes."""
    _lora_data.cache_clear()
    _attention_data.cache_clear()


def cases(s: Shapes = Shapes()) -> list[Case]:
    """Every case at shapes ``s``, family by family in tune.py's priority order."""
    return lora_cases(s) + attention_cases(s) + ce_cases(s) + paged_cases(s) + fused_cases(s)
