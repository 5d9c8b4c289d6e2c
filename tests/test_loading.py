"""Bad input gets one clear error naming what is wrong."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.models import CheckpointError, ConfigError, PackedBatch, load_model
from engine.models.presets import save_random_checkpoint


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A private copy of a tiny llama checkpoint that a test may damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama"), dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(folder)


def test_malformed_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="malformed JSON"):
        load_model(folder)


def test_config_missing_key(folder):
    _edit_config(folder, hidden_size=None)
    with pytest.raises(ConfigError, match="'hidden_size'"):
        load_model(folder)


def test_config_bad_value(folder):
    _edit_config(folder, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        load_model(folder)


def test_unsupported_model_type(folder):
    _edit_config(folder, model_type="gpt2")
    with pytest.raises(ConfigError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        load_model(folder)


def test_unsupported_rope(folder):
    _edit_config(folder, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        load_model(folder)


def test_missing_weight_file(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_model(folder)


def test_missing_shard(tmp_path):
    folder = save_random_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of"):
        load_model(folder)


def test_truncated_weight_file(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)


def test_missing_weight(folder):
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing weight\(s\): model.layers.1.mlp.up_proj.weight"):
        load_model(folder)


def test_wrong_shape(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(16, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.k_proj.weight has shape \[16, 64\], expected \[32, 64\]"):
        load_model(folder)


def test_unused_tensor_warns(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.randn(3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.warns(UserWarning, match="model.layers.0.extra.weight"):
        load_model(folder)


@pytest.fixture
def model(checkpoint):
    return load_model(checkpoint("llama"))


def _forward(model, ids, pos, cu, max_seqlen):
    return model(torch.tensor(ids), torch.tensor(pos), torch.tensor(cu, dtype=torch.int32), max_seqlen)


def test_token_outside_vocab(model):
    with pytest.raises(ValueError, match=r"token id 1031, outside the vocabulary \[0, 1031\)"):
        _forward(model, [1, 1031], [0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="token id -1"):
        _forward(model, [-1, 3], [0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="token id 5000"):
        PackedBatch.from_sequences([[1, 5000]], vocab_size=1031)


def test_cu_seqlens_mismatch(model):
    with pytest.raises(ValueError, match=r"end at len\(input_ids\)=3"):
        _forward(model, [1, 2, 3], [0, 1, 0], [0, 2, 4], 2)
    with pytest.raises(ValueError, match="start at 0"):
        _forward(model, [1, 2, 3], [0, 1, 0], [1, 2, 3], 2)
    with pytest.raises(ValueError, match="max_seqlen=1 is smaller than the longest sequence"):
        _forward(model, [1, 2, 3], [0, 1, 0], [0, 2, 3], 1)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D torch.int32"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="position_ids"):
        _forward(model, [1, 2, 3], [0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="is empty"):
        PackedBatch.from_sequences([[1], []])


def test_loading_is_memory_frugal(tmp_path):
    """The host never holds a second full copy: anonymous memory grows by about the
    weights' size during the load, not twice that."""
    folder = save_random_checkpoint(
        tmp_path, "llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4,
    )
    weights = os.path.getsize(folder / "model.safetensors")
    script = textwrap.dedent(f"""
        import threading, time, torch
        from engine.models import build_model, load_config, load_model
        build_model(load_config({str(folder)!r}))  # one-time allocator and dispatch set-up (~33 MB)
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        base, peak, done = anon(), [0], [False]
        def watch():
            while not done[0]:
                peak[0] = max(peak[0], anon()); time.sleep(0.0005)
        t = threading.Thread(target=watch); t.start()
        m = load_model({str(folder)!r})
        done[0] = True; t.join()
        print(max(peak[0], anon()) - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 1.3 * weights, (grown, weights)
