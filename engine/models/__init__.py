"""Llama / Qwen2 / Qwen3 / Mistral models from Hugging Face config.json + safetensors."""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import CheckpointError, load_tokenizer, load_weights, read_config, weight_map
from .config import ConfigError, LlamaConfig, MistralConfig, ModelConfig, Qwen2Config, Qwen3Config
from .lora import LoRAConfig, LoRALinear, add_lora
from .packing import PackedBatch
from .peft import (adapter_stamp, adapter_tensors, load_peft_lora, lora_state_dict_to_peft, peft_config,
                   read_peft_adapter, read_peft_snapshot, save_peft_lora, set_adapter_stack)
from .transformer import Transformer

_REGISTRY: dict[str, Callable[[dict], ModelConfig]] = {}


def register(model_type: str, factory: Callable[[dict], ModelConfig]) -> None:
    """Make ``model_type`` (the Hugging Face config key) loadable. ``factory`` parses the
    config.json dict into a ModelConfig; the model class is ``Transformer``."""
    _REGISTRY[model_type] = factory


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def unregister(model_type: str) -> None:
    """Forget a ``model_type`` that ``register`` added."""
    _REGISTRY.pop(model_type, None)


register("llama", LlamaConfig.from_hf)
register("qwen2", Qwen2Config.from_hf)
register("qwen3", Qwen3Config.from_hf)
register("mistral", MistralConfig.from_hf)


def parse_config(hf: dict) -> ModelConfig:
    """ModelConfig from a config.json dict; an unsupported model_type lists the supported."""
    model_type = hf.get("model_type")
    if model_type not in _REGISTRY:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type](hf)


def load_config(path: str | Path) -> ModelConfig:
    return parse_config(read_config(path))


def build_model(config: ModelConfig, *, dtype: torch.dtype = torch.float32, device=None) -> Transformer:
    """An uninitialised model (parameters allocated, not filled) on ``device``."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device=torch.device(device) if device is not None else torch.device("cpu"))
    model.reset_buffers()
    return model


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device=None) -> Transformer:
    """Load a local Hugging Face checkpoint folder.

    Args:
        path: folder with config.json and model.safetensors, or shards listed in
            model.safetensors.index.json.
        dtype: parameter dtype; defaults to the dtype config.json names, else float32.
        device: where the parameters live (default CPU).
    """
    folder = Path(path)
    config = load_config(folder)
    model = build_model(config, dtype=dtype or config.dtype or torch.float32, device=device)
    load_weights(model, folder, config)
    return model.eval()


def share_weights(model: Transformer) -> Transformer:
    """A copy of ``model``'s modules whose parameters and buffers are ``model``'s own tensors
    (no weight is copied). Adapters attached to the copy (``add_lora``, ``set_adapter_stack``
    replace its projection modules) leave ``model`` and its other copies unchanged, so several
    LoRA trainers and a sampler can run on one set of base weights; an in-place change of a
    shared tensor (full-weight training) is seen by all of them."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


__all__ = [
    "CheckpointError", "ConfigError", "LlamaConfig", "LoRAConfig", "LoRALinear", "MistralConfig", "ModelConfig",
    "PackedBatch", "Qwen2Config", "Qwen3Config", "Transformer", "adapter_stamp", "adapter_tensors", "add_lora",
    "build_model", "load_config", "load_model", "load_peft_lora", "load_tokenizer", "lora_state_dict_to_peft",
    "parse_config", "peft_config", "read_peft_adapter", "read_peft_snapshot", "register", "save_peft_lora",
    "set_adapter_stack", "share_weights", "supported_model_types", "weight_map",
]
