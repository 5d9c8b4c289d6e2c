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
backward  dyB = dy @ B, dB = dy.T @ xa     one kernel, one read of dy (2·N·out); float32
                                           partial sums per split, summed in fixed order
          dx = scale * (dyB @ A) * mask    one kernel: writes dx (2·N·in), reads x (2·N·in)
          dA = scale * dyB.T @ dropout(x)  for dA in the same pass, mask regenerated
          dx += dy @ W                     cuBLAS addmm with beta=1
          dW = dy.T @ x                    cuBLAS, only when weight requires grad

So the adapter costs 2·(2·N·in + 2·N·out) + 2·N·in bytes of extra traffic per step
(besides the [N, r] and [out, r] float32 side buffers): N=8192, in=out=4096 gives 5 x 64
MiB, about 100 us at 3.3 TB/s.

Deterministic: a reduction split over programs (the shrink over in-features, the dy pass
over rows and out-features, dA over rows) writes one float32 partial per split, and the
host sums them with ``torch.sum`` over the split dimension, a fixed-order reduction; no
float atomics, so the same inputs give the same bits on the same GPU. The dy pass splits
its rows into s_n ranges and its out-features into s_o ranges, chosen so that the
partials, (s_n·out + s_o·N)·r floats, are fewest for about two programs per SM: 4096->4096
at N=8192, r=16 writes 12.6 MB of them (dy is 67 MB). The dropout mask is never
stored: Philox (``tl.philox``, one call per 4 elements) regenerates it from the seed.

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

import math

import torch

from . import configs
from .dispatch import on_device
from .lora_bwd_triton import lora_dx_kernel, lora_dy_kernel
from .lowrank_gemm import block_class, gemm_lowrank, pick_gemm, tma_ok
from .triton_base import (cast, dot, dot_block, dot_mode, dropout_apply, dropout_keep, empty, fixed_order_sum,
                          interpreting, row_tile, sm_count, split_range, tl, triton, unit_last_stride)

FUSED_DY_MAX_RANK = 32  # padded rank up to which dyB and dB share one pass over dy
TEST_BLOCKS: dict | None = None  # tests: force small blocks and several splits, e.g. dict(n=16, k=16, o=16, splits=2)
_BIG = tl.constexpr(2**30)  # id of rows without an adapter (jit globals must be constexpr)


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


@triton.jit(do_not_specialize=["seed"])
def _mask_kernel(out_ptr, N, K, seed, p, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(seed, p, rows, tl.program_id(1) * BLOCK_K, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _shrink_kernel(x_ptr, stride_xn, a_ptr, stride_aa, stride_ar, stride_ak, ids_ptr, scales_ptr, xa_ptr,
                   N, K, R, k_per_split, seed, p, inv_keep,
                   MULTI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """Split s (grid axis 1) of xa = dropout(x) @ A.T: its partial sum over the split's
    in-features, dropout(x[rows, k-range]) @ A.T, stored into slice s of the float32
    [splits, N, BLOCK_R] xa_ptr. MULTI: A is [n, r, in], each row uses A[ids[row]] and the
    result is multiplied by scales[ids[row]] (0 for id -1)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xn
    if MULTI:
        ids = _adapter_ids(ids_ptr, rows, row_ok)
    acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    k_start, k_end = split_range(k_per_split, K, 1)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols, k_ok, x = row_tile(x_rows, row_ok, k0, k_end, BLOCK_K)
        if HAS_DROPOUT:
            x = dropout_apply(x, dropout_keep(seed, p, rows, k0, BLOCK_K), inv_keep, PREC)
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
    out = xa_ptr + (tl.program_id(1).to(tl.int64) * N + rows)[:, None] * BLOCK_R + rr[None, :]
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
        splits = max(1, min(tiles, triton.cdiv(_programs_wanted(t), max(other_programs, 1))))
    return triton.cdiv(tiles, splits) * block


def _programs_wanted(t: torch.Tensor) -> int:
    return 2 * sm_count(t.device) if t.is_cuda else 4


def _dy_split_lengths(n: int, m: int, blk: dict, t: torch.Tensor) -> tuple[int, int]:
    """(rows, out-features) per split of the dy pass. Its float32 partials hold s_n·m + s_o·n
    rows of r_pad floats for s_n row splits and s_o column splits; with s_n·s_o about
    :func:`_programs_wanted`, that is least at s_n = sqrt(programs · n / m)."""
    tiles_n = triton.cdiv(n, blk["n"])
    if blk["splits"] is not None:
        splits_n = max(1, min(blk["splits"], tiles_n))
    else:
        splits_n = max(1, min(tiles_n, round(math.sqrt(_programs_wanted(t) * n / m))))
    n_per_split = triton.cdiv(tiles_n, splits_n) * blk["n"]
    return n_per_split, _split_length(m, blk["o"], blk, triton.cdiv(n, n_per_split), t)


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
    """xa [N, r_pad] float32 <- x @ A.T (MULTI when ids is given); split over the
    in-features, the splits' partials go through a buffer summed in a fixed order."""
    n, k = x.shape
    r_pad = xa.shape[1]
    multi = ids is not None
    blk = blocks("shrink", r_pad, x, n, multi)
    grid_n = triton.cdiv(n, blk["n"])
    k_per_split = _split_length(k, blk["k"], blk, grid_n, x)
    splits = triton.cdiv(k, k_per_split)
    parts = empty((splits, n, r_pad), torch.float32, x.device) if splits > 1 else xa
    sa = (a.stride(0), a.stride(1), a.stride(2)) if multi else (0, a.stride(0), a.stride(1))
    _shrink_kernel[(grid_n, splits)](
        x, x.stride(0), a, *sa, ids if multi else x, scales if multi else x, parts,
        n, k, a.shape[-2], k_per_split, seed, p, 1.0 / (1.0 - p),
        MULTI=multi, HAS_DROPOUT=p > 0, PREC=dot_mode(x.dtype),
        BLOCK_N=blk["n"], BLOCK_K=blk["k"], BLOCK_R=r_pad, num_warps=4, num_stages=3)
    if splits > 1:
        fixed_order_sum(parts, xa)


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
    with on_device(dy.device):
        if r_pad <= FUSED_DY_MAX_RANK:
            blk = blocks("dy", r_pad, dy)
            n_per_split, o_per_split = _dy_split_lengths(n, m, blk, dy)
            splits_n, splits_o = triton.cdiv(n, n_per_split), triton.cdiv(m, o_per_split)
            dyb_parts = empty((splits_o, n, r_pad), torch.float32, dev)
            db_parts = empty((splits_n, m, r_pad), torch.float32, dev) if need_b else dyb_parts
            dbias_parts = empty((splits_n, m), torch.float32, dev) if need_bias else dyb_parts
            lora_dy_kernel[(splits_n, splits_o)](
                dy, dy.stride(0), b, b.stride(0), b.stride(1), xa, dyb_parts, db_parts, dbias_parts, n, m, r,
                n_per_split, o_per_split, NEED_DB=need_b, NEED_DBIAS=need_bias, PREC=dot_mode(dy.dtype),
                BLOCK_N=blk["n"], BLOCK_O=blk["o"], BLOCK_R=r_pad, num_warps=4, num_stages=3)
            dyb = fixed_order_sum(dyb_parts)
            if need_b:
                db = (fixed_order_sum(db_parts)[:, :r] * scale).to(b.dtype)
            if need_bias:
                dbias = fixed_order_sum(dbias_parts).to(dy.dtype)
        else:  # two cuBLAS GEMMs, each reading dy once
            dyb = torch.mm(dy, b.to(dy.dtype))
            if need_b:
                db = torch.mm(dy.t(), xa[:, :r].to(dy.dtype)).mul_(scale).to(b.dtype)
            if need_bias:
                dbias = dy.sum(0)
        dx = empty((n, k), x.dtype, dev) if need_x else None
        da_parts = None

        def dx_da(with_dx: bool, with_da: bool):
            """dx = scale * (dyB @ A) * mask (the C of dx += dy @ W) and / or dA's per-split
            partials (da_parts [splits, r_pad, in] float32)."""
            nonlocal da_parts
            blk = blocks("dx", r_pad, dy)
            tiles_k = triton.cdiv(k, blk["k"])
            n_per_split = _split_length(n, blk["n"], blk, tiles_k, dy)
            splits = triton.cdiv(n, n_per_split)
            if with_da:
                da_parts = empty((splits, r_pad, k), torch.float32, dev)
            # With dropout, 8 warps and 2 stages: at 4 warps / 3 stages the mask, the dx tile
            # and the dA accumulator spilled at ranks 16-64 (ptxas, sm_90a, bf16; issue 16).
            warps, stages = (8, 2) if p > 0 else (4, 3)
            lora_dx_kernel[(tiles_k, splits)](
                x, x.stride(0), a, a.stride(0), a.stride(1), dyb, dyb.stride(0), dx if with_dx else dyb,
                dx.stride(0) if with_dx else 0, da_parts if with_da else dyb, n, k, r, n_per_split, scale, seed, p,
                1.0 / (1.0 - p), NEED_DX=with_dx, NEED_DA=with_da, HAS_DROPOUT=p > 0, PREC=dot_mode(x.dtype),
                BLOCK_N=blk["n"], BLOCK_K=blk["k"], BLOCK_R=r_pad, num_warps=warps, num_stages=stages)
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
            da = (fixed_order_sum(da_parts)[:r] * scale).to(a.dtype)
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
