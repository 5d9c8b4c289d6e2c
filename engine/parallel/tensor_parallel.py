"""Megatron-style tensor parallelism of the packed decoder.

A rank of a group of ``tp`` holds:
  * column-parallel ``attn.qkv`` and ``mlp.gate_up``: its rows of q, k, v (whole heads) and
    of gate, up, each block in the same order as the unsharded fused parameter, so the model
    code splits them exactly as it does at tp=1.
  * row-parallel ``attn.o`` and ``mlp.down``: its columns (the bias whole).
  * a vocabulary-parallel embedding (its contiguous slice of token ids) and LM head (its
    slice of rows), which feeds ``kernels.linear_logprobs(..., process_group=tp_group(model))``:
    no rank ever holds full-vocabulary logits.
  * everything else replicated. Replicated parameters whose gradient comes from rank-local
    work only (Qwen3's q/k norms act on the local heads) get their gradient summed over the
    ranks by a hook, so every replica takes the same optimizer step.

``build_tp_model`` builds the model at its local sizes, then ``modules.parallelize`` puts
the parallel modules, which run the collectives (with or without a LoRA adapter), in place
of the embedding and the projections and records the group (``tp_group(model)``, held weakly). The model code
(``engine/models``) does not branch on tp: local head counts come from the shapes.
Parameter names are those of the unsharded model.

Constraints: tp must divide the query heads, the key/value heads and the FFN size. Fewer
key/value heads than ranks (replicating KV heads) is not supported and is rejected; the
vocabulary may split unevenly (the first ``V % tp`` ranks get one id more).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kernels.collectives import GroupRef, summed_grad

from ..models import build_model, load_config
from ..models.checkpoint import WeightEntry, load_weights, weight_map
from ..models.config import ConfigError, ModelConfig
from ..models.transformer import Transformer
from .modules import COLUMN, ROW, ParallelLinear, gather, parallelize, tp_group

PARTIAL_GRAD = ("attn.q_norm.weight", "attn.k_norm.weight")


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise ConfigError when ``tp`` cannot split this model."""
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tp must be a positive int, got {tp!r}")
    for what, n in (("num_attention_heads", config.num_heads), ("num_key_value_heads", config.num_kv_heads),
                    ("intermediate_size", config.intermediate_size)):
        if n % tp:
            hint = " (replicating key/value heads over more ranks than there are is not supported)" \
                if what == "num_key_value_heads" else ""
            raise ConfigError(f"tp={tp} does not divide {what}={n}{hint}")


def vocab_slice(vocab: int, tp: int, rank: int) -> tuple[int, int]:
    """(start, size) of ``rank``'s contiguous slice of the vocabulary."""
    base, extra = divmod(vocab, tp)
    return rank * base + min(rank, extra), base + (rank < extra)


def local_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config one rank's layers are built from (vocab_size stays global)."""
    check_tp(config, tp)
    return dataclasses.replace(config, num_heads=config.num_heads // tp, num_kv_heads=config.num_kv_heads // tp,
                               intermediate_size=config.intermediate_size // tp)


def shard_entries(config: ModelConfig, tp: int, rank: int) -> list[WeightEntry]:
    """The weight map of one rank: which slice of each stored tensor fills which rows."""
    out = []
    v_start, v_size = vocab_slice(config.vocab_size, tp, rank)
    for e in weight_map(config):
        module = e.param.rsplit(".", 1)[0].split(".", 2)[-1]  # "layers.3.attn.qkv.weight" -> "attn.qkv"
        if e.param in ("embed.weight", "lm_head.weight"):
            e = dataclasses.replace(e, shard=(0, v_start, v_size, config.vocab_size))
        elif module in COLUMN:
            rows = e.rows // tp
            e = dataclasses.replace(e, row_offset=e.row_offset // tp, rows=rows, shard=(0, rank * rows, rows, e.rows))
        elif module in ROW and e.param.endswith(".weight"):
            full = config.num_heads * config.head_dim if module == "attn.o" else config.intermediate_size
            e = dataclasses.replace(e, shard=(1, rank * full // tp, full // tp, full))
        out.append(e)
    return out


def build_tp_model(config: ModelConfig, group, *, dtype=torch.float32, device=None) -> Transformer:
    """An uninitialised model holding this rank's shard (``group=None``: the plain model)."""
    if group is None:
        return build_model(config, dtype=dtype, device=device)
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    local = local_config(config, tp)
    v_start, v_size = vocab_slice(config.vocab_size, tp, rank)
    with torch.device("meta"):
        model = Transformer(local)
        model.embed = nn.Embedding(v_size, config.hidden_size, _weight=torch.empty(v_size, config.hidden_size))
        if model.lm_head is not None:
            model.lm_head = nn.Linear(config.hidden_size, v_size, bias=False)
    model.config = config  # the global config: vocab checks, attention scale and RoPE are unchanged
    model = model.to(dtype).to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    model.reset_buffers()
    parallelize(model, group, v_start)
    sharded = {e.param for e in shard_entries(config, tp, rank) if e.shard is not None}
    for name, param in model.named_parameters():
        if name.split(".", 2)[-1] in PARTIAL_GRAD:
            param.register_hook(partial(summed_grad, GroupRef(group)))
        # Each rank holds a different slice (global-norm gradient clipping sums these).
        param.tp_sharded = name in sharded
    return model


def load_tp_model(path: str | Path, group=None, *, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """Load this rank's shard of a Hugging Face checkpoint; each rank reads only its slices
    of the memory-mapped safetensors files. ``group=None`` is ``engine.models.load_model``."""
    folder = Path(path)
    config = load_config(folder)
    model = build_tp_model(config, group, dtype=dtype or config.dtype or torch.float32, device=device)
    entries = None if group is None else shard_entries(config, dist.get_world_size(group), dist.get_rank(group))
    load_weights(model, folder, config, entries)
    return model.eval()


@torch.no_grad()
def full_state(model: Transformer, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Hugging Face name -> the unsharded tensor (or its gradient), gathered from every rank
    of ``tp_group(model)``; on one rank it is just the model's weights under HF names."""
    group = tp_group(model)
    config = model.config
    tp, rank = (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)
    params = dict(model.named_parameters())
    out = {}
    for e in (shard_entries(config, tp, rank) if group is not None else weight_map(config)):
        param = params[e.param]
        t = param.grad if grads else param
        if t is None:
            continue
        t = t.narrow(0, e.row_offset, e.rows) if e.rows is not None else t
        if e.shard is not None:
            dim = e.shard[0]
            sizes = [vocab_slice(e.shard[3], tp, r)[1] for r in range(tp)] if e.param in ("embed.weight", "lm_head.weight") \
                else [e.shard[2]] * tp
            t = gather(t, dim, group, sizes)
        out[e.hf_name] = t.detach().clone()
    return out


def gather_vocab(model: Transformer, logits: torch.Tensor) -> torch.Tensor:
    """[rows, V_local] logits of this rank's vocabulary slice -> [rows, V] on every rank
    (unchanged on a model without a group). For the few rows a sampler needs, not training."""
    group = tp_group(model)
    if group is None:
        return logits
    tp = dist.get_world_size(group)
    return gather(logits, 1, group, [vocab_slice(model.config.vocab_size, tp, r)[1] for r in range(tp)])


def shard_tensor(config: ModelConfig, group, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of parameter ``name`` (a name of the unsharded model's state_dict)
    given its unsharded value: the same slices ``load_tp_model`` reads from a checkpoint."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    whole = {e.hf_name: e for e in weight_map(config) if e.param == name}
    parts = sorted((e for e in shard_entries(config, tp, rank) if e.param == name), key=lambda e: e.row_offset)
    if not parts:
        raise KeyError(f"{name!r} is not a weight of this model")
    pieces = []
    for e in parts:
        w = whole[e.hf_name]
        src = full.narrow(0, w.row_offset, w.rows) if w.rows is not None else full
        pieces.append(src.narrow(e.shard[0], e.shard[1], e.shard[2]) if e.shard is not None else src)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _lora_module(model, name: str):
    """The ParallelLinear whose ``lora_a`` / ``lora_b`` is parameter ``name``, else None."""
    module_name, _, leaf = name.rpartition(".")
    if leaf not in ("lora_a", "lora_b"):
        return None
    module = model.get_submodule(module_name)
    return module if isinstance(module, ParallelLinear) else None


@torch.no_grad()
def unshard_param(model: Transformer, name: str, local: torch.Tensor) -> torch.Tensor:
    """The unsharded value of parameter ``name`` (or of a tensor shaped like it: its
    gradient, an optimizer moment) from every rank's ``local`` part; a collective of
    ``tp_group(model)`` for a sharded parameter (every rank calls it), the tensor itself for
    a replicated one or at tp=1. The inverse of ``shard_param``."""
    group = tp_group(model)
    if group is None:
        return local
    lora = _lora_module(model, name)
    if lora is not None:  # the sharded factor is gathered, the replicated one is whole already
        if name.endswith(lora.replicated_factor):
            return local
        is_a = name.endswith("lora_a")
        return lora.full_factors(*((local, lora.lora_b) if is_a else (lora.lora_a, local)))[0 if is_a else 1]
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = sorted((e for e in shard_entries(model.config, tp, rank) if e.param == name), key=lambda e: e.row_offset)
    if not parts or all(e.shard is None for e in parts):
        return local  # replicated (norms, a value head)
    pieces = []
    for e in parts:
        t = local.narrow(0, e.row_offset, e.rows) if e.rows is not None else local
        sizes = [vocab_slice(e.shard[3], tp, r)[1] for r in range(tp)] if name in ("embed.weight", "lm_head.weight") \
            else [e.shard[2]] * tp
        pieces.append(gather(t, e.shard[0], group, sizes))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def shard_param(model: Transformer, name: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of parameter ``name`` (or of a tensor shaped like it) given its
    unsharded value; no collective."""
    group = tp_group(model)
    if group is None:
        return full
    lora = _lora_module(model, name)
    if lora is not None:
        if name.endswith(lora.replicated_factor):
            return full
        is_a = name.endswith("lora_a")
        return lora.local_factors(*((full, lora.lora_b) if is_a else (lora.lora_a, full)))[0 if is_a else 1]
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    if not any(e.param == name and e.shard is not None for e in shard_entries(model.config, tp, rank)):
        return full
    return shard_tensor(model.config, group, name, full)
