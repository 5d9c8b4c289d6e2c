"""Triton backend of linear_logprobs / linear_cross_entropy / linear_token_loss.

Algorithm: the rows are processed in chunks of C rows. For each chunk the raw logits
``z = x_c @ weight.T`` [C, V] are written by one GEMM (cuBLAS) into a reused buffer in the
input dtype, a Triton kernel reduces each row to its statistics in float32 (online max and
sum of exponentials, the target's score, and on request sum(p*s) and sum(s)), and, when a
gradient is wanted, a second Triton kernel overwrites the buffer in place with the gradient
of the scores, ``dz``, from which two GEMMs give ``dx_c = dz @ weight`` and
``dW += dz.T @ x_c``. Peak memory above the inputs is dx + dW + one chunk buffer; the chunk
size is chosen so that the buffer is at most ``CHUNK_BUDGET`` times the gradient buffers.

Two ways to get gradients:
  * two passes (``ChunkedStats``): the forward keeps only [N] statistics; the backward
    takes any upstream gradient on them and recomputes the logits: 8·N·H·V FLOPs.
  * one pass (``FusedTokenLoss``): the loss is token-local and given up front, so each
    chunk's gradient is formed as soon as its statistics are known, and the backward only
    scales the stored gradients by the incoming scalar: 6·N·H·V FLOPs, the matmul floor.

Weight-gradient precision: each chunk's ``dz.T @ x_c`` accumulates in float32 inside the
GEMM and is added to dW in the weight's dtype (one rounding per chunk, N/C chunks);
``fp32_weight_grad=True`` keeps dW in a float32 buffer instead (4·V·H bytes more) and
rounds once at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import configs
from .token_stats import TokenStats, evaluate_loss, vocab_offset, zero_ignored
from .triton_base import empty, interpreting, tl, triton

CHUNK_BUDGET = 0.2  # chunk logits buffer <= this fraction of the bytes of dx + dW
MIN_CHUNK_ROWS = 128


@triton.jit
def _scores(z, cols, mask, bias_ptr, inv_temp, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Scores s = softcap(z + bias) / temperature in float32, and ds/dz."""
    z = z.to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates cleanly to +-1 at both ends.
        t = 1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0)
        s = softcap * t * inv_temp
        ds = (1.0 - t * t) * inv_temp
    else:
        s = z * inv_temp
        ds = inv_temp + 0.0 * z
    return s, ds


@triton.jit
def _stats_kernel(z_ptr, stride_z, bias_ptr, tgt_ptr, V, vocab_start, inv_temp, softcap,
                  max_ptr, sumexp_ptr, pick_ptr, ssum_ptr, psum_ptr,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_SUM: tl.constexpr,
                  WANT_PSUM: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row per program: max, sum exp(s - max), s[target], and on request sum(s) and
    sum(exp(s - max) * s). Per-lane online accumulators, reduced once at the end."""
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    tgt = tl.load(tgt_ptr + row) - vocab_start
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_V], tl.float32)
    pick = tl.zeros([BLOCK_V], tl.float32)
    ssum = tl.zeros([BLOCK_V], tl.float32)
    psum = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        s, _ = _scores(tl.load(z_row + cols, mask=mask, other=0.0), cols, mask, bias_ptr, inv_temp, softcap,
                       HAS_BIAS, HAS_SOFTCAP)
        s = tl.where(mask, s, 0.0)
        pick += tl.where(cols == tgt, s, 0.0)
        if WANT_SUM:
            ssum += s
        m_new = tl.maximum(m, tl.where(mask, s, float("-inf")))
        alpha = tl.exp(tl.where(m_new == m, 0.0, m - m_new))
        p = tl.where(mask, tl.exp(s - m_new), 0.0)
        l = l * alpha + p
        if WANT_PSUM:
            psum = psum * alpha + p * s
        m = m_new
    row_max = tl.max(m, axis=0)
    scale = tl.where(m == float("-inf"), 0.0, tl.exp(tl.where(m == float("-inf"), 0.0, m - row_max)))
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, tl.sum(l * scale, axis=0))
    tl.store(pick_ptr + row, tl.sum(pick, axis=0))
    if WANT_SUM:
        tl.store(ssum_ptr + row, tl.sum(ssum, axis=0))
    if WANT_PSUM:
        tl.store(psum_ptr + row, tl.sum(psum * scale, axis=0))


@triton.jit
def _grad_kernel(z_ptr, stride_z, bias_ptr, tgt_ptr, V, vocab_start, inv_temp, softcap,
                 lse_ptr, a_ptr, k_ptr, c_ptr, d_ptr,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                 HAS_SUM: tl.constexpr, BLOCK_V: tl.constexpr):
    """In place: z <- dL/dz for one [row, BLOCK_V] tile, where with p = exp(s - lse)
    dL/ds_j = p_j * (k - c * s_j) + a * [j == target] + d  (k = g_lse - g_logprob + c * E[s],
    a = g_logprob, c = g_entropy, d = g_sum), then times ds/dz."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    z_tile = z_ptr + row.to(tl.int64) * stride_z + cols
    s, ds = _scores(tl.load(z_tile, mask=mask, other=0.0), cols, mask, bias_ptr, inv_temp, softcap,
                    HAS_BIAS, HAS_SOFTCAP)
    tgt = tl.load(tgt_ptr + row) - vocab_start
    lse = tl.load(lse_ptr + row)
    a = tl.load(a_ptr + row)
    k = tl.load(k_ptr + row)
    p = tl.exp(s - lse)
    if HAS_ENTROPY:
        g = p * (k - tl.load(c_ptr + row) * s)
    else:
        g = p * k
    g += tl.where(cols == tgt, a, 0.0)
    if HAS_SUM:
        g += tl.load(d_ptr + row)
    tl.store(z_tile, (g * ds).to(z_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Options:
    temperature: float = 1.0
    softcap: float | None = None
    ignore_index: int = -100
    want_entropy: bool = False
    want_sum: bool = False
    process_group: object = None
    fp32_weight_grad: bool = False


def chunk_rows(n: int, v: int, h: int, itemsize: int) -> int:
    """Rows per chunk: the [C, V] buffer stays within CHUNK_BUDGET of the gradient buffers."""
    rows = int(CHUNK_BUDGET * (n + v) * h / v)
    rows = max(MIN_CHUNK_ROWS, rows // 64 * 64)
    return max(1, min(n, rows))


def launch_config(kind: str, v: int) -> dict:
    """The heuristic config (BLOCK_V, num_warps) of the statistics ("stats") or gradient
    ("grad") kernel over a vocabulary shard of ``v``. Interpreter: 256-wide tiles, so tests
    cross tile edges. GPU: "grad" writes one 4096-wide tile per program and keeps nothing;
    "stats" streams a row in 2048-wide steps with up to five per-lane float32 accumulators
    (8 elements a thread each at 8 warps): at most 79 registers in every variant (sm_90,
    triton 3.6/3.9; at 4096 wide they took up to 128 and spilled 8 B in float32), so 3 to 6
    blocks share an SM instead of 2 or 3 (benchmarks/NOTES.md)."""
    width = 256 if interpreting() else {"stats": 2048, "grad": 4096}[kind]
    return dict(BLOCK_V=min(width, triton.next_power_of_2(v)), num_warps=8)


def shape_class(v: int, dtype: torch.dtype, opts: Options, has_bias: bool) -> str:
    """The class of a linear_logprobs.stats/grad table entry: vocabulary shard size, dtype
    and the variant (bias, softcap, sum, entropy), which sets the registers a row needs."""
    flags = "".join(str(int(f)) for f in (has_bias, opts.softcap is not None, opts.want_sum, opts.want_entropy))
    return configs.shape_class(v=v, dtype=configs.dtype_name(dtype), flags=flags)


def candidates(kind: str, v: int) -> list[dict]:
    """Configs tune.py times for the "stats" or "grad" kernel: launch_config's first, then
    BLOCK_V in {1024, 2048, 4096, 8192} (capped at the shard) x num_warps in {4, 8, 16}."""
    cap = triton.next_power_of_2(v)
    return configs.candidate_list(launch_config(kind, v), *(
        dict(BLOCK_V=min(b, cap), num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16)))


class _Problem:
    """Shapes, buffers and kernel launches shared by the forward and backward passes."""

    def __init__(self, x, weight, bias, targets, opts: Options, vocab_start: int | None = None):
        self.x, self.weight, self.bias, self.targets, self.opts = x, weight, bias, targets, opts
        self.n, self.v = x.shape[0], weight.shape[0]
        group = opts.process_group
        if vocab_start is None:  # a host all-gather under vocab parallelism: once per op call
            vocab_start = vocab_offset(self.v, group) if group is not None else 0
        self.vocab_start = vocab_start
        self.valid = targets != opts.ignore_index
        self.rows = chunk_rows(self.n, self.v, x.shape[1], x.element_size())
        self.inv_temp = 1.0 / opts.temperature
        self.softcap = float(opts.softcap) if opts.softcap is not None else 1.0
        cls = shape_class(self.v, x.dtype, opts, bias is not None)
        self.stats_cfg = configs.choose("linear_logprobs.stats", cls, x.device, lambda: launch_config("stats", self.v))
        self.grad_cfg = configs.choose("linear_logprobs.grad", cls, x.device, lambda: launch_config("grad", self.v))
        self._buf = None

    def chunks(self):
        for start in range(0, self.n, self.rows):
            yield start, min(self.n, start + self.rows)

    def logits(self, start, end):
        """Raw logits x[start:end] @ weight.T into the reused chunk buffer."""
        if self._buf is None:
            self._buf = empty((min(self.rows, self.n), self.v), self.x.dtype, self.x.device)
        z = self._buf[: end - start]
        torch.mm(self.x[start:end], self.weight.t(), out=z)
        return z

    def _flags(self):
        return dict(HAS_BIAS=self.bias is not None, HAS_SOFTCAP=self.opts.softcap is not None)

    def stats(self, z, start, end):
        """Statistics of rows [start, end) combined over the vocabulary-parallel group:
        dict of float32 [C] tensors lse, logprob, and on request sum and expected (E[s])."""
        c, opts = end - start, self.opts
        f32 = dict(dtype=torch.float32, device=z.device)
        row_max, sumexp, pick = (torch.empty(c, **f32) for _ in range(3))
        ssum = torch.empty(c, **f32) if opts.want_sum else row_max
        psum = torch.empty(c, **f32) if opts.want_entropy else row_max
        bias = self.bias if self.bias is not None else z
        _stats_kernel[(c,)](z, z.stride(0), bias, self.targets[start:end], self.v, self.vocab_start,
                            self.inv_temp, self.softcap, row_max, sumexp, pick, ssum, psum,
                            WANT_SUM=opts.want_sum, WANT_PSUM=opts.want_entropy, **self.stats_cfg,
                            **self._flags())
        group = opts.process_group
        if group is not None:
            local_max = row_max.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            rescale = torch.exp(local_max - row_max)
            parts = [sumexp * rescale, pick] + [ssum] * opts.want_sum + [psum * rescale] * opts.want_entropy
            packed = torch.stack(parts)
            dist.all_reduce(packed, group=group)
            sumexp, pick = packed[0], packed[1]
            if opts.want_sum:
                ssum = packed[2]
            if opts.want_entropy:
                psum = packed[-1]
        lse = row_max + torch.log(sumexp)
        out = {"lse": lse, "logprob": pick - lse}
        if opts.want_sum:
            out["sum"] = ssum
        if opts.want_entropy:
            out["expected"] = psum / sumexp
        return out

    def grad_logits(self, z, start, end, lse, a, k, c=None, d=None):
        """Overwrite z with dL/dz from per-row coefficients (see _grad_kernel)."""
        bias = self.bias if self.bias is not None else z
        grid = (end - start, triton.cdiv(self.v, self.grad_cfg["BLOCK_V"]))
        _grad_kernel[grid](z, z.stride(0), bias, self.targets[start:end], self.v, self.vocab_start, self.inv_temp,
                           self.softcap, lse, a, k, c if c is not None else a, d if d is not None else a,
                           HAS_ENTROPY=c is not None, HAS_SUM=d is not None, **self.grad_cfg, **self._flags())

    def new_grads(self, need_x, need_w, need_b):
        w_dtype = torch.float32 if self.opts.fp32_weight_grad else self.weight.dtype
        dx = empty(self.x.shape, self.x.dtype, self.x.device) if need_x else None
        dw = torch.zeros(self.weight.shape, dtype=w_dtype, device=self.weight.device) if need_w else None
        db = torch.zeros(self.v, dtype=torch.float32, device=self.x.device) if need_b else None
        return dx, dw, db

    def accumulate(self, dz, start, end, dx, dw, db):
        if dx is not None:
            torch.mm(dz, self.weight, out=dx[start:end])
        if dw is not None:
            _addmm_into(dw, dz.t(), self.x[start:end])
        if db is not None:
            db += dz.sum(0, dtype=torch.float32)

    def finish(self, dx, dw, db):
        if dx is not None and self.opts.process_group is not None:
            dist.all_reduce(dx, group=self.opts.process_group)
        if dw is not None:
            dw = dw.to(self.weight.dtype)
        if db is not None:
            db = db.to(self.bias.dtype)
        return dx, dw, db


def _addmm_into(acc, a, b):
    """acc += a @ b, with acc possibly float32 while a, b are bf16/fp16."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    try:  # cuBLAS: low-precision inputs, float32 output, no temporary
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class ChunkedStats(torch.autograd.Function):
    """Two-pass op: forward -> per-token (logprob, lse, entropy, sum), backward from any
    upstream gradient on them. Outputs not asked for are returned as empty tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, opts: Options):
        prob = _Problem(x, weight, bias, targets, opts)
        n, f32 = prob.n, dict(dtype=torch.float32, device=x.device)
        lse, logprob = torch.empty(n, **f32), torch.empty(n, **f32)
        expected = torch.empty(n, **f32) if opts.want_entropy else None
        ssum = torch.empty(n, **f32) if opts.want_sum else torch.empty(0, **f32)
        for start, end in prob.chunks():
            st = prob.stats(prob.logits(start, end), start, end)
            lse[start:end], logprob[start:end] = st["lse"], st["logprob"]
            if opts.want_entropy:
                expected[start:end] = st["expected"]
            if opts.want_sum:
                ssum[start:end] = st["sum"]
        valid = prob.valid
        entropy = zero_ignored(lse - expected, valid) if opts.want_entropy else torch.empty(0, **f32)
        ctx.save_for_backward(x, weight, bias, targets, lse, expected)
        ctx.opts, ctx.vocab_start = opts, prob.vocab_start
        if opts.want_sum:
            ssum = zero_ignored(ssum, valid)
        return zero_ignored(logprob, valid), zero_ignored(lse, valid), entropy, ssum

    @staticmethod
    def backward(ctx, g_logprob, g_lse, g_entropy, g_sum):
        x, weight, bias, targets, lse, expected = ctx.saved_tensors
        opts = ctx.opts
        prob = _Problem(x, weight, bias, targets, opts, ctx.vocab_start)
        zero = torch.zeros(prob.n, dtype=torch.float32, device=x.device)
        valid = prob.valid

        def coef(g):
            return zero if g is None or g.numel() == 0 else zero_ignored(g.float(), valid)

        a, b = coef(g_logprob), coef(g_lse)
        c = coef(g_entropy) if opts.want_entropy and g_entropy is not None else None
        d = coef(g_sum) if opts.want_sum and g_sum is not None else None
        k = b - a + (c * expected if c is not None else 0)
        dx, dw, db = prob.new_grads(*ctx.needs_input_grad[:3])
        for start, end in prob.chunks():
            z = prob.logits(start, end)
            sl = slice(start, end)
            prob.grad_logits(z, start, end, lse[sl].contiguous(), a[sl], k[sl],
                             c[sl] if c is not None else None, d[sl] if d is not None else None)
            prob.accumulate(z, start, end, dx, dw, db)
        dx, dw, db = prob.finish(dx, dw, db)
        return dx, dw, db, None, None


class FusedTokenLoss(torch.autograd.Function):
    """One-pass op: sum over tokens of a token-local loss, with the gradients of x, weight
    and bias formed during the forward; the backward scales them by the incoming scalar.
    Returns (total, logprob, lse, loss per token[, entropy]); all but total carry no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, loss_fn, aux_names, opts: Options, *aux_values):
        prob = _Problem(x, weight, bias, targets, opts)
        aux = dict(zip(aux_names, aux_values))
        need = ctx.needs_input_grad[:3]
        dx, dw, db = prob.new_grads(*need)
        f32 = dict(dtype=torch.float32, device=x.device)
        total = torch.zeros((), **f32)
        names = ("logprob", "lse", "loss") + ("entropy",) * opts.want_entropy
        record = {name: torch.empty(prob.n, **f32) for name in names}
        for start, end in prob.chunks():
            z = prob.logits(start, end)
            st = prob.stats(z, start, end)
            sl = slice(start, end)
            valid = prob.valid[sl]
            with torch.enable_grad():
                leaves = {"logprob": st["logprob"], "lse": st["lse"]}
                if opts.want_entropy:
                    leaves["entropy"] = st["lse"] - st["expected"]
                if opts.want_sum:
                    leaves["sum"] = st["sum"]
                leaves = {key: t.requires_grad_() for key, t in leaves.items()}
                shown = {key: zero_ignored(t, valid) for key, t in leaves.items()}
                stats = TokenStats(shown["logprob"], shown["lse"], shown.get("entropy"), shown.get("sum"), valid)
                loss = evaluate_loss(loss_fn, stats, {key: t[sl] for key, t in aux.items()})
                grads = {}
                if any(need) and loss.requires_grad:
                    found = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
                    grads = {key: g for key, g in zip(leaves, found) if g is not None}
            total += loss.detach().sum()
            for name in names:
                record[name][sl] = loss.detach() if name == "loss" else shown[name].detach()
            if not any(need):
                continue
            zeros = torch.zeros(end - start, **f32)
            a, b = grads.get("logprob", zeros), grads.get("lse", zeros)
            c, d = grads.get("entropy"), grads.get("sum")
            k = b - a + (c * st["expected"] if c is not None else 0)
            prob.grad_logits(z, start, end, st["lse"], a.contiguous(), k.contiguous(),
                             c.contiguous() if c is not None else None, d.contiguous() if d is not None else None)
            prob.accumulate(z, start, end, dx, dw, db)
        ctx.grads = prob.finish(dx, dw, db)
        ctx.n_aux = len(aux_values)
        ctx.mark_non_differentiable(*record.values())
        return (total,) + tuple(record.values())

    @staticmethod
    def backward(ctx, g_total, *unused):
        # In place: the stored gradients are ours, and a copy of dW would double its memory.
        grads = tuple(None if t is None else t.mul_(g_total.to(t.dtype)) for t in ctx.grads)
        ctx.grads = None
        return grads + (None,) * (4 + ctx.n_aux)
