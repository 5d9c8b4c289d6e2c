"""Per-device kernel configs, decided outside the step (DESIGN.md: "Tile configs come from
the per-device table, never from timing inside a step").

One JSON file per device in this folder, named after ``torch.cuda.get_device_name()`` with
every run of characters other than letters and digits replaced by ``_``
(``NVIDIA_H100_80GB_HBM3.json``, ``NVIDIA_H200.json``)::

    {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
     "date": "2026-11-27T16:00:00+00:00", "note": "filled by benchmarks/tune.py",
     "entries": {"<kernel>": {"<shape class>": <config>}}, "measured": {...}}

``benchmarks/tune.py`` writes it on a GPU; nothing else does. A kernel's launcher asks
:func:`choose` for its config: a :func:`forced` override if one is active, else the
device's table entry for (kernel, shape class), else the kernel's documented heuristic.
Tables exist for CUDA devices only: CPU tensors (the interpreter) always take the
heuristic. ``$ENGINE_KERNEL_CONFIGS`` names another folder of tables (a tuned copy outside
the package); every rank of a tensor-parallel group reads the same file, so the ranks
launch the same kernels and round alike.

Kernel names (``family.kernel``) and their shape classes, each built on the host from
sizes the launcher already holds (fixed model dimensions exact, varying sizes as powers of
two, dtypes by :func:`dtype_name`); the module named beside each documents its classes and
candidate lists:

* ``varlen_attention.fwd``/``.dkdv``/``.dq`` (varlen_attention_triton.shape_class): head
  dim, dtype, causal. Config: dict BLOCK_M, BLOCK_N, num_warps, num_stages.
* ``paged_attention.decode`` (paged_attention.decode_shape_class): head dim, dtype, GQA
  group. Config: dict BLOCK_N, num_warps, num_stages.
* ``linear_logprobs.stats``/``.grad`` (linear_logprobs_triton.shape_class): vocabulary
  shard size, dtype, variant flags. Config: dict BLOCK_V, num_warps.
* ``lora.gemm`` (lowrank_gemm.shape_class): the LoRA scheme of a base GEMM, per kind
  (fwd / dx), rows as a power of two, N, K, padded rank, dtype, flags, TMA. Config:
  "cublas" or a fused tile config (BM, BN, BK, warps, stages, tma).
* ``lora.shrink``/``.expand``/``.dy``/``.dx`` (lowrank_gemm.block_class): padded rank,
  dtype, decode. Config: dict n, k, o, splits.
* ``fused_ops.rms_norm``/``.silu_mul``/``.rope`` (fused_ops): hidden size (head dim for
  rope), dtype. Config: num_warps (int).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .. import triton_base

DIR = Path(__file__).resolve().parent
ENV_DIR = "ENGINE_KERNEL_CONFIGS"
T = TypeVar("T")
_FORCED: dict[str, object] = {}


def table_dir() -> Path:
    """The folder the tables are read from: ``$ENGINE_KERNEL_CONFIGS``, else this package's."""
    return Path(os.environ[ENV_DIR]) if os.environ.get(ENV_DIR) else DIR


def file_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3.json``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


@functools.lru_cache(maxsize=16)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str | None:
    """The name a CUDA device's table is filed under; None for other devices (no table),
    except while kernels.launch_check compiles for a stand-in GPU: that GPU's name."""
    if device.type != "cuda":
        return triton_base.COMPILE_ONLY.name if triton_base.COMPILE_ONLY is not None else None
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def _as_config(value):
    """JSON lists become tuples (hashable, as the kernels' own config tuples)."""
    return tuple(value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=16)
def _entries(name: str, folder: str) -> dict:
    """The entries of device ``name``'s table in ``folder`` ($ENGINE_KERNEL_CONFIGS, "" for
    this package's), read once per process (an absent file: no entries). Keyed by the
    name, not the path, so that a launch builds no path."""
    path = (Path(folder) if folder else DIR) / file_name(name)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"kernel config table {path}: not readable JSON ({e})") from e
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ValueError(f"kernel config table {path}: 'entries' must map kernel -> {{shape class: config}}")
    return {kernel: {cls: _as_config(cfg) for cls, cfg in classes.items()} for kernel, classes in entries.items()}


def lookup(kernel: str, shape_class: str, device: torch.device | str) -> object | None:
    """The table's config for (kernel, shape class) on ``device`` (a torch.device or a
    device name), or None when the device has no table or the table no such entry."""
    name = device if isinstance(device, str) else device_name(device)
    if name is None:
        return None
    return _entries(name, os.environ.get(ENV_DIR, "")).get(kernel, {}).get(shape_class)


def _check(kernel: str, shape_class: str, config, default):
    """A table entry must have the heuristic's form: the same keys for a dict config,
    the same type otherwise (a stale or hand-edited table fails here, naming the entry)."""
    if isinstance(default, dict):
        ok = isinstance(config, dict) and set(config) == set(default)
    else:
        ok = isinstance(config, (str, tuple)) if isinstance(default, (str, tuple)) else type(config) is type(default)
    if not ok:
        raise ValueError(f"kernel config table {table_dir()}: entry {kernel} [{shape_class}] = {config!r} does not "
                         f"have the form of the heuristic's {default!r}; rerun benchmarks/tune.py for this device")
    return dict(config) if isinstance(config, dict) else config


def choose(kernel: str, shape_class: str, device: torch.device, heuristic: Callable[[], T]) -> T:
    """The config ``kernel`` launches with: a :func:`forced` one, else the device table's
    entry for ``shape_class``, else ``heuristic()``. A dict comes back as a fresh copy."""
    default = heuristic()
    config = _FORCED[kernel] if kernel in _FORCED else lookup(kernel, shape_class, device)
    return default if config is None else _check(kernel, shape_class, config, default)


@contextlib.contextmanager
def forced(overrides: dict[str, object]):
    """Launch ``kernel`` with ``config`` in every shape class inside the block, for each
    ``{kernel: config}`` (benchmarks/tune.py and the launch check try candidates so; tests
    pin a path). Not thread-safe: it changes the process's choice."""
    saved = dict(_FORCED)
    _FORCED.update({k: _as_config(v) for k, v in overrides.items()})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def reload() -> None:
    """Forget the tables read so far (after tune.py rewrote one in this process)."""
    _entries.cache_clear()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``: the dtype part of a shape class."""
    return str(dtype).removeprefix("torch.")


def pow2(n: int) -> int:
    """The power of two at or above ``n`` (1 for n <= 1): the class of a varying size."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def shape_class(**parts) -> str:
    """``shape_class(d=128, dtype="bfloat16")`` -> ``"d=128,dtype=bfloat16"`` (the key of
    an entry; booleans as 0/1)."""
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in parts.items())


def candidate_list(heuristic, *others) -> list:
    """The heuristic's config first (tune.py measures it before anything else), then the
    other candidates, each once."""
    out = [heuristic]
    for c in others:
        if c not in out:
            out.append(c)
    return out
