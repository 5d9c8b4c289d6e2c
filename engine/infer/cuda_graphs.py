"""CUDA graphs for decode-only steps: one graph per padded batch size.

A decode step of a small model is bound by kernel launches (a few per layer), not by the
GPU; replaying a captured graph removes the launch cost. Graphs need fixed shapes and
addresses, so every step copies its inputs into static buffers of the next captured size
(1, 2, 4, ..., 128 sequences) with a block table padded to the longest possible sequence.
Padding rows are harmless: token 0 at position 0, ``slot_mapping`` -1 (``append_kv``
skips it), ``seq_len`` 0 (``paged_attention`` gives zeros), so the first ``n`` rows of the
output equal the unpadded step's. ``pad_decode_inputs`` does that copy on any device; the
CPU tests run the padded batch eagerly against the unpadded one.

Not captured (eager path): steps with prefill chunks, adapters (per-token adapter ids),
more sequences than the largest graph, or a block table wider than the static one.
"""
from __future__ import annotations

import torch

from .cache import KVCache
from .forward import StepBatch, forward_with_cache

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def static_decode_inputs(max_batch: int, max_blocks: int, device) -> StepBatch:
    """Static buffers of a decode-only step of up to ``max_batch`` sequences, every row padding."""
    return StepBatch(
        input_ids=torch.zeros(max_batch, dtype=torch.int64, device=device),
        position_ids=torch.zeros(max_batch, dtype=torch.int64, device=device),
        slot_mapping=torch.full((max_batch,), -1, dtype=torch.int64, device=device),
        cu_q=torch.zeros(1, dtype=torch.int32, device=device), cu_k=torch.zeros(1, dtype=torch.int32, device=device),
        kv_slots=None, block_table=torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device),
        seq_lens=torch.zeros(max_batch, dtype=torch.int32, device=device), max_q=0, max_k=0, decode_only=True,
        num_decode=max_batch)


def view_decode_inputs(static: StepBatch, size: int) -> StepBatch:
    """The first ``size`` rows of the static buffers as a decode-only StepBatch (views)."""
    return StepBatch(
        input_ids=static.input_ids[:size], position_ids=static.position_ids[:size],
        slot_mapping=static.slot_mapping[:size], cu_q=static.cu_q, cu_k=static.cu_k, kv_slots=None,
        block_table=static.block_table[:size], seq_lens=static.seq_lens[:size], max_q=0, max_k=0, decode_only=True,
        num_decode=size)


def pad_decode_inputs(static: StepBatch, batch: StepBatch, size: int) -> StepBatch:
    """Copy a decode-only ``batch`` of n <= size sequences into the static buffers, pad rows
    n..size-1, and return the padded [size] view. Device copies only (no host sync)."""
    n, width = batch.num_decode, batch.block_table.shape[1]
    if not batch.decode_only or batch.adapter_ids is not None:
        raise ValueError("pad_decode_inputs: needs a decode-only batch without adapters")
    if not n <= size <= static.input_ids.shape[0] or width > static.block_table.shape[1]:
        raise ValueError(f"pad_decode_inputs: a batch of {n} sequences x {width} blocks does not fit size {size} of "
                         f"the static buffers [{static.input_ids.shape[0]}, {static.block_table.shape[1]}]")
    out = view_decode_inputs(static, size)
    for dst, src, pad in ((out.input_ids, batch.input_ids, 0), (out.position_ids, batch.position_ids, 0),
                          (out.slot_mapping, batch.slot_mapping, -1), (out.seq_lens, batch.seq_lens, 0)):
        dst[:n].copy_(src)
        dst[n:].fill_(pad)
    out.block_table[:n, :width].copy_(batch.block_table)
    out.block_table[:n, width:].zero_()
    out.block_table[n:].zero_()
    return out


class DecodeGraphs:
    """Captured decode forwards of ``model`` over ``cache`` for the sizes in ``sizes``.

    ``run(batch)`` returns the hidden states [n, hidden] of a decode-only step from a graph
    replay (a view into the graph's output buffer, valid until the next replay), or None
    when the step does not fit a graph (the caller runs ``forward_with_cache``). Graphs
    are captured on first use; ``reset()`` drops them (when the model's modules change, e.g.
    a new adapter stack; in-place weight updates need no reset).
    """

    def __init__(self, model, cache: KVCache, max_blocks: int, sizes: tuple[int, ...] = GRAPH_BATCH_SIZES):
        self.model, self.cache, self.max_blocks = model, cache, max_blocks
        self.sizes = tuple(sorted(sizes))
        self._static: StepBatch | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def reset(self) -> None:
        self._graphs.clear()
        self._static = None

    def fits(self, batch: StepBatch) -> bool:
        return (batch.decode_only and batch.adapter_ids is None and 0 < batch.num_decode <= self.sizes[-1]
                and batch.block_table.shape[1] <= self.max_blocks)

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        if not self.fits(batch):
            return None
        if not self._graphs:
            self._capture()
        size = next(s for s in self.sizes if s >= batch.num_decode)
        pad_decode_inputs(self._static, batch, size)
        graph, out = self._graphs[size]
        graph.replay()
        return out[:batch.num_decode]

    @torch.no_grad()
    def _capture(self) -> None:
        device = self.cache.k[0].device
        self._static = static_decode_inputs(self.sizes[-1], self.max_blocks, device)
        pool = None
        # Largest first: the smaller graphs reuse its memory pool.
        for size in reversed(self.sizes):
            inputs = view_decode_inputs(self._static, size)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks its kernels
                for _ in range(2):
                    forward_with_cache(self.model, self.cache, inputs)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward_with_cache(self.model, self.cache, inputs)
            pool = graph.pool()
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize(device)
