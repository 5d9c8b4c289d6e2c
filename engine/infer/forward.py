"""The decoder over a paged KV cache: prefill chunks and decode steps in one packed batch.

Each layer reuses the model's own modules (qkv, q_norm/k_norm, RoPE, o, the MLP and the
norms' weights) in the order of ``Attention.forward``, with the small fused kernels on CUDA
(``impl="auto"``; the training model keeps the eager ops): each residual add is fused with
the norm that follows it (``kernels.rms_norm(..., residual=)``), RoPE with the q/k norms.
Only the attention differs:

* the step's new keys/values are written into the cache first (``kernels.append_kv``);
* decode-only steps (one new token per sequence) run ``kernels.paged_attention`` straight
  on the cache;
* in a step that also holds prefill chunks, the one-token sequences (packed first) still
  take the paged kernel, and each prefill chunk (possibly on top of a cached prefix)
  gathers its sequence's cached keys/values, prefix and new tokens, into a packed
  [Tk, Hkv, D] tensor and runs ``kernels.varlen_attention`` with
  ``cu_seqlens_k`` covering prefix + chunk: its bottom-right causal alignment puts the
  chunk's queries at the end of their sequence, and ``window`` (Mistral, Qwen sliding
  layers) counts from each query's absolute position.

The gather indices are built once per step on the host, not per layer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

import kernels
from engine.models.lora import project

from .cache import KVCache, host_to_device


@dataclass
class StepBatch:
    """One engine step. The first ``num_decode`` sequences have one new token each and
    attend through ``paged_attention``; the others (prefill chunks) through the gather +
    ``varlen_attention`` path. Device tensors:

    input_ids, position_ids [T] int64: the new tokens, packed sequence by sequence;
    slot_mapping [T] int64: cache slot of each new token;
    block_table [B, max_blocks] int32, seq_lens [B] int32: every sequence (paged_attention
        reads the first num_decode rows);
    cu_q [P+1] int32, cu_k [P+1] int32: boundaries of the P prefill chunks' new tokens
        (counted from the first prefill token) and of their keys (cached prefix + chunk);
    kv_slots [Tk] int64: cache slot of each prefill key, packed like cu_k (None if P = 0);
    adapter_ids [T] int32 or None.
    Host: max_q, max_k ints over the prefill chunks; num_decode; decode_only when P = 0.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    slot_mapping: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_slots: torch.Tensor | None
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    max_q: int
    max_k: int
    decode_only: bool
    num_decode: int = 0
    adapter_ids: torch.Tensor | None = None

    @classmethod
    def build(cls, chunks: list[tuple[list[int], int, list[int]]], block_size: int, device,
              adapter_ids: list[int] | None = None) -> "StepBatch":
        """chunks: per sequence (new token ids, number already cached, block ids); the
        blocks must cover cached + new tokens; the leading one-token chunks are decoded
        through the paged kernel. adapter_ids: one per sequence (-1: base)."""
        ids, pos, slots, kv_slots, q_lens, k_lens, tables, ads = [], [], [], [], [], [], [], []
        for i, (tokens, start, blocks) in enumerate(chunks):
            end = start + len(tokens)
            assert len(blocks) * block_size >= end, "blocks do not cover the sequence"
            ids += tokens
            if end == start + 1:  # decoding: the common case, kept cheap
                pos.append(start)
                slots.append(blocks[start // block_size] * block_size + start % block_size)
            else:
                pos += range(start, end)
                slots += [blocks[p // block_size] * block_size + p % block_size for p in range(start, end)]
            q_lens.append(len(tokens))
            k_lens.append(end)
            tables.append(blocks)
            if adapter_ids is not None:
                ads += [adapter_ids[i]] * len(tokens)
        num_decode = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
        decode_only = num_decode == len(q_lens)
        for (tokens, start, blocks) in chunks[num_decode:]:
            end = start + len(tokens)
            kv_slots += [blocks[p // block_size] * block_size + p % block_size for p in range(end)]
        width = max((len(t) for t in tables), default=0) or 1
        table = [b for t in tables for b in (*t, *(0,) * (width - len(t)))]
        cu_q = list(itertools.accumulate(q_lens[num_decode:], initial=0))
        cu_k = list(itertools.accumulate(k_lens[num_decode:], initial=0))
        i64 = host_to_device(device, torch.int64, ids, pos, slots, kv_slots)
        i32 = host_to_device(device, torch.int32, cu_q, cu_k, table, k_lens, ads)
        return cls(
            input_ids=i64[0], position_ids=i64[1], slot_mapping=i64[2], cu_q=i32[0], cu_k=i32[1],
            kv_slots=None if decode_only else i64[3], block_table=i32[2].view(len(tables), width), seq_lens=i32[3],
            max_q=max(q_lens[num_decode:], default=0), max_k=max(k_lens[num_decode:], default=0),
            decode_only=decode_only, num_decode=num_decode, adapter_ids=None if adapter_ids is None else i32[4],
        )


def _attention(attn, x, cos, sin, layer: int, cache: KVCache, batch: StepBatch) -> torch.Tensor:
    q, k, v = attn.qkv_rope(x, cos, sin, batch.adapter_ids, impl="auto")
    k_cache, v_cache = cache.k[layer], cache.v[layer]
    kernels.append_kv(k_cache, v_cache, k, v, batch.slot_mapping)
    scale = attn.head_dim ** -0.5
    nd = batch.num_decode
    if batch.decode_only:
        out = kernels.paged_attention(q, k_cache, v_cache, batch.block_table, batch.seq_lens,
                                      softmax_scale=scale, window=attn.window)
    else:
        hkv, d = k_cache.shape[2], k_cache.shape[3]
        keys = k_cache.view(-1, hkv, d)[batch.kv_slots]
        values = v_cache.view(-1, hkv, d)[batch.kv_slots]
        pre = kernels.varlen_attention(q[nd:], keys, values, batch.cu_q, batch.cu_k, batch.max_q, batch.max_k,
                                       causal=True, softmax_scale=scale, window=attn.window)
        if nd == 0:
            out = pre
        else:
            dec = kernels.paged_attention(q[:nd], k_cache, v_cache, batch.block_table[:nd], batch.seq_lens[:nd],
                                          softmax_scale=scale, window=attn.window)
            out = torch.cat([dec, pre])
    return project(attn.o, out.reshape(x.shape[0], -1), batch.adapter_ids)


def _add_norm(norm, h: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h + delta), h + delta): the residual add and the next pre-norm in one kernel."""
    if delta is None:
        return kernels.rms_norm(h, norm.weight, norm.eps), h
    return kernels.rms_norm(delta, norm.weight, norm.eps, residual=h)


@torch.no_grad()
def forward_with_cache(model, cache: KVCache, batch: StepBatch) -> torch.Tensor:
    """Run the decoder on a step's new tokens, reading and extending the paged cache.
    Returns the final-normed hidden states [T, hidden] of the new tokens."""
    h = model.embed(batch.input_ids)
    cos, sin = model.rope(batch.position_ids, h.dtype)
    delta = None  # the last sublayer's output, added to the residual stream by the next norm
    for i, block in enumerate(model.layers):
        x, h = _add_norm(block.attn_norm, h, delta)
        delta = _attention(block.attn, x, cos, sin, i, cache, batch)
        x, h = _add_norm(block.mlp_norm, h, delta)
        delta = block.mlp(x, batch.adapter_ids, impl="auto")
    return _add_norm(model.norm, h, delta)[0]
