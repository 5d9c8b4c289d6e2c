"""Training state on disk: safetensors, written under a temporary name, then renamed.

``<folder>/state.safetensors`` holds the trainable weights (the adapter alone under LoRA,
plus the value head of a scoring model) as ``weights.<name>``, AdamW's moments as
``optimizer.<name>.exp_avg`` / ``.exp_avg_sq`` / ``.step``, and in its metadata the step
counter and what kind of model wrote it. Sampler exports: a PEFT adapter folder under
LoRA, else a Hugging Face folder (config.json + model.safetensors) that transformers loads.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from engine.models import save_peft_lora
from engine.parallel import full_state

STATE_FILE = "state.safetensors"
_FORMAT = "engine-train-state-v1"
# Files a sampler export copies from the base checkpoint when present.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "generation_config.json")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _kind(trainer) -> str:
    return ("lora" if trainer.lora else "full") + ("+value_head" if trainer.value_head is not None else "")


def _state_file(trainer) -> str:
    """state.safetensors, or one file per rank under tensor parallelism (a state saved at
    tp=n loads at tp=n; the sampler exports are unsharded)."""
    if trainer.group is None:
        return STATE_FILE
    tp, rank = dist.get_world_size(trainer.group), dist.get_rank(trainer.group)
    return f"state.tp{tp}-rank{rank}.safetensors"


def _is_writer(trainer) -> bool:
    return trainer.group is None or dist.get_rank(trainer.group) == 0


def save_state(trainer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"weights.{n}": p for n, p in trainer.params}
    for n, p in trainer.params:
        for key, value in trainer.optimizer.state.get(p, {}).items():
            tensors[f"optimizer.{n}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    meta = {"format": _FORMAT, "step": str(trainer.step), "kind": _kind(trainer)}
    _atomic_save(tensors, folder / _state_file(trainer), meta)
    if trainer.group is not None:
        dist.barrier(group=trainer.group)  # every shard is on disk when the call returns
    return folder


def load_state(trainer, path: Path, *, with_optimizer: bool) -> None:
    name = _state_file(trainer)
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"path {str(path)!r}: no {name} (a folder written by save_state at this tp)")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"path {str(path)!r}: not a training state written by save_state")
        if meta.get("kind") != _kind(trainer):
            raise ValueError(f"path {str(path)!r} holds a {meta.get('kind')} state; this model is {_kind(trainer)}")
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    names = [n for n, _ in trainer.params]
    missing = [n for n in names if f"weights.{n}" not in keys]
    if missing:
        raise ValueError(f"path {str(path)!r}: no weights for {missing[:4]} (saved from a different model?)")
    with torch.no_grad():
        for n, p in trainer.params:
            src = tensors[f"weights.{n}"]
            if src.shape != p.shape:
                raise ValueError(f"path {str(path)!r}: weights.{n} has shape {tuple(src.shape)}, "
                                 f"the model's is {tuple(p.shape)}")
            p.copy_(src)
    trainer.optimizer.state.clear()
    if with_optimizer:
        for n, p in trainer.params:
            state = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                name = f"optimizer.{n}.{key}"
                if name in tensors:
                    t = tensors[name]
                    state[key] = t if key == "step" else t.to(p.device)
            if state:
                trainer.optimizer.state[p] = state
        trainer.step = int(meta["step"])


def save_for_sampler(trainer, source: Path, folder: Path) -> Path:
    """PEFT adapter (LoRA) or full HF folder; a scoring model adds value_head.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = _is_writer(trainer)  # under tensor parallelism every rank gathers, the first writes
    if trainer.lora:
        save_peft_lora(trainer.model, folder, write=writer)
    else:
        state = full_state(trainer.model)
        if writer:
            _atomic_save(state, folder / "model.safetensors", {"format": "pt"})
    if not writer:
        dist.barrier(group=trainer.group)
        return folder
    if not trainer.lora:
        config = json.loads((source / "config.json").read_text())
        tmp = folder / "config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, folder / "config.json")
        for name in _TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
    if trainer.value_head is not None:
        _atomic_save({"weight": trainer.value_head.weight, "bias": trainer.value_head.bias},
                     folder / "value_head.safetensors", {"format": "pt"})
    if trainer.group is not None:
        dist.barrier(group=trainer.group)
    return folder
