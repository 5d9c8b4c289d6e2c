"""Backend selection shared by every op: ``impl="auto"`` picks Triton on CUDA tensors
and the torch reference on CPU tensors (DESIGN.md, "Kernels: contract of one op"); and the
device checks and launch context of the Triton launchers."""
from __future__ import annotations

import contextlib

import torch

from .triton_base import HAVE_TRITON, gpu_branch, interpreting


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
    if impl == "triton" and not gpu_branch(x.device) and not interpreting():
        raise RuntimeError(f"{op}: impl='triton' on {x.device.type} tensors needs CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before triton is imported (the Triton interpreter, for tests)")
    return impl


def check_triton_device(op: str, x: torch.Tensor) -> None:
    """Raise a clear error instead of letting triton fail on a tensor it cannot launch on
    (for launchers called directly, past :func:`resolve_impl`). Any tensor passes while
    kernels.launch_check compiles (nothing launches then)."""
    if gpu_branch(x.device) or interpreting():
        return
    raise RuntimeError(
        f"{op}: impl='triton' needs CUDA tensors (got a tensor on {x.device}); on CPU use impl='torch', or set "
        "TRITON_INTERPRET=1 before triton is first imported to run the kernels under the Triton interpreter"
    )


def on_device(device: torch.device):
    """The context a launcher runs its kernels in: ``torch.cuda.device(device)`` on CUDA
    (kernels launch on the tensor's GPU, not the current one), nothing elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def backend_usable(name: str) -> bool:
    return _why_unusable(name) is None


def _why_unusable(name: str) -> str | None:
    if name == "torch":
        return None
    if name == "triton":
        return None if HAVE_TRITON else "triton is not installed"
    if name == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "the flash_attn package is not installed"
        return None
    return f"unknown backend {name!r}"
