"""LoRA projections: ``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T``.

This module holds the public ops, their argument checks, the autograd Function of the
Triton backend and the torch reference backend (``impl="torch"``), which defines the
semantics; the Triton kernels and launchers are in ``lora_triton.py`` and ``lowrank_gemm.py``.

Adapter layout (PEFT's, with no transposes): ``lora_a`` [r, in] is PEFT's
``lora_A.weight``, ``lora_b`` [out, r] is ``lora_B.weight`` and ``scale`` is PEFT's
``scaling``: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``). Several
adapters for :func:`lora_linear_multi` are stacked on a leading axis, ranks zero-padded to
the largest: rows of ``lora_a`` and columns of ``lora_b`` beyond an adapter's own rank must
be zero (:func:`pack_lora_adapters` builds the stacks).

Dropout (``dropout > 0``, training): PEFT's ``lora_dropout``, applied to the input of the
adapter only, never to the base projection: ``dropout(x) = x * keep / (1 - p)`` with
``keep ~ Bernoulli(1 - p)`` per element. The mask is a pure function of
``(dropout_seed, x's shape, backend)``: the Triton backend draws it with ``tl.rand`` inside
its kernels and never stores it, the torch backend with a seeded ``torch.Generator``. The
two backends draw different masks for the same seed; :func:`lora_dropout_mask` regenerates
the mask either one used, which is how tests check dropout exactly. Without an explicit
seed one is drawn from torch's default CPU generator (a host draw, no device sync), so
``torch.manual_seed`` makes a run reproducible and activation checkpointing (which restores
the RNG state) recomputes the same mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import resolve_impl
from .lora_triton import dropout_mask, lora_bwd, lora_fwd, lora_multi_fwd
from .triton_base import unit_last_stride

_BACKENDS = ("triton", "torch")
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def draw_dropout_seed() -> int:
    """A fresh dropout seed from torch's default CPU generator."""
    return int(torch.randint(0, 2**31 - 1, ()))


def lora_dropout_mask(shape, p: float, seed: int, *, device="cpu", impl: str = "torch") -> torch.Tensor:
    """The keep-mask (bool, ``shape`` = x's shape) that backend ``impl`` applies to x for
    dropout probability ``p`` and ``seed``."""
    shape = tuple(shape)
    if impl == "triton":
        return dropout_mask(shape, p, seed, torch.device(device))
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


# ---------------------------------------------------------------------------------------
# torch reference backend


def lora_linear_torch(x, weight, lora_a, lora_b, scale, *, bias=None, dropout=0.0, dropout_seed=None):
    """Reference: the formula in x's dtype, differentiable by autograd."""
    xd = x
    if dropout > 0:
        keep = lora_dropout_mask(x.shape, dropout, dropout_seed, device=x.device, impl="torch")
        xd = x * keep / (1.0 - dropout)
    lora = F.linear(F.linear(xd, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return F.linear(x, weight, bias) + scale * lora


def lora_linear_multi_torch(x, weight, lora_a, lora_b, scales, adapter_ids, *, bias=None):
    """Reference: one masked LoRA term per adapter (no host sync, n_adapters full GEMMs)."""
    y = F.linear(x, weight, bias)
    for i in range(lora_a.shape[0]):
        term = F.linear(F.linear(x, lora_a[i].to(x.dtype)), lora_b[i].to(x.dtype)) * scales[i].to(x.dtype)
        y = y + torch.where((adapter_ids == i)[..., None], term, torch.zeros((), dtype=y.dtype, device=y.device))
    return y


# ---------------------------------------------------------------------------------------
# argument checks


def _shape(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_base(x, weight, bias):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.dtype not in _FLOATS:
        raise ValueError(f"x must be a floating tensor [..., in], got {_shape(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be [out, in={x.shape[-1]}], got {_shape(weight)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)
                             or bias.dtype != x.dtype):
        raise ValueError(f"bias must be None or a {x.dtype} tensor [out={weight.shape[0]}], got {_shape(bias)}")


def _check_devices(x, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_lora(x, weight, lora_a, lora_b, scale, dropout, dropout_seed):
    out, inp = weight.shape
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 2 or lora_a.shape[1] != inp or lora_a.shape[0] < 1:
        raise ValueError(f"lora_a must be [r, in={inp}] with r >= 1, got {_shape(lora_a)}")
    r = lora_a.shape[0]
    if not isinstance(lora_b, torch.Tensor) or tuple(lora_b.shape) != (out, r):
        raise ValueError(f"lora_b must be [out={out}, r={r}], got {_shape(lora_b)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite Python float (e.g. lora_alpha / r), got {scale!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if dropout_seed is not None and (isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int)):
        raise ValueError(f"dropout_seed must be None or an int, got {dropout_seed!r}")


def _check_multi(x, weight, lora_a, lora_b, scales, adapter_ids):
    out, inp = weight.shape
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3 or lora_a.shape[2] != inp or lora_a.shape[1] < 1:
        raise ValueError(f"lora_a must be [n_adapters, r, in={inp}], got {_shape(lora_a)}")
    n, r = lora_a.shape[:2]
    if not isinstance(lora_b, torch.Tensor) or tuple(lora_b.shape) != (n, out, r):
        raise ValueError(f"lora_b must be [n_adapters={n}, out={out}, r={r}], got {_shape(lora_b)}")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (n,) or scales.dtype not in _FLOATS:
        raise ValueError(f"scales must be a floating tensor [n_adapters={n}], got {_shape(scales)}")
    if (not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype != torch.int32
            or tuple(adapter_ids.shape) != tuple(x.shape[:-1])):
        raise ValueError(f"adapter_ids must be an int32 tensor of shape {tuple(x.shape[:-1])} (x without its "
                         f"last dim), got {_shape(adapter_ids)}")
    _check_devices(x, lora_a=lora_a, lora_b=lora_b, scales=scales, adapter_ids=adapter_ids)
    if x.device.type == "cpu" and adapter_ids.numel():  # free on the host; a sync on GPUs
        lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
        if lo < -1 or hi >= n:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_ids holds {bad}, outside [-1, n_adapters={n}) (-1 means no adapter)")


# ---------------------------------------------------------------------------------------
# public ops


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T on 2-D x; saves x and the
    [N, r] float32 xa (and the dropout seed, never a mask)."""

    @staticmethod
    def forward(ctx, x, weight, a, b, bias, scale: float, p: float, seed: int):
        x = unit_last_stride(x)
        y, xa = lora_fwd(x, weight, a, b, bias, scale, p, seed)
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.args = (scale, p, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, xa = ctx.saved_tensors
        grads = lora_bwd(unit_last_stride(dy), x, weight, a, b, xa, *ctx.args, ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                bias: torch.Tensor | None = None, dropout: float = 0.0, dropout_seed: int | None = None,
                impl: str = "auto") -> torch.Tensor:
    """A linear layer with one LoRA adapter, as PEFT's ``lora.Linear`` computes it.

    ``y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T``

    Args:
        x: [..., in] activations (fp32, bf16 or fp16; fp64 on impl="torch"); leading
            dimensions are kept.
        weight: [out, in] base weight, x's dtype. Usually frozen; it gets a gradient only
            when it requires one.
        lora_a: [r, in] (PEFT's ``lora_A.weight``); lora_b: [out, r] (``lora_B.weight``).
            Any floating dtype: they are cast to x's dtype for the products (PEFT keeps them
            in float32 under bf16 autocast) and their gradients come back in their dtype.
        scale: Python float, PEFT's ``scaling`` (``lora_alpha / r``).
        bias: optional [out] bias, x's dtype.
        dropout: probability in [0, 1) of zeroing an element of x on the adapter path
            (pass 0 in eval mode). See the module docstring for the mask and its seed.
        dropout_seed: int seed of the dropout mask; None draws one.
        impl: "auto" (Triton on CUDA tensors, else torch), "triton" or "torch".

    Returns:
        y [..., out] in x's dtype, differentiable in x, weight, bias, lora_a and lora_b.
        The Triton backend runs the base GEMMs either on cuBLAS, with the low-rank term
        pre-written as their C, or as one Triton GEMM with the term in its epilogue,
        whichever the device's config table names for the shape class (cuBLAS without
        an entry); see ``lora_triton.py`` for the byte counts. Its float32 partial sums
        are added with atomics, so results may differ in the last bits between runs.
    """
    _check_base(x, weight, bias)
    _check_lora(x, weight, lora_a, lora_b, scale, dropout, dropout_seed)
    _check_devices(x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    backend = resolve_impl("lora_linear", impl, x, _BACKENDS)
    scale, dropout = float(scale), float(dropout)
    if dropout > 0 and dropout_seed is None:
        dropout_seed = draw_dropout_seed()
    if backend == "torch":
        return lora_linear_torch(x, weight, lora_a, lora_b, scale, bias=bias, dropout=dropout,
                                 dropout_seed=dropout_seed)
    if x.dtype == torch.float64:
        raise ValueError("lora_linear: impl='triton' takes fp32, bf16 or fp16 x, got float64 (use impl='torch')")
    x2 = x.reshape(-1, x.shape[-1])
    y = LoRALinearFunction.apply(x2, weight, lora_a, lora_b, bias, scale, dropout, dropout_seed or 0)
    return y.view(*x.shape[:-1], weight.shape[0])


def lora_linear_multi(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scales: torch.Tensor, adapter_ids: torch.Tensor, *, bias: torch.Tensor | None = None,
                      impl: str = "auto") -> torch.Tensor:
    """A linear layer serving several LoRA adapters at once, one adapter per token
    (multi-tenant inference, as punica / S-LoRA do).

    ``y[i] = x[i] @ weight.T + bias + scales[a] * (x[i] @ lora_a[a].T) @ lora_b[a].T``
    with ``a = adapter_ids[i]``; ``a == -1`` gives the base projection alone.

    Args:
        x: [..., in] activations (fp32, bf16 or fp16); weight [out, in] and bias [out]
            in x's dtype, as in :func:`lora_linear`.
        lora_a: [n_adapters, r, in]; lora_b: [n_adapters, out, r]: each adapter's PEFT
            ``lora_A`` / ``lora_B`` weights, ranks below r zero-padded (the padding must be
            zero; see :func:`pack_lora_adapters`). Any floating dtype, cast to x's.
        scales: [n_adapters] floating, each adapter's ``lora_alpha / r``.
        adapter_ids: int32, shape of x without its last dimension; values in
            [-1, n_adapters). Tokens of one adapter need not be contiguous; the Triton
            kernels read the ids on the device (no host sync, CUDA-graph friendly).
        impl: "auto", "triton" or "torch".

    Returns:
        y [..., out] in x's dtype. Inference only on the Triton backend: it raises if a
        gradient would be needed (run under ``torch.no_grad()``); the torch reference is
        differentiable.
    """
    _check_base(x, weight, bias)
    _check_multi(x, weight, lora_a, lora_b, scales, adapter_ids)
    _check_devices(x, weight=weight, bias=bias)
    backend = resolve_impl("lora_linear_multi", impl, x, _BACKENDS)
    if backend == "torch":
        return lora_linear_multi_torch(x, weight, lora_a, lora_b, scales, adapter_ids, bias=bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, scales, bias)):
        raise RuntimeError("lora_linear_multi: impl='triton' is inference-only; call it under torch.no_grad() "
                           "(or use lora_linear for training one adapter)")
    if x.dtype == torch.float64:
        raise ValueError("lora_linear_multi: impl='triton' takes fp32, bf16 or fp16 x, got float64 (use impl='torch')")
    x2 = x.reshape(-1, x.shape[-1])
    y = lora_multi_fwd(x2, weight, lora_a, lora_b, scales, adapter_ids.reshape(-1), bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def pack_lora_adapters(adapters, *, rank: int | None = None, dtype: torch.dtype | None = None):
    """Stack adapters of possibly different ranks for :func:`lora_linear_multi`.

    Args:
        adapters: sequence of ``(lora_a [r_i, in], lora_b [out, r_i], scale)``: PEFT's
            ``lora_A.weight``, ``lora_B.weight`` and ``lora_alpha / r_i``.
        rank: padded rank (default: the largest r_i).
        dtype: of the stacks (default: the first adapter's).

    Returns:
        ``(lora_a [n, rank, in], lora_b [n, out, rank], scales [n] float32)``, zero-padded.
    """
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters must hold at least one (lora_a, lora_b, scale)")
    a0, b0, _ = adapters[0]
    inp, out = a0.shape[1], b0.shape[0]
    rank = rank if rank is not None else max(a.shape[0] for a, _, _ in adapters)
    dtype = dtype or a0.dtype
    stack_a = torch.zeros(len(adapters), rank, inp, dtype=dtype, device=a0.device)
    stack_b = torch.zeros(len(adapters), out, rank, dtype=dtype, device=a0.device)
    scales = torch.empty(len(adapters), dtype=torch.float32, device=a0.device)
    for i, (a, b, s) in enumerate(adapters):
        r = a.shape[0]
        if a.dim() != 2 or a.shape[1] != inp or tuple(b.shape) != (out, r) or r > rank:
            raise ValueError(f"adapter {i}: lora_a must be [r <= {rank}, in={inp}] and lora_b [out={out}, r], "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        stack_a[i, :r] = a
        stack_b[i, :, :r] = b
        scales[i] = float(s)
    return stack_a, stack_b, scales
