"""A GEMM with a low-rank term: ``C = P @ Q + scale * lo @ rt (* dropout keep-mask /
(1 - p)) + bias``, written once. The "fused" scheme of LoRA's base GEMMs
(``lora_triton.py``): the forward's ``y = x @ W.T + scale * xa @ B.T + bias`` and the
backward's ``dx = dy @ W + scale * (dyB @ A) * mask / (1 - p)``.

``_gemm_lowrank_kernel`` loads its tiles through pointers; ``_gemm_lowrank_tma_kernel``
through TMA descriptors, when the tensors are aligned for them. Either starts its
accumulator from the rank-r term (one more small MMA, the dropout mask regenerated
beside it) and stores C once: two full passes over C fewer than cuBLAS adding the base onto
a pre-written term (the pre-write and its read-back, in each direction), if the Triton GEMM
keeps up with cuBLAS. Whether it does is measured per shape class by benchmarks/tune.py,
outside any step, and read from the device's table (:func:`pick_gemm`).
"""
from __future__ import annotations

import torch

from . import configs
from .triton_base import cast, dot, dot_block, dot_mode, dropout_bits, keep_from_bits, tl, triton

# Base GEMM + rank-r term: "fused" (one Triton GEMM writes y / dx with the term in its
# accumulator; "fused-tma" with TMA loads) or "cublas" (a Triton kernel pre-writes the term,
# cuBLAS adds the base with beta=1). None: the device table's choice (pick_gemm). Tests and
# benchmarks force one here, as shorthand for configs.forced({"lora.gemm": CONFIGS[0]}).
GEMM: str | None = None
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, TMA loads): the fused candidates of lora.gemm.
# No bf16 launch of these spills registers (ptxas -v, sm_90a, triton 3.6 and 3.9; ranks
# 8-64, with and without dropout). Dropped: (128, 128, 64, 4, 4, False), whose 128
# accumulator floats per thread on 4 warps left too few registers for dropout at rank 64
# (8-12 B spilled; slicing the rank did not cure it under triton 3.6); (128, 128, 64, 8, 4,
# False) is the same tile on 8 warps.
CONFIGS = ((128, 256, 64, 8, 3, False), (256, 128, 64, 8, 3, False), (128, 128, 64, 8, 4, False),
           (128, 256, 64, 8, 3, True), (128, 128, 64, 8, 4, True))


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
def _lowrank_term(pid_m, pid_n, lo_ptr, stride_lm, rt_ptr, stride_rr, stride_rn, M, N, R, scale, seed, p, inv_keep,
                  dtype: tl.constexpr, HAS_DROPOUT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The tile's scale * lo @ rt (* keep-mask / (1 - p)) in float32 [BLOCK_M, BLOCK_N]
    (operands in C's dtype, dtype): the initial accumulator of the main loop.

    Registers (ptxas, sm_90a, bf16; 128x256 tiles on 8 warps hold 128 accumulator floats
    per thread): applied in the epilogue, the masked product lived beside the accumulator
    with Philox's temporaries and spilled 0.8-1.6 KB (issue 16). Here nothing else is live:
    the mask is drawn first and held packed (4 elements a register) while lo / rt load and
    multiply; no config of CONFIGS spills at ranks 8-64 with or without dropout."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if HAS_DROPOUT:
        keep = dropout_bits(seed, p, rows, pid_n * BLOCK_N, BLOCK_N)
        scale = scale * inv_keep
        # Philox's temporaries die here; the barrier keeps the compiler from hoisting the
        # loads below above them, where they would live beside them.
        tl.debug_barrier()
    rm = (rows % M).to(tl.int64)  # rows / columns past the end read in-range data, never stored
    rn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    lo = tl.load(lo_ptr + rm[:, None] * stride_lm + rr[None, :], mask=(rr < R)[None, :], other=0.0).to(tl.float32)
    rt = tl.load(rt_ptr + rr[:, None] * stride_rr + rn[None, :] * stride_rn, mask=(rr < R)[:, None], other=0.0)
    low = dot(cast(lo * scale, dtype, PREC), cast(rt, dtype, PREC), None, PREC)
    if HAS_DROPOUT:
        low = tl.where(keep_from_bits(keep, BLOCK_N), low, 0.0)
    return low


@triton.jit
def _store_tile(acc, pid_m, pid_n, bias_ptr, c_ptr, stride_cm, M, N, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """C[tile] = acc + bias, rounded once to C's dtype."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols % N).to(tl.float32)[None, :]
    tl.store(c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :], cast(acc, c_ptr.dtype.element_ty, PREC),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit(do_not_specialize=["seed"])
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
    acc = _lowrank_term(pid_m, pid_n, lo_ptr, stride_lm, rt_ptr, stride_rr, stride_rn, M, N, R, scale, seed, p,
                        inv_keep, c_ptr.dtype.element_ty, HAS_DROPOUT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)
    # Out-of-range rows / columns load in-range data (wrapped) and are never stored: only K
    # needs a mask in the loop.
    rm = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    rn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + rm[:, None] * stride_pm + rk[None, :] * stride_pk
    q_ptrs = q_ptr + rk[:, None] * stride_qk + rn[None, :] * stride_qn
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(p_ptrs)
            b = tl.load(q_ptrs)
        else:
            a = tl.load(p_ptrs, mask=(k0 + rk < K)[None, :], other=0.0)
            b = tl.load(q_ptrs, mask=(k0 + rk < K)[:, None], other=0.0)
        acc = dot(a, b, acc, PREC)
        p_ptrs += BLOCK_K * stride_pk
        q_ptrs += BLOCK_K * stride_qk
    _store_tile(acc, pid_m, pid_n, bias_ptr, c_ptr, stride_cm, M, N, HAS_BIAS, PREC, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["seed"])
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
    acc = _lowrank_term(pid_m, pid_n, lo_ptr, stride_lm, rt_ptr, stride_rr, stride_rn, M, N, R, scale, seed, p,
                        inv_keep, c_ptr.dtype.element_ty, HAS_DROPOUT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)
    for k0 in range(0, K, BLOCK_K):
        a = p_desc.load([pid_m * BLOCK_M, k0])
        if Q_ROWS_N:
            b = q_desc.load([pid_n * BLOCK_N, k0]).T
        else:
            b = q_desc.load([k0, pid_n * BLOCK_N])
        acc = dot(a, b, acc, PREC)
    _store_tile(acc, pid_m, pid_n, bias_ptr, c_ptr, stride_cm, M, N, HAS_BIAS, PREC, BLOCK_M, BLOCK_N)


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need unit last strides and 16-byte aligned bases and row strides."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in tensors)


def gemm_lowrank(p_op: torch.Tensor, q_op: torch.Tensor, lo: torch.Tensor, rt: torch.Tensor, r: int, scale: float,
                 bias: torch.Tensor | None, out: torch.Tensor, seed: int, p: float, config: tuple) -> None:
    """out [M, N] = p_op [M, K] @ q_op [K, N] + scale * lo @ rt[:r] (dropout-masked when
    p > 0) + bias; q_op and rt may be transposed views. config: (BM, BN, BK, warps,
    stages, tma), one of CONFIGS or smaller tiles."""
    m, k = p_op.shape
    n = q_op.shape[1]
    bm, bn, bk, warps, stages, tma = config
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    common = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0, PREC=dot_mode(out.dtype), BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, BLOCK_R=dot_block(r), GROUP_M=8, num_warps=warps, num_stages=stages)
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


def shape_class(kind: str, m: int, n: int, k: int, r_pad: int, dtype: torch.dtype, flags: tuple, tma: bool) -> str:
    """The lora.gemm class of a product out [m, n] over k: kind ("fwd": y, flags (bias,);
    "dx": dx, flags (dropout,)), rows as a power of two, n, k and the padded rank exact."""
    return configs.shape_class(kind=kind, m=configs.pow2(m), n=n, k=k, r=r_pad, dtype=configs.dtype_name(dtype),
                               flags="".join(str(int(f)) for f in flags), tma=tma)


def block_class(r_pad: int, dtype: torch.dtype, decode: bool) -> str:
    """The class of lora.shrink/expand/dy/dx (lora_triton.blocks): padded rank, dtype, decode
    (a multi-adapter launch over at most 256 rows: one-token row blocks)."""
    return configs.shape_class(r=r_pad, dtype=configs.dtype_name(dtype), decode=decode)


def candidates(tma: bool) -> list:
    """The schemes tune.py times for a lora.gemm class: "cublas" (the heuristic), then every
    fused config (the TMA ones when the operands allow TMA)."""
    return configs.candidate_list("cublas", *(c for c in CONFIGS if tma or not c[5]))


def pick_gemm(kind: str, out: torch.Tensor, k: int, r_pad: int, flags: tuple, tma: bool) -> object:
    """"cublas" or a fused config for this product (arguments as in :func:`shape_class`).
    Nothing is timed here: the device table's entry (benchmarks/tune.py measured it), else
    "cublas": cuBLAS's speed is known, while a fused config nobody has measured on this
    device may spill or miss cuBLAS's rate and slow every step. float32 and CPU tensors
    have no entries (tune.py measures bf16 on a GPU): "cublas" unless forced."""
    if GEMM is not None:
        return {"cublas": "cublas", "fused": CONFIGS[0], "fused-tma": CONFIGS[-1]}[GEMM]
    m, n = out.shape
    return configs.choose("lora.gemm", shape_class(kind, m, n, k, r_pad, out.dtype, flags, tma), out.device,
                          lambda: "cublas")
