"""Loading Hugging Face checkpoint folders: config.json plus safetensors weights.

Memory: the model is built on the meta device, materialised empty on the target device
and filled tensor by tensor straight from memory-mapped safetensors files: every source
tensor is a view of the page cache, so the host never holds a second copy of the weights,
not even one tensor's worth (safetensors' own get_tensor would copy each one first).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not match its config."""


@dataclass(frozen=True)
class WeightEntry:
    """One Hugging Face tensor and the rows of our parameter it fills."""

    hf_name: str
    param: str
    row_offset: int = 0  # where the tensor starts along dim 0 of a fused parameter
    rows: int | None = None  # its length along dim 0 there (None: the whole parameter)
    # Tensor parallelism: (dim, start, length, full) reads only [start, start + length) of
    # the stored tensor along ``dim``, whose full size there is ``full``.
    shard: tuple[int, int, int, int] | None = None


def weight_map(config: ModelConfig) -> list[WeightEntry]:
    """Explicit map from Hugging Face weight names to ours.

    q/k/v land in row blocks of ``attn.qkv`` ([q; k; v]) and gate/up in ``mlp.gate_up``
    ([gate; up]); every other tensor maps one to one.
    """
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    entries = [WeightEntry("model.embed_tokens.weight", "embed.weight"), WeightEntry("model.norm.weight", "norm.weight")]
    if not config.tie_word_embeddings:
        entries.append(WeightEntry("lm_head.weight", "lm_head.weight"))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        entries += [
            WeightEntry(hf + "input_layernorm.weight", ours + "attn_norm.weight"),
            WeightEntry(hf + "post_attention_layernorm.weight", ours + "mlp_norm.weight"),
            WeightEntry(hf + "self_attn.o_proj.weight", ours + "attn.o.weight"),
            WeightEntry(hf + "mlp.down_proj.weight", ours + "mlp.down.weight"),
        ]
        for kind in ["weight"] + ["bias"] * config.qkv_bias:
            for proj, off, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
                entries.append(WeightEntry(f"{hf}self_attn.{proj}_proj.{kind}", f"{ours}attn.qkv.{kind}", off, rows))
        for kind in ["weight"] + ["bias"] * config.mlp_bias:
            entries.append(WeightEntry(f"{hf}mlp.gate_proj.{kind}", f"{ours}mlp.gate_up.{kind}", 0, inter))
            entries.append(WeightEntry(f"{hf}mlp.up_proj.{kind}", f"{ours}mlp.gate_up.{kind}", inter, inter))
        if config.mlp_bias:
            entries.append(WeightEntry(hf + "mlp.down_proj.bias", ours + "mlp.down.bias"))
        if config.o_bias:
            entries.append(WeightEntry(hf + "self_attn.o_proj.bias", ours + "attn.o.bias"))
        if config.qk_norm:
            entries.append(WeightEntry(hf + "self_attn.q_norm.weight", ours + "attn.q_norm.weight"))
            entries.append(WeightEntry(hf + "self_attn.k_norm.weight", ours + "attn.k_norm.weight"))
    return entries


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsFile:
    """A memory-mapped safetensors file whose tensors are zero-copy views."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            self.entries: dict[str, dict] = header
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
        self._start = 8 + n
        # shared=False maps the file copy-on-write: pages are read lazily from the page cache.
        self._bytes = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        meta = self.entries[name]
        if meta["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {meta['dtype']}")
        dtype = _ST_DTYPES[meta["dtype"]]
        begin, end = meta["data_offsets"]
        raw = self._bytes[self._start + begin : self._start + end]
        if raw.numel() != end - begin:
            raise CheckpointError(f"{self.path}: file is truncated; tensor {name} runs past its end")
        if (self._start + begin) % dtype.itemsize:
            raw = raw.clone()  # a misaligned tensor cannot be viewed in place
        return raw.view(dtype).view(meta["shape"])


# Tensors some published checkpoints carry that the model does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(path: str | Path) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist or is not a directory")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{folder}: no config.json in the checkpoint folder")
    try:
        hf = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg}: malformed JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{cfg}: expected a JSON object, got {type(hf).__name__}")
    return hf


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it (single file or sharded index)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r}); expected a 'weight_map' object") from None
        missing = sorted({f for f in mapping.values() if not (folder / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{folder}: shard(s) named in model.safetensors.index.json are missing: {missing}")
        return {name: folder / f for name, f in mapping.items()}
    if single.is_file():
        return dict.fromkeys(SafetensorsFile(single).keys(), single)
    raise FileNotFoundError(
        f"{folder}: no weights found; expected model.safetensors or model.safetensors.index.json with its shards"
    )


@torch.no_grad()
def load_weights(model: torch.nn.Module, folder: Path, config: ModelConfig,
                 entries: list[WeightEntry] | None = None) -> None:
    """Fill ``model``'s parameters from the safetensors files in ``folder`` (``entries``
    defaults to ``weight_map(config)``; a tensor-parallel rank passes its sharded map)."""
    files = weight_files(folder)
    entries = weight_map(config) if entries is None else entries
    missing = [e.hf_name for e in entries if e.hf_name not in files]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{folder}: missing weight(s): {shown}")
    params = dict(model.named_parameters())
    by_file: dict[Path, list[WeightEntry]] = {}
    for e in entries:
        by_file.setdefault(files[e.hf_name], []).append(e)
    for path, group in by_file.items():
        f = SafetensorsFile(path)
        for e in group:
            param = params[e.param]
            expected = [e.rows or param.shape[0], *param.shape[1:]]
            if e.shard is not None:
                expected[e.shard[0]] = e.shard[3]
            shape = f.shape(e.hf_name)
            if shape != tuple(expected):
                raise CheckpointError(
                    f"{path.name}: weight {e.hf_name} has shape {list(shape)}, expected {expected} from config.json"
                )
            src = f.tensor(e.hf_name)
            if e.shard is not None:  # a view: only this slice's pages are read
                src = src.narrow(e.shard[0], e.shard[1], e.shard[2])
            param[e.row_offset : e.row_offset + src.shape[0]].copy_(src)
    used = {e.hf_name for e in entries}
    unused = [n for n in files if n not in used and not n.endswith(_IGNORED_SUFFIXES)
              and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if unused:
        warnings.warn(f"{folder}: {len(unused)} tensor(s) in the checkpoint are not used by the model: {unused[:8]}")


def stored_dtypes(folder: Path) -> dict[str, int]:
    """Count of tensors per stored dtype, read from the safetensors headers only."""
    counts: dict[str, int] = {}
    for path in sorted(set(weight_files(folder).values())):
        for meta in SafetensorsFile(path).entries.values():
            counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + 1
    return counts


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | Path, *, required: bool = False):
    """The transformers tokenizer a checkpoint folder ships (``AutoTokenizer``), or None when
    it has no tokenizer files; ``required=True`` raises instead, naming the files looked for."""
    folder = Path(path)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        if required:
            raise ValueError(f"{str(folder)!r}: no tokenizer files ({', '.join(TOKENIZER_FILES)}) in the "
                             f"checkpoint folder")
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
