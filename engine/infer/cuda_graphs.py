"""CUDA graphs for decode-only steps: one graph per padded batch size.

A decode step of a small model is bound by kernel launches (a few per layer), not by the
GPU; replaying a captured graph removes the launch cost. Graphs need fixed shapes and
addresses, so every step copies its inputs into static buffers of the next captured size
(1, 2, 4, ..., 128 sequences) with a block table padded to the longest possible sequence.
Padding rows are harmless: token 0 at position 0, ``slot_mapping`` -1 (``append_kv``
skips it), ``seq_len`` 0 (``paged_attention`` gives zeros), adapter -1 (the base model),
so the first ``n`` rows of the output equal the unpadded step's. ``pad_decode_inputs``
does that copy on any device; the CPU tests run the padded batch eagerly against the
unpadded one.

Steps with per-token adapters (``lora_linear_multi``, which reads the ids on the device)
replay graphs of their own, with the adapter ids as one more static input; loading an
adapter drops every graph (``reset``), and each is captured again when next needed.

Not captured (eager path): steps with prefill chunks, more sequences than the largest
graph, or a block table wider than the static one; and steps of a kind (with or without
adapters) whose capture failed (a warning says why).
"""
from __future__ import annotations

import warnings

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
        num_decode=max_batch, adapter_ids=torch.full((max_batch,), -1, dtype=torch.int32, device=device))


def view_decode_inputs(static: StepBatch, size: int, adapters: bool = False) -> StepBatch:
    """The first ``size`` rows of the static buffers as a decode-only StepBatch (views),
    with per-token adapter ids when ``adapters``."""
    return StepBatch(
        input_ids=static.input_ids[:size], position_ids=static.position_ids[:size],
        slot_mapping=static.slot_mapping[:size], cu_q=static.cu_q, cu_k=static.cu_k, kv_slots=None,
        block_table=static.block_table[:size], seq_lens=static.seq_lens[:size], max_q=0, max_k=0, decode_only=True,
        num_decode=size, adapter_ids=static.adapter_ids[:size] if adapters else None)


def pad_decode_inputs(static: StepBatch, batch: StepBatch, size: int) -> StepBatch:
    """Copy a decode-only ``batch`` of n <= size sequences into the static buffers, pad rows
    n..size-1, and return the padded [size] view. Device copies only (no host sync)."""
    n, width = batch.num_decode, batch.block_table.shape[1]
    if not batch.decode_only:
        raise ValueError("pad_decode_inputs: needs a decode-only batch")
    if not n <= size <= static.input_ids.shape[0] or width > static.block_table.shape[1]:
        raise ValueError(f"pad_decode_inputs: a batch of {n} sequences x {width} blocks does not fit size {size} of "
                         f"the static buffers [{static.input_ids.shape[0]}, {static.block_table.shape[1]}]")
    adapters = batch.adapter_ids is not None
    out = view_decode_inputs(static, size, adapters)
    pairs = [(out.input_ids, batch.input_ids, 0), (out.position_ids, batch.position_ids, 0),
             (out.slot_mapping, batch.slot_mapping, -1), (out.seq_lens, batch.seq_lens, 0)]
    if adapters:
        pairs.append((out.adapter_ids, batch.adapter_ids, -1))
    for dst, src, pad in pairs:
        dst[:n].copy_(src)
        dst[n:].fill_(pad)
    out.block_table[:n, :width].copy_(batch.block_table)
    out.block_table[:n, width:].zero_()
    out.block_table[n:].zero_()
    return out


class DecodeGraphs:
    """Captured decode forwards of ``model`` over ``cache`` for the sizes in ``sizes``, for
    steps without adapters and for steps with per-token adapter ids.

    ``run(batch)`` returns the hidden states [n, hidden] of a decode-only step from a graph
    replay (a view into the graph's output buffer, valid until the next replay), or None
    when the step does not fit a graph (the caller runs ``forward_with_cache``). Each graph
    is captured on the first step of its size and kind (two warm-up forwards and one
    captured), so loading an adapter, which drops every graph (``reset()``, the model's
    modules changed), costs one capture per size then in use, not all of them. In-place
    weight updates need no reset.
    """

    def __init__(self, model, cache: KVCache, max_blocks: int, sizes: tuple[int, ...] = GRAPH_BATCH_SIZES):
        self.model, self.cache, self.max_blocks = model, cache, max_blocks
        self.sizes = tuple(sorted(sizes))
        self._static: StepBatch | None = None
        self._pool = None  # one memory pool: a replay's output is consumed before the next replay
        self._graphs: dict[tuple[bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (adapters, size)
        self._failed: set[bool] = set()  # kinds whose capture failed: eager from then on

    def reset(self) -> None:
        self._graphs.clear()
        self._failed.clear()
        self._static = None
        self._pool = None

    def fits(self, batch: StepBatch) -> bool:
        return (batch.decode_only and 0 < batch.num_decode <= self.sizes[-1]
                and batch.block_table.shape[1] <= self.max_blocks)

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        adapters = batch.adapter_ids is not None
        if not self.fits(batch) or adapters in self._failed:
            return None
        size = next(s for s in self.sizes if s >= batch.num_decode)
        if (adapters, size) not in self._graphs:
            try:
                self._graphs[adapters, size] = self._capture(adapters, size)
            except Exception as e:  # noqa: BLE001 - the eager path serves these steps instead
                warnings.warn(f"CUDA graphs: capturing a decode step {'with' if adapters else 'without'} adapters "
                              f"failed ({e!r}); such steps run eagerly", RuntimeWarning, stacklevel=2)
                self._failed.add(adapters)
                return None
        pad_decode_inputs(self._static, batch, size)
        graph, out = self._graphs[adapters, size]
        graph.replay()
        return out[:batch.num_decode]

    @torch.no_grad()
    def _capture(self, adapters: bool, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        device = self.cache.k[0].device
        if self._static is None:
            self._static = static_decode_inputs(self.sizes[-1], self.max_blocks, device)
        # The warm-up forwards write the cache: every row padding (no slot, no keys).
        self._static.slot_mapping.fill_(-1)
        self._static.seq_lens.zero_()
        inputs = view_decode_inputs(self._static, size, adapters)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for _ in range(2):
                forward_with_cache(self.model, self.cache, inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = forward_with_cache(self.model, self.cache, inputs)
        self._pool = graph.pool()
        return graph, out
