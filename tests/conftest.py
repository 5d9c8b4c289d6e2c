import os
import time

import torch

# Triton kernels run under the interpreter on CPU tensors; it must be set before triton
# is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from engine.models.presets import save_random_checkpoint  # noqa: E402

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, **overrides) -> folder of a random tiny HF checkpoint (cached)."""
    cache = {}

    def make(family: str, **overrides):
        key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(family)
            cache[key] = save_random_checkpoint(folder, family, **overrides)
        return cache[key]

    return make


@pytest.fixture
def peft_adapters(tmp_path):
    """peft_adapters(folder) -> paths of two PEFT adapters with random A and B made by peft
    on transformers: r=4 on q/v/down and r=6 on k/o/gate/up."""
    def make(folder):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        out = []
        for k, targets in enumerate((["q_proj", "v_proj", "down_proj"], ["k_proj", "o_proj", "gate_proj", "up_proj"])):
            pm = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                LoraConfig(r=4 + 2 * k, lora_alpha=8, target_modules=targets))
            g = torch.Generator().manual_seed(10 + k)
            with torch.no_grad():
                for name, p in pm.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            pm.save_pretrained(tmp_path / f"adapter{k}")
            out.append(str(tmp_path / f"adapter{k}"))
        return out

    return make


@pytest.fixture
def assert_no_children():
    """assert_no_children() waits up to 10 s for this process to have no child process left
    (zombies included), then asserts it: no worker outlives its pool."""
    import psutil

    def check():
        me = psutil.Process()
        deadline = time.monotonic() + 10
        while me.children(recursive=True) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not me.children(recursive=True)

    return check
