"""Model configs: one dataclass per family, parsed from a Hugging Face ``config.json``.

Each family maps the Hugging Face keys (both the transformers-5 ``rope_parameters`` form
and the older ``rope_theta`` + ``rope_scaling`` form found in published checkpoints) onto
one set of fields that the shared decoder in ``transformer.py`` understands.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """config.json is malformed or describes something this engine cannot run."""


@dataclass
class ModelConfig:
    """Architecture shared by the Llama-style decoder families."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # RoPE frequency scaling: {"rope_type": "linear", "factor": f} or the Llama 3.1 form
    # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    #  "original_max_position_embeddings"}. None means plain RoPE.
    rope_scaling: dict | None = None
    qkv_bias: bool = False  # bias on the q, k and v projections (Qwen2; Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False  # bias on gate, up and down (Llama mlp_bias)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # window of the layers marked "sliding_attention"
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" or "sliding_attention"
    dtype: torch.dtype | None = None  # the checkpoint's stored dtype, if config.json says
    extra: dict = field(default_factory=dict, repr=False)  # the raw config.json

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = ("full_attention",) * self.num_layers
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config.json: head_dim must be even for RoPE, got {self.head_dim}")
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"config.json: layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for t in self.layer_types:
            if t not in ("full_attention", "sliding_attention"):
                raise ConfigError(f"config.json: unsupported layer type {t!r} in layer_types")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError("config.json: layer_types has sliding layers but sliding_window is not set")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in _ROPE_TYPES:
                raise ConfigError(f"config.json: rope type {kind!r} is not supported; supported: {_ROPE_TYPES}")
            need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
            missing = [k for k in need.get(kind, ()) if k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"config.json: rope type {kind!r} needs {missing}")

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def inv_freq(self, device=None) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2] float32, with the configured scaling
        (same arithmetic as transformers, so bf16 results match bit for bit)."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        s = self.rope_scaling
        if s is None or s["rope_type"] == "default":
            return inv
        if s["rope_type"] == "linear":
            return inv / s["factor"]
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
        return torch.where(medium, smoothed, scaled)

    # -- parsing -----------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Parse a Hugging Face config dict (the contents of config.json)."""
        return cls(**cls._common_fields(hf), **cls._family_fields(hf))

    @classmethod
    def _family_fields(cls, hf: dict) -> dict:
        return {}

    @staticmethod
    def _common_fields(hf: dict) -> dict:
        def need(key):
            if key not in hf:
                raise ConfigError(f"config.json: missing required key {key!r}")
            return hf[key]

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        if not isinstance(heads, int) or heads <= 0:
            raise ConfigError(f"config.json: num_attention_heads must be a positive integer, got {heads!r}")
        head_dim = hf.get("head_dim") or (hidden // heads if isinstance(hidden, int) else None)
        dtype_name = hf.get("dtype") or hf.get("torch_dtype")
        theta, scaling = _parse_rope(hf)
        return dict(
            model_type=need("model_type"),
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            dtype=_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None,
            extra=dict(hf),
        )


def _parse_rope(hf: dict) -> tuple[float, dict | None]:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise ConfigError("config.json: rope_parameters / rope_scaling must be objects")
    if params and not isinstance(next(iter(params.values())), (int, float, str)):
        raise ConfigError("config.json: per-layer-type rope_parameters are not supported")
    merged = {**legacy, **params}
    theta = float(merged.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.pop("rope_type", merged.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "llama3" and "original_max_position_embeddings" not in merged:
        merged["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return theta, {"rope_type": kind, **merged}


def _activation(hf: dict) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")


@dataclass
class LlamaConfig(ModelConfig):
    """Llama 2/3/3.1/3.2: ``attention_bias`` puts a bias on q, k, v and o; ``mlp_bias`` on
    the MLP; Llama 3.1 uses ``rope_type: llama3`` frequency scaling."""

    @classmethod
    def _family_fields(cls, hf):
        _activation(hf)
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))


def _sliding_layers(hf: dict) -> tuple[int | None, tuple[str, ...]]:
    """Qwen2/Qwen3: sliding attention only with ``use_sliding_window``, on the layers
    from ``max_window_layers`` on, unless ``layer_types`` lists them explicitly."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    layers = hf.get("num_hidden_layers", 0)
    types = hf.get("layer_types")
    if types is None:
        start = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
    if window is None:  # transformers ignores layer_types without use_sliding_window
        types = ["full_attention"] * layers
    return window, tuple(types)


@dataclass
class Qwen2Config(ModelConfig):
    """Qwen2 / Qwen2.5: bias on q, k, v (not o)."""

    @classmethod
    def _family_fields(cls, hf):
        _activation(hf)
        window, types = _sliding_layers(hf)
        return dict(qkv_bias=True, sliding_window=window, layer_types=types)


@dataclass
class Qwen3Config(ModelConfig):
    """Qwen3 (dense): RMSNorm on each q and k head before RoPE; explicit ``head_dim``."""

    @classmethod
    def _family_fields(cls, hf):
        _activation(hf)
        window, types = _sliding_layers(hf)
        bias = bool(hf.get("attention_bias", False))
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window, layer_types=types)


@dataclass
class MistralConfig(ModelConfig):
    """Mistral: no biases; ``sliding_window`` (when set) applies to every layer."""

    @classmethod
    def _family_fields(cls, hf):
        _activation(hf)
        window = hf.get("sliding_window")
        types = ("sliding_attention" if window else "full_attention",) * hf.get("num_hidden_layers", 0)
        return dict(sliding_window=window, layer_types=types)

