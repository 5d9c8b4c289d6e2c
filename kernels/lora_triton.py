"""Triton backend of lora_linear and lora_linear_multi.

Two schemes for the base GEMMs, chosen per shape class by the device's config table
(``lowrank_gemm.pick_gemm``; the first without an entry):

* "cublas" (below): the base GEMMs stay on cuBLAS; Triton kernels pre-write the rank-r
  term into y and dx, which cuBLAS reads back as C (beta=1);
* "fused": the GEMM of ``lowrank_gemm.py``, which adds the rank-r term in its epilogue
  and writes y (forward) or dx (backward) once.

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

from __future__ import annotations

import torch

from . import configs
from .dispatch import on_device
from .lowrank_gemm import block_class, gemm_lowrank, pick_gemm, tma_ok
from .triton_base import (cast, dot, dot_block, dot_mode, dropout_keep, empty, interpreting, sm_count, tl, triton,
                          unit_last_stride)

FUSED_DY_MAX_RANK = 32  # padded rank up to which dyB and dB share one pass over dy
TEST_BLOCKS: dict | None = None  # tests: force small blocks and several splits, e.g. dict(n=16, k=16, o=16, splits=2)
_BIG = tl.constexpr(2**30)  # id of rows without an adapter (jit globals must be constexpr)


@triton.jit
def _dropout(x, keep, inv_keep, PREC: tl.constexpr):
    """x * keep / (1 - p) in x's dtype."""
    return cast(tl.where(keep, x.to(tl.float32) * inv_keep, 0.0), x.dtype, PREC)


@triton.jit
def _split_range(per_split, total):
    """[start, end) of this program's split (grid axis 1) of a loop over ``total`` elements."""
    start = tl.program_id(1) * per_split
    return start, tl.minimum(start + per_split, total)


@triton.jit
def _row_tile(row_ptrs, row_ok, c0, end, BLOCK: tl.constexpr):
    """Columns c0 + [0, BLOCK) of a block of rows (row_ptrs [rows, 1]): (the columns, the
    mask of those < end, the tile, zero outside)."""
    cols = c0 + tl.arange(0, BLOCK)
    ok = cols < end
    return cols, ok, tl.load(row_ptrs + cols[None, :], mask=row_ok[:, None] & ok[None, :], other=0.0)


@triton.jit
def _adapter_ids(ids_ptr, rows, row_ok):
    """Adapter id of each row, _BIG for rows without one (id -1) and rows past the end."""
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=-1)
    return tl.where(ids >= 0, ids, _BIG)


@triton.jit
def _adapter_products(acc, x, w_tile, stride_w, w_mask, ids, dtype: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """acc + each row of x times the weight tile of its own adapter (the tile of adapter i
    at w_tile + i * stride_w, cast to dtype): one iteration per distinct id in the block,
    rows of other ids zeroed; rows with id _BIG add nothing."""
    cur = tl.min(ids, axis=0)
    while cur < _BIG:
        w = cast(tl.load(w_tile + cur.to(tl.int64) * stride_w, mask=w_mask, other=0.0), dtype, PREC)
        xs = tl.where((ids == cur)[:, None], x, 0.0)
        if BLOCK_N >= 16:
            acc = dot(xs, w, acc, PREC)
        else:  # one-token blocks (decode): a broadcast product instead of an MMA
            acc += tl.sum(xs.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        cur = tl.min(tl.where(ids > cur, ids, _BIG), axis=0)
    return acc


@triton.jit
def _mask_kernel(out_ptr, N, K, seed, p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, p, rows, tl.program_id(1) * BLOCK_K, K, BLOCK_K)
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
        ids = _adapter_ids(ids_ptr, rows, row_ok)
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    k_start, k_end = _split_range(k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols, k_ok, x = _row_tile(x_rows, row_ok, k0, k_end, BLOCK_K)
        if HAS_DROPOUT:
            x = _dropout(x, dropout_keep(seed, p, rows, k0, K, BLOCK_K), inv_keep, PREC)
        a_tile = a_ptr + rr[None, :] * stride_ar + cols[:, None].to(tl.int64) * stride_ak  # A.T tile [BK, BR]
        a_mask = k_ok[:, None] & r_ok[None, :]
        if MULTI:
            acc = _adapter_products(acc, x, a_tile, stride_aa, a_mask, ids, x.dtype, PREC, BLOCK_N)
        else:
            a = cast(tl.load(a_tile, mask=a_mask, other=0.0), x.dtype, PREC)
            acc = dot(x, a, acc, PREC)
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
    xa = cast(xa, dtype, PREC)
    b_tile = b_ptr + rr[:, None] * stride_br + cols[None, :].to(tl.int64) * stride_bo  # B.T tile [BR, BO]
    b_mask = (rr < R)[:, None] & col_ok[None, :]
    if MULTI:
        acc = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
        acc = _adapter_products(acc, xa, b_tile, stride_ba, b_mask, _adapter_ids(ids_ptr, rows, row_ok), dtype, PREC,
                                BLOCK_N)
    else:
        b = cast(tl.load(b_tile, mask=b_mask, other=0.0), dtype, PREC)
        acc = dot(xa, b, None, PREC) * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_yn + cols[None, :], cast(acc, dtype, PREC),
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
        xa = cast(tl.load(xa_ptr + rows.to(tl.int64)[:, None] * BLOCK_R + rr[None, :], mask=row_ok[:, None],
                          other=0.0), dtype, PREC)
    dyb = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    o_start, o_end = _split_range(o_per_split, M)
    for o0 in range(o_start, o_end, BLOCK_O):
        cols, col_ok, dy = _row_tile(dy_rows, row_ok, o0, o_end, BLOCK_O)
        b = cast(tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_bo + rr[None, :] * stride_br,
                         mask=col_ok[:, None] & (rr < R)[None, :], other=0.0), dtype, PREC)
        dyb = dot(dy, b, dyb, PREC)
        if NEED_DB:
            part = dot(tl.trans(dy), xa, None, PREC)
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
    a = cast(tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :].to(tl.int64) * stride_ak,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0), dtype, PREC)
    da = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    n_start, n_end = _split_range(n_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_end
        dyb = cast(tl.load(dyb_ptr + rows.to(tl.int64)[:, None] * stride_dybn + rr[None, :],
                           mask=row_ok[:, None] & r_ok[None, :], other=0.0), dtype, PREC)
        tile = rows.to(tl.int64)[:, None]
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_DROPOUT:  # one mask draw serves dx and dA
            keep = dropout_keep(seed, p, rows, tl.program_id(0) * BLOCK_K, K, BLOCK_K)
        if NEED_DX:
            dx = dot(dyb, a, None, PREC) * scale
            if HAS_DROPOUT:
                dx = tl.where(keep, dx * inv_keep, 0.0)
            tl.store(dx_ptr + tile * stride_dxn + cols[None, :], cast(dx, dtype, PREC), mask=mask)
        if NEED_DA:
            x = tl.load(x_ptr + tile * stride_xn + cols[None, :], mask=mask, other=0.0)
            if HAS_DROPOUT:
                x = _dropout(x, keep, inv_keep, PREC)
            da = dot(tl.trans(dyb), x, da, PREC)
    if NEED_DA:
        tl.atomic_add(da_ptr + rr[:, None] * K + cols[None, :], da, mask=(rr < BLOCK_R)[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------
# launchers


def _blocks(kind: str, r_pad: int, n: int = 0, multi: bool = False) -> dict:
    """Tile sizes (rows BN, in-features BK, out-features BO). A multi-adapter launch over
    at most 256 rows (decode) takes one-token row blocks."""
    if TEST_BLOCKS is not None:
        blk = dict(TEST_BLOCKS)
    elif interpreting():
        blk = dict(n=16, k=32, o=32, splits=None)
    else:  # dyB accumulator of the dy pass: BN x r_pad float32 kept in registers.
        blk = dict(n={"dy": 256 if r_pad <= 16 else 128}.get(kind, 64), k=128, o=64 if kind == "dy" else 128,
                   splits=None)
    if multi and n <= 256:
        blk["n"] = 1
    return blk


def blocks(kind: str, r_pad: int, t: torch.Tensor, n: int = 0, multi: bool = False) -> dict:
    """_blocks, or (without TEST_BLOCKS) the device table's lora.<kind> entry of block_class."""
    return _blocks(kind, r_pad, n, multi) if TEST_BLOCKS is not None else configs.choose(
        f"lora.{kind}", block_class(r_pad, t.dtype, multi and n <= 256), t.device, lambda: _blocks(kind, r_pad, n, multi))


def block_candidates(kind: str, r_pad: int, decode: bool) -> list[dict]:
    """The heuristic's blocks, then row blocks 32-256 (1 in decode) x feature blocks 64, 128."""
    base, feat, rows = _blocks(kind, r_pad, 0, decode), "o" if kind in ("expand", "dy") else "k", (32, 64, 128, 256)
    return configs.candidate_list(base, *(dict(base, n=n, **{feat: f}) for n in ((1,) if decode else rows) for f in (64, 128)))


def _split_length(total: int, block: int, blk: dict, other_programs: int, t: torch.Tensor) -> int:
    """Length (a multiple of ``block``) of each split of a ``total``-long loop, so that the
    grid, ``other_programs`` wide along its other axis, has about two resident programs per
    SM (enough to keep HBM busy in a streaming kernel); ``blk["splits"]`` forces a count."""
    tiles = triton.cdiv(total, block)
    if blk["splits"] is not None:
        splits = max(1, min(blk["splits"], tiles))
    else:
        want = 2 * sm_count(t.device) if t.is_cuda else 4
        splits = max(1, min(tiles, triton.cdiv(want, max(other_programs, 1))))
    return triton.cdiv(tiles, splits) * block


def _fused_config(config: tuple) -> tuple:
    """A config of lowrank_gemm.CONFIGS, with small tiles under the interpreter or TEST_BLOCKS."""
    if interpreting() or TEST_BLOCKS is not None:
        small = (16, 32, 16) if TEST_BLOCKS is None else (TEST_BLOCKS["n"], TEST_BLOCKS["o"], TEST_BLOCKS["k"])
        return (*small, 4, 1, config[5])
    return config


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
    blk = blocks("shrink", r_pad, x, n, multi)
    grid_n = triton.cdiv(n, blk["n"])
    k_per_split = _split_length(k, blk["k"], blk, grid_n, x)
    splits = triton.cdiv(k, k_per_split)
    if splits > 1:
        xa.zero_()
    sa = (a.stride(0), a.stride(1), a.stride(2)) if multi else (0, a.stride(0), a.stride(1))
    _shrink_kernel[(grid_n, splits)](
        x, x.stride(0), a, *sa, ids if multi else x, scales if multi else x, xa,
        n, k, a.shape[-2], k_per_split, seed, p, 1.0 / (1.0 - p),
        MULTI=multi, HAS_DROPOUT=p > 0, ATOMIC=splits > 1, PREC=dot_mode(x.dtype),
        BLOCK_N=blk["n"], BLOCK_K=blk["k"], BLOCK_R=r_pad, num_warps=4, num_stages=3)


def _expand(xa, b, y, bias, scale, *, ids=None) -> None:
    n, m = y.shape
    r_pad = xa.shape[1]
    multi = ids is not None
    blk = blocks("expand", r_pad, y, n, multi)
    sb = (b.stride(0), b.stride(1), b.stride(2)) if multi else (0, b.stride(0), b.stride(1))
    grid = (triton.cdiv(n, blk["n"]), triton.cdiv(m, blk["o"]))
    _expand_kernel[grid](
        xa, b, *sb, ids if multi else y, bias if bias is not None else y, y, y.stride(0),
        n, m, b.shape[-1], scale,
        MULTI=multi, HAS_BIAS=bias is not None, PREC=dot_mode(y.dtype),
        BLOCK_N=blk["n"], BLOCK_O=blk["o"], BLOCK_R=r_pad, num_warps=4)


def lora_fwd(x, weight, a, b, bias, scale: float, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, in] (unit last stride) -> (y [N, out], xa [N, r_pad] float32, unscaled)."""
    n = x.shape[0]
    r_pad = dot_block(a.shape[0])
    xa = empty((n, r_pad), torch.float32, x.device)
    y = empty((n, weight.shape[0]), x.dtype, x.device)
    if n == 0:
        return y, xa
    with on_device(x.device):
        _shrink(x, a, xa, seed=seed, p=p)
        choice = pick_gemm("fwd", y, x.shape[1], r_pad, (bias is not None,), tma_ok(x, weight))
        if choice == "cublas":
            _expand(xa, b, y, bias, scale)
            y.addmm_(x, weight.t())
        else:
            gemm_lowrank(x, weight.t(), xa, b.t(), b.shape[1], scale, bias, y, 0, 0.0, _fused_config(choice))
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
            blk = blocks("dy", r_pad, dy)
            grid_n = triton.cdiv(n, blk["n"])
            o_per_split = _split_length(m, blk["o"], blk, grid_n, dy)
            dyb = torch.zeros(n, r_pad, **f32)
            db_acc = torch.zeros(m, r_pad, **f32) if need_b else dyb
            dbias_acc = torch.zeros(m, **f32) if need_bias else dyb
            _bwd_dy_kernel[(grid_n, triton.cdiv(m, o_per_split))](
                dy, dy.stride(0), b, b.stride(0), b.stride(1), xa, dyb, db_acc, dbias_acc, n, m, r, o_per_split,
                NEED_DB=need_b, NEED_DBIAS=need_bias, PREC=dot_mode(dy.dtype),
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
        dx = empty((n, k), x.dtype, dev) if need_x else None
        da_acc = torch.zeros(r_pad, k, **f32) if need_a else None

        def dx_da(with_dx: bool, with_da: bool):
            """dx = scale * (dyB @ A) * mask (the C of dx += dy @ W) and / or dA."""
            blk = blocks("dx", r_pad, dy)
            tiles_k = triton.cdiv(k, blk["k"])
            n_per_split = _split_length(n, blk["n"], blk, tiles_k, dy)
            _bwd_dx_kernel[(tiles_k, triton.cdiv(n, n_per_split))](
                x, x.stride(0), a, a.stride(0), a.stride(1), dyb, dyb.stride(0), dx if with_dx else dyb,
                dx.stride(0) if with_dx else 0, da_acc if with_da else dyb, n, k, r, n_per_split, scale, seed, p,
                1.0 / (1.0 - p), NEED_DX=with_dx, NEED_DA=with_da, HAS_DROPOUT=p > 0, PREC=dot_mode(x.dtype),
                BLOCK_N=blk["n"], BLOCK_K=blk["k"], BLOCK_R=r_pad, num_warps=4, num_stages=3)
        pick = pick_gemm("dx", dx, m, r_pad, (p > 0,), tma_ok(dy, weight)) if need_x else None
        if pick == "cublas":
            dx_da(True, need_a)  # one kernel writes dx's C and accumulates dA
            dx.addmm_(dy, weight)
        else:
            if need_a:
                dx_da(False, True)
            if need_x:
                gemm_lowrank(dy, weight, dyb, a, r, scale, None, dx, seed, p, _fused_config(pick))
        if need_a:
            da = (da_acc[:r] * scale).to(a.dtype)
    if need_w:
        dw = torch.mm(dy.t(), x)
    return dx, dw, da, db, dbias


def lora_multi_fwd(x, weight, a, b, scales, ids, bias) -> torch.Tensor:
    """Multi-adapter forward (inference) on 2-D x; ids int32 [N]."""
    x = unit_last_stride(x)
    n = x.shape[0]
    r_pad = dot_block(a.shape[1])
    y = empty((n, weight.shape[0]), x.dtype, x.device)
    if n == 0:
        return y
    xa = empty((n, r_pad), torch.float32, x.device)
    ids = ids.contiguous()
    with on_device(x.device):
        _shrink(x, a, xa, ids=ids, scales=scales)
        _expand(xa, b, y, bias, 1.0, ids=ids)
    y.addmm_(x, weight.t())
    return y
