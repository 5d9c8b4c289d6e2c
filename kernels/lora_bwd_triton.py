"""Triton kernels of lora_linear's backward (the launchers and the byte counts are in
``lora_triton.py``): the dy pass (dyB = dy @ B, dB = dy.T @ xa and dbias in one read of
dy) and the dx pass (dx's rank-r term, written as the C of cuBLAS's dx += dy @ W, and dA).
Both split their reductions over programs and write one float32 partial per split, which
the launcher sums in a fixed order: no float atomics, the same bits on every run."""
from .triton_base import cast, dot, dropout_apply, dropout_bits, keep_from_bits, row_tile, split_range, tl, triton


@triton.jit
def lora_dy_kernel(dy_ptr, stride_dyn, b_ptr, stride_bo, stride_br, xa_ptr, dyb_ptr, db_ptr, dbias_ptr,
                   N, M, R, n_per_split, o_per_split,
                   NEED_DB: tl.constexpr, NEED_DBIAS: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """One read of dy over row split i (grid axis 0) x out-feature split j (axis 1), into
    float32 partials that this program alone writes: dyB[rows] = dy @ B over split j's
    columns, into slice j of dyb_ptr [splits_o, N, BR]; dB = dy.T @ xa and dbias = column
    sums of dy over split i's rows, into slice i of db_ptr [splits_n, out, BR] and
    dbias_ptr [splits_n, out]. dB and dbias stay in memory (L2) between row blocks: the
    first block stores them, each later one adds its own."""
    rr = tl.arange(0, BLOCK_R)
    dtype = dy_ptr.dtype.element_ty
    dyb_split = dyb_ptr + tl.program_id(1).to(tl.int64) * N * BLOCK_R
    db_split = db_ptr + tl.program_id(0).to(tl.int64) * M * BLOCK_R
    dbias_split = dbias_ptr + tl.program_id(0).to(tl.int64) * M
    n_start, n_end = split_range(n_per_split, N, 0)
    o_start, o_end = split_range(o_per_split, M, 1)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_end
        dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * stride_dyn
        if NEED_DB:
            xa = cast(tl.load(xa_ptr + rows.to(tl.int64)[:, None] * BLOCK_R + rr[None, :], mask=row_ok[:, None],
                              other=0.0), dtype, PREC)
        dyb = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        # The first row block stores dB / dbias, later ones add (a vector: the interpreter
        # takes no scalar condition in a load mask).
        later = tl.full([BLOCK_O], n0, tl.int32) > n_start
        for o0 in range(o_start, o_end, BLOCK_O):
            cols, col_ok, dy = row_tile(dy_rows, row_ok, o0, o_end, BLOCK_O)
            b = cast(tl.load(b_ptr + cols[:, None].to(tl.int64) * stride_bo + rr[None, :] * stride_br,
                             mask=col_ok[:, None] & (rr < R)[None, :], other=0.0), dtype, PREC)
            dyb = dot(dy, b, dyb, PREC)
            if NEED_DB:
                db_tile = db_split + cols.to(tl.int64)[:, None] * BLOCK_R + rr[None, :]
                part = tl.load(db_tile, mask=(col_ok & later)[:, None], other=0.0)
                tl.store(db_tile, dot(tl.trans(dy), xa, part, PREC), mask=col_ok[:, None])
            if NEED_DBIAS:
                part = tl.load(dbias_split + cols, mask=col_ok & later, other=0.0)
                tl.store(dbias_split + cols, part + tl.sum(dy.to(tl.float32), axis=0), mask=col_ok)
        tl.store(dyb_split + rows.to(tl.int64)[:, None] * BLOCK_R + rr[None, :], dyb, mask=row_ok[:, None])
        # The next row block reads back the dB / dbias partials stored above, possibly in
        # other threads of this program: a CTA barrier makes those global stores visible.
        tl.debug_barrier()


@triton.jit(do_not_specialize=["seed"])
def lora_dx_kernel(x_ptr, stride_xn, a_ptr, stride_ar, stride_ak, dyb_ptr, stride_dybn, dx_ptr, stride_dxn, da_ptr,
                   N, K, R, n_per_split, scale, seed, p, inv_keep,
                   NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """One tile of in-features x row split s (grid axis 1): dx = scale * (dyB @ A) * mask /
    (1-p) written (the initial C of dx += dy @ W) and the split's dyB.T @ dropout(x)
    accumulated in registers over its rows, then stored into slice s of the float32
    [splits, BR, in] da_ptr."""
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    dtype = x_ptr.dtype.element_ty
    a = cast(tl.load(a_ptr + rr[:, None] * stride_ar + cols[None, :].to(tl.int64) * stride_ak,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0), dtype, PREC)
    da = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    n_start, n_end = split_range(n_per_split, N, 1)
    for n0 in range(n_start, n_end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_end
        dyb = cast(tl.load(dyb_ptr + rows.to(tl.int64)[:, None] * stride_dybn + rr[None, :],
                           mask=row_ok[:, None] & r_ok[None, :], other=0.0), dtype, PREC)
        tile = rows.to(tl.int64)[:, None]
        mask = row_ok[:, None] & col_ok[None, :]
        if HAS_DROPOUT:  # one mask draw serves dx and dA, held packed (4 elements a register)
            keep = dropout_bits(seed, p, rows, tl.program_id(0) * BLOCK_K, BLOCK_K)
        if NEED_DX:
            dx = dot(dyb, a, None, PREC) * scale
            if HAS_DROPOUT:
                dx = tl.where(keep_from_bits(keep, BLOCK_K), dx * inv_keep, 0.0)
            tl.store(dx_ptr + tile * stride_dxn + cols[None, :], cast(dx, dtype, PREC), mask=mask)
        if NEED_DA:
            x = tl.load(x_ptr + tile * stride_xn + cols[None, :], mask=mask, other=0.0)
            if HAS_DROPOUT:
                x = dropout_apply(x, keep_from_bits(keep, BLOCK_K), inv_keep, PREC)
            da = dot(tl.trans(dyb), x, da, PREC)
    if NEED_DA:
        da_split = da_ptr + tl.program_id(1).to(tl.int64) * BLOCK_R * K
        tl.store(da_split + rr[:, None] * K + cols[None, :], da, mask=col_ok[None, :])
