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
    """assert_no_children() waits up to 10 s until no child process of this one (zombies
    included) is left that the test started, then asserts it: no worker outlives its pool.
    Not counted: children from before the test, and multiprocessing's resource tracker and
    forkserver, which the process's first ``spawn`` starts and which live as long as it."""
    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}

    def service(p) -> bool:  # multiprocessing's own per-process helpers, started on first use
        try:
            return any(f"multiprocessing.{name}" in " ".join(p.cmdline()) for name in ("resource_tracker", "forkserver"))
        except psutil.Error:  # gone meanwhile
            return True

    def left() -> list:
        return [p for p in me.children(recursive=True) if p.pid not in before and not service(p)]

    def check():
        deadline = time.monotonic() + 10
        while left() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not left()

    return check
