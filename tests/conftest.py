import os

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
