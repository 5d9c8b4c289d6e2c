"""Small fused ops of the decoder's forward: RMSNorm (with the residual add), RoPE (with the
Qwen3 per-head q/k norms) and SiLU-and-multiply.

A decode step of a 1B model runs ~37 kernels per layer in eager torch: RMSNorm alone is 8
(cast, square, mean, add, rsqrt, multiply, cast, scale), RoPE 10, the q/k norms of Qwen3
16 more. Each reads and writes a few KB; in a CUDA graph each still costs ~2 µs, which at
batch 1 adds up to more than the weights take to stream. These kernels do each group in
one pass. They reproduce the torch ops' roundings (every intermediate the eager code
rounds to the model's dtype is rounded here too), so results agree with the torch
reference up to the reduction order of the RMS mean.

Forward only (inference): with autograd recording and an input that requires grad,
``impl="auto"`` takes the torch reference, whose ops autograd differentiates; ``impl=
"triton"`` refuses. The torch functions are the reference and the CPU path. The inference
engine calls these with "auto"; the model's own modules pass "torch" (engine/models).
"""
from __future__ import annotations

import torch

from . import configs
from .dispatch import check_triton_device, on_device, resolve_impl
from .triton_base import TRITON_DTYPES, tl, triton, unit_last_stride

_BACKENDS = ("triton", "torch")
# num_warps candidates tune.py times per fused_ops.<op> class (shape_class: the row's size
# and dtype); each launcher's own heuristic, beside its launch, is among them.
WARPS = {"rms_norm": (1, 2, 4, 8, 16), "silu_mul": (1, 2, 4, 8), "rope": (1, 2, 4)}


# ---------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _rms_norm_kernel(X, Res, W, Out, H, n_cols, stride_x, stride_res, stride_out, stride_h, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:  # the residual stream: x + res rounded to x's dtype, stored, then normed
        res = tl.load(Res + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv).to(X.dtype.element_ty)
    w = tl.load(W + cols, mask=mask, other=0.0)
    tl.store(Out + row * stride_out + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(Out.dtype.element_ty),
             mask=mask)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to ``dtype`` and back to float32 (an eager op's output rounding)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rope_kernel(Q, K, QO, KO, Cos, Sin, WQ, WK, n_q, half, stride_qt, stride_qh, stride_kt, stride_kh, stride_qot,
                 stride_qoh, stride_kot, stride_koh, stride_ct, stride_st, eps, HAS_NORM: tl.constexpr,
                 BLOCK: tl.constexpr):
    """One program per (token, head) over the q heads then the k heads: one launch for both."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    if h < n_q:
        x_row = Q + t * stride_qt + h * stride_qh
        o_row = QO + t * stride_qot + h * stride_qoh
    else:
        x_row = K + t * stride_kt + (h - n_q) * stride_kh
        o_row = KO + t * stride_kot + (h - n_q) * stride_koh
    x1 = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # Qwen3's per-head RMSNorm before the rotation
        if h < n_q:
            w_row = WQ
        else:
            w_row = WK
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * half) + eps)
        w1 = tl.load(w_row + cols, mask=mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_row + half + cols, mask=mask, other=0.0).to(tl.float32)
        x1 = _round(w1 * _round(x1 * inv, Q.dtype.element_ty), Q.dtype.element_ty)
        x2 = _round(w2 * _round(x2 * inv, Q.dtype.element_ty), Q.dtype.element_ty)
    c1 = tl.load(Cos + t * stride_ct + cols, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(Cos + t * stride_ct + half + cols, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + t * stride_st + cols, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(Sin + t * stride_st + half + cols, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded
    o1 = _round(x1 * c1, Q.dtype.element_ty) + _round(-x2 * s1, Q.dtype.element_ty)
    o2 = _round(x2 * c2, Q.dtype.element_ty) + _round(x1 * s2, Q.dtype.element_ty)
    tl.store(o_row + cols, o1.to(Q.dtype.element_ty), mask=mask)
    tl.store(o_row + half + cols, o2.to(Q.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(X, Out, n_cols, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = _round(gate / (1.0 + tl.exp(-gate)), X.dtype.element_ty)  # F.silu's formula, rounded
    tl.store(Out + row * stride_out + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# launchers


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last] with a unit last stride (a view when the layout allows it)."""
    x = unit_last_stride(x)
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def shape_class(size: int, dtype: torch.dtype) -> str:
    """The class of a fused_ops.rms_norm/silu_mul/rope entry: the row's size (hidden, the
    gated width, or head dim) exact, and the dtype."""
    return configs.shape_class(n=size, dtype=configs.dtype_name(dtype))


def warps(op: str, size: int, x: torch.Tensor, heuristic) -> int:
    """num_warps of ``op``: the device table's fused_ops.<op> entry, else ``heuristic()``."""
    return configs.choose(f"fused_ops.{op}", shape_class(size, x.dtype), x.device, heuristic)


def rms_norm_triton(x, weight, eps, residual=None):
    check_triton_device("rms_norm", x)
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res2 = h = None
    if residual is not None:
        res2 = _rows(residual)
        h = torch.empty_like(x2)
    block = triton.next_power_of_2(n_cols)
    if n_rows:
        with on_device(x.device):
            _rms_norm_kernel[(n_rows,)](
                x2, res2, weight, out, h, n_cols, x2.stride(0), 0 if res2 is None else res2.stride(0), out.stride(0),
                0 if h is None else h.stride(0), float(eps), HAS_RES=residual is not None, BLOCK=block,
                num_warps=warps("rms_norm", n_cols, x, lambda: min(16, max(1, block // 256))))
    out = out.view(x.shape)
    return out if residual is None else (out, h.view(x.shape))


def rope_triton(q, k, cos, sin, q_weight=None, k_weight=None, eps=1e-6):
    check_triton_device("rope", q)
    q, k = unit_last_stride(q), unit_last_stride(k)
    cos, sin = unit_last_stride(cos.reshape(cos.shape[0], -1)), unit_last_stride(sin.reshape(sin.shape[0], -1))
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, hkv, d, dtype=q.dtype, device=q.device)
    if t and hq + hkv:
        half = d // 2
        with on_device(q.device):
            _rope_kernel[(t, hq + hkv)](
                q, k, q_out, k_out, cos, sin, q_weight, k_weight, hq, half, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), cos.stride(0),
                sin.stride(0), float(eps), HAS_NORM=q_weight is not None, BLOCK=triton.next_power_of_2(half),
                num_warps=warps("rope", d, q, lambda: 1))
    return q_out, k_out


def silu_mul_triton(gate_up):
    check_triton_device("silu_mul", gate_up)
    x = _rows(gate_up)
    n = x.shape[1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(max(n, 1)))
    if x.shape[0] and n:
        with on_device(x.device):
            _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0), BLOCK=block,
                                                                  num_warps=warps("silu_mul", n, x, lambda: 4))
    return out.view(*gate_up.shape[:-1], n)


# ---------------------------------------------------------------------------------------
# references (the eager ops the model ran before these kernels; also the CPU path)


def rms_norm_torch(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    # transformers' order: normalise in float32, cast back, then scale (bf16 results agree).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * xf.to(x.dtype)
    return out if residual is None else (out, x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_torch(q, k, cos, sin, q_weight=None, k_weight=None, eps=1e-6):
    cos, sin = cos.reshape(cos.shape[0], 1, -1), sin.reshape(sin.shape[0], 1, -1)
    if q_weight is not None:
        q, k = rms_norm_torch(q, q_weight, eps), rms_norm_torch(k, k_weight, eps)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul_torch(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------------------
# public ops


def _pick(op: str, impl: str, x: torch.Tensor, *tensors) -> str:
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))
    if needs_grad:
        if impl == "triton":
            raise ValueError(f"{op}: impl='triton' is forward only (inference); an input requires grad, use "
                             "impl='auto' or 'torch', or run under torch.no_grad()")
        resolve_impl(op, impl, x, _BACKENDS)  # still reject unknown impls
        return "torch"
    backend = resolve_impl(op, impl, x, _BACKENDS)
    if backend == "triton" and x.dtype not in TRITON_DTYPES:
        raise ValueError(f"{op}: the Triton kernel takes float32, bfloat16 or float16, got {x.dtype}")
    return backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             impl: str = "auto"):
    """RMSNorm over the last dimension, as transformers computes it:
    ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with the statistics in float32.

    Args:
        x: [..., hidden] floating.
        weight: [hidden], any floating dtype (the output takes the promoted dtype).
        eps: the variance epsilon.
        residual: optional, x's shape and dtype: normalise ``h = x + residual`` (rounded to
            x's dtype) instead, and return ``(normed, h)``: the pre-norm residual stream of
            a decoder layer in one pass.
        impl: "auto" (Triton on CUDA without autograd, else torch), "triton" or "torch".
    Returns: normed [..., hidden], or (normed, h) with a residual.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"rms_norm: x must be a floating tensor [..., hidden], got {_describe(x)}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.shape[-1],) or weight.device != x.device:
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}] on {x.device}, got {_describe(weight)}")
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.shape != x.shape
                                 or residual.dtype != x.dtype or residual.device != x.device):
        raise ValueError(f"rms_norm: residual must match x ({x.dtype} {tuple(x.shape)} on {x.device}), "
                         f"got {_describe(residual)}")
    if _pick("rms_norm", impl, x, weight, residual) == "triton":
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None, eps: float = 1e-6,
         impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys (the rotate-half convention of Llama,
    Qwen and Mistral): ``x * cos + rotate_half(x) * sin``, optionally after a per-head
    RMSNorm with ``q_weight`` / ``k_weight`` (Qwen3's q_norm / k_norm).

    Args:
        q: [T, Hq, D], k: [T, Hkv, D]: any strides with a unit last stride (views of a
            fused qkv projection are read in place); D even.
        cos, sin: [T, 1, D] or [T, D] in q's dtype.
        q_weight, k_weight: both or neither, [D].
        eps: the norms' epsilon.
        impl: "auto" (Triton on CUDA without autograd, else torch), "triton" or "torch".
    Returns: (q, k) rotated, new contiguous tensors.
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            raise ValueError(f"rope: {name} must be a floating tensor [T, heads, D], got {_describe(t)}")
    t_, _, d = q.shape
    if d % 2 or k.shape[0] != t_ or k.shape[2] != d or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"rope: q {_describe(q)} and k {_describe(k)} need the same T, an even D and one dtype")
    for name, c in (("cos", cos), ("sin", sin)):
        if not isinstance(c, torch.Tensor) or c.shape[0] != t_ or c.numel() != t_ * d or c.device != q.device:
            raise ValueError(f"rope: {name} must be [{t_}, 1, {d}] or [{t_}, {d}] on {q.device}, got {_describe(c)}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("rope: give both q_weight and k_weight (the per-head norms), or neither")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and (not isinstance(w, torch.Tensor) or tuple(w.shape) != (d,) or w.device != q.device):
            raise ValueError(f"rope: {name} must be [{d}] on {q.device}, got {_describe(w)}")
    backend = _pick("rope", impl, q, k, cos, sin, q_weight, k_weight)
    mixed = [t.dtype for t in (cos, sin, q_weight, k_weight) if t is not None and t.dtype != q.dtype]
    if backend == "triton" and mixed:  # the kernel rounds like the eager ops of one dtype
        if impl == "triton":
            raise ValueError(f"rope: impl='triton' needs cos, sin and the norm weights in q's dtype {q.dtype}, "
                             f"got {mixed[0]}")
        backend = "torch"
    if backend == "triton":
        return rope_triton(q, k, cos, sin, q_weight, k_weight, eps)
    return rope_torch(q, k, cos, sin, q_weight, k_weight, eps)


def silu_mul(gate_up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection ``gate_up = [..., 2 * I]`` (gate
    first): the SwiGLU activation. Returns [..., I] in gate_up's dtype.
    impl: "auto" (Triton on CUDA without autograd, else torch), "triton" or "torch"."""
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: gate_up must be [..., 2 * intermediate], got {_describe(gate_up)}")
    if _pick("silu_mul", impl, gate_up) == "triton":
        return silu_mul_triton(gate_up)
    return silu_mul_torch(gate_up)


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
