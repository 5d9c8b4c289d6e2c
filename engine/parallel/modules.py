"""Megatron-style parallel modules, put in place of a built model's own by ``parallelize``
(torchtitan's rule: ``engine/models`` knows nothing of them). Each shares the parameters of
the module it replaces, so parameter names are those of the unsharded model.

* ``ColumnParallelLinear`` (q/k/v, gate/up): this rank's rows of each fused block. Its
  input is replicated; the input's gradient is summed over the ranks (``copy_to_group``).
* ``RowParallelLinear`` (o, down): this rank's columns. The partial outputs are summed over
  the ranks (``sum_over_group``) and the bias, replicated, is added once, after the sum.
* ``VocabParallelEmbedding``: this rank's contiguous slice of token ids; other ids give
  zeros and the ranks' outputs are summed.

Both linear modules are ``LoRALinear`` subclasses, so LoRA runs on the shards: the rank
dimension is never split. A column shard holds the whole A and its rows of each block of B;
a row shard holds its columns of A and the whole B. The replicated factor's gradient comes
from this rank's slice only, so a hook sums it over the ranks. A new adapter's A is drawn
whole and cut (``LoRALinear.add_adapter`` through ``local_factors``), so it is the same at
any tp; PEFT export gathers the slices (``full_factors``), and a PEFT adapter loads (or is
stacked for serving) as each rank's slices.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels.collectives import GroupRef, copy_to_group, sum_over_group, summed_grad

from ..models.lora import PROJECTIONS, LoRALinear, projections

COLUMN = ("attn.qkv", "mlp.gate_up")  # split along their output rows
ROW = ("attn.o", "mlp.down")  # split along their input columns


def gather(t: torch.Tensor, dim: int, group, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's 2-D ``t`` along ``dim`` (rank r's has ``sizes[r]`` there;
    default: all equal). all_gather needs equal shapes, so each is padded to the largest."""
    sizes = sizes or [t.shape[dim]] * dist.get_world_size(group)
    pad = max(sizes) - t.shape[dim]
    padded = F.pad(t, (0, 0, 0, pad) if dim == 0 else (0, pad)) if pad else t.contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, sizes)], dim=dim)


class ParallelLinear(LoRALinear):
    """A LoRALinear holding one rank's part of a projection split over ``group``; of its
    adapter, every rank holds the ``replicated_factor`` whole and a slice of the other."""

    replicated_factor: str
    sharded_factor: str

    @classmethod
    def shard_of(cls, linear: nn.Linear, blocks: tuple[int, ...], group) -> "ParallelLinear":
        """The ``cls`` sharing ``linear``'s (already sharded) weight and bias."""
        new = cls.wrap(linear, blocks)
        new.group_ref, new.tp, new.tp_rank = GroupRef(group), dist.get_world_size(group), dist.get_rank(group)
        return new

    @property
    def group(self):
        return self.group_ref()

    def add_adapter(self, *args, **kwargs) -> None:
        super().add_adapter(*args, **kwargs)
        getattr(self, self.replicated_factor).register_hook(partial(summed_grad, self.group_ref))
        # Each rank holds a different slice: global-norm gradient clipping sums them.
        getattr(self, self.sharded_factor).tp_sharded = True


class ColumnParallelLinear(ParallelLinear):
    replicated_factor, sharded_factor = "lora_a", "lora_b"

    @property
    def full_blocks(self) -> tuple[int, ...]:
        return tuple(n * self.tp for n in self.blocks)

    def local_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = b.split(self.full_blocks)
        return a, torch.cat([p.narrow(0, self.tp_rank * n, n) for p, n in zip(parts, self.blocks)])

    def full_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a, torch.cat([gather(p, 0, self.group) for p in b.split(self.blocks)])

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if adapter_ids is None:  # per-token adapters serve without autograd: no gradient to sum
            x = copy_to_group(x, self.group)
        return self.lora_linear(x, self.bias, adapter_ids)


class RowParallelLinear(ParallelLinear):
    replicated_factor, sharded_factor = "lora_b", "lora_a"

    @property
    def full_in_features(self) -> int:
        return self.in_features * self.tp

    def local_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a.narrow(1, self.tp_rank * self.in_features, self.in_features), b

    def full_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gather(a, 1, self.group), b

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        # The partial outputs (adapters' included: A's columns here) sum to the whole.
        out = sum_over_group(self.lora_linear(x, None, adapter_ids), self.group)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """The token ids [vocab_start, vocab_start + num_embeddings) of a vocabulary split over
    ``group``."""

    @classmethod
    def shard_of(cls, embedding: nn.Embedding, group, vocab_start: int) -> "VocabParallelEmbedding":
        n, dim = embedding.weight.shape
        new = cls(n, dim, _weight=torch.empty(n, dim, device="meta"))  # _weight: no random init
        new.weight = embedding.weight
        new.group_ref, new.vocab_start = GroupRef(group), vocab_start
        return new

    @property
    def group(self):
        return self.group_ref()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return sum_over_group(out.masked_fill(outside[:, None], 0), self.group)


def tp_group(model):
    """The process group ``parallelize`` split ``model`` over; None for a model it did not
    split. The model holds it weakly (``kernels.collectives.GroupRef``): this raises once the
    group was destroyed."""
    ref = getattr(model, "tp_group_ref", None)
    return None if ref is None else ref()


def parallelize(model, group, vocab_start: int) -> None:
    """Put the parallel modules in place of ``model``'s embedding and projections, whose
    parameters already hold this rank's shard (the LM head, a plain slice of the vocabulary's
    rows, needs no module: ``kernels.linear_logprobs`` takes ``tp_group(model)``)."""
    model.tp_group_ref, model.vocab_start = GroupRef(group), vocab_start
    model.embed = VocabParallelEmbedding.shard_of(model.embed, group, vocab_start)
    for _, name, parent, attr, blocks in projections(model):
        cls = ColumnParallelLinear if PROJECTIONS[name][0] in COLUMN else RowParallelLinear
        setattr(parent, attr, cls.shard_of(getattr(parent, attr), blocks, group))
