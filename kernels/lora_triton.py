"""Triton backend of lora_linear and lora_linear_multi.

Two schemes for the base GEMMs, chosen per shape class by timing both on the first call
(``_pick_gemm``; float32 and the interpreter take the first):

* "cublas" (below): the base GEMMs stay on cuBLAS; Triton kernels pre-write the rank-r
  term into y and dx, which cuBLAS reads back as C (beta=1);
* "fused": ``_gemm_lowrank_kernel`` (pointer loads) or ``_gemm_lowrank_tma_kernel`` (TMA
  descriptor loads, when the tensors are aligned for them), a Triton GEMM that adds the
  rank-r term as one more MMA into its accumulator before the single store of y (forward)
  or dx (backward, the dropout mask regenerated in its epilogue): two full passes fewer
  (the pre-write and its read-back, in each direction), if the Triton GEMM keeps up with
  cuBLAS.

Triton does the rank-r work, which is memory-bound, so the design counts bytes. N
tokens, in / out features, rank r, activations of 2 bytes (the "cublas" scheme):

forward   xa = dropout(x) @ A.T            shrink kernel: reads x once (2·N·in bytes)
          y  = scale * xa @ B.T + bias     expand kernel: writes y once (2·N·out)
          y += x @ W.T                     cuBLAS addmm with beta=1: reads y as C in the
                                           epilogue of a compute-bound GEMM
backward  dyB = dy @ B, dB = dy.T @ xa     one kernel, one read of dy (2·N·out); partial
                                           sums of dyB and dB added in float32 atomics
          dx = scale * (dyB @ A) * mask    one kernel: writes dx (2·N·in), reads x (2·N·in)
          dA = scale * dyB.T @ dropout(x)  for dA in the same pass, mask regenerated
          dx += dy @ W                     cuBLAS addmm with beta=1
          dW = dy.T @ x                    cuBLAS, only when weight requires grad

So the adapter costs 2·(2·N·in + 2·N·out) + 2·N·in bytes of extra traffic per step
(besides the [N, r] and [out, r] float32 side buffers, which live in L2): N=8192,
in=out=4096 gives 5 x 64 MiB, about 100 us at 3.3 TB/s. The dropout mask is never
stored: Philox (``tl.randint4x``, one call per 4 elements) regenerates it from the seed.

Above ``FUSED_DY_MAX_RANK`` the backward's dy pass is two cuBLAS GEMMs instead (one more
read of dy): holding dyB for a block of rows in registers limits the block to about 8K/r
rows, and the dB partials, (N / rows)·out·r floats, would then outweigh a second read of dy.

Multi-adapter (``lora_linear_multi``, inference): the same shrink / expand pair, where a
block of tokens loops over the distinct adapter ids it holds (read on the device, one
iteration per distinct id; one for a block of one adapter, as in prefill of packed
sequences). Small batches (decode) use blocks of one token, so no block waits on another
adapter's weights.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._dispatch import interpreting, on_device

FUSED_DY_MAX_RANK = 32  # padded rank up to which dyB and dB share one pass over dy
POISON = False  # tests: fill every output buffer with NaN before the kernels write it
TEST_BLOCKS: dict | None = None  # tests: force small blocks and several splits, e.g. dict(n=16, k=16, o=16, splits=2)
# Base GEMM + rank-r term: "fused" (one Triton GEMM writes y / dx with the term in its
# epilogue; "fused-tma" with TMA loads) or "cublas" (a Triton kernel pre-writes the term,
# cuBLAS adds the base with beta=1). None: on the first call of each shape class, time the
# cuBLAS scheme and every fused config and keep the fastest (CUDA, bf16/fp16); the
# interpreter and float32 take "cublas". Tests and benchmarks force one.
GEMM: str | None = None
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, TMA loads)
_GEMM_CONFIGS = ((128, 256, 64, 8, 3, False), (256, 128, 64, 8, 3, False), (128, 128, 64, 8, 4, False),
                 (128, 128, 64, 4, 4, False), (128, 256, 64, 8, 3, True), (128, 128, 64, 8, 4, True))
_GEMM_PICKS: dict = {}  # shape class -> "cublas" or a config of _GEMM_CONFIGS
_BIG = tl.constexpr(2**30)  # id of rows without an adapter (jit globals must be constexpr)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b in float32. PREC "upcast" (interpreter only): Triton 3.9's interpreter
    gets bf16 tl.dot wrong (errors of 1e10); the float32 product of bf16 values is exact."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _to(x, dtype: tl.constexpr, PREC: tl.constexpr):
    """x.to(dtype) rounding to nearest even. PREC "upcast" (interpreter only): Triton 3.9's
    interpreter truncates float32 -> bf16, doubling the rounding error; round by hand first."""
    if PREC == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _keep(seed, p, rows, k0, n_cols, BLOCK_K: tl.constexpr):
    """Dropout keep-mask of the tile rows x [k0, k0 + BLOCK_K) (k0 a multiple of 4): element
    (row, col) keeps when u >= p, u the (col % 4)-th of the four uniforms Philox draws for
    counter row * cdiv(n_cols, 4) + col // 4 (one Philox call per 4 elements; int64 counters)."""
    quads = rows.to(tl.int64)[:, None] * ((n_cols + 3) // 4) + (k0 // 4 + tl.arange(0, BLOCK_K // 4))[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, quads)
    r = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    return (r >> 8).to(tl.float32) * (1.0 / 16777216.0) >= p  # 24-bit uniforms in [0, 1)


@triton.jit
def _dropout(x, keep, inv_keep, PREC: tl.constexpr):
    """x * keep / (1 - p) in x's dtype."""
    return _to(tl.where(keep, x.to(tl.float32) * inv_keep, 0.0), x.dtype, PREC)


@triton.jit
def _mask_kernel(out_ptr, N, K, seed, p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, p, rows, tl.program_id(1) * BLOCK_K, K, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8), mask=mask)


@triton.jit
def _shrink_kernel(x_ptr, stride_xn, a_ptr, stride_aa, stride_ar, stride_ak, ids_ptr, scales_ptr, xa_ptr,
                   N, K, R, k_per_split, seed, p, inv_keep,
                   MULTI: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """xa[rows] (+)= dropout(x[rows, k-range]) @ A.T over one split of the in-features,
    float32 [N, BLOCK_R]. MULTI: A is [n, r, in], each row uses A[ids[row]] and the result
    is multiplied by scales[ids[row]] (0 for id -1)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    if MULTI:
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
        ids = tl.where(ids >= 0, ids, _BIG)
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < k_end
        x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = _dropout(x, _keep(seed, p, rows, k0, K, BLOCK_K), inv_keep, PREC)
        a_tile = a_ptr + rr[None, :] * stride_ar + cols[:, None].to(tl.int64) * stride_ak  # A.T tile [BK, BR]
        a_mask = k_ok[:, None] & r_ok[None, :]
        if MULTI:
            cur = tl.min(ids, axis=0)
            while cur < _BIG:
                a = _to(tl.load(a_tile + cur.to(tl.int64) * stride_aa, mask=a_mask, other=0.0), x.dtype, PREC)
                xs = tl.where((ids == cur)[:, None], x, 0.0)
                if BLOCK_N >= 16:
                    acc = _dot(xs, a, acc, PREC)
                else:  # one-token blocks (decode): a broadcast product instead of an MMA
                    acc += tl.sum(xs.to(tl.float32)[:, :, None] * a.to(tl.float32)[None, :, :], axis=1)
                cur = tl.min(tl.where(ids > cur, ids, _BIG), axis=0)
        else:
            a = _to(tl.load(a_tile, mask=a_mask, other=0.0), x.dtype, PREC)
            acc = _dot(x, a, acc, PREC)
    if MULTI:
        s = tl.load(scales_ptr + ids, mask=row_ok & (ids < _BIG), other=0.0).to(tl.float32)
        acc = acc * s[:, None]
    out = xa_ptr + rows.to(tl.int64)[:, None] * BLOCK_R + rr[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=row_ok[:, None] & (rr < BLOCK_R)[None, :])
    else:
        tl.store(out, acc, mask=row_ok[:, None])


@triton.jit
def _expand_kernel(xa_ptr, b_ptr, stride_ba, stride_bo, stride_br, ids_ptr, bias_ptr, y_ptr, stride_yn,
                   N, M, R, scale,
                   MULTI: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """y[rows, cols] = scale * xa[rows] @ B[cols].T + bias[cols], in y's dtype (the
    initial C of the base GEMM). MULTI: B is [n, out, r], rows use B[ids[row]], xa is
    already scaled, rows with id -1 get bias alone."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok, col_ok = rows < N, cols < M
    rr = tl.arange(0, BLOCK_R)
    dtype = y_ptr.dtype.element_ty
    xa = tl.load(xa_ptr + rows.to(tl.int64)[:, None] * BLOCK_R + rr[None, :], mask=row_ok[:, None], other=0.0)
    b_tile = b_ptr + rr[:, None] * stride_br + cols[None, :].to(tl.int64) * stride_bo  # B.T tile [BR, BO]
    b_mask = (rr < R)[:, None] & col_ok[None, :]
    if MULTI:
        ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
        ids = tl.where(ids >= 0, ids, _BIG)
        acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
        cur = tl.min(ids, axis=0)
        while cur < _BIG:
            b = _to(tl.load(b_tile + cur.to(tl.int64) * stride_ba, mask=b_mask, other=0.0), dtype, PREC)
            xs = _to(tl.where((ids == cur)[:, None], xa, 0.0), dtype, PREC)
            if BLOCK_N >= 16:
                acc = _dot(xs, b, acc, PREC)
            else:
                acc += tl.sum(xs.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
            cur = tl.min(tl.where(ids > cur, ids, _BIG), axis=0)
    else:
        b = _to(tl.load(b_tile, mask=b_mask, other=0.0), dtype, PREC)
        acc = _dot(_to(xa, dtype, PREC), b, None, PREC) * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :], _to(acc, dtype, PREC),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bwd_dy_kernel(dy_ptr, stride_dyn, b_ptr, stride_bo, stride_br, xa_ptr, dyb_ptr, db_ptr, dbias_ptr,
                   N, M, R, o_per_split,
                   NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """One read of dy over rows x one split of the out-features: dyB[rows] += dy @ B,
    dB += dy.T @ xa[rows] and dbias += column sums of dy, all float32 atomics (L2-resident
    targets: [N, BR], [out, BR], [out])."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rr = tl.arange(0, BLOCK_R)
    dtype = dy_ptr.dtype.element_ty
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dyn
    if NEED_DB:
        xa = _to(tl.load(xa_ptr + rows.to(tl.int64)[:, None] * BLOCK_R + rr[None, :], mask=row_ok[:, None],
                         other=0.0), dtype, PREC)
    dyb = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    o_start = tl.program_id(1) * o_per_split
    o_end = tl.minimum(o_start + o_per_split, M)
    for o0 in range(o_start, o_end, BLOCK_O):
        cols = o0 + tl.arange(0, BLOCK_O)
        col_ok = cols < o_end
        dy = tl.load(dy_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        b = _to(tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_bo + rr[None, :] * stride_br,
                        mask=col_ok[:, None] & (rr < R)[None, :], other=0.0), dtype, PREC)
        dyb = _dot(dy, b, dyb, PREC)
        if NEED_DB:
            part = _dot(tl.trans(dy), xa, None, PREC)
            tl.atomic_add(db_ptr + cols.to(tl.int64)[:, None] * BLOCK_R + rr[None, :], part,
                          mask=col_ok[:, None] & (rr < BLOCK_R)[None, :])
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + cols, tl.sum(dy.to(tl.float32), axis=0), mask=col_ok)
    tl.atomic_add(dyb_ptr + rows.to(tl.int64)[:, None] * BLOCK_R + rr[None, :], dyb,
                  mask=row_ok[:, None] & (rr < BLOCK_R)[None, :])


@triton.jit
def _bwd_dx_kernel(x_ptr, stride_xn, a_ptr, stride_ar, stride_ak, dyb_ptr, stride_dybn, dx_ptr, stride_dxn, da_ptr,
                   N, K, R, n_per_split, scale, seed, p, inv_keep,
                   NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One tile of in-features x one split of the rows: dx = scale * (dyB @ A) * mask / (1-p)
    written (the initial C of dx += dy @ W) and dA += dyB.T @ dropout(x) accumulated in
    registers over the rows, then added to the float32 [BR, in] buffer."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dtype = x_ptr.dtype.element_ty
    a = _to(tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :].to(tl.int64) * stride_ak,
                    mask=r_ok[:, None] & col_ok[None, :], other=0.0), dtype, PREC)
    da = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    n_start = tl.program_id(1) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_end
        dyb = _to(tl.load(dyb_ptr + rows.to(tl.int64)[:, None] * stride_dybn + rr[None, :],
                          mask=row_ok[:, None] & r_ok[None, :], other=0.0), dtype, PREC)
        tile = rows.to(tl.int64)[:, None]
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_DROPOUT:  # one mask draw serves dx and dA
            keep = _keep(seed, p, rows, tl.program_id(0) * BLOCK_K, K, BLOCK_K)
        if NEED_DX:
            dx = _dot(dyb, a, None, PREC) * scale
            if HAS_DROPOUT:
                dx = tl.where(keep, dx * inv_keep, 0.0)
            tl.store(dx_ptr + tile * stride_dxn + cols[None, :], _to(dx, dtype, PREC), mask=mask)
        if NEED_DA:
            x = tl.load(x_ptr + tile * stride_xn + cols[None, :], mask=mask, other=0.0)
            if HAS_DROPOUT:
                x = _dropout(x, keep, inv_keep, PREC)
            da = _dot(tl.trans(dyb), x, da, PREC)
    if NEED_DA:
        tl.atomic_add(da_ptr + rr[:, None] * K + cols[None, :], da, mask=(rr < BLOCK_R)[:, None] & col_ok[None, :])


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order: GROUP_M row tiles in a row
    share the column tiles of Q in L2, as in Triton's matmul tutorial."""
    pid = tl.program_id(0)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _lowrank_epilogue(acc, pid_m, pid_n, lo_ptr, stride_lm, rt_ptr, stride_rr, stride_rn, bias_ptr, c_ptr,
                      stride_cm, M, N, R, scale, seed, p, inv_keep,
                      HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scale * lo @ rt (* keep-mask / (1 - p)) + bias, stored once into C. Without
    dropout the low-rank product is one more MMA into acc; with it, a product of its own,
    masked (the mask acts on the adapter path only)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (rows % M).to(tl.int64)  # rows / columns past the end read in-range data, never stored
    rn = (cols % N).to(tl.int64)
    dtype = c_ptr.dtype.element_ty
    rr = tl.arange(0, BLOCK_R)
    lo = tl.load(lo_ptr + rm[:, None] * stride_lm + rr[None, :], mask=(rr < R)[None, :], other=0.0).to(tl.float32)
    rt = _to(tl.load(rt_ptr + rr[:, None] * stride_rr + rn[None, :] * stride_rn, mask=(rr < R)[:, None], other=0.0),
             dtype, PREC)
    if HAS_DROPOUT:
        low = _dot(_to(lo, dtype, PREC), rt, None, PREC)
        keep = _keep(seed, p, rows, pid_n * BLOCK_N, N, BLOCK_N)
        acc += tl.where(keep, low * (scale * inv_keep), 0.0)
    else:
        acc = _dot(_to(lo * scale, dtype, PREC), rt, acc, PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], _to(acc, dtype, PREC),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def _gemm_lowrank_kernel(p_ptr, stride_pm, stride_pk, q_ptr, stride_qk, stride_qn, lo_ptr, stride_lm,
                         rt_ptr, stride_rr, stride_rn, bias_ptr, c_ptr, stride_cm,
                         M, N, K, R, scale, seed, p, inv_keep,
                         HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, EVEN_K: tl.constexpr,
                         PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """C = P @ Q + scale * lo @ rt (* dropout keep-mask / (1 - p)) + bias, written once.

    P [M, K] and Q [K, N] in C's dtype (any strides), lo [M, >= R] (xa or dyB) and rt
    [R, N] (B.T or A, any strides), padded with zeros to BLOCK_R. The rank-r term costs no
    pass over C: the forward's y and the backward's dx are written once instead of
    pre-written and read back by cuBLAS."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Out-of-range rows / columns load in-range data (wrapped) and are never stored: only K
    # needs a mask in the loop.
    rm = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + rm[:, None] * stride_pm + rk[None, :] * stride_pk
    q_ptrs = q_ptr + rk[:, None] * stride_qk + rn[None, :] * stride_qn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(p_ptrs)
            b = tl.load(q_ptrs)
        else:
            a = tl.load(p_ptrs, mask=(k0 + rk < K)[None, :], other=0.0)
            b = tl.load(q_ptrs, mask=(k0 + rk < K)[:, None], other=0.0)
        acc = _dot(a, b, acc, PREC)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk
    _lowrank_epilogue(acc, pid_m, pid_n, lo_ptr, stride_lm, rt_ptr, stride_rr, stride_rn, bias_ptr, c_ptr, stride_cm,
                      M, N, R, scale, seed, p, inv_keep, HAS_BIAS, HAS_DROPOUT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _gemm_lowrank_tma_kernel(p_desc, q_desc, lo_ptr, stride_lm, rt_ptr, stride_rr, stride_rn, bias_ptr, c_ptr,
                             stride_cm, M, N, K, R, scale, seed, p, inv_keep,
                             Q_ROWS_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                             PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    """_gemm_lowrank_kernel with the P and Q tiles loaded through TMA descriptors (Hopper's
    copy engine fills shared memory; out-of-range elements read as zero). Q_ROWS_N: Q's
    descriptor is over Q.T ([N, K] in memory, as W in the forward), its tiles transposed
    for the MMA."""
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = p_desc.load([pid_m * BLOCK_M, k0])
        if Q_ROWS_N:
            b = q_desc.load([pid_n * BLOCK_N, k0]).T
        else:
            b = q_desc.load([k0, pid_n * BLOCK_N])
        acc = _dot(a, b, acc, PREC)
    _lowrank_epilogue(acc, pid_m, pid_n, lo_ptr, stride_lm, rt_ptr, stride_rr, stride_rn, bias_ptr, c_ptr, stride_cm,
                      M, N, R, scale, seed, p, inv_keep, HAS_BIAS, HAS_DROPOUT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)

# ---------------------------------------------------------------------------------------
# launchers


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(t: torch.Tensor) -> int:
    """About two resident programs per SM, enough to keep HBM busy in a streaming kernel."""
    return 2 * _sm_count(t.device.index or 0) if t.is_cuda else 4


def _blocks(kind: str, r_pad: int) -> dict:
    """Tile sizes (rows BN, in-features BK, out-features BO)."""
    if TEST_BLOCKS is not None:
        return dict(TEST_BLOCKS)
    if interpreting():
        return dict(n=16, k=32, o=32, splits=None)
    # dyB accumulator of the dy pass: BN x r_pad float32 kept in registers.
    n = {"dy": 256 if r_pad <= 16 else 128}.get(kind, 64)
    return dict(n=n, k=128, o=64 if kind == "dy" else 128, splits=None)


def _split(total_tiles: int, other_programs: int, want: int, forced: int | None) -> int:
    """Number of splits of a ``total_tiles``-long loop so that the grid has ``want`` programs."""
    if forced is not None:
        return max(1, min(forced, total_tiles))
    return max(1, min(total_tiles, triton.cdiv(want, max(other_programs, 1))))


def _prec(dtype: torch.dtype) -> str:
    if interpreting():
        return "upcast"
    # float32 inputs: true float32 products (torch's matmul default), not TF32; bf16 and
    # fp16 inputs ignore the setting (tensor cores, float32 accumulation).
    return "ieee" if dtype == torch.float32 else "tf32"


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


def _empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dropout_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The keep-mask the kernels apply to an x of ``shape`` (bool, same shape)."""
    k = shape[-1] if shape else 1
    out = torch.empty(shape, dtype=torch.int8, device=device)
    n = out.numel() // max(k, 1)
    if out.numel():
        with on_device(device):
            _mask_kernel[(triton.cdiv(n, 32), triton.cdiv(k, 32))](out, n, k, seed, p, BLOCK_N=32, BLOCK_K=32)
    return out.bool()


def _shrink(x, a, xa, *, ids=None, scales=None, seed=0, p=0.0) -> None:
    """xa [N, r_pad] float32 (zeroed when split) <- x @ A.T (MULTI when ids is given)."""
    n, k = x.shape
    r_pad = xa.shape[1]
    multi = ids is not None
    blk = _blocks("shrink", r_pad)
    bn = blk["n"] if not multi or n > 256 else 1  # one-token blocks for decode-sized batches
    if multi and bn > 1 and interpreting() and TEST_BLOCKS is None:
        bn = 16
    grid_n = triton.cdiv(n, bn)
    tiles = triton.cdiv(k, blk["k"])
    splits = _split(tiles, grid_n, _target_programs(x), blk["splits"])
    k_per_split = triton.cdiv(tiles, splits) * blk["k"]
    splits = triton.cdiv(k, k_per_split)
    if splits > 1:
        xa.zero_()
    sa = (a.stride(0), a.stride(1), a.stride(2)) if multi else (0, a.stride(0), a.stride(1))
    _shrink_kernel[(grid_n, splits)](
        x, x.stride(0), a, *sa, ids if multi else x, scales if multi else x, xa,
        n, k, a.shape[-2], k_per_split, seed, p, 1.0 / (1.0 - p),
        MULTI=multi, HAS_DROPOUT=p > 0, ATOMIC=splits > 1, PREC=_prec(x.dtype),
        BLOCK_N=bn, BLOCK_K=blk["k"], BLOCK_R=r_pad, num_warps=4, num_stages=3)


def _expand(xa, b, y, bias, scale, *, ids=None) -> None:
    n, m = y.shape
    r_pad = xa.shape[1]
    multi = ids is not None
    blk = _blocks("expand", r_pad)
    bn = blk["n"] if not multi or n > 256 else 1
    if multi and bn > 1 and interpreting() and TEST_BLOCKS is None:
        bn = 16
    sb = (b.stride(0), b.stride(1), b.stride(2)) if multi else (0, b.stride(0), b.stride(1))
    grid = (triton.cdiv(n, bn), triton.cdiv(m, blk["o"]))
    _expand_kernel[grid](
        xa, b, *sb, ids if multi else y, bias if bias is not None else y, y, y.stride(0),
        n, m, b.shape[-1], scale,
        MULTI=multi, HAS_BIAS=bias is not None, PREC=_prec(y.dtype),
        BLOCK_N=bn, BLOCK_O=blk["o"], BLOCK_R=r_pad, num_warps=4)


def _tma_ok(*tensors) -> bool:
    """TMA descriptors need unit last strides and 16-byte aligned bases and row strides."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def _gemm_lowrank(p_op, q_op, lo, rt, r: int, scale: float, bias, out, seed: int, p: float, config) -> None:
    """out [M, N] = p_op [M, K] @ q_op [K, N] + scale * lo @ rt[:r] (dropout-masked when
    p > 0) + bias; q_op and rt may be transposed views. config: (BM, BN, BK, warps,
    stages, tma)."""
    m, k = p_op.shape
    n = q_op.shape[1]
    if interpreting() or TEST_BLOCKS is not None:
        small = (16, 32, 16) if TEST_BLOCKS is None else (TEST_BLOCKS["n"], TEST_BLOCKS["o"], TEST_BLOCKS["k"])
        config = (*small, 4, 1, config[5])
    bm, bn, bk, warps, stages, tma = config
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    common = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, PREC=_prec(out.dtype), BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, BLOCK_R=_r_pad(r), GROUP_M=8, num_warps=warps, num_stages=stages)
    tail = (lo, lo.stride(0), rt, rt.stride(0), rt.stride(1), bias if bias is not None else out, out, out.stride(0),
            m, n, k, r, scale, seed, p, 1.0 / (1.0 - p))
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        rows_n = q_op.stride(0) == 1  # q_op is the transpose of a row-major [N, K] tensor
        q_mem = q_op.t() if rows_n else q_op
        _gemm_lowrank_tma_kernel[grid](
            TensorDescriptor.from_tensor(p_op, [bm, bk]),
            TensorDescriptor.from_tensor(q_mem, [bn, bk] if rows_n else [bk, bn]), *tail, Q_ROWS_N=rows_n, **common)
    else:
        _gemm_lowrank_kernel[grid](p_op, p_op.stride(0), p_op.stride(1), q_op, q_op.stride(0), q_op.stride(1), *tail,
                                   EVEN_K=k % bk == 0, **common)


def _pick_gemm(kind: str, out: torch.Tensor, k: int, r_pad: int, flags: tuple, tma_ok: bool, runs) -> object:
    """"cublas" or a fused config for this shape class. ``runs(choice)`` performs the
    product with that choice (it overwrites ``out`` only). Timed once per class on CUDA:
    every fused config (the TMA ones when ``tma_ok``) against the cuBLAS path, with
    triton.testing.do_bench."""
    if GEMM is not None:
        return {"cublas": "cublas", "fused": _GEMM_CONFIGS[0], "fused-tma": _GEMM_CONFIGS[-1]}[GEMM]
    if not out.is_cuda or out.dtype == torch.float32:
        return "cublas"
    m, n = out.shape
    key = (kind, triton.next_power_of_2(m), n, k, r_pad, out.dtype, out.device.index, flags, tma_ok)
    pick = _GEMM_PICKS.get(key)
    if pick is None:
        configs = [c for c in _GEMM_CONFIGS if tma_ok or not c[5]]
        times = {c: triton.testing.do_bench(lambda c=c: runs(c), warmup=5, rep=25) for c in ("cublas", *configs)}
        pick = _GEMM_PICKS[key] = min(times, key=times.get)
    return pick


def lora_fwd(x, weight, a, b, bias, scale: float, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] (unit last stride) -> (y [N, out], xa [N, r_pad] float32, unscaled)."""
    n = x.shape[0]
    r_pad = _r_pad(a.shape[0])
    xa = _empty((n, r_pad), torch.float32, x.device)
    y = _empty((n, weight.shape[0]), x.dtype, x.device)
    if n == 0:
        return y, xa
    with on_device(x.device):
        _shrink(x, a, xa, seed=seed, p=p)

        def run(choice):
            if choice == "cublas":
                _expand(xa, b, y, bias, scale)
                y.addmm_(x, weight.t())
            else:
                _gemm_lowrank(x, weight.t(), xa, b.t(), b.shape[1], scale, bias, y, 0, 0.0, choice)

        run(_pick_gemm("fwd", y, x.shape[1], r_pad, (bias is not None,), _tma_ok(x, weight), run))
    return y, xa


def lora_bwd(dy, x, weight, a, b, xa, scale: float, p: float, seed: int, needs: tuple[bool, ...]):
    """Gradients (dx, dW, dA, dB, dbias) for the needs flags (x, weight, a, b, bias)."""
    need_x, need_w, need_a, need_b, need_bias = needs
    n, k = x.shape
    m, r = b.shape
    r_pad = xa.shape[1]
    dev = dy.device
    dx = dw = da = db = dbias = None
    if n == 0:
        zeros = [torch.zeros_like(t) if need else None for t, need in ((x, need_x), (weight, need_w), (a, need_a),
                                                                       (b, need_b))]
        return (*zeros, torch.zeros(m, dtype=dy.dtype, device=dev) if need_bias else None)
    f32 = dict(dtype=torch.float32, device=dev)
    with on_device(dy.device):
        if r_pad <= FUSED_DY_MAX_RANK:
            blk = _blocks("dy", r_pad)
            grid_n = triton.cdiv(n, blk["n"])
            tiles = triton.cdiv(m, blk["o"])
            splits = _split(tiles, grid_n, _target_programs(dy), blk["splits"])
            o_per_split = triton.cdiv(tiles, splits) * blk["o"]
            dyb = torch.zeros(n, r_pad, **f32)
            db_acc = torch.zeros(m, r_pad, **f32) if need_b else dyb
            dbias_acc = torch.zeros(m, **f32) if need_bias else dyb
            _bwd_dy_kernel[(grid_n, triton.cdiv(m, o_per_split))](
                dy, dy.stride(0), b, b.stride(0), b.stride(1), xa, dyb, db_acc, dbias_acc, n, m, r, o_per_split,
                NEED_DB=need_b, NEED_DBIAS=need_bias, PREC=_prec(dy.dtype),
                BLOCK_N=blk["n"], BLOCK_O=blk["o"], BLOCK_R=r_pad, num_warps=4, num_stages=3)
            if need_b:
                db = (db_acc[:, :r] * scale).to(b.dtype)
            if need_bias:
                dbias = dbias_acc.to(dy.dtype)
        else:  # two cuBLAS GEMMs, each reading dy once
            dyb = torch.mm(dy, b.to(dy.dtype))
            if need_b:
                db = torch.mm(dy.t(), xa[:, :r].to(dy.dtype)).mul_(scale).to(b.dtype)
            if need_bias:
                dbias = dy.sum(0)
        dx = _empty((n, k), x.dtype, dev) if need_x else None
        da_acc = torch.zeros(r_pad, k, **f32) if need_a else None

        def dx_da(with_dx: bool, with_da: bool):
            """dx = scale * (dyB @ A) * mask (the C of dx += dy @ W) and / or dA."""
            blk = _blocks("dx", r_pad)
            tiles_k = triton.cdiv(k, blk["k"])
            row_tiles = triton.cdiv(n, blk["n"])
            splits = _split(row_tiles, tiles_k, _target_programs(dy), blk["splits"])
            n_per_split = triton.cdiv(row_tiles, splits) * blk["n"]
            _bwd_dx_kernel[(tiles_k, triton.cdiv(n, n_per_split))](
                x, x.stride(0), a, a.stride(0), a.stride(1), dyb, dyb.stride(0), dx if with_dx else dyb,
                dx.stride(0) if with_dx else 0, da_acc if with_da else dyb, n, k, r, n_per_split, scale, seed, p,
                1.0 / (1.0 - p), NEED_DX=with_dx, NEED_DA=with_da, HAS_DROPOUT=p > 0, PREC=_prec(x.dtype),
                BLOCK_N=blk["n"], BLOCK_K=blk["k"], BLOCK_R=r_pad, num_warps=4, num_stages=3)

        def run_dx(choice):
            if choice == "cublas":
                dx_da(True, False)
                dx.addmm_(dy, weight)
            else:
                _gemm_lowrank(dy, weight, dyb, a, r, scale, None, dx, seed, p, choice)

        pick = _pick_gemm("dx", dx, m, r_pad, (p > 0,), _tma_ok(dy, weight), run_dx) if need_x else None
        if pick == "cublas":
            dx_da(True, need_a)  # one kernel writes dx's C and accumulates dA
            dx.addmm_(dy, weight)
        else:
            if need_a:
                dx_da(False, True)
            if need_x:
                run_dx(pick)
        if need_a:
            da = (da_acc[:r] * scale).to(a.dtype)
    if need_w:
        dw = torch.mm(dy.t(), x)
    return dx, dw, da, db, dbias


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ W.T + bias + scale * (dropout(x) @ A.T) @ B.T on 2-D x; saves x and the
    [N, r] float32 xa (and the dropout seed, never a mask)."""

    @staticmethod
    def forward(ctx, x, weight, a, b, bias, scale: float, p: float, seed: int):
        x = _rows(x)
        y, xa = lora_fwd(x, weight, a, b, bias, scale, p, seed)
        ctx.save_for_backward(x, weight, a, b, xa)
        ctx.args = (scale, p, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, xa = ctx.saved_tensors
        grads = lora_bwd(_rows(dy), x, weight, a, b, xa, *ctx.args, ctx.needs_input_grad[:5])
        return (*grads, None, None, None)


def lora_multi_fwd(x, weight, a, b, scales, ids, bias) -> torch.Tensor:
    """Multi-adapter forward (inference) on 2-D x; ids int32 [N]."""
    x = _rows(x)
    n = x.shape[0]
    r_pad = _r_pad(a.shape[1])
    y = _empty((n, weight.shape[0]), x.dtype, x.device)
    if n == 0:
        return y
    xa = _empty((n, r_pad), torch.float32, x.device)
    ids = ids.contiguous()
    with on_device(x.device):
        _shrink(x, a, xa, ids=ids, scales=scales)
        _expand(xa, b, y, bias, 1.0, ids=ids)
    y.addmm_(x, weight.t())
    return y
