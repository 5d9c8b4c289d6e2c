"""Triton kernels of varlen attention, forward (the ``impl="triton"`` backend of
``kernels.varlen_attention``; see that module for the algorithm and the contract), and the
tile helpers the backward kernels (``varlen_attention_bwd_triton.py``) share with it: the
prologue of a program over a block of queries (``query_program``: forward, dQ) or of keys
(``key_program``: dK/dV), the causal/window block ranges, and the masked loads."""
from typing import NamedTuple

import torch

from . import configs
from .dispatch import check_triton_device, on_device
from .triton_base import (LN2, attention_scores, cast, dot, dot_block, dot_mode, interpreting, online_softmax_step,
                          tl, triton, unit_last_stride)


class Flags(NamedTuple):
    """The compile-time variant of a varlen attention kernel: one constexpr, ``FLAGS``, that
    the kernel hands to every tile helper instead of four loose flags. Bools only: triton
    3.6 reads a field of a constexpr NamedTuple as a plain Python value, and passes such a
    value on to a @triton.jit helper only if it is a bool or a number (so PREC, a
    string, stays a kernel argument of its own)."""
    is_causal: bool
    has_window: bool
    has_softcap: bool
    even_d: bool  # head_dim == BLOCK_D: no mask on the head dims


# FLAGS of every varlen attention kernel, from its launch arguments (IS_CAUSAL; window and
# softcap, 0 for None; head_dim and BLOCK_D). The kernels read IS_CAUSAL through FLAGS only.
attention_flags = triton.heuristics({
    "FLAGS": lambda a: Flags(a["IS_CAUSAL"], a["window"] > 0, a["softcap"] > 0, a["head_dim"] == a["BLOCK_D"]),
})


@triton.jit
def key_blocks(m_lo, len_q, len_k, window, FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    if FLAGS.is_causal:
        hi = tl.minimum(hi, tl.maximum(m_lo + BLOCK_M + shift, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(m_lo + shift + 1, 0) // BLOCK_N) * BLOCK_N)
    if FLAGS.has_window:
        lo = (tl.maximum(m_lo + shift - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(m_lo + BLOCK_M + shift - window, 0), BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def query_blocks(n_lo, len_q, len_k, window, FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The transpose of key_blocks: queries [lo, hi) that may see keys [n_lo, n_lo +
    BLOCK_N), and the mask-free query blocks [full_lo, full_hi) (those also lie wholly
    inside the sequence, since their rows are read without a row mask)."""
    shift = len_k - len_q
    lo = shift * 0
    hi = len_q
    full_lo = lo
    full_hi = (len_q // BLOCK_M) * BLOCK_M
    if FLAGS.is_causal:
        lo = (tl.maximum(n_lo - shift, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n_lo + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
    if FLAGS.has_window:
        hi = tl.minimum(hi, tl.maximum(n_lo + BLOCK_N - 1 + window - shift, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(n_lo + window - shift, 0) // BLOCK_M) * BLOCK_M)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def pair_ok(qpos, kpos, len_k, window, FLAGS: tl.constexpr):
    """Allowed (query, key) pairs; qpos and kpos are broadcastable positions in key space."""
    ok = kpos < len_k
    if FLAGS.is_causal:
        ok = ok & (kpos <= qpos)
    if FLAGS.has_window:
        ok = ok & (kpos > qpos - window)
    return ok


@triton.jit
def load_rows(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
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
def zero_rows(base, stride_t, start, end, step, offs_m, offs_d, d_ok, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zero rows [start, end) of a [rows, D] slice, this program taking every ``step``-th
    block (the tokens past cu_seqlens[-1], which no sequence owns)."""
    for r0 in range(start, end, step):
        rows = r0 + offs_m
        ptrs = base + rows.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
        tl.store(ptrs, tl.zeros((BLOCK_R, BLOCK_D), tl.float32),
                 mask=(rows < end)[:, None] & d_ok[None, :])


@triton.jit
def load_tokens(base, stride_t, start, lo, length, offs, offs_d, d_ok, CHECK_ROWS: tl.constexpr,
                EVEN_D: tl.constexpr):
    """Positions lo + offs of a sequence whose first token is ``start`` in a [tokens, D]
    slice at ``base`` (one head): (positions, positions < length, token indices in int64,
    the tile, zero past length when CHECK_ROWS)."""
    pos = lo + offs
    ok = pos < length
    tok = (start + pos).to(tl.int64)
    return pos, ok, tok, load_rows(base + tok[:, None] * stride_t + offs_d[None, :], ok, d_ok, CHECK_ROWS, EVEN_D)


@triton.jit
def program_tile(CuQ, CuK, num_seqs, num_heads, head_dim, KEYS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where this program stands. Grid axis 0 enumerates (sequence b, head) pairs; b ==
    num_seqs is the tail, the tokens past cu_seqlens[-1] that no sequence owns, seen as a
    sequence of length 0 that starts at cu_seqlens[-1] (the index of its end is clamped to
    its start, so nothing past cu_seqlens is read). Axis 1 enumerates blocks of BLOCK_N keys
    (KEYS) or of BLOCK_M queries, the latter in reverse order: under causal masking the last
    query blocks carry the most work, and start first. Returns (tail, head, the block's
    first row, the number of blocks, active: that row lies inside the sequence, the first
    query token, query count, first key token and key count of the sequence, the query,
    key and head-dim offsets of a tile, the mask of the head dims < head_dim)."""
    pid = tl.program_id(0)
    num_blocks = tl.num_programs(1)
    if KEYS:
        block = tl.program_id(1)
    else:
        block = num_blocks - 1 - tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    b = pid // num_heads
    q_start = tl.load(CuQ + b)
    k_start = tl.load(CuK + b)
    end = tl.minimum(b + 1, num_seqs)
    len_q = tl.load(CuQ + end) - q_start
    len_k = tl.load(CuK + end) - k_start
    if KEYS:
        block_lo = block * BLOCK_N
        active = block_lo < len_k
    else:
        block_lo = block * BLOCK_M
        active = block_lo < len_q
    return (b == num_seqs, pid % num_heads, block_lo, num_blocks, active, q_start, len_q, k_start, len_k,
            tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), offs_d, offs_d < head_dim)


@triton.jit
def query_program(Q, K, V, CuQ, CuK, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs,
                  num_heads, group, head_dim, FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """The prologue of a program over a block of queries (forward, dQ), whether or not it is
    active: program_tile's (active, tail, head h, first row m_lo, block count, first query
    token, offs_m, offs_n, offs_d, d_ok), the query tile (row mask, token indices and q,
    zero on rows past the sequence: all of them when not active), the bases of the
    sequence's keys and values in the GQA group's key/value head, the queries' positions in
    key space (bottom-right alignment), the query count and the key count."""
    tail, h, m_lo, num_m, active, q_start, len_q, k_start, len_k, offs_m, offs_n, offs_d, d_ok = program_tile(
        CuQ, CuK, num_seqs, num_heads, head_dim, False, BLOCK_M, BLOCK_N, BLOCK_D)
    rows, row_ok, tok, q = load_tokens(Q + h * stride_qh, stride_qt, q_start, m_lo, len_q, offs_m, offs_d, d_ok, True,
                                       FLAGS.even_d)
    kh = h // group
    k_base = K + k_start.to(tl.int64) * stride_kt + kh * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kh * stride_vh
    return (active, tail, h, m_lo, num_m, q_start, offs_m, offs_n, offs_d, d_ok, row_ok, tok, q, k_base, v_base,
            rows + (len_k - len_q), len_q, len_k)


@triton.jit
def key_program(K, V, CuQ, CuK, stride_kt, stride_kh, stride_vt, stride_vh, num_seqs, num_kv_heads, head_dim,
                FLAGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The prologue of a program over a block of keys (dK/dV), whether or not it is active:
    program_tile's (active, tail, key/value head kh, first key n_lo, block count, offs_m,
    offs_n, offs_d, d_ok), the key positions, their mask and token indices, the k and v tiles
    (zero on keys past the sequence: all of them when not active), and the sequence's first
    query token, first key token, query count and key count."""
    tail, kh, n_lo, num_n, active, q_start, len_q, k_start, len_k, offs_m, offs_n, offs_d, d_ok = program_tile(
        CuQ, CuK, num_seqs, num_kv_heads, head_dim, True, BLOCK_M, BLOCK_N, BLOCK_D)
    cols, col_ok, ktok, k = load_tokens(K + kh * stride_kh, stride_kt, k_start, n_lo, len_k, offs_n, offs_d, d_ok, True,
                                        FLAGS.even_d)
    v = load_rows(V + ktok[:, None] * stride_vt + kh * stride_vh + offs_d[None, :], col_ok, d_ok, True, FLAGS.even_d)
    return (active, tail, kh, n_lo, num_n, offs_m, offs_n, offs_d, d_ok, cols, col_ok, ktok, k, v, q_start, k_start,
            len_q, len_k)


@triton.jit
def key_block_scores(q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, start_n, sm_scale, softcap,
                     offs_n, offs_d, d_ok, MASKED: tl.constexpr, FLAGS: tl.constexpr, PREC: tl.constexpr):
    """Keys start_n + offs_n of a query tile: (k, v, the scores in log2 units, -inf where
    MASKED rules a pair out, and tanh of the softcap; see attention_scores)."""
    cols = start_n + offs_n
    col_ok = cols < len_k
    k = load_rows(k_base + cols.to(tl.int64)[:, None] * stride_kt + offs_d[None, :], col_ok, d_ok, MASKED, FLAGS.even_d)
    v = load_rows(v_base + cols.to(tl.int64)[:, None] * stride_vt + offs_d[None, :], col_ok, d_ok, MASKED, FLAGS.even_d)
    qk = dot(q, tl.trans(k), None, PREC)
    s, t = attention_scores(qk, sm_scale, softcap, FLAGS.has_softcap)
    if MASKED:
        s = tl.where(pair_ok(qpos[:, None], cols[None, :], len_k, window, FLAGS), s, float("-inf"))
    return k, v, s, t


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, lo, hi, sm_scale, softcap,
               offs_n, offs_d, d_ok, MASKED: tl.constexpr, FLAGS: tl.constexpr, PREC: tl.constexpr,
               BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        _, v, s, _ = key_block_scores(q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, start_n, sm_scale,
                                      softcap, offs_n, offs_d, d_ok, MASKED, FLAGS, PREC)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, s, v, PREC)
    return acc, l_i, m_i


@attention_flags
@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, sm_scale, softcap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    total_q, num_seqs, num_heads, group, head_dim,
    IS_CAUSAL: tl.constexpr, PREC: tl.constexpr, FLAGS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Out and lse of one block of queries: the online softmax over the key blocks it may
    see, the mask evaluated only on blocks that cut the causal/window band. The tail
    program writes out 0 and lse -inf on the rows past cu_seqlens_q[-1]."""
    (active, tail, h, m_lo, num_m, q_start, offs_m, offs_n, offs_d, d_ok, row_ok, tok, q, k_base, v_base, qpos, len_q,
     len_k) = query_program(Q, K, V, CuQ, CuK, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                            num_seqs, num_heads, group, head_dim, FLAGS, BLOCK_M, BLOCK_N, BLOCK_D)
    if active:
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        lo, full_lo, full_hi, hi = key_blocks(m_lo, len_q, len_k, window, FLAGS, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window, lo,
                                   full_lo, sm_scale, softcap, offs_n, offs_d, d_ok, True, FLAGS, PREC,
                                   BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                                   full_lo, full_hi, sm_scale, softcap, offs_n, offs_d, d_ok, False, FLAGS,
                                   PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, qpos, len_k, window,
                                   full_hi, hi, sm_scale, softcap, offs_n, offs_d, d_ok, True, FLAGS, PREC,
                                   BLOCK_N)
        seen = l_i > 0.0  # a query that sees no key: out 0, lse -inf
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
        o_ptrs = Out + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, cast(out, Out.dtype.element_ty, PREC), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(Lse + h.to(tl.int64) * stride_lh + tok, lse, mask=row_ok)
    if tail:
        zero_rows(Out + h * stride_oh, stride_ot, q_start + m_lo, total_q, num_m * BLOCK_M, offs_m, offs_d, d_ok,
                  BLOCK_M, BLOCK_D)
        for r0 in range(q_start + m_lo, total_q, num_m * BLOCK_M):
            rows = r0 + offs_m
            tl.store(Lse + h.to(tl.int64) * stride_lh + rows, tl.full((BLOCK_M,), float("-inf"), tl.float32),
                     mask=rows < total_q)


# ---------------------------------------------------------------------------------------
# Launcher


def config(kind: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes of the forward ("fwd") and backward ("dkdv", "dq") kernels. Interpreter:
    the smallest tiles tl.dot accepts, so that tests on small shapes cross block boundaries.
    GPU: untuned starting points for sm_80/sm_90, sized so that the float32 accumulators
    (fwd: acc [BLOCK_M, D]; dkdv: dk and dv [BLOCK_N, D]; dq: dq [BLOCK_M, D]) stay near 64
    registers a thread, and the pipelined K/V (or Q/dO) tiles fit the A100's shared memory too.
    TODO(H100): autotune per (kind, head_dim, dtype, causal) over BLOCK_M, BLOCK_N in
    {16, 32, 64, 128}, num_warps in {4, 8}, num_stages in {2, 3, 4}; the grid depends on
    the query/key tile, so the tuner needs a grid lambda of META."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    wide = head_dim > 128 or dtype == torch.float32
    warps = 4 if head_dim <= 64 else 8
    if kind == "fwd":  # float32 (ieee dots) spills tens of KB here: a reference path, reported, not failed
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2) if wide else \
            dict(BLOCK_M=128, BLOCK_N=64, num_warps=warps, num_stages=3)
    if kind == "dkdv":  # the key/value tile and dk/dv stay, query tiles stream
        # No spill in bf16/fp16 under triton 3.6 and 3.9 (python -m kernels.launch_check).
        # d=64: 4 warps and 3 stages spilled 48-112 B under 3.9; 8 warps, 2 stages do not.
        # d=128: 64-key tiles with 2-3 stages spill under 3.6 (BLOCK_M 32: 100-312 B; BLOCK_M
        # 16: 8 B with softcap), 16 x 32 with 4 warps spills 36 B non-causal under 3.9;
        # 32 x 32 with 8 warps stays at <= 242 registers. The float32 tile may spill (80 B
        # under 3.6): a reference path, reported, not failed.
        if wide:
            return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=64 if head_dim <= 64 else 32, num_warps=8, num_stages=2)
    # dq: the query tile and dq stay, key tiles stream
    return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2) if wide else \
        dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)


def shape_class(head_dim: int, dtype: torch.dtype, causal: bool) -> str:
    """The class of a varlen_attention.fwd/dkdv/dq table entry: head dim, dtype, causal (the
    sequence lengths only change the grid's size)."""
    return configs.shape_class(d=head_dim, dtype=configs.dtype_name(dtype), causal=causal)


def tuned_config(kind: str, head_dim: int, dtype: torch.dtype, causal: bool, device: torch.device) -> dict:
    """The launch config of ``kind``: the device table's varlen_attention.<kind> entry, else
    :func:`config`."""
    return configs.choose(f"varlen_attention.{kind}", shape_class(head_dim, dtype, causal), device,
                          lambda: config(kind, head_dim, dtype))


def candidates(kind: str, head_dim: int, dtype: torch.dtype) -> list[dict]:
    """Configs tune.py times for ``kind`` (and the launch check compiles): :func:`config`'s
    first, then tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) around it; for head dims
    over 128 and float32, only tiles no larger than the heuristic's."""
    wide = head_dim > 128 or dtype == torch.float32
    tiles = {"fwd": ((128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                     (128, 128, 8, 2)),
             "dkdv": ((32, 64, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 3),
                      (64, 128, 8, 2)),
             "dq": ((128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (32, 64, 4, 3),
                    (128, 16, 8, 3))}[kind]
    if wide:
        tiles = {"fwd": ((64, 32, 4, 2), (32, 32, 4, 2)), "dkdv": ((16, 32, 4, 2), (16, 16, 4, 2)),
                 "dq": ((32, 16, 4, 2), (16, 16, 4, 2))}[kind]
    return configs.candidate_list(config(kind, head_dim, dtype), *(
        dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in tiles))


def grid_blocks(max_seqlen: int, block: int) -> int:
    """Blocks of ``block`` tokens along the grid's second axis (CUDA caps it at 65535)."""
    n = max(1, triton.cdiv(max_seqlen, block))
    if n > 65535:
        raise ValueError(f"varlen_attention: max_seqlen {max_seqlen} needs {n} blocks of {block}, over CUDA's grid "
                         "limit 65535")
    return n


def check_out(name: str, t: torch.Tensor | None, shape, dtype, device) -> None:
    """A caller's output buffer must have the expected shape, dtype, device and a unit last stride."""
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
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    total_q, hq, d = q.shape
    check_out("out", out, q.shape, q.dtype, q.device)
    check_out("lse", lse, (hq, total_q), torch.float32, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(hq, total_q, dtype=torch.float32, device=q.device) if lse is None else lse
    if lse.stride(0) != total_q and total_q > 0:
        raise ValueError("varlen_attention: lse must be contiguous [Hq, T]")
    if total_q == 0:
        return out, lse
    if k.shape[0] == 0:  # no keys at all: every query sees none
        return out.zero_(), lse.fill_(float("-inf"))
    num_seqs = cu_seqlens_q.numel() - 1
    cfg = tuned_config("fwd", d, q.dtype, causal, q.device)
    grid = ((num_seqs + 1) * hq, grid_blocks(max_seqlen_q, cfg["BLOCK_M"]))
    with on_device(q.device):
        _varlen_attn_fwd_kernel[grid](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, softcap or 0.0, window or 0,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            lse.stride(0), total_q, num_seqs, hq, hq // k.shape[1], d,
            IS_CAUSAL=causal, PREC=dot_mode(q.dtype), BLOCK_D=dot_block(d), **cfg,
        )
    return out, lse
