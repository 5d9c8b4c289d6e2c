"""The shared Triton base of every kernel family in this package (DESIGN.md: "Helpers
shared by kernel families live in the shared Triton base module").

Host side: the optional import of triton (a stub when it is missing, so that every module
imports and the torch backends run), whether kernels run under the interpreter, the
``tl.dot`` precision for a dtype, tile-size and SM-count helpers, the poisoned allocation
that tests use to catch unwritten elements, and the unit-last-stride rule.

Device side (``@triton.jit`` helpers, inlined by the compiler): tanh, ``dot`` / ``cast``
with their interpreter workarounds, the Philox dropout keep-mask and its application, the
range of a split loop and a masked row tile, and the attention scores and online-softmax
step that varlen and paged attention both run. Host side also: the fixed-order sum of
per-split partials that keeps split reductions deterministic.
"""
from __future__ import annotations

import functools
import os
import types
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # triton ships for Linux only; the torch backends still work without it
    HAVE_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn, heuristics=lambda values: (lambda fn: fn))
    tl = types.SimpleNamespace(constexpr=lambda value: value)

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
POISON = False  # tests: `empty` fills every buffer with NaN, so an element no kernel writes shows up
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


class StandInGPU(NamedTuple):
    """The GPU kernels.launch_check compiles for: its name (as torch.cuda.get_device_name
    gives it: the config table read) and SM count."""
    name: str
    sms: int


# kernels.launch_check sets this: launchers then take CPU tensors as that GPU's (the device
# gates pass them, every launch heuristic takes its GPU branch, the config tables are that
# GPU's) and each launch only compiles. None everywhere else.
COMPILE_ONLY: StandInGPU | None = None


# ---------------------------------------------------------------------------------------
# host side


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (CPU tensors, for tests).
    TRITON_INTERPRET must be set before triton is imported for the kernels to be built so."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_branch(device: torch.device) -> bool:
    """Whether launch heuristics take their GPU branch for tensors on ``device``: CUDA
    tensors, or any tensor while kernels.launch_check compiles (``COMPILE_ONLY``)."""
    return device.type == "cuda" or COMPILE_ONLY is not None


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` on inputs of ``dtype``: float32 inputs get true
    float32 products ("ieee", torch's matmul default), not TF32 (the model's float32 checks
    hold attention to 1e-4); bf16 and fp16 inputs ignore the setting (tensor cores,
    float32 accumulation)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_mode(dtype: torch.dtype) -> str:
    """The ``PREC`` argument of :func:`dot` and :func:`cast`: :func:`dot_precision`, or
    "upcast" under the interpreter (see those helpers for the interpreter's defects)."""
    return "upcast" if interpreting() else dot_precision(dtype)


def dot_block(n: int) -> int:
    """A tile dimension covering ``n``: a power of two, at least 16 (tl.dot needs every
    dimension >= 16)."""
    return max(16, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one when it has no index), or
    of the GPU that kernels.launch_check compiles for."""
    if COMPILE_ONLY is not None:
        return COMPILE_ONLY.sms
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, NaN-filled when ``POISON`` is set (tests)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last stride is 1 (kernels take any row stride), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def fixed_order_sum(parts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """parts [splits, ...] (float32 partial sums, one slice per split of a reduction)
    summed over the split dimension by torch's reduction, whose order is fixed by the shape
    (no atomics): the same bits on every run, where float atomics would add in arrival
    order. One split is returned as it is (a view) unless ``out`` is given."""
    if parts.shape[0] == 1 and out is None:
        return parts[0]
    return torch.sum(parts, 0, out=out)


# ---------------------------------------------------------------------------------------
# device side


@triton.jit
def tanh(x):
    # tl.tanh is not in every triton.language we support; exp2 of a non-positive argument
    # never overflows.
    e = tl.exp2(tl.abs(x) * (-2.0 * 1.4426950408889634))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in float32. PREC "upcast" (interpreter only): Triton 3.9's interpreter
    gets bf16 tl.dot wrong (errors of 1e10); the float32 product of bf16 values is exact."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def cast(x, dtype: tl.constexpr, PREC: tl.constexpr):
    """x.to(dtype) rounding to nearest even. PREC "upcast" (interpreter only): Triton 3.9's
    interpreter truncates float32 -> bf16, doubling the rounding error; round by hand first."""
    if PREC == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def dropout_keep(seed, p, rows, k0, BLOCK_K: tl.constexpr):
    """Dropout keep-mask of the tile rows x [k0, k0 + BLOCK_K) (k0 a multiple of 4): element
    (row, col) keeps when u >= p, u the (col % 4)-th of the four 24-bit uniforms that
    Philox-4x32-10 draws for the counter (col // 4, row, 0, 0): one call per 4 elements,
    32-bit counter words (rows and column quads below 2^32), no 64-bit index arithmetic."""
    return keep_from_bits(dropout_bits(seed, p, rows, k0, BLOCK_K), BLOCK_K)


@triton.jit
def dropout_bits(seed, p, rows, k0, BLOCK_K: tl.constexpr):
    """The keep-mask of :func:`dropout_keep` packed: int32 [rows, BLOCK_K // 4], bit j of
    quad q keeping column k0 + 4q + j. One register per four mask elements: a kernel that
    draws the mask early holds this, and expands it (:func:`keep_from_bits`) where used."""
    quads = (k0 // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)[None, :]
    row = rows.to(tl.uint32)[:, None]
    zero = quads * row * 0
    r0, r1, r2, r3 = tl.philox(seed, quads + zero, row + zero, zero, zero)
    return _keep_bit(r0, p) | (_keep_bit(r1, p) << 1) | (_keep_bit(r2, p) << 2) | (_keep_bit(r3, p) << 3)


@triton.jit
def keep_from_bits(bits, BLOCK_K: tl.constexpr):
    """bool [rows, BLOCK_K] from :func:`dropout_bits`: interleaving copies each quad's
    register to its four columns, where each picks its own bit."""
    spread = tl.interleave(tl.interleave(bits, bits), tl.interleave(bits, bits))
    return ((spread >> (tl.arange(0, BLOCK_K) % 4)[None, :]) & 1) != 0


@triton.jit
def _keep_bit(r, p):
    """1 where the 24-bit uniform of the Philox output r is >= p (kept), else 0 (int32)."""
    return ((r >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p).to(tl.int32)


@triton.jit
def dropout_apply(x, keep, inv_keep, PREC: tl.constexpr):
    """x * keep / (1 - p) (inv_keep = 1 / (1 - p)) in x's dtype."""
    return cast(tl.where(keep, x.to(tl.float32) * inv_keep, 0.0), x.dtype, PREC)


@triton.jit
def split_range(per_split, total, AXIS: tl.constexpr):
    """[start, end) of this program's split (grid axis AXIS) of a loop over ``total`` elements."""
    start = tl.program_id(AXIS) * per_split
    return start, tl.minimum(start + per_split, total)


@triton.jit
def row_tile(row_ptrs, row_ok, c0, end, BLOCK: tl.constexpr):
    """Columns c0 + [0, BLOCK) of a block of rows (row_ptrs [rows, 1]): (the columns, the
    mask of those < end, the tile, zero outside)."""
    cols = c0 + tl.arange(0, BLOCK)
    ok = cols < end
    return cols, ok, tl.load(row_ptrs + cols[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)


@triton.jit
def attention_scores(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Attention scores in log2 units from the raw Q K^T, and tanh(.) of the softcap (for
    the backward's dS; the raw qk without softcap)."""
    if HAS_SOFTCAP:
        t = tanh(qk * (sm_scale / softcap))
        s = t * (softcap * LOG2E)
    else:
        t = qk
        s = qk * (sm_scale * LOG2E)
    return s, t


@triton.jit
def online_softmax_step(acc, l_i, m_i, s, v, PREC: tl.constexpr):
    """One key block of the online softmax: fold scores s [rows, keys] (log2 units, -inf
    where masked) and values v [keys, D] into the running output acc, sum l_i and max m_i."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    # cast() only under the interpreter (its truncation to bf16 would double P's rounding
    # error); on the GPU the plain .to(), as the constexpr test drops the call: the inlined
    # call's debug labels alone cost the bf16 forward a register (kernels.launch_check).
    # One expression, in this order, so the GPU's IR is op for op what it was before.
    acc = acc * alpha[:, None] + dot(cast(p, v.dtype, PREC) if PREC == "upcast" else p.to(v.dtype), v, None, PREC)
    return acc, l_i, m_new
