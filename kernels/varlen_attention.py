"""Token-packed (varlen) attention.

Sequences are concatenated along the token axis with no padding; ``cu_seqlens`` holds
their boundaries. This module holds the public op and its torch reference backend
(``impl="torch"``, one scaled-dot-product attention per sequence with an explicit mask).
The Triton kernels of the attention issue plug in behind the same signature.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_impl

_BACKENDS = ("torch",)


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
        q: [T, Hq, D] queries of all sequences, concatenated.
        k, v: [Tk, Hkv, D] keys and values; Hq must be a multiple of Hkv (GQA/MQA:
            query head h reads key/value head ``h // (Hq // Hkv)``).
        cu_seqlens_q, cu_seqlens_k: [B+1] int32 cumulative sequence lengths on q's device.
            Passing the same tensor for both is the usual training call.
        max_seqlen_q, max_seqlen_k: host ints, at least the longest sequence.
        causal: causal mask, aligned bottom-right when a sequence has more keys than
            queries (prefill on top of a cached prefix).
        softmax_scale: defaults to ``D ** -0.5``.
        window: sliding window; a query attends to at most the last ``window`` keys up to
            its own position.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the softmax.
        return_lse: also return the log-sum-exp of the scores, [Hq, T] float32.
        impl: "auto" (Triton on CUDA when available, else torch) or "torch".

    Returns:
        out [T, Hq, D] in q's dtype (and lse [Hq, T] float32 if requested). A query that
        sees no key gets a zero output and lse -inf.
    """
    _check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, softcap)
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    backend = resolve_impl("varlen_attention", impl, q, _BACKENDS)
    assert backend == "torch"
    out, lse = varlen_attention_torch(
        q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap
    )
    return (out, lse) if return_lse else out
