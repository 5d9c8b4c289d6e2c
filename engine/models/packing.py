"""Packed batches: many sequences in one flat token stream, no padding (DESIGN.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class PackedBatch:
    """``input_ids`` and ``position_ids`` [T] int64, ``cu_seqlens`` [B+1] int32, and the
    host-side ``max_seqlen`` and ``seq_lens`` (computed once here, never read back from
    the device)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_lens: list[int]

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        *,
        vocab_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> "PackedBatch":
        """Pack token lists. Raises ValueError on an empty sequence or, when
        ``vocab_size`` is given, on a token id outside ``[0, vocab_size)``."""
        lens = [len(s) for s in sequences]
        if any(n == 0 for n in lens):
            raise ValueError(f"sequence {lens.index(0)} is empty; every packed sequence needs at least one token")
        flat = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        if vocab_size is not None and flat.numel():
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        if lens:
            torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0, out=cu[1:])
        # Position of each token in its sequence: global index minus its sequence's start.
        starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(lens, dtype=torch.int64))
        positions = torch.arange(flat.numel(), dtype=torch.int64) - starts
        return cls(
            input_ids=flat.to(device),
            position_ids=positions.to(device),
            cu_seqlens=cu.to(device),
            max_seqlen=max(lens, default=0),
            seq_lens=lens,
        )

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.cu_seqlens.to(device),
                           self.max_seqlen, self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Cut a per-token tensor [T, ...] back into one tensor per sequence."""
        return list(values.split(self.seq_lens))
