"""Paged KV cache: one pool of fixed-size blocks per layer, a free list, refcounts.

Layout (kernels/paged_attention.py): ``k[layer]`` / ``v[layer]`` are
[num_blocks, block_size, Hkv, D]; token p of a sequence lives in block
``blocks[p // block_size]`` at offset ``p % block_size``.

Prefix sharing: the samples of one prompt share the prompt's *full* blocks (refcount > 1);
the last, partial block is copied once per extra sample when the samples fork
(copy-on-write at fork time, one block copy per layer on the device), so every block a
sequence writes into is its own. A block returns to the free list when its refcount drops
to 0.

Tensor parallelism: each rank caches its own key/value heads; the block ids, and so the
allocator and the scheduler, are the driver's alone (``BlockSpace``).

Sizing: on CUDA the pool takes ``gpu_fraction`` of the free device memory after the
weights are loaded; elsewhere it holds ``num_tokens`` tokens (the caller passes a multiple
of max_batch_size).
"""
from __future__ import annotations

import array

import torch
import torch.distributed as dist

from engine.parallel import tp_group


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def blocks_for_memory(free_bytes: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> int:
    return free_bytes // (block_size * bytes_per_token(num_layers, num_kv_heads, head_dim, dtype))


_TYPECODES = {torch.int64: "q", torch.int32: "i", torch.float32: "f"}
_ZEROS = (0,) * 16  # alignment padding


def host_to_device(device, dtype: torch.dtype, *lists: list) -> list[torch.Tensor]:
    """The host lists as 1-D ``dtype`` tensors on ``device``, from one transfer. On CUDA the
    copy leaves pinned memory without waiting: a copy from pageable memory would wait for
    the work already queued, and a step is built while the previous one still runs. Each
    part starts on a 16-byte boundary (the kernels' pointer alignment stays the same)."""
    device = torch.device(device)
    align = 16 // dtype.itemsize
    flat = array.array(_TYPECODES[dtype])  # filled in C: ~3x faster than torch.tensor(list)
    offsets = []
    for values in lists:
        flat.extend(_ZEROS[:-len(flat) % align])
        offsets.append(len(flat))
        flat.extend(values)
    host = torch.frombuffer(flat, dtype=dtype) if flat else torch.empty(0, dtype=dtype)
    if device.type == "cuda":
        host = torch.empty(host.shape, dtype=dtype, pin_memory=True).copy_(host)
    out = host.to(device, non_blocking=True)
    return [out[o:o + len(values)] for o, values in zip(offsets, lists)]


class BlockAllocator:
    """Free list of block ids with reference counts (host side only)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache: {n} blocks requested, {len(self._free)} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is not allocated"
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} freed twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def refcount(self, block: int) -> int:
        return self._refs[block]


class BlockSpace:
    """The host side of a paged cache, all the scheduler needs: block size and count and
    the allocator. Under tensor parallelism the driver holds only this; every rank holds a
    KVCache with the same number of blocks (its local key/value heads)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"KV cache: num_blocks must be at least 1, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.allocator = BlockAllocator(num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


class KVCache(BlockSpace):
    """Device tensors k, v [num_layers, num_blocks, block_size, Hkv, D] and their allocator."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device):
        super().__init__(num_blocks, block_size)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks (every layer) src[i] -> dst[i] on the device."""
        if not src:
            return
        s, d = host_to_device(self.k.device, torch.int64, src, dst)
        self.k[:, d] = self.k[:, s]
        self.v[:, d] = self.v[:, s]

    @classmethod
    def for_model(cls, model, *, block_size: int, num_tokens: int | None = None, gpu_fraction: float = 0.9,
                  dtype: torch.dtype | None = None) -> "KVCache":
        """Size the pool: ``num_tokens`` when given, else (CUDA) a fraction of the free memory.
        On a tensor-parallel shard (``tp_group(model)``) the ranks agree on the smallest count."""
        cfg = model.config
        device = model.embed.weight.device
        dtype = dtype or model.embed.weight.dtype
        attn = model.layers[0].attn
        hkv = attn.qkv.out_features // (attn.kv_ratio + 2) // attn.head_dim  # local heads (TP shard)
        if num_tokens is None:
            if device.type != "cuda":
                raise ValueError("KV cache: num_tokens is required off CUDA")
            free, _ = torch.cuda.mem_get_info(device)
            num_blocks = blocks_for_memory(int(free * gpu_fraction), block_size, cfg.num_layers, hkv, attn.head_dim,
                                           dtype)
        else:
            num_blocks = -(-num_tokens // block_size)
        group = tp_group(model)
        if group is not None:
            n = torch.tensor([num_blocks], dtype=torch.int64, device=device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=group)
            num_blocks = int(n)
        return cls(cfg.num_layers, num_blocks, block_size, hkv, attn.head_dim, dtype=dtype, device=device)
