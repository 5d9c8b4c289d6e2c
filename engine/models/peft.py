"""LoRA adapters in PEFT's format: export, import, and multi-adapter stacks.

``lora_state_dict_to_peft`` / ``save_peft_lora`` write the model's adapter as PEFT's
``save_pretrained`` does (the fused q/k/v and gate/up factors split back into PEFT's
per-projection ``lora_A`` / ``lora_B``, see lora.py); ``load_peft_lora`` reads one back
as the model's trainable adapter. A module holding part of a projection exports the whole
(``LoRALinear.full_factors``: every holder must call) and loads its part.

Multi-adapter inference: ``set_adapter_stack(model, [adapter, ...])`` packs several PEFT
adapters (ranks and targets may differ) into per-projection stacks, and
``model(..., adapter_ids=ids)`` then serves adapter ``ids[t]`` to token ``t`` (-1: base
model) through ``kernels.lora_linear_multi``; inference only (under ``torch.no_grad()``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

import kernels

from .files import write_safetensors, write_text
from .lora import PEFT_TO_OURS, PROJECTIONS, LoRAConfig, LoRALinear, add_lora, peft_targets, projections

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _peft_prefix(i: int, name: str, sub: str) -> str:
    return f"base_model.model.model.layers.{i}.{PROJECTIONS[name][1]}.{sub}"


def lora_state_dict_to_peft(model) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it: ``base_model.model.model.layers.{i}.self_attn.q_proj
    .lora_A.weight`` [r, in] and ``...lora_B.weight`` [out_i, r], for every target module."""
    config = _config(model)
    out = {}
    for i, name, parent, attr, _ in projections(model):
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear) or layer.lora_a is None:
            continue
        full_a, full_b = layer.full_factors(layer.lora_a.detach(), layer.lora_b.detach())
        for sub, a, b in zip(PROJECTIONS[name][2], full_a.split(config.rank), full_b.split(layer.full_blocks)):
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
    layout; each file written whole or not at all, engine/models/files.py). When the model's
    modules hold parts of the projections (tensor parallelism) every holder must call it
    (the parts are gathered); pass ``write=False`` on all but one."""
    state = lora_state_dict_to_peft(model)
    folder = Path(folder)
    if not write:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / ADAPTER_WEIGHTS, state, {"format": "pt"})
    write_text(folder / ADAPTER_CONFIG, json.dumps(peft_config(model), indent=2))
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
    for key, value in state.items():  # one NaN would make every token the adapter serves NaN
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"PEFT adapter: {key} holds NaN or inf values")
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
        targets = tuple(PEFT_TO_OURS)
    if not isinstance(targets, (list, tuple)) or not targets:
        raise ValueError(f"adapter_config: target_modules must be a list of module names, got {targets!r}")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"adapter_config: r must be a positive int, got {rank!r}")
    lora = LoRAConfig(rank, float(config.get("lora_alpha", 8)), peft_targets(targets),
                      float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False)))
    return state, lora


def adapter_stamp(folder: str | Path) -> tuple[int, ...]:
    """What tells one saved version of a PEFT adapter folder from the next: the inode,
    modification time (ns) and size of its two files (a save that replaces a file by rename,
    as ``save_peft_lora`` does, changes the inode even within one clock tick)."""
    stamp = []
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        try:
            st = os.stat(Path(folder) / name)
        except FileNotFoundError:
            raise FileNotFoundError(f"{folder}: no {name} (a PEFT LoRA adapter folder holds {ADAPTER_CONFIG} "
                                    f"and {ADAPTER_WEIGHTS})") from None
        stamp += (st.st_ino, st.st_mtime_ns, st.st_size)
    return tuple(stamp)


def read_peft_snapshot(folder: str | Path, attempts: int = 5) -> tuple[dict[str, torch.Tensor], dict, tuple]:
    """(state dict, adapter_config dict, ``adapter_stamp``) of one version of a PEFT adapter
    folder that may be re-saved while it is read: both files are read into memory between
    two equal stamps (retried while they differ), so the pair is never half old, half new."""
    from safetensors.torch import load

    folder = Path(folder)
    for _ in range(attempts):
        before = adapter_stamp(folder)
        try:
            config = json.loads((folder / ADAPTER_CONFIG).read_text())
            state = load((folder / ADAPTER_WEIGHTS).read_bytes())
        except Exception:  # noqa: BLE001 - a file caught mid-write: read again if it changed
            if adapter_stamp(folder) == before:
                raise
        else:
            if adapter_stamp(folder) == before:
                return state, config, before
        time.sleep(0.05)  # a writer is at work: give it a moment
    raise RuntimeError(f"{folder}: the adapter kept changing while it was read ({attempts} attempts)")


def adapter_tensors(model, state, lora: LoRAConfig):
    """Per projection (layer, name) -> (A [n_blocks * r, in], B [out, r]) of the model's
    module, with zero blocks for sub-projections the adapter does not target. Names and
    shapes are checked against the whole projection; a module that holds a part of it (see
    ``LoRALinear.local_factors``) gets its part."""
    seen, out = set(), {}
    r = lora.rank
    for i, name, parent, attr, blocks in projections(model):
        subs = PROJECTIONS[name][2]
        if not set(subs) & set(lora.target_modules):
            continue
        layer = getattr(parent, attr)
        if not isinstance(layer, LoRALinear):  # a view sharing its parameters; the model is left as it is
            layer = LoRALinear.wrap(layer, blocks)
        full_in = layer.full_in_features
        a_parts, b_parts = [], []
        for sub, rows in zip(subs, layer.full_blocks):
            if sub not in lora.target_modules:
                a_parts.append(torch.zeros(r, full_in))
                b_parts.append(torch.zeros(rows, r))
                continue
            prefix = _peft_prefix(i, name, sub)
            for suffix, shape in ((".lora_A.weight", (r, full_in)), (".lora_B.weight", (rows, r))):
                key = prefix + suffix
                if key not in state:
                    raise KeyError(f"PEFT adapter: missing {key}")
                if tuple(state[key].shape) != shape:
                    raise ValueError(f"PEFT adapter: {key} has shape {tuple(state[key].shape)}, expected {shape}")
                seen.add(key)
            a_parts.append(state[prefix + ".lora_A.weight"].float().cpu())
            b_parts.append(state[prefix + ".lora_B.weight"].float().cpu())
        out[(i, name)] = layer.local_factors(torch.cat(a_parts), torch.cat(b_parts))
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
    path, attr = PROJECTIONS[name][0].split(".")
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
