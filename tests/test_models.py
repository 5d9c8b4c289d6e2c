"""Parity of the packed forward with transformers, per family and per feature."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.models import PackedBatch, load_model
from engine.models.presets import TINY, save_random_checkpoint

FAMILIES = tuple(TINY)

LENGTHS = (13, 1, 29, 8)  # one length-1 sequence; longer than Mistral's tiny window of 7


def _max_rel_error(folder, lengths=LENGTHS, dtype=torch.float32):
    model = load_model(folder, dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    vocab = model.config.vocab_size
    seqs = [torch.randint(0, vocab, (n,)).tolist() for n in lengths]
    batch = PackedBatch.from_sequences(seqs, vocab_size=vocab)
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
        ours = model.compute_logits(hidden)
        ref = torch.cat([hf(torch.tensor([s])).logits[0] for s in seqs])
    assert hidden.shape == (sum(lengths), model.config.hidden_size)
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(checkpoint, family):
    assert _max_rel_error(checkpoint(family)) <= 1e-4


@pytest.mark.parametrize("family, overrides", [
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", dict(attention_bias=True, tie_word_embeddings=False)),
    ("mistral", dict(sliding_window=None, num_key_value_heads=1)),
])
def test_feature_parity(checkpoint, family, overrides):
    assert _max_rel_error(checkpoint(family, **overrides)) <= 1e-4


def test_sharded_checkpoint(tmp_path):
    folder = save_random_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert _max_rel_error(folder) <= 1e-4


def test_legacy_rope_scaling_keys(tmp_path):
    """Published Llama 3.1 checkpoints use rope_theta + rope_scaling rather than rope_parameters."""
    folder = save_random_checkpoint(tmp_path, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    if "rope_parameters" in cfg:  # transformers 5 writes the new form; transformers 4 already wrote the legacy one
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        (folder / "config.json").write_text(json.dumps(cfg))
    assert "rope_parameters" not in json.loads((folder / "config.json").read_text())
    model = load_model(folder)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    assert model.config.rope_theta == 500000.0
    assert _max_rel_error(folder) <= 1e-4


def test_dtype_and_gradients(checkpoint):
    folder = checkpoint("qwen3")
    assert load_model(folder).embed.weight.dtype == torch.float32  # config.json says float32
    model = load_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model = load_model(folder).train()
    batch = PackedBatch.from_sequences([[1, 2, 3], [4], [5, 6]])
    hidden = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
    (hidden * torch.randn_like(hidden)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_packing_positions():
    batch = PackedBatch.from_sequences([[7, 8, 9], [1], [2, 3]])
    assert batch.input_ids.tolist() == [7, 8, 9, 1, 2, 3]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 6] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 3
    assert [t.tolist() for t in batch.split(batch.input_ids)] == [[7, 8, 9], [1], [2, 3]]


def test_registry_custom_model_type(checkpoint, tmp_path):
    from engine.models import LlamaConfig, register, supported_model_types

    folder = checkpoint("llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "my_llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    register("my_llama", LlamaConfig.from_hf)
    try:
        assert "my_llama" in supported_model_types()
        assert load_model(tmp_path).config.model_type == "my_llama"
    finally:
        from engine.models import unregister
        unregister("my_llama")
