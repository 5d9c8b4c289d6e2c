"""LoRA adapters on the decoder's projections, in PEFT's format.

``add_lora(model, rank, alpha)`` turns the targeted projections into :class:`LoRALinear`
(same ``weight`` / ``bias`` parameters, so checkpoints load as before), freezes every base
parameter and adds trainable ``lora_a`` / ``lora_b``; each projection then runs
``kernels.lora_linear``. A model without adapters is unchanged.

Layout against PEFT's per-projection adapters (``lora_A.weight`` [r, in], ``lora_B.weight``
[out_i, r], scaling ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``):
our q/k/v and gate/up are fused projections, so their adapters are fused too, exactly:

* ``lora_a`` [n_blocks * r, in]: the blocks' A matrices stacked (q, k, v or gate, up);
* ``lora_b`` [out, r]: the blocks' B matrices stacked along out (the compact form of the
  block-diagonal [out, n_blocks * r] matrix that the forward builds, a few hundred KB),
  so block i's outputs see only block i's rank-r input and one kernel call serves all.

A sub-projection that an adapter does not target (PEFT's common ``["q_proj", "v_proj"]``)
keeps zero A and B rows: it adds nothing, gets zero gradients and is not exported.

Tensor parallelism (engine/parallel makes each sharded projection a LoRALinear with ``tp_mode``
"column" or "row" and ``tp_group``): the rank dimension is never split. A column-parallel
projection (qkv, gate_up) holds the whole A and its rows of each block of B; a row-parallel
one (o, down) holds its columns of A and the whole B. The replicated factor's gradient is
summed over the ranks, and A is drawn whole from a seeded generator and sliced, so a new
adapter is the same at any tp. Export gathers the slices.

Multi-adapter inference: ``set_adapter_stack(model, [adapter, ...])`` packs several PEFT
adapters (ranks and targets may differ) into per-projection stacks, and
``model(..., adapter_ids=ids)`` then serves adapter ``ids[t]`` to token ``t`` (-1: base
model) through ``kernels.lora_linear_multi``; inference only (under ``torch.no_grad()``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.collectives import copy_to_group, sum_over_group, summed_grad

# Our projection -> the PEFT / Hugging Face sub-projections it fuses, in row order.
_PROJECTIONS = {
    "qkv": ("attn.qkv", "self_attn", ("q_proj", "k_proj", "v_proj")),
    "o": ("attn.o", "self_attn", ("o_proj",)),
    "gate_up": ("mlp.gate_up", "mlp", ("gate_proj", "up_proj")),
    "down": ("mlp.down", "mlp", ("down_proj",)),
}
_PEFT_TO_OURS = {sub: ours for ours, (_, _, subs) in _PROJECTIONS.items() for sub in subs}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoRAConfig:
    """What ``add_lora`` attached; ``target_modules`` are PEFT names (``q_proj`` ...)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Linear):
    """nn.Linear with an optional trainable adapter and an optional multi-adapter stack,
    which also runs the collectives of a tensor-parallel shard (``tp_mode`` "column": the
    input's gradient summed over ``tp_group``; "row": the outputs summed, the bias added once).

    ``blocks``: output sizes of the fused sub-projections (their sum is out_features).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocks: tuple[int, ...] = (),
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.blocks = tuple(blocks) or (out_features,)
        self.register_parameter("lora_a", None)  # [n_blocks * r, in]
        self.register_parameter("lora_b", None)  # [out, r]
        self.scale = 0.0
        self.dropout = 0.0
        # Multi-adapter stacks (set_adapter_stack): [n, R, in], [n, out, R], [n]; not in state_dict.
        for name in ("stack_a", "stack_b", "stack_scales"):
            self.register_buffer(name, None, persistent=False)

    @classmethod
    def wrap(cls, linear: nn.Linear, blocks: tuple[int, ...]) -> "LoRALinear":
        """A LoRALinear that shares ``linear``'s weight and bias."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, blocks=blocks, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.tp_mode, new.tp_group = getattr(linear, "tp_mode", None), getattr(linear, "tp_group", None)
        new.train(linear.training)
        return new

    tp_mode: str | None = None  # "column" / "row" on a tensor-parallel shard
    tp_group = None

    def add_adapter(self, rank: int, scale: float, dropout: float, dtype: torch.dtype,
                    generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A kaiming-uniform (as nn.Linear), B zero, so y is unchanged.
        A is drawn on the CPU from ``generator`` for the whole (unsharded) matrix, so every
        tensor-parallel rank draws the same and keeps its slice."""
        dev = self.weight.device
        tp, r = _tp_size(self.tp_group), _tp_rank(self.tp_group)
        full_in = self.in_features * tp if self.tp_mode == "row" else self.in_features
        a = torch.empty(len(self.blocks) * rank, full_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        if self.tp_mode == "row":
            a = a[:, r * self.in_features:(r + 1) * self.in_features]
        self.lora_a = nn.Parameter(a.to(device=dev, dtype=dtype).contiguous())
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=dev))
        self.scale, self.dropout = float(scale), float(dropout)
        replicated = {"column": self.lora_a, "row": self.lora_b}.get(self.tp_mode)
        if replicated is not None:  # its gradient comes from this rank's slice only
            replicated.register_hook(partial(summed_grad, self.tp_group))
            sharded = self.lora_b if self.tp_mode == "column" else self.lora_a
            sharded.tp_sharded = True  # read by global-norm gradient clipping

    def dense_b(self) -> torch.Tensor:
        """lora_b as the [out, n_blocks * r] block-diagonal matrix the kernel multiplies by."""
        if len(self.blocks) == 1:
            return self.lora_b
        return torch.block_diag(*self.lora_b.split(self.blocks))

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        bias = None if self.tp_mode == "row" else self.bias  # a row-parallel bias is added once, after the sum
        if adapter_ids is None:
            if self.tp_mode == "column":
                x = copy_to_group(x, self.tp_group)
            if self.lora_a is None:
                out = F.linear(x, self.weight, bias)
            else:
                out = kernels.lora_linear(x, self.weight, self.lora_a, self.dense_b(), self.scale, bias=bias,
                                          dropout=self.dropout if self.training else 0.0)
        else:
            # Serving per-token adapters (no autograd; a column shard's input needs no
            # collective). The stacks hold this rank's slices (A's columns on a row shard, B's
            # rows on a column shard), so a row shard's partial outputs sum to the whole. A
            # projection no stacked adapter targets has no stack: the base alone.
            if self.stack_a is not None:
                out = kernels.lora_linear_multi(x, self.weight, self.stack_a, self.stack_b, self.stack_scales,
                                                adapter_ids, bias=bias)
            else:
                out = F.linear(x, self.weight, bias)
            if self.lora_a is not None:  # the model's own adapter (a trainer's) serves the tokens with id -1
                own = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.dense_b().to(x.dtype))
                out = out + (self.scale * own) * (adapter_ids < 0).to(out.dtype)[:, None]
        if self.tp_mode == "row":
            out = sum_over_group(out, self.tp_group)
            out = out if self.bias is None else out + self.bias
        return out


def project(layer: nn.Module, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)``; per-token adapters reach only LoRA projections."""
    if adapter_ids is not None and isinstance(layer, LoRALinear):
        return layer(x, adapter_ids)
    return layer(x)


def projections(model):
    """(layer index, our projection name, parent module, attribute, blocks) for every projection."""
    for i, block in enumerate(model.layers):
        attn = block.attn
        kv = attn.qkv.out_features // (attn.kv_ratio + 2)
        inter = block.mlp.gate_up.out_features // 2
        yield i, "qkv", attn, "qkv", (kv * attn.kv_ratio, kv, kv)
        yield i, "o", attn, "o", ()
        yield i, "gate_up", block.mlp, "gate_up", (inter, inter)
        yield i, "down", block.mlp, "down", ()


def _peft_targets(targets) -> tuple[str, ...]:
    """Our names (qkv, o, gate_up, down) or PEFT's (q_proj, ...) -> sorted PEFT names."""
    if isinstance(targets, str):
        targets = (targets,)
    out = set()
    for t in targets:
        if t in _PROJECTIONS:
            out.update(_PROJECTIONS[t][2])
        elif t in _PEFT_TO_OURS:
            out.add(t)
        else:
            raise ValueError(f"target {t!r} is not one of {sorted(_PROJECTIONS)} or {sorted(_PEFT_TO_OURS)}")
    return tuple(sorted(out))


def add_lora(model, rank: int, alpha: float, targets=("qkv", "o", "gate_up", "down"), *, dropout: float = 0.0,
             use_rslora: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0) -> LoRAConfig:
    """Attach one trainable adapter per targeted projection and freeze the base model.

    Args:
        rank, alpha: PEFT's ``r`` and ``lora_alpha`` (scale ``alpha / rank``, or
            ``alpha / sqrt(rank)`` with ``use_rslora``).
        targets: our projection names and/or PEFT module names (``q_proj`` ... ``down_proj``).
        dropout: PEFT's ``lora_dropout``, applied in training mode only.
        dtype: adapter parameters' dtype (float32 by default, as PEFT's
            ``autocast_adapter_dtype``); the kernels compute in the activations' dtype.
        seed: seeds the draw of the A matrices (the same adapter at any tp).
    """
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has a LoRA adapter")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    peft = _peft_targets(targets)
    config = LoRAConfig(rank, float(alpha), peft, float(dropout), use_rslora)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for _, name, parent, attr, blocks in projections(model):
        subs = _PROJECTIONS[name][2]
        if not set(subs) & set(peft):
            continue
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear.wrap(layer, blocks)
            setattr(parent, attr, layer)
        layer.add_adapter(rank, config.scale, dropout, dtype, generator)
        with torch.no_grad():  # sub-projections not targeted: zero A rows, B rows already zero
            for j, sub in enumerate(subs):
                if sub not in peft:
                    layer.lora_a[j * rank:(j + 1) * rank].zero_()
    model.lora_config = config
    return config


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _tp_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate the ranks' slices of t along dim (equal slices)."""
    parts = [torch.empty_like(t) for _ in range(_tp_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _peft_prefix(i: int, name: str, sub: str) -> str:
    return f"base_model.model.model.layers.{i}.{_PROJECTIONS[name][1]}.{sub}"


def lora_state_dict_to_peft(model) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it: ``base_model.model.model.layers.{i}.self_attn.q_proj
    .lora_A.weight`` [r, in] and ``...lora_B.weight`` [out_i, r], for every target module."""
    config = _config(model)
    out = {}
    for i, name, parent, attr, _ in projections(model):
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear) or layer.lora_a is None:
            continue
        a, b = layer.lora_a.detach(), layer.lora_b.detach()
        if layer.tp_mode == "row":
            a = _gather(a, 1, layer.tp_group)
        a_blocks = a.split(config.rank)
        b_blocks = b.split(layer.blocks)
        if layer.tp_mode == "column":
            b_blocks = [_gather(block, 0, layer.tp_group) for block in b_blocks]
        for sub, a, b in zip(_PROJECTIONS[name][2], a_blocks, b_blocks):
            if sub in config.target_modules:
                prefix = _peft_prefix(i, name, sub)
                out[prefix + ".lora_A.weight"] = a.contiguous()
                out[prefix + ".lora_B.weight"] = b.contiguous()
    return out


def peft_config(model) -> dict:
    """adapter_config.json for the model's adapter (PEFT fills the fields left out)."""
    c = _config(model)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c.rank, "lora_alpha": c.alpha,
            "lora_dropout": c.dropout, "target_modules": list(c.target_modules), "use_rslora": c.use_rslora,
            "bias": "none", "fan_in_fan_out": False, "use_dora": False, "inference_mode": True,
            "base_model_name_or_path": None}


def save_peft_lora(model, folder: str | Path, *, write: bool = True) -> Path:
    """Write adapter_model.safetensors and adapter_config.json (PEFT's ``save_pretrained``
    layout; each file written under a temporary name, then renamed). Under tensor
    parallelism every rank must call it (the slices are gathered); pass ``write=False`` on
    all ranks but one."""
    from safetensors.torch import save_file

    state = lora_state_dict_to_peft(model)
    folder = Path(folder)
    if not write:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    save_file({k: v.cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS)
    tmp = folder / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(peft_config(model), indent=2))
    os.replace(tmp, folder / ADAPTER_CONFIG)
    return folder


def _config(model) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapter (add_lora or load_peft_lora first)")
    return config


def read_peft_adapter(source, config: dict | None = None) -> tuple[dict[str, torch.Tensor], LoRAConfig]:
    """(state dict, LoRAConfig) from a PEFT adapter folder, or from a state dict plus its
    adapter_config dict. Raises on PEFT features this engine does not run."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (folder / f).is_file():
                raise FileNotFoundError(f"{folder}: no {f} (a PEFT LoRA adapter folder holds {ADAPTER_CONFIG} "
                                        f"and {ADAPTER_WEIGHTS})")
        from safetensors.torch import load_file

        config = json.loads((folder / ADAPTER_CONFIG).read_text()) if config is None else config
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    elif isinstance(source, dict):
        if config is None:
            raise ValueError("config (the adapter_config.json dict) is required with a state dict")
        state = source
    else:
        raise ValueError(f"source must be a PEFT adapter folder or a state dict, got {type(source).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter_config: peft_type {config.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False),
                    ("use_qalora", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"adapter_config: {key}={config[key]!r} is not supported (only {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "exclude_modules",
                "layer_replication", "target_parameters"):
        if config.get(key):
            raise ValueError(f"adapter_config: {key} is not supported, got {config[key]!r}")
    targets = config.get("target_modules")
    if targets == "all-linear":
        targets = tuple(_PEFT_TO_OURS)
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"adapter_config: target_modules must be a list of module names, got {targets!r}")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"adapter_config: r must be a positive int, got {rank!r}")
    lora = LoRAConfig(rank, float(config.get("lora_alpha", 8)), _peft_targets(targets),
                      float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False)))
    return state, lora


def adapter_tensors(model, state, lora: LoRAConfig):
    """Per projection (layer, name) -> (A [n_blocks * r, in], B [out, r]) with zero blocks
    for sub-projections the adapter does not target; checks names and shapes."""
    seen, out = set(), {}
    r = lora.rank
    for i, name, parent, attr, blocks in projections(model):
        subs = _PROJECTIONS[name][2]
        if not set(subs) & set(lora.target_modules):
            continue
        layer = getattr(parent, attr)
        blocks = blocks or (layer.out_features,)
        tp, rank = _tp_size(getattr(layer, "tp_group", None)), _tp_rank(getattr(layer, "tp_group", None))
        mode = getattr(layer, "tp_mode", None)
        full_in = layer.in_features * tp if mode == "row" else layer.in_features
        a_parts, b_parts = [], []
        for sub, rows in zip(subs, blocks):
            full_rows = rows * tp if mode == "column" else rows
            if sub not in lora.target_modules:
                a_parts.append(torch.zeros(r, layer.in_features))
                b_parts.append(torch.zeros(rows, r))
                continue
            prefix = _peft_prefix(i, name, sub)
            for suffix, shape in ((".lora_A.weight", (r, full_in)), (".lora_B.weight", (full_rows, r))):
                key = prefix + suffix
                if key not in state:
                    raise KeyError(f"PEFT adapter: missing {key}")
                if tuple(state[key].shape) != shape:
                    raise ValueError(f"PEFT adapter: {key} has shape {tuple(state[key].shape)}, expected {shape}")
                seen.add(key)
            a = state[prefix + ".lora_A.weight"].float().cpu()
            b = state[prefix + ".lora_B.weight"].float().cpu()
            if mode == "row":  # this rank's slice (tensor parallelism)
                a = a[:, rank * layer.in_features:(rank + 1) * layer.in_features]
            elif mode == "column":
                b = b[rank * rows:(rank + 1) * rows]
            a_parts.append(a)
            b_parts.append(b)
        out[(i, name)] = (torch.cat(a_parts), torch.cat(b_parts))
    unused = sorted(set(state) - seen)
    if unused:
        raise ValueError(f"PEFT adapter: {len(unused)} tensor(s) match no projection of this model, e.g. {unused[0]}")
    return out


@torch.no_grad()
def load_peft_lora(model, source, config: dict | None = None) -> LoRAConfig:
    """Load a PEFT LoRA adapter (folder, or state dict + adapter_config dict) as the
    model's trainable adapter, adding it with ``add_lora`` when the model has none."""
    state, lora = read_peft_adapter(source, config)
    if getattr(model, "lora_config", None) is None:
        add_lora(model, lora.rank, lora.alpha, lora.target_modules, dropout=lora.dropout, use_rslora=lora.use_rslora)
    elif (model.lora_config.rank, model.lora_config.target_modules) != (lora.rank, lora.target_modules):
        raise ValueError(f"PEFT adapter has r={lora.rank}, target_modules={list(lora.target_modules)}; the model's "
                         f"adapter has r={model.lora_config.rank}, target_modules={list(model.lora_config.target_modules)}")
    for (i, name), (a, b) in adapter_tensors(model, state, lora).items():
        layer = getattr(*_parent(model, i, name))
        layer.lora_a.copy_(a)
        layer.lora_b.copy_(b)
        layer.scale = lora.scale
    model.lora_config = lora
    return lora


def _parent(model, i: int, name: str):
    path, attr = _PROJECTIONS[name][0].split(".")
    return getattr(model.layers[i], path), attr


@torch.no_grad()
def set_adapter_stack(model, adapters) -> int:
    """Pack several PEFT adapters (folders, or ``(state_dict, config_dict)`` pairs) for
    ``model(..., adapter_ids=...)``: adapter k serves tokens whose id is k. Ranks and
    target modules may differ between adapters (zero-padded). Returns their number."""
    parsed = [read_peft_adapter(*(a if isinstance(a, tuple) else (a,))) for a in adapters]
    if not parsed:
        raise ValueError("adapters must hold at least one PEFT adapter")
    per_adapter = [adapter_tensors(model, state, lora) for state, lora in parsed]
    w_dtype = model.embed.weight.dtype
    for i, name, parent, attr, blocks in projections(model):
        layer = getattr(parent, attr)
        if not any((i, name) in t for t in per_adapter):
            if isinstance(layer, LoRALinear):
                layer.stack_a = layer.stack_b = layer.stack_scales = None
            continue
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear.wrap(layer, blocks)
            setattr(parent, attr, layer)
        packed = []
        for t, (_, lora) in zip(per_adapter, parsed):
            if (i, name) in t:
                a, b = t[(i, name)]
                b = torch.block_diag(*b.split(layer.blocks)) if len(layer.blocks) > 1 else b
                packed.append((a, b, lora.scale))
            else:
                packed.append((torch.zeros(1, layer.in_features), torch.zeros(layer.out_features, 1), 0.0))
        stack_a, stack_b, scales = kernels.pack_lora_adapters(packed)
        dev = layer.weight.device
        layer.stack_a, layer.stack_b = stack_a.to(dev, w_dtype), stack_b.to(dev, w_dtype)
        layer.stack_scales = scales.to(dev)
    model.num_adapters = len(parsed)
    return len(parsed)


def check_adapter_ids(adapter_ids, n_tokens: int, num_adapters: int, device, *, check_values: bool = True) -> None:
    """Raise ValueError naming the argument when ``adapter_ids`` cannot be served."""
    if num_adapters == 0:
        raise ValueError("adapter_ids given but the model has no adapter stack (engine.models.lora.set_adapter_stack)")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype != torch.int32 or tuple(adapter_ids.shape) != (n_tokens,):
        got = f"{adapter_ids.dtype} {tuple(adapter_ids.shape)}" if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
        raise ValueError(f"adapter_ids must be an int32 tensor [T={n_tokens}], got {got}")
    if adapter_ids.device != device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device}, the model on {device}")
    if check_values and n_tokens:
        lo, hi = torch.stack([adapter_ids.min(), adapter_ids.max()]).tolist()
        if lo < -1 or hi >= num_adapters:
            raise ValueError(f"adapter_ids holds {lo if lo < -1 else hi}, outside [-1, {num_adapters}) "
                             f"(-1 means the base model)")
