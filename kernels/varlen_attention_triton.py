"""Triton kernels of varlen attention (the ``impl="triton"`` backend of
``kernels.varlen_attention``; see that module for the algorithm and the contract)."""
import types

import torch

from ._dispatch import on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux only; the torch backend still works without it
    triton = types.SimpleNamespace(jit=lambda fn: fn, heuristics=lambda values: (lambda fn: fn))
    tl = types.SimpleNamespace(constexpr=lambda value: value)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    # tl.tanh is not in every triton.language we support; exp2 of a non-positive argument
    # never overflows.
    e = tl.exp2(tl.abs(x) * (-2.0 * 1.4426950408889634))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _key_blocks(m_lo, len_q, len_k, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) that queries [m_lo, m_lo + BLOCK_M) of a sequence may see, and the
    blocks [full_lo, full_hi) inside it where every (query, key) pair is allowed (no mask).
    lo, full_lo, full_hi are multiples of BLOCK_N unless clipped to hi. Query i sits at
    key position i + len_k - len_q (bottom-right alignment). Every division here is of a
    non-negative number: triton's // truncates toward zero on the GPU but floors under the
    interpreter."""
    shift = len_k - len_q
    lo = shift * 0  # a tensor, not a Python int, so that every branch below has one type
    hi = len_k
    full_lo = lo
    full_hi = (len_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(hi, tl.maximum(m_lo + BLOCK_M + shift, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(m_lo + shift + 1, 0) // BLOCK_N) * BLOCK_N)
    if HAS_WINDOW:
        lo = (tl.maximum(m_lo + shift - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m_lo + BLOCK_M + shift - window, 0), BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_blocks(n_lo, len_q, len_k, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transpose of _key_blocks: queries [lo, hi) that may see keys [n_lo, n_lo +
    BLOCK_N), and the mask-free query blocks [full_lo, full_hi) (those also lie wholly
    inside the sequence, since their rows are read without a row mask)."""
    shift = len_k - len_q
    lo = shift * 0
    hi = len_q
    full_lo = lo
    full_hi = (len_q // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        lo = (tl.maximum(n_lo - shift, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n_lo + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(n_lo + BLOCK_N - 1 + window - shift, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(n_lo + window - shift, 0) // BLOCK_M) * BLOCK_M)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _pair_ok(qpos, kpos, len_k, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Allowed (query, key) pairs; qpos and kpos are broadcastable positions in key space."""
    ok = kpos < len_k
    if IS_CAUSAL:
        ok = ok & (kpos <= qpos)
    if HAS_WINDOW:
        ok = ok & (kpos > qpos - window)
    return ok


@triton.jit
def _seq_bounds(CuQ, CuK, b):
    """First query token, query count, first key token and key count of sequence b."""
    q_start = tl.load(CuQ + b)
    k_start = tl.load(CuK + b)
    return q_start, tl.load(CuQ + b + 1) - q_start, k_start, tl.load(CuK + b + 1) - k_start


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _zero_rows(base, stride_t, start, end, step, offs_m, offs_d, d_ok, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zero rows [start, end) of a [rows, D] slice, this program taking every ``step``-th
    block (the tokens past cu_seqlens[-1], which no sequence owns)."""
    for r0 in range(start, end, step):
        rows = r0 + offs_m
        ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
        tl.store(ptrs, tl.zeros((BLOCK_R, BLOCK_D), tl.float32),
                 mask=(rows < end)[:, None] & d_ok[None, :])


@triton.jit
def _scores(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scores in log2 units from the raw Q K^T, and tanh(.) of the softcap (for dS)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (sm_scale / softcap))
        s = t * (softcap * _LOG2E)
    else:
        t = qk
        s = qk * (sm_scale * _LOG2E)
    return s, t


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, lo, hi,
               sm_scale, softcap, offs_n, offs_d, d_ok,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_k
        k = _load_rows(k_base + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        v = _load_rows(v_base + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = _scores(qk, sm_scale, softcap, HAS_SOFTCAP)
        if MASKED:
            s = tl.where(_pair_ok(qpos[:, None], cols[None, :], len_k, window, IS_CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.heuristics({
    "HAS_WINDOW": lambda a: a["window"] > 0,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
    "EVEN_D": lambda a: a["head_dim"] == a["BLOCK_D"],
})
@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, sm_scale, softcap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    total_q, num_seqs, num_heads, group, head_dim,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    num_m = tl.num_programs(1)
    pid_m = num_m - 1 - tl.program_id(1)  # causal: the last query blocks carry the most work, start them first
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if b < num_seqs:
        q_start, len_q, k_start, len_k = _seq_bounds(CuQ, CuK, b)
        m_lo = pid_m * BLOCK_M
        if m_lo < len_q:
            rows = m_lo + offs_m
            row_ok = rows < len_q
            tok = (q_start + rows).to(tl.int64)
            q = _load_rows(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
            kh = h // group
            k_base = K + k_start.to(tl.int64) * stride_kt + kh * stride_kh
            v_base = V + k_start.to(tl.int64) * stride_vt + kh * stride_vh
            qpos = rows + (len_k - len_q)
            acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            lo, full_lo, full_hi, hi = _key_blocks(m_lo, len_q, len_k, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                                       lo, full_lo, sm_scale, softcap, offs_n, offs_d, d_ok, True, IS_CAUSAL,
                                       HAS_WINDOW, HAS_SOFTCAP, EVEN_D, DOT_PRECISION, BLOCK_N)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                                       full_lo, full_hi, sm_scale, softcap, offs_n, offs_d, d_ok, False, IS_CAUSAL,
                                       HAS_WINDOW, HAS_SOFTCAP, EVEN_D, DOT_PRECISION, BLOCK_N)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                                       full_hi, hi, sm_scale, softcap, offs_n, offs_d, d_ok, True, IS_CAUSAL,
                                       HAS_WINDOW, HAS_SOFTCAP, EVEN_D, DOT_PRECISION, BLOCK_N)
            seen = l_i > 0.0  # a query that sees no key: out 0, lse -inf
            out = acc / tl.where(seen, l_i, 1.0)[:, None]
            lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
            o_ptrs = Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            tl.store(Lse + h.to(tl.int64) * stride_lh + tok, lse, mask=row_ok)
    else:
        tail = tl.load(CuQ + num_seqs)
        _zero_rows(Out + h * stride_oh, stride_ot, tail + pid_m * BLOCK_M, total_q, num_m * BLOCK_M, offs_m, offs_d, d_ok,
                   BLOCK_M, BLOCK_D)
        for r0 in range(tail + pid_m * BLOCK_M, total_q, num_m * BLOCK_M):
            rows = r0 + offs_m
            tl.store(Lse + h.to(tl.int64) * stride_lh + rows, tl.full((BLOCK_M,), float("-inf"), tl.float32),
                     mask=rows < total_q)


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
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, q_start, cols,
                    len_q, len_k, window, lo, hi, sm_scale, softcap, offs_m, offs_d, d_ok,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    # Transposed tiles ([keys, queries]) so that dK and dV accumulate without transposes.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < len_q
        tok = (q_start + rows).to(tl.int64)
        q = _load_rows(q_base + tok[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, MASKED, EVEN_D)
        do = _load_rows(do_base + tok[:, None] * stride_dot + offs_d[None, :], row_ok, d_ok, MASKED, EVEN_D)
        if MASKED:
            lse = tl.load(lse_base + tok, mask=row_ok, other=0.0) * _LOG2E
            lse = tl.where(lse == float("-inf"), 0.0, lse)  # a query that saw no key: its p is 0 anyway
            delta = tl.load(delta_base + tok, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + tok) * _LOG2E
            delta = tl.load(delta_base + tok)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        s_t, t_t = _scores(qk_t, sm_scale, softcap, HAS_SOFTCAP)
        if MASKED:
            ok = _pair_ok(rows[None, :] + (len_k - len_q), cols[:, None], len_k, window, IS_CAUSAL, HAS_WINDOW)
            s_t = tl.where(ok & row_ok[None, :], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.heuristics({
    "HAS_WINDOW": lambda a: a["window"] > 0,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
    "EVEN_D": lambda a: a["head_dim"] == a["BLOCK_D"],
})
@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, CuQ, CuK, sm_scale, softcap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    total_k, num_seqs, num_kv_heads, group, head_dim,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)  # causal: the first key blocks are seen by the most queries
    num_n = tl.num_programs(1)
    b = pid_bh // num_kv_heads
    kh = pid_bh % num_kv_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if b < num_seqs:
        q_start, len_q, k_start, len_k = _seq_bounds(CuQ, CuK, b)
        n_lo = pid_n * BLOCK_N
        if n_lo < len_k:
            cols = n_lo + offs_n
            col_ok = cols < len_k
            ktok = (k_start + cols).to(tl.int64)
            k = _load_rows(K + ktok[:, None] * stride_kt + kh * stride_kh + offs_d[None, :], col_ok, d_ok, True, EVEN_D)
            v = _load_rows(V + ktok[:, None] * stride_vt + kh * stride_vh + offs_d[None, :], col_ok, d_ok, True, EVEN_D)
            dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            lo, full_lo, full_hi, hi = _query_blocks(n_lo, len_q, len_k, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
            for g in range(0, group):  # GQA: sum over the query heads sharing this key/value head
                h = kh * group + g
                q_base = Q + h * stride_qh
                do_base = DOut + h * stride_doh
                lse_base = Lse + h.to(tl.int64) * stride_lh
                delta_base = Delta + h.to(tl.int64) * stride_lh
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                         q_start, cols, len_q, len_k, window, lo, full_lo, sm_scale, softcap, offs_m,
                                         offs_d, d_ok, True, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, EVEN_D,
                                         DOT_PRECISION, BLOCK_M)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                         q_start, cols, len_q, len_k, window, full_lo, full_hi, sm_scale, softcap,
                                         offs_m, offs_d, d_ok, False, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, EVEN_D,
                                         DOT_PRECISION, BLOCK_M)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                         q_start, cols, len_q, len_k, window, full_hi, hi, sm_scale, softcap, offs_m,
                                         offs_d, d_ok, True, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, EVEN_D,
                                         DOT_PRECISION, BLOCK_M)
            mask = col_ok[:, None] & d_ok[None, :]
            tl.store(DK + ktok[:, None] * stride_dkt + kh * stride_dkh + offs_d[None, :],
                     (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
            tl.store(DV + ktok[:, None] * stride_dvt + kh * stride_dvh + offs_d[None, :],
                     dv.to(DV.dtype.element_ty), mask=mask)
    else:
        tail = tl.load(CuK + num_seqs)
        start = tail + pid_n * BLOCK_N
        _zero_rows(DK + kh * stride_dkh, stride_dkt, start, total_k, num_n * BLOCK_N, offs_n, offs_d, d_ok, BLOCK_N,
                   BLOCK_D)
        _zero_rows(DV + kh * stride_dvh, stride_dvt, start, total_k, num_n * BLOCK_N, offs_n, offs_d, d_ok, BLOCK_N,
                   BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, lo, hi,
                  sm_scale, softcap, offs_n, offs_d, d_ok,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < len_k
        k = _load_rows(k_base + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        v = _load_rows(v_base + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, t = _scores(qk, sm_scale, softcap, HAS_SOFTCAP)
        if MASKED:
            s = tl.where(_pair_ok(qpos[:, None], cols[None, :], len_k, window, IS_CAUSAL, HAS_WINDOW), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.heuristics({
    "HAS_WINDOW": lambda a: a["window"] > 0,
    "HAS_SOFTCAP": lambda a: a["softcap"] > 0,
    "EVEN_D": lambda a: a["head_dim"] == a["BLOCK_D"],
})
@triton.jit
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, CuQ, CuK, sm_scale, softcap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    total_q, num_seqs, num_heads, group, head_dim,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    num_m = tl.num_programs(1)
    pid_m = num_m - 1 - tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if b < num_seqs:
        q_start, len_q, k_start, len_k = _seq_bounds(CuQ, CuK, b)
        m_lo = pid_m * BLOCK_M
        if m_lo < len_q:
            rows = m_lo + offs_m
            row_ok = rows < len_q
            tok = (q_start + rows).to(tl.int64)
            q = _load_rows(Q + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
            do = _load_rows(DOut + tok[:, None] * stride_dot + h * stride_doh + offs_d[None, :], row_ok, d_ok, True,
                            EVEN_D)
            lse = tl.load(Lse + h.to(tl.int64) * stride_lh + tok, mask=row_ok, other=0.0) * _LOG2E
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(Delta + h.to(tl.int64) * stride_lh + tok, mask=row_ok, other=0.0)
            kh = h // group
            k_base = K + k_start.to(tl.int64) * stride_kt + kh * stride_kh
            v_base = V + k_start.to(tl.int64) * stride_vt + kh * stride_vh
            qpos = rows + (len_k - len_q)
            dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            lo, full_lo, full_hi, hi = _key_blocks(m_lo, len_q, len_k, window, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
            dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, lo,
                               full_lo, sm_scale, softcap, offs_n, offs_d, d_ok, True, IS_CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, EVEN_D, DOT_PRECISION, BLOCK_N)
            dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                               full_lo, full_hi, sm_scale, softcap, offs_n, offs_d, d_ok, False, IS_CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, EVEN_D, DOT_PRECISION, BLOCK_N)
            dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                               full_hi, hi, sm_scale, softcap, offs_n, offs_d, d_ok, True, IS_CAUSAL, HAS_WINDOW,
                               HAS_SOFTCAP, EVEN_D, DOT_PRECISION, BLOCK_N)
            tl.store(DQ + tok[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                     (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        tail = tl.load(CuQ + num_seqs)
        _zero_rows(DQ + h * stride_dqh, stride_dqt, tail + pid_m * BLOCK_M, total_q, num_m * BLOCK_M, offs_m, offs_d,
                   d_ok, BLOCK_M, BLOCK_D)


# ---------------------------------------------------------------------------------------
# Launchers


def triton_interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter (TRITON_INTERPRET=1
    when triton was imported): then they run on CPU tensors."""
    return type(_tanh).__name__ == "InterpretedFunction"


def check_triton_device(op: str, x: torch.Tensor) -> None:
    """Raise a clear error instead of letting triton fail on a tensor it cannot launch on."""
    if x.is_cuda or triton_interpreted():
        return
    raise RuntimeError(
        f"{op}: impl='triton' needs CUDA tensors (got a tensor on {x.device}); on CPU use impl='torch', or set "
        "TRITON_INTERPRET=1 before triton is first imported to run the kernels under the Triton interpreter"
    )


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dimension >= 16


def _config(kind: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes. Interpreter: the smallest tiles tl.dot accepts, so that tests on small
    shapes cross block boundaries. GPU: untuned starting points for sm_80/sm_90, sized so
    that the float32 accumulators (fwd: acc [BLOCK_M, D]; dkdv: dk and dv [BLOCK_N, D];
    dq: dq [BLOCK_M, D]) stay near 64 registers a thread, and the pipelined K/V (or Q/dO)
    tiles fit the A100's shared memory too.
    TODO(H100): autotune per (kind, head_dim, dtype, causal) over BLOCK_M, BLOCK_N in
    {16, 32, 64, 128}, num_warps in {4, 8}, num_stages in {2, 3, 4}; the grid depends on
    the query/key tile, so the tuner needs a grid lambda of META."""
    if triton_interpreted():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    wide = head_dim > 128 or dtype == torch.float32
    warps = 4 if head_dim <= 64 else 8
    if kind == "fwd":
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2) if wide else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=warps, num_stages=3)
    if kind == "dkdv":  # the key/value tile and dk/dv stay, query tiles stream
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2) if wide else \
            dict(BLOCK_M=32, BLOCK_N=64, num_warps=warps, num_stages=3)
    # dq: the query tile and dq stay, key tiles stream
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2) if wide else \
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)


def _rows_last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _grid_blocks(op: str, max_seqlen: int, block: int) -> int:
    n = max(1, triton.cdiv(max_seqlen, block))
    if n > 65535:
        raise ValueError(f"{op}: max_seqlen {max_seqlen} needs {n} blocks of {block}, over CUDA's grid limit 65535")
    return n


def _check_out(name: str, t: torch.Tensor | None, shape, dtype, device) -> None:
    if t is not None and (tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or t.stride(-1) != 1):
        raise ValueError(f"varlen_attention: {name} must be {dtype} {tuple(shape)} on {device} with unit last stride, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


def varlen_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, *, causal: bool, softmax_scale: float, window: int | None, softcap: float | None,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. q [T, Hq, D], k/v [Tk, Hkv, D] (one dtype of float16/bfloat16/float32),
    cu_seqlens_* [B+1] int32. Returns out [T, Hq, D] (q's dtype) and lse [Hq, T] float32;
    ``out``/``lse`` may be given to write into. Rows past cu_seqlens_q[-1] get out 0, lse -inf."""
    check_triton_device("varlen_attention", q)
    q, k, v = (_rows_last_contiguous(x) for x in (q, k, v))
    total_q, hq, d = q.shape
    _check_out("out", out, q.shape, q.dtype, q.device)
    _check_out("lse", lse, (hq, total_q), torch.float32, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(hq, total_q, dtype=torch.float32, device=q.device) if lse is None else lse
    if lse.stride(0) != total_q and total_q > 0:
        raise ValueError("varlen_attention: lse must be contiguous [Hq, T]")
    if total_q == 0:
        return out, lse
    if k.shape[0] == 0:  # no keys at all: every query sees none
        return out.zero_(), lse.fill_(float("-inf"))
    num_seqs = cu_seqlens_q.numel() - 1
    cfg = _config("fwd", d, q.dtype)
    grid = ((num_seqs + 1) * hq, _grid_blocks("varlen_attention", max_seqlen_q, cfg["BLOCK_M"]))
    with on_device(q.device):
        _varlen_attn_fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, softcap or 0.0, window or 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            lse.stride(0), total_q, num_seqs, hq, hq // k.shape[1], d,
            IS_CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=_block_d(d), **cfg,
        )
    return out, lse


def varlen_attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool,
    softmax_scale: float, window: int | None, softcap: float | None,
    dq: torch.Tensor | None = None, dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: dq [T, Hq, D], dk/dv [Tk, Hkv, D] in the inputs' dtype from dout
    [T, Hq, D] and the forward's out and lse. Rows past cu_seqlens[-1] get zero gradient."""
    check_triton_device("varlen_attention", q)
    dout, q, k, v, out = (_rows_last_contiguous(x) for x in (dout, q, k, v, out))
    total_q, hq, d = q.shape
    total_k, hkv, _ = k.shape
    for name, t, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_out(name, t, ref.shape, ref.dtype, ref.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if total_q == 0 or total_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    num_seqs = cu_seqlens_q.numel() - 1
    block_d = _block_d(d)
    common = dict(IS_CAUSAL=causal, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=block_d)
    delta = torch.empty(hq, total_q, dtype=torch.float32, device=q.device)
    with on_device(q.device):
        block_t = 16 if triton_interpreted() else 64
        _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), hq)](
            out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
            total_q, d, BLOCK_T=block_t, BLOCK_D=block_d,
        )
        cfg = _config("dkdv", d, q.dtype)
        grid = ((num_seqs + 1) * hkv, _grid_blocks("varlen_attention", max_seqlen_k, cfg["BLOCK_N"]))
        _varlen_attn_bwd_dkdv_kernel[grid](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, softmax_scale, softcap or 0.0, window or 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
            total_k, num_seqs, hkv, hq // hkv, d, **common, **cfg,
        )
        cfg = _config("dq", d, q.dtype)
        grid = ((num_seqs + 1) * hq, _grid_blocks("varlen_attention", max_seqlen_q, cfg["BLOCK_M"]))
        _varlen_attn_bwd_dq_kernel[grid](
            q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, softmax_scale, softcap or 0.0, window or 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
            dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            total_q, num_seqs, hq, hq // hkv, d, **common, **cfg,
        )
    return dq, dk, dv


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs must not silently drop to TF32 on the GPU (the model's float32 checks
    # hold it to 1e-4); for 16-bit inputs the setting has no effect.
    return "ieee" if dtype == torch.float32 else "tf32"


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
