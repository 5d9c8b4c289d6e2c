"""Decode attention over a paged KV cache, and the write of new keys/values into it.

Cache layout (vLLM's): ``k_cache``/``v_cache`` are [num_blocks, block_size, Hkv, D]; token
``p`` of sequence ``b`` lives in physical block ``block_table[b, p // block_size]`` at slot
``p % block_size``. A slot id is ``block * block_size + offset``.

Decoding (``paged_attention``): one query per sequence, at position ``seq_lens[b] - 1``,
attending to the sequence's first ``seq_lens[b]`` cached tokens (the new token's own k/v
must already be appended). Split-K ("flash-decoding"): each sequence's context is cut
into up to ``num_splits`` chunks (of at least 256 keys, cut on the device from the
sequence's own length) so that a small batch still fills the GPU; each program handles
one (sequence, key/value head, chunk) with all the query heads of its GQA group as the
rows of one tile, writes a partial (max, sum, unnormalised output) in float32, and a
combine kernel merges the chunks. With a single chunk the first kernel writes ``out``
directly.

Prefill into the cache: append the prompt's keys/values with ``append_kv(k_cache,
v_cache, k, v, slot_mapping)`` (slot of token p: ``block_table[b, p // block_size] *
block_size + p % block_size``), and compute the prompt's own attention with
``varlen_attention`` on the packed prompt (q, k, v straight from the projections, no cache
read). A prompt that continues a cached prefix passes the prefix's keys/values gathered
from the cache plus the new ones as ``k``/``v`` with ``cu_seqlens_k`` longer than
``cu_seqlens_q`` (bottom-right causal alignment). Then decode step by step: append the
new token's k/v, then ``paged_attention``.
"""
import torch

from . import configs
from .dispatch import check_triton_device, on_device, resolve_impl
from .triton_base import (TRITON_DTYPES, attention_scores, cast, dot, dot_block, dot_mode, gpu_branch, interpreting,
                          online_softmax_step, sm_count, tl, triton, unit_last_stride)

_BACKENDS = ("triton", "torch")


@triton.heuristics({
    "HAS_WINDOW": lambda a: a["window"] > 0,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
})
@triton.jit
def _paged_attn_fwd_kernel(
    Q, KCache, VCache, BlockTable, SeqLens, Out, PartAcc, PartM, PartL, sm_scale, softcap, window,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_tb, stride_ob, stride_oh, num_kv_heads, group, head_dim, block_size, max_blocks, min_keys,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SINGLE_SPLIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = pid // num_kv_heads
    kh = pid % num_kv_heads
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    h_ok = offs_h < group
    heads = kh * group + offs_h
    q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    seq_len = tl.load(SeqLens + b)
    # The keys this query sees, [lo, seq_len), cut into chunks from the sequence's own
    # length (not the table's width, which a CUDA graph pads to the longest context): as
    # many chunks as the grid has, but none under min_keys keys; chunks past them are empty.
    lo = 0
    if HAS_WINDOW:  # the query at seq_len - 1 sees keys p > seq_len - 1 - window
        lo = tl.maximum(seq_len - window, 0)
    span = seq_len - lo
    used = tl.maximum(tl.minimum(num_splits, tl.cdiv(span, min_keys)), 1)
    chunk = tl.cdiv(tl.cdiv(span, used), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    table = BlockTable + b.to(tl.int64) * stride_tb
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        page = pos // block_size  # pos >= 0, so // and % agree between GPU and interpreter
        ok = (pos < end) & (page < max_blocks)
        phys = tl.load(table + page, mask=ok, other=0).to(tl.int64)
        slot = pos % block_size
        k_row = phys * stride_kb + slot * stride_ks + kh * stride_kh
        v_row = phys * stride_vb + slot * stride_vs + kh * stride_vh
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(KCache + k_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VCache + v_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s, _ = attention_scores(dot(q, tl.trans(k), None, PREC), sm_scale, softcap, HAS_SOFTCAP)
        s = tl.where(ok[None, :], s, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, PREC)
    if SINGLE_SPLIT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, cast(out, Out.dtype.element_ty, PREC), mask=h_ok[:, None] & d_ok[None, :])
    else:
        # Partials laid out [B, Hq, num_splits, (D)] contiguous, in log2 units.
        part = (b.to(tl.int64) * num_kv_heads * group + heads) * num_splits + split
        tl.store(PartM + part, m_i, mask=h_ok)
        tl.store(PartL + part, l_i, mask=h_ok)
        tl.store(PartAcc + part[:, None] * head_dim + offs_d[None, :], acc, mask=h_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_attn_combine_kernel(PartAcc, PartM, PartL, Out, stride_ob, stride_oh, num_heads, num_splits, head_dim,
                               PREC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # one (sequence, query head)
    b = pid // num_heads
    h = pid % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < head_dim
    part = pid.to(tl.int64) * num_splits + offs_s
    m = tl.load(PartM + part, mask=s_ok, other=float("-inf"))
    l = tl.load(PartL + part, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty chunks
    total = tl.sum(w * l, 0)
    acc = tl.load(PartAcc + part[:, None] * head_dim + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, cast(out, Out.dtype.element_ty, PREC),
             mask=d_ok)


@triton.jit
def _append_kv_kernel(K, V, KCache, VCache, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ckb, stride_cks, stride_ckh, stride_cvb, stride_cvs, stride_cvh,
                      num_kv_heads, head_dim, block_size, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t)
    keep = slot >= 0
    slot = tl.where(keep, slot, 0)  # keep the division on non-negative numbers
    blk = slot // block_size
    off = slot % block_size
    offs_h = tl.arange(0, BLOCK_HK)
    offs_d = tl.arange(0, BLOCK_D)
    # keep is broadcast to a block first: the interpreter rejects a scalar & block mask.
    keep_h = (tl.zeros((BLOCK_HK,), tl.int32) + keep.to(tl.int32)) > 0
    mask = ((offs_h < num_kv_heads) & keep_h)[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(KCache + blk * stride_ckb + off * stride_cks + offs_h[:, None] * stride_ckh + offs_d[None, :], k, mask=mask)
    tl.store(VCache + blk * stride_cvb + off * stride_cvs + offs_h[:, None] * stride_cvh + offs_d[None, :], v, mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers


def _decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    """TODO(H100): autotune BLOCK_N in {32, 64, 128}, num_warps in {2, 4, 8}, num_stages in
    {2, 3, 4}. The kernel is bound by reading the cache (and by the block-table gather for
    small blocks), so the tile mainly sets the number of loads in flight."""
    if interpreting():
        return dict(BLOCK_N=16, num_warps=1, num_stages=1)
    if head_dim > 128 or dtype == torch.float32:  # float32 at d=128 spills ~1 KB: reported, not failed
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def decode_shape_class(head_dim: int, dtype: torch.dtype, group: int) -> str:
    """The class of a paged_attention.decode table entry: head dim, dtype, GQA group (query
    heads per key/value head); batch and context only change the grid and the split count."""
    return configs.shape_class(d=head_dim, dtype=configs.dtype_name(dtype), group=group)


def decode_candidates(head_dim: int, dtype: torch.dtype) -> list[dict]:
    """Configs tune.py times for the decode kernel: _decode_config's first, then BLOCK_N in
    {32, 64, 128} x num_warps in {2, 4, 8} x num_stages in {2, 3} (BLOCK_N 32 and 64 only for
    head dims over 128 and float32)."""
    wide = head_dim > 128 or dtype == torch.float32
    return configs.candidate_list(_decode_config(head_dim, dtype), *(
        dict(BLOCK_N=n, num_warps=w, num_stages=st) for n in ((32, 64) if wide else (32, 64, 128))
        for w in (2, 4, 8) for st in (2, 3)))


def _min_keys(device: torch.device) -> int:
    """The shortest chunk worth a partial write: 256 keys (under the interpreter: 32)."""
    return 256 if gpu_branch(device) else 32


def _default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Enough (sequence, head, chunk) programs for about two waves of the GPU, but no more
    chunks than the longest context has of ``_min_keys`` keys. The kernel cuts each
    sequence into at most this many chunks of at least that size."""
    if not gpu_branch(device):  # the interpreter
        target = 8
    else:
        target = 2 * sm_count(device)
    wanted = triton.cdiv(target, max(1, batch * num_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_context, _min_keys(device)), 64))


def paged_attention_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
    *, softmax_scale: float, window: int | None, softcap: float | None, num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton decode attention (arguments as in ``paged_attention``); ``num_splits`` overrides
    the split-K heuristic, ``out`` [B, Hq, D] may be given to write into."""
    check_triton_device("paged_attention", q)
    q = unit_last_stride(q)
    batch, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    if batch == 0:
        return out
    cfg = configs.choose("paged_attention.decode", decode_shape_class(d, q.dtype, hq // hkv), q.device,
                         lambda: _decode_config(d, q.dtype))
    max_context = max(1, max_blocks * block_size)
    min_keys = 1  # an explicit num_splits is taken as it is
    if num_splits is None:
        num_splits = _default_num_splits(batch, hkv, max_context, q.device)
        min_keys = _min_keys(q.device)
    single = num_splits == 1
    part_acc = part_m = part_l = out  # unused placeholders when there is one chunk
    if not single:
        part_acc = torch.empty(batch, hq, num_splits, d, dtype=torch.float32, device=q.device)
        part_m = torch.empty(batch, hq, num_splits, dtype=torch.float32, device=q.device)
        part_l = torch.empty(batch, hq, num_splits, dtype=torch.float32, device=q.device)
    block_d = dot_block(d)
    with on_device(q.device):
        _paged_attn_fwd_kernel[(batch * hkv, num_splits)](
            q, k_cache, v_cache, block_table, seq_lens, out, part_acc, part_m, part_l,
            softmax_scale, softcap or 0.0, window or 0,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0), out.stride(0), out.stride(1),
            hkv, hq // hkv, d, block_size, max_blocks, min_keys,
            SINGLE_SPLIT=single, PREC=dot_mode(q.dtype), BLOCK_H=dot_block(hq // hkv), BLOCK_D=block_d,
            **cfg,
        )
        if not single:
            _paged_attn_combine_kernel[(batch * hq,)](
                part_acc, part_m, part_l, out, out.stride(0), out.stride(1), hq, num_splits, d,
                PREC=dot_mode(q.dtype), BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            )
    return out


def append_kv_triton(k_cache, v_cache, k, v, slot_mapping) -> None:
    check_triton_device("append_kv", k)
    k, v = unit_last_stride(k), unit_last_stride(v)
    t, hkv, d = k.shape
    if t == 0:
        return
    with on_device(k.device):
        _append_kv_kernel[(t,)](
            k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), hkv, d, k_cache.shape[1],
            BLOCK_HK=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
        )


# ---------------------------------------------------------------------------------------
# References and public ops


def paged_attention_torch(q, k_cache, v_cache, block_table, seq_lens, *, softmax_scale, window, softcap):
    """Reference: gather each sequence's keys/values block by block, attend in float32 (or
    wider) with an explicit window mask. Reads ``seq_lens`` on the host."""
    batch, hq, _ = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros_like(q)
    for b, length in enumerate(seq_lens.tolist()):
        if length == 0:
            continue
        pos = torch.arange(length, device=q.device)
        phys = block_table[b, pos // block_size].long()
        keys = k_cache[phys, pos % block_size].to(compute).repeat_interleave(hq // hkv, dim=1)  # [L, Hq, D]
        values = v_cache[phys, pos % block_size].to(compute).repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].to(compute), keys) * softmax_scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if window is not None:
            scores = scores.masked_fill(pos[None, :] <= length - 1 - window, float("-inf"))
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values).to(q.dtype)
    return out


def append_kv_torch(k_cache, v_cache, k, v, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep]
    v_cache[slots // block_size, slots % block_size] = v[keep]


def _check_cache(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.dim() != 4:
        raise ValueError(f"{op}: k_cache must be [num_blocks, block_size, Hkv, D], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype or v_cache.device != k_cache.device:
        raise ValueError(f"{op}: v_cache ({v_cache.dtype} {tuple(v_cache.shape)} on {v_cache.device}) must match "
                         f"k_cache ({k_cache.dtype} {tuple(k_cache.shape)} on {k_cache.device})")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"{op}: k_cache and v_cache need a unit stride along D (copying a cache is not an option)")


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged KV cache (decoding).

    Args:
        q: [B, Hq, D] the query of each sequence's newest token, at position seq_lens[b] - 1.
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] in q's dtype (float16, bfloat16 or
            float32 for Triton); Hq must be a multiple of Hkv (GQA/MQA).
        block_table: [B, max_blocks] int32 physical block of each logical block; entries
            past a sequence's length are never read.
        seq_lens: [B] int32 number of cached tokens of each sequence, the new one included;
            0 gives a zero output (padding rows of a fixed-size batch). Must not exceed
            max_blocks * block_size (the Triton kernel ignores keys past the table).
        softmax_scale: defaults to ``D ** -0.5``.
        window: the query attends to the last ``window`` keys only.
        softcap: scores become ``softcap * tanh(scores / softcap)`` before the softmax.
        impl: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        out [B, Hq, D] in q's dtype. No autograd: this is the decode path.
    """
    if q.dim() != 3:
        raise ValueError(f"paged_attention: q must be [batch, Hq, D], got shape {tuple(q.shape)}")
    _check_cache("paged_attention", k_cache, v_cache)
    batch, hq, d = q.shape
    if k_cache.shape[3] != d:
        raise ValueError(f"paged_attention: head_dim of q ({d}) and k_cache ({k_cache.shape[3]}) differ")
    if hq % k_cache.shape[2] != 0:
        raise ValueError(f"paged_attention: query heads ({hq}) must be a multiple of key/value heads ({k_cache.shape[2]})")
    if k_cache.dtype != q.dtype or not q.is_floating_point():
        raise ValueError(f"paged_attention: q ({q.dtype}) and k_cache/v_cache ({k_cache.dtype}) must share one floating dtype")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"paged_attention: block_table must be int32 [{batch}, max_blocks], "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"paged_attention: seq_lens must be int32 [{batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    for name, t in (("k_cache", k_cache), ("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"paged_attention: {name} is on {t.device} but q is on {q.device}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"paged_attention: window must be None or a positive int, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"paged_attention: softcap must be None or positive, got {softcap!r}")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("paged_attention: has no backward (decode only); call it under torch.no_grad()")
    if softmax_scale is None:
        softmax_scale = d ** -0.5
    opts = dict(softmax_scale=float(softmax_scale), window=window, softcap=None if softcap is None else float(softcap))
    backend = resolve_impl("paged_attention", impl, q, _BACKENDS)
    if impl == "auto" and q.dtype not in TRITON_DTYPES:
        backend = "torch"
    if backend == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(f"paged_attention: impl='triton' supports q in {TRITON_DTYPES}, got {q.dtype}")
        return paged_attention_fwd(q, k_cache, v_cache, block_table, seq_lens, **opts)
    return paged_attention_torch(q, k_cache, v_cache, block_table, seq_lens, **opts)


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    impl: str = "auto",
) -> None:
    """Write new keys/values into the paged cache, in place.

    Args:
        k_cache, v_cache: [num_blocks, block_size, Hkv, D] the caches, written in place.
        k, v: [T, Hkv, D] in the caches' dtype: the new tokens' keys and values.
        slot_mapping: [T] int64 on the caches' device; token t goes to block
            ``slot // block_size``, offset ``slot % block_size``; a negative slot skips the
            token (padding). Slots must be below num_blocks * block_size (not checked on the
            Triton path, which would need a host sync).
        impl: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".
    """
    _check_cache("append_kv", k_cache, v_cache)
    _, _, hkv, d = k_cache.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != (hkv, d) or t.shape[0] != k.shape[0]:
            raise ValueError(f"append_kv: {name} must be [T, {hkv}, {d}] like the cache, got shape {tuple(t.shape)}")
        if t.dtype != k_cache.dtype or t.device != k_cache.device:
            raise ValueError(f"append_kv: {name} ({t.dtype} on {t.device}) must match the cache "
                             f"({k_cache.dtype} on {k_cache.device})")
    if slot_mapping.dtype != torch.int64 or tuple(slot_mapping.shape) != (k.shape[0],):
        raise ValueError(f"append_kv: slot_mapping must be int64 [{k.shape[0]}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if slot_mapping.device != k_cache.device:
        raise ValueError(f"append_kv: slot_mapping is on {slot_mapping.device} but the cache is on {k_cache.device}")
    if resolve_impl("append_kv", impl, k, _BACKENDS) == "triton":
        append_kv_triton(k_cache, v_cache, k, v, slot_mapping)
    else:
        append_kv_torch(k_cache, v_cache, k, v, slot_mapping)
