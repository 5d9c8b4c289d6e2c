"""``torch.ops.engine.sample_tokens``: the sampling step as a torch.library custom op.

The op is opaque to torch.compile (its fake implementation gives shapes and dtypes only),
and picks its implementation when it runs:

* the CUDA kernel of ``csrc/sampling.cu`` (``torch.ops.engine_C.sample_rows``, from the
  ``kernels._C`` extension or one JIT-built from csrc/ on first use) for CUDA tensors when
  no row uses top-k/top-p (``truncate=False``): one pass over the vocabulary per row;
* otherwise the torch twin ``sampling.sample_tokens`` (same counter hash, so both draw the
  same tokens up to float rounding in near ties; on CPU the op *is* the twin, bit for bit).

A failed build or import is reported once (a warning) and the twin serves from then on.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

from .sampling import sample_tokens as sample_tokens_torch

_CSRC = Path(__file__).resolve().parents[2] / "csrc"


@functools.cache
def load_extension() -> bool:
    """Make ``torch.ops.engine_C.sample_rows`` available: import ``kernels._C`` (setup.py
    build), else JIT-build csrc/*.cu + *.cpp with ninja. True on success; a failure warns
    once and is cached (the torch twin is used from then on). CUDA machines only."""
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    try:
        import kernels._C  # noqa: F401
        return True
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import load

        sources = sorted(str(p) for p in (*_CSRC.glob("*.cu"), *_CSRC.glob("*.cpp")))
        # No --use_fast_math: the kernel's logf/expf must round like the twin's so that the
        # Gumbel scores, hence the tokens, agree.
        load(name="engine_cuda_ext", sources=sources, extra_cflags=["-O3"], extra_cuda_cflags=["-O3"],
             with_cuda=True, is_python_module=False, verbose=False)
        return True
    except Exception as e:  # noqa: BLE001 - any build failure: one warning, then the twin
        warnings.warn(f"engine: the CUDA sampling extension could not be built or imported ({e!r}); "
                      "sampling uses the torch twin", RuntimeWarning, stacklevel=2)
        return False


@torch.library.custom_op("engine::sample_tokens", mutates_args=())
def _sample_tokens_op(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                      seeds: torch.Tensor, steps: torch.Tensor,
                      truncate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if logits.is_cuda and not truncate and load_extension():
        return torch.ops.engine_C.sample_rows(logits.float(), temperature.float(), seeds, steps)
    return sample_tokens_torch(logits, temperature, top_k, top_p, seeds, steps, truncate=truncate)


@_sample_tokens_op.register_fake
def _(logits, temperature, top_k, top_p, seeds, steps, truncate):
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=torch.int64), logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows, dtype=torch.float32))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, steps: torch.Tensor, *,
                  truncate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row through ``torch.ops.engine.sample_tokens``.

    Args:
        logits: [B, V] float (float32 on the CUDA kernel path; other dtypes are upcast).
        temperature: [B] float32; 0 means greedy.
        top_k: [B] int64; <= 0 keeps all tokens.
        top_p: [B] float32 in (0, 1].
        seeds, steps: [B] int64 per-row seed and generation step (the counter of the hash).
        truncate: host flag; False promises that no row uses top-k or top-p, which lets
            CUDA tensors take the one-pass kernel.
        All tensors on one device.

    Returns:
        tokens [B] int64, logprob [B] float32 under the sampling distribution, raw_logprob
        [B] float32 under the model's distribution (as ``sampling.sample_tokens``).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_tokens: logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    rows = logits.shape[0]
    for name, t, dtype in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int64),
                           ("top_p", top_p, torch.float32), ("seeds", seeds, torch.int64),
                           ("steps", steps, torch.int64)):
        if t.dtype != dtype or tuple(t.shape) != (rows,) or t.device != logits.device:
            raise ValueError(f"sample_tokens: {name} must be {dtype} [{rows}] on {logits.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return torch.ops.engine.sample_tokens(logits, temperature, top_k, top_p, seeds, steps, truncate)
