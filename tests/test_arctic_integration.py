"""ArcticTraining's SFT trainer with ``model: {type: engine}`` (engine/integrations/arctic.py).

arctic-training pins transformers<5 and builds DeepSpeed, so this runs in its own virtual
environment: ``bash tests/arctic_env.sh`` creates it and runs this file. Elsewhere it is
skipped. On CPU, DeepSpeed runs with its CPU accelerator, one gloo rank and ZeRO stage 0.
"""
import importlib.util
import math
import os
import socket

import pytest

if importlib.util.find_spec("arctic_training") is None:
    pytest.skip("arctic_training is not installed: `bash tests/arctic_env.sh` sets up its venv and runs this test",
                allow_module_level=True)
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed first picks its accelerator

import torch  # noqa: E402
from arctic_training.config.trainer import get_config  # noqa: E402
from arctic_training.registry import get_registered_model_factory, get_registered_trainer  # noqa: E402
from datasets import Dataset  # noqa: E402

from engine.integrations.arctic import EngineModelFactory, EngineSFTTrainer  # noqa: E402
from engine.integrations.hf import EngineForCausalLM  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def one_rank():
    """A single-rank gloo process group, as ArcticTraining's launcher would set up."""
    import deepspeed.comm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    yield
    torch.distributed.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _dataset(folder) -> str:
    """A tiny local instruct dataset (question / answer columns) saved with save_to_disk."""
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]

    def text(n):
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))

    rows = {"question": [text(4 + k % 3) for k in range(12)], "answer": [text(6 + k % 5) for k in range(12)]}
    Dataset.from_dict(rows).save_to_disk(str(folder))
    return str(folder)


def _recipe(tmp_path, checkpoint_folder, data_folder, trainer_type, model_type):
    return {
        "type": trainer_type,
        "skip_validation": trainer_type == "sft",
        "seed": 0,
        "micro_batch_size": 1,
        "exit_iteration": STEPS,
        "overfit_first_batch": True,  # the same batch each step: the loss must fall
        "train_log_iter_interval": 0,
        "model": {"type": model_type, "name_or_path": str(checkpoint_folder), "dtype": "float32",
                  "disable_activation_checkpoint": False},
        "data": {"sources": [{"type": "huggingface_instruct", "name_or_path": data_folder,
                              "role_mapping": {"user": "question", "assistant": "answer"}}],
                 "max_length": 256, "num_proc": 1, "dl_num_workers": 1, "cache_dir": str(tmp_path / "cache")},
        "optimizer": {"type": "cpu_adam", "lr": 3e-3},
        "scheduler": {"warmup_ratio": 0.0},
        "deepspeed": {"zero_optimization": {"stage": 0}},
        "logger": {"output_dir": str(tmp_path / "logs")},
        "train_log_metrics_path": str(tmp_path / "metrics.jsonl"),
    }


def _train(recipe) -> tuple[object, list[float]]:
    config = get_config(recipe)
    trainer = get_registered_trainer(config.type)(config)  # as arctic_training's entrypoint does
    losses = []
    loss = trainer.loss

    def recorded(batch):
        out = loss(batch)
        losses.append(float(out))
        return out

    trainer.loss = recorded
    trainer.train()
    return trainer, losses


@pytest.mark.parametrize("trainer_type", ["engine-sft", "sft"])
def test_sft_recipe_trains_engine_model(one_rank, checkpoint, tmp_path, monkeypatch, trainer_type):
    monkeypatch.chdir(tmp_path)
    folder = checkpoint("qwen2", tokenizer=True)
    recipe = _recipe(tmp_path, folder, _dataset(tmp_path / "data"), trainer_type, "engine")
    trainer, losses = _train(recipe)
    assert isinstance(trainer.model_unwrapped, EngineForCausalLM)
    assert isinstance(trainer.config.model.factory(trainer), EngineModelFactory)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    if trainer_type == "engine-sft":  # the stock trainer on the transformers model: the same losses, step by step
        reference = _recipe(tmp_path / "hf", folder, recipe["data"]["sources"][0]["name_or_path"], "sft",
                            "huggingface")
        reference["model"]["attn_implementation"] = "sdpa"
        _, hf_losses = _train(reference)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(hf_losses), rtol=1e-4, atol=0)


def test_lora_recipe(one_rank, checkpoint, tmp_path, monkeypatch):
    """peft_config (LORA) becomes the engine's LoRA: only the adapters train, and the loss falls."""
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, checkpoint("qwen2", tokenizer=True), _dataset(tmp_path / "data"), "engine-sft", "engine")
    recipe["model"]["peft_config"] = {"peft_type": "Lora", "r": 4, "lora_alpha": 8,
                                      "target_modules": ["q_proj", "v_proj", "down_proj"]}
    recipe["optimizer"]["lr"] = 2e-2
    trainer, losses = _train(recipe)
    trainable = {n for n, p in trainer.model_unwrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable), trainable
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, losses  # 6.93 -> 6.68 here


def test_engine_sft_trainer_is_registered():
    assert get_registered_model_factory("engine") is EngineModelFactory
    assert get_registered_trainer("engine-sft") is EngineSFTTrainer
