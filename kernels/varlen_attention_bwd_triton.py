"""Triton kernels of varlen attention, backward (see ``varlen_attention.py`` for the
algorithm): ``delta = rowsum(dO * O)``, then a dK/dV kernel (one program per key block and
key/value head, looping over the query blocks of every query head of its GQA group) and a
dQ kernel (one program per query block and head, looping over key blocks). The tile
helpers are the forward's (``varlen_attention_triton.py``)."""
import torch

from .dispatch import check_triton_device, on_device
from .triton_base import (LOG2E, attention_scores, cast, dot, dot_block, dot_mode, interpreting, tl, triton,
                          unit_last_stride)
from .varlen_attention_triton import (attention_flags, check_out, grid_blocks, key_block_scores, key_blocks,
                                      key_program, load_rows, load_tokens, pair_ok, query_blocks, query_program,
                                      tuned_config, zero_rows)


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(Out, DOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
                                       total_q, head_dim, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < total_q
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    tok = rows.to(tl.int64)
    o = tl.load(Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h.to(tl.int64) * stride_dh + tok, delta, mask=row_ok)


@triton.jit
def _lse_delta(lse_base, delta_base, tok, row_ok, MASKED: tl.constexpr):
    """The forward's lse (log2 units) and delta of query tokens tok."""
    if MASKED:
        lse = tl.load(lse_base + tok, mask=row_ok, other=0.0) * LOG2E
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # a query that saw no key: its p is 0 anyway
        delta = tl.load(delta_base + tok, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + tok) * LOG2E
        delta = tl.load(delta_base + tok)
    return lse, delta


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, q_start, cols,
                    len_q, len_k, window, lo, hi, sm_scale, softcap, offs_m, offs_d, d_ok, MASKED: tl.constexpr,
                    FLAGS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    # Transposed tiles ([keys, queries]) so that dK and dV accumulate without transposes.
    for start_m in range(lo, hi, BLOCK_M):
        rows, row_ok, tok, q = load_tokens(q_base, stride_qt, q_start, start_m, len_q, offs_m, offs_d, d_ok, MASKED,
                                           FLAGS.even_d)
        do = load_rows(do_base + tok[:, None] * stride_dot + offs_d[None, :], row_ok, d_ok, MASKED, FLAGS.even_d)
        lse, delta = _lse_delta(lse_base, delta_base, tok, row_ok, MASKED)
        qk_t = dot(k, tl.trans(q), None, PREC)
        s_t, t_t = attention_scores(qk_t, sm_scale, softcap, FLAGS.has_softcap)
        if MASKED:
            ok = pair_ok(rows[None, :] + (len_k - len_q), cols[:, None], len_k, window, FLAGS)
            s_t = tl.where(ok & row_ok[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += dot(cast(p_t, do.dtype, PREC), do, None, PREC)
        dp_t = dot(v, tl.trans(do), None, PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if FLAGS.has_softcap:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += dot(cast(ds_t, q.dtype, PREC), q, None, PREC)
    return dk, dv


@attention_flags
@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, sm_scale, softcap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    total_k, num_seqs, num_kv_heads, group, head_dim,
    IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, FLAGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK and dV of one block of keys, summed over the query heads of its GQA group and
    the query blocks that may see it (key blocks in order: under causal masking the first
    are seen by the most queries, and start first). The tail program zeroes dK and dV on
    the rows past cu_seqlens_k[-1]."""
    (active, tail, kh, n_lo, num_n, offs_m, offs_n, offs_d, d_ok, cols, col_ok, ktok, k, v, q_start, k_start, len_q,
     len_k) = key_program(K, V, CuQ, CuK, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, num_kv_heads, head_dim,
                          FLAGS, BLOCK_M, BLOCK_N, BLOCK_D)
    if active:
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        lo, full_lo, full_hi, hi = query_blocks(n_lo, len_q, len_k, window, FLAGS, BLOCK_M, BLOCK_N)
        for g in range(0, group):  # GQA: sum over the query heads sharing this key/value head
            h = kh * group + g
            q_base = Q + h * stride_qh
            do_base = DOut + h * stride_doh
            lse_base = Lse + h.to(tl.int64) * stride_lh
            delta_base = Delta + h.to(tl.int64) * stride_lh
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     q_start, cols, len_q, len_k, window, lo, full_lo, sm_scale, softcap, offs_m,
                                     offs_d, d_ok, True, FLAGS, PREC, BLOCK_M)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     q_start, cols, len_q, len_k, window, full_lo, full_hi, sm_scale, softcap,
                                     offs_m, offs_d, d_ok, False, FLAGS, PREC, BLOCK_M)
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     q_start, cols, len_q, len_k, window, full_hi, hi, sm_scale, softcap, offs_m,
                                     offs_d, d_ok, True, FLAGS, PREC, BLOCK_M)
        mask = col_ok[:, None] & d_ok[None, :]
        tl.store(DK + ktok[:, None] * stride_dkt + kh * stride_dkh + offs_d[None, :],
                 cast(dk * sm_scale, DK.dtype.element_ty, PREC), mask=mask)
        tl.store(DV + ktok[:, None] * stride_dvt + kh * stride_dvh + offs_d[None, :],
                 cast(dv, DV.dtype.element_ty, PREC), mask=mask)
    if tail:
        start = k_start + n_lo
        zero_rows(DK + kh * stride_dkh, stride_dkt, start, total_k, num_n * BLOCK_N, offs_n, offs_d, d_ok, BLOCK_N,
                  BLOCK_D)
        zero_rows(DV + kh * stride_dvh, stride_dvt, start, total_k, num_n * BLOCK_N, offs_n, offs_d, d_ok, BLOCK_N,
                  BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, lo, hi, sm_scale,
                  softcap, offs_n, offs_d, d_ok, MASKED: tl.constexpr, FLAGS: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s, t = key_block_scores(q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, start_n, sm_scale,
                                      softcap, offs_n, offs_d, d_ok, MASKED, FLAGS, PREC)
        p = tl.exp2(s - lse[:, None])
        dp = dot(do, tl.trans(v), None, PREC)
        ds = p * (dp - delta[:, None])
        if FLAGS.has_softcap:
            ds = ds * (1.0 - t * t)
        dq += dot(cast(ds, k.dtype, PREC), k, None, PREC)
    return dq


@attention_flags
@triton.jit
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, sm_scale, softcap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    total_q, num_seqs, num_heads, group, head_dim,
    IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, FLAGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one block of queries, from the key blocks it may see (the forward's
    order and masking). The tail program zeroes dQ on the rows past cu_seqlens_q[-1]."""
    (active, tail, h, m_lo, num_m, q_start, offs_m, offs_n, offs_d, d_ok, row_ok, tok, q, k_base, v_base, qpos, len_q,
     len_k) = query_program(Q, K, V, CuQ, CuK, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            num_seqs, num_heads, group, head_dim, FLAGS, BLOCK_M, BLOCK_N, BLOCK_D)
    if active:
        do = load_rows(DOut + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], row_ok, d_ok, True,
                       FLAGS.even_d)
        lse, delta = _lse_delta(Lse + h.to(tl.int64) * stride_lh, Delta + h.to(tl.int64) * stride_lh, tok, row_ok, True)
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        lo, full_lo, full_hi, hi = key_blocks(m_lo, len_q, len_k, window, FLAGS, BLOCK_M, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, lo,
                           full_lo, sm_scale, softcap, offs_n, offs_d, d_ok, True, FLAGS, PREC, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, full_lo,
                           full_hi, sm_scale, softcap, offs_n, offs_d, d_ok, False, FLAGS, PREC, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                           full_hi, hi, sm_scale, softcap, offs_n, offs_d, d_ok, True, FLAGS, PREC, BLOCK_N)
        tl.store(DQ + tok[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                 cast(dq * sm_scale, DQ.dtype.element_ty, PREC), mask=row_ok[:, None] & d_ok[None, :])
    if tail:
        zero_rows(DQ + h * stride_dqh, stride_dqt, q_start + m_lo, total_q, num_m * BLOCK_M, offs_m, offs_d, d_ok,
                  BLOCK_M, BLOCK_D)


# ---------------------------------------------------------------------------------------
# Launcher


def varlen_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool,
    softmax_scale: float, window: int | None, softcap: float | None,
    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: dq [T, Hq, D], dk/dv [Tk, Hkv, D] in the inputs' dtype from dout
    [T, Hq, D] and the forward's out and lse. Rows past cu_seqlens[-1] get zero gradient."""
    check_triton_device("varlen_attention", q)
    dout, q, k, v, out = (unit_last_stride(x) for x in (dout, q, k, v, out))
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    for name, t, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        check_out(name, t, ref.shape, ref.dtype, ref.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if total_q == 0 or total_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    num_seqs = cu_seqlens_q.numel() - 1
    block_d = dot_block(d)
    common = dict(IS_CAUSAL=causal, PREC=dot_mode(q.dtype), BLOCK_D=block_d)
    delta = torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
    with on_device(q.device):
        block_t = 16 if interpreting() else 64
        _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), hq)](
            out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
            total_q, d, BLOCK_T=block_t, BLOCK_D=block_d,
        )
        cfg = tuned_config("dkdv", d, q.dtype, causal, q.device)
        grid = ((num_seqs + 1) * hkv, grid_blocks(max_seqlen_k, cfg["BLOCK_N"]))
        _varlen_attn_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, softcap or 0.0, window or 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            total_k, num_seqs, hkv, hq // hkv, d, **common, **cfg,
        )
        cfg = tuned_config("dq", d, q.dtype, causal, q.device)
        grid = ((num_seqs + 1) * hq, grid_blocks(max_seqlen_q, cfg["BLOCK_M"]))
        _varlen_attn_bwd_dq_kernel[grid](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, softmax_scale, softcap or 0.0, window or 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            total_q, num_seqs, hq, hq // hkv, d, **common, **cfg,
        )
    return dq, dk, dv
