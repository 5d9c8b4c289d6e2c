"""Tiny model presets and random Hugging Face checkpoints for tests, the demo and
benchmarks (no hub access needed: transformers writes the folder itself)."""
from __future__ import annotations

from pathlib import Path

import torch

_BASE = dict(
    vocab_size=1031, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
)

# One tiny config per family, each exercising what is particular to it.
TINY = {
    "llama": dict(_BASE, model_type="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(_BASE, model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=24, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "mistral": dict(_BASE, model_type="mistral", sliding_window=7,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

# Shape of Llama 3.2 1B (random weights): the size the GPU benchmarks use.
LLAMA_1B = dict(
    model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)


def transformers_config_fields(config: dict) -> dict:
    """``config`` in the form the installed transformers reads: transformers 4 ignores
    ``rope_parameters`` (it would build the model with the default RoPE), so under it the
    presets' ``rope_parameters`` become the older ``rope_theta`` + ``rope_scaling``."""
    import transformers

    fields = dict(config)
    if int(transformers.__version__.split(".")[0]) >= 5 or "rope_parameters" not in fields:
        return fields
    params = dict(fields.pop("rope_parameters"))
    if "rope_theta" in params:
        fields["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        fields["rope_scaling"] = params
    return fields


def hf_model(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers causal LM with every parameter random (norm weights near 1, biases
    nonzero), so no weight can be silently skipped or misplaced in a comparison."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = transformers_config_fields(config)
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.02 if p.dim() > 1 else 0.1)
    return model.to(dtype).eval()


def save_random_checkpoint(folder: str | Path, config: dict | str = "llama", *, seed: int = 0,
                           dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                           tokenizer: bool = False, **overrides) -> Path:
    """Write a random checkpoint with ``save_pretrained``. ``config`` is a family name
    from TINY or a full config dict; ``overrides`` change single fields. ``tokenizer``: also
    write :func:`byte_tokenizer` (ids 0-258, so any vocabulary of 259 or more fits it)."""
    base = TINY[config] if isinstance(config, str) else config
    fields = {**base, **overrides}
    model = hf_model(fields, seed=seed, dtype=dtype)
    folder = Path(folder)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if tokenizer:
        tok = byte_tokenizer()
        if fields["vocab_size"] < len(tok):
            raise ValueError(f"tokenizer=True needs vocab_size >= {len(tok)}, got {fields['vocab_size']}")
        model.generation_config.eos_token_id = tok.eos_token_id
        tok.save_pretrained(folder)
    model.save_pretrained(folder, **kwargs)
    return folder


# Special tokens of the byte tokenizer, after the 256 byte tokens: end of text (EOS and
# padding) and ChatML's turn markers, so chat templates render.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_chars() -> dict[int, str]:
    """GPT-2's map from a byte to a printable character (byte-level BPE's alphabet): a
    printable Latin-1 byte stands for itself, the others for chr(256 + n) in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, moved = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b], moved = chr(256 + moved), moved + 1
    return out


def byte_tokenizer():
    """A transformers tokenizer with no download: token id = byte value (0-255) of the
    UTF-8 text (byte-level, no merges), then SPECIAL_TOKENS as ids 256, 257, 258; EOS is
    ``<|endoftext|>`` and a ChatML chat template is set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_chars().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0],
                                  additional_special_tokens=list(SPECIAL_TOKENS[1:]))
    tok.chat_template = _CHAT_TEMPLATE
    return tok
