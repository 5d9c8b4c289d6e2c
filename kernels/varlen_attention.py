"""Token-packed (varlen) attention.

Sequences are concatenated along the token axis with no padding; ``cu_seqlens`` holds
their boundaries. Backends behind one signature:

- ``"triton"``: FlashAttention-2 style kernels in ``varlen_attention_triton.py`` (forward) and
  ``varlen_attention_bwd_triton.py`` (backward). Forward: one program per
  (sequence, query head, block of BLOCK_M queries), online softmax in float32 over blocks
  of BLOCK_N keys, key blocks wholly outside the causal/window band skipped, and the mask
  only evaluated on blocks that cut the band. Backward: ``delta = rowsum(dO * O)``, then a
  dK/dV kernel (one program per key block and key/value head, looping over the query
  blocks of every query head of its GQA group) and a dQ kernel (one program per query
  block and head, looping over key blocks). No atomics, so gradients are deterministic;
  the price is recomputing ``Q K^T`` and ``dO V^T`` in both kernels (7 block matmuls per
  tile instead of 5).
- ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` when that package is installed.
- ``"torch"``: the reference, one attention per sequence with an explicit mask.

``impl="auto"`` takes Triton on CUDA (it covers every feature and dtype the model uses;
flash_attn is picked only when asked for, until the benchmark says it should lead) and the
reference on CPU.
"""
import torch

from .dispatch import resolve_impl
from .triton_base import TRITON_DTYPES
from .varlen_attention_bwd_triton import varlen_attention_bwd
from .varlen_attention_triton import varlen_attention_fwd

_BACKENDS = ("triton", "flash_attn", "torch")


# ---------------------------------------------------------------------------------------
# Other backends


def varlen_attention_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                                softmax_scale, window, softcap, return_lse):
    """``flash_attn.flash_attn_varlen_func`` with this op's conventions: window w becomes
    window_size=(w - 1, 0) (causal) or (w - 1, -1); lse of a query that sees no key is
    mapped from flash-attn's +inf to -inf. Caveat: flash-attn leaves rows past
    cu_seqlens_q[-1] unwritten (this op's other backends zero them)."""
    from flash_attn import flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"varlen_attention: impl='flash_attn' needs float16 or bfloat16 q/k/v, got {q.dtype}")
    window_size = (-1, -1) if window is None else (window - 1, 0 if causal else -1)
    res = flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                 softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                 softcap=softcap or 0.0, return_attn_probs=return_lse)
    if not return_lse:
        return res, None
    out, lse = res[0], res[1].detach()
    if lse.dim() != 2:  # older flash-attn releases returned a padded [B, Hq, max_seqlen_q] lse
        raise RuntimeError(f"varlen_attention: this flash_attn returns lse of shape {tuple(lse.shape)}, not [Hq, T]; "
                           "upgrade flash_attn or use impl='triton' for return_lse=True")
    return out, lse.masked_fill(lse == float("inf"), float("-inf"))


def _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, softcap):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"varlen_attention: q, k, v must be [tokens, heads, head_dim], got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"varlen_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_attention: head_dim of q ({q.shape[2]}) and k ({k.shape[2]}) differ")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"varlen_attention: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"varlen_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"varlen_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"varlen_attention: {name} must be a 1-D int32 tensor [B+1], got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"varlen_attention: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"varlen_attention: cu_seqlens_q ({cu_seqlens_q.numel()}) and cu_seqlens_k ({cu_seqlens_k.numel()}) "
            "must describe the same number of sequences"
        )
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"varlen_attention: {name} must be a non-negative int, got {m!r}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"varlen_attention: window must be None or a positive int, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"varlen_attention: softcap must be None or positive, got {softcap!r}")


def attention_mask(len_q: int, len_k: int, *, causal: bool, window: int | None, device=None) -> torch.Tensor:
    """Boolean [len_q, len_k] mask of allowed (query, key) pairs for one sequence.

    Query i sits at absolute position ``i + len_k - len_q`` (bottom-right alignment, as in
    FlashAttention); causal keeps keys at or before it, ``window`` keeps the last ``window``
    keys up to it.
    """
    qpos = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    kpos = torch.arange(len_k, device=device)[None, :]
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if causal:
        allowed &= kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    return allowed


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    window: int | None,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per-sequence attention in (at least) float32 with an explicit mask.

    Reads the boundaries on the host (one sync), so it is meant for CPU and for tests.
    """
    total_q, hq, _ = q.shape
    group = hq // k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros_like(q)
    lse = torch.full((hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(bq) - 1):
        qs, qe, ks, ke = bq[b], bq[b + 1], bk[b], bk[b + 1]
        if qe == qs:
            continue
        qb = q[qs:qe].to(compute).transpose(0, 1)  # [Hq, Lq, D]
        kb = k[ks:ke].to(compute).transpose(0, 1).repeat_interleave(group, dim=0)
        vb = v[ks:ke].to(compute).transpose(0, 1).repeat_interleave(group, dim=0)
        scores = (qb @ kb.transpose(1, 2)) * softmax_scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        allowed = attention_mask(qe - qs, ke - ks, causal=causal, window=window, device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        lse_b = torch.logsumexp(scores, dim=-1)  # [Hq, Lq]; -inf where a query sees no key
        probs = torch.exp(scores - lse_b[..., None].clamp_min(torch.finfo(compute).min))
        out[qs:qe] = (probs @ vb).transpose(0, 1).to(q.dtype)
        lse[:, qs:qe] = lse_b.float()
    return out, lse


class VarlenAttentionFunction(torch.autograd.Function):
    """Triton forward/backward. Gradients flow through ``out`` only; ``lse`` is returned as
    a non-differentiable tensor (its gradient is never needed by the model or the losses)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window,
                softcap):
        opts = dict(causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap)
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, **opts)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.opts, ctx.max_seqlen = opts, (max_seqlen_q, max_seqlen_k)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlen,
                                          **ctx.opts)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    impl: str = "auto",
):
    """Attention over a packed batch of sequences.

    Args:
        q: [T, Hq, D] queries of all sequences, concatenated (float16, bfloat16 or float32
            for Triton; any floating dtype for the torch reference).
        k, v: [Tk, Hkv, D] keys and values in q's dtype; Hq must be a multiple of Hkv
            (GQA/MQA: query head h reads key/value head ``h // (Hq // Hkv)``).
        cu_seqlens_q, cu_seqlens_k: [B+1] int32 cumulative sequence lengths on q's device.
            Passing the same tensor for both is the usual training call.
        max_seqlen_q, max_seqlen_k: host ints, at least the longest sequence (the Triton
            grid is sized from them; rows of a longer sequence would be left unwritten).
        causal: causal mask, aligned bottom-right when a sequence has more keys than
            queries (prefill on top of a cached prefix).
        softmax_scale: defaults to ``D ** -0.5``.
        window: sliding window; a query attends to at most the last ``window`` keys up to
            its own position.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the softmax.
        return_lse: also return the log-sum-exp of the scores, [Hq, T] float32. It carries
            no gradient: backward flows through ``out`` only.
        impl: "auto" (Triton on CUDA for float16/bfloat16/float32, else torch), "triton",
            "flash_attn" (needs the flash_attn package) or "torch".

    Returns:
        out [T, Hq, D] in q's dtype (and lse [Hq, T] float32 if requested). A query that
        sees no key gets a zero output and lse -inf; rows past cu_seqlens_q[-1] are zero
        (lse -inf) for every backend except flash_attn, which leaves them unwritten.
    """
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, softcap)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    backend = resolve_impl("varlen_attention", impl, q, _BACKENDS)
    if impl == "auto" and backend == "triton" and q.dtype not in TRITON_DTYPES:
        backend = "torch"
    opts = dict(causal=causal, softmax_scale=float(softmax_scale), window=window,
                softcap=None if softcap is None else float(softcap))
    if backend == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(f"varlen_attention: impl='triton' supports q/k/v in {TRITON_DTYPES}, got {q.dtype}")
        out, lse = VarlenAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                 causal, opts["softmax_scale"], window, opts["softcap"])
    elif backend == "flash_attn":
        out, lse = varlen_attention_flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                               return_lse=return_lse, **opts)
    else:
        out, lse = varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, **opts)
    return (out, lse) if return_lse else out

