"""Backend selection shared by every op: ``impl="auto"`` picks Triton on CUDA tensors
and the torch reference on CPU tensors (DESIGN.md, "Kernels: contract of one op")."""
from __future__ import annotations

import contextlib
import os

import torch


def resolve_impl(op: str, impl: str, x: torch.Tensor, available: tuple[str, ...]) -> str:
    """Return the backend ``op`` runs on, or raise naming the valid choices.

    ``available`` lists the backends this op has, in order of preference on CUDA.
    """
    if impl == "auto":
        if x.is_cuda:
            for name in available:
                if name != "torch" and backend_usable(name):
                    return name
        return "torch"
    if impl not in available:
        raise ValueError(f"{op}: impl={impl!r} is not one of {('auto',) + available}")
    if not backend_usable(impl):
        raise RuntimeError(f"{op}: impl={impl!r} is not usable here ({_why_unusable(impl)})")
    if impl == "triton" and not x.is_cuda and not interpreting():
        raise RuntimeError(f"{op}: impl='triton' on {x.device.type} tensors needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before triton is imported (the Triton interpreter, for tests)")
    return impl


def on_device(device: torch.device):
    """The context a launcher runs its kernels in: ``torch.cuda.device(device)`` on CUDA
    (kernels launch on the tensor's GPU, not the current one), nothing elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def interpreting() -> bool:
    """True when Triton kernels run under the interpreter (CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_usable(name: str) -> bool:
    return _why_unusable(name) is None


def _why_unusable(name: str) -> str | None:
    if name == "torch":
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        return None
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "the flash_attn package is not installed"
        return None
    return f"unknown backend {name!r}"
