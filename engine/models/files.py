"""Files written whole or not at all, under temporaries the engine recognises.

A file ``<folder>/<name>`` is written as ``<folder>/.<name>.engine-tmp-<pid>`` (safetensors
go one level deeper: the library writes its own ``.tmpXXXXXX`` inside that folder before
renaming), flushed to disk, then renamed over the target. A writer killed half-way leaves
only such a temporary; ``remove_stale_temporaries(folder)`` deletes those whose writer
process is gone, and every save and load of a training state calls it on its folder.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

_TAG = ".engine-tmp-"
_TEMPORARY = re.compile(r"^\..+" + re.escape(_TAG) + r"(\d+)$")


def temporary(path: Path) -> Path:
    """This process's temporary name for ``path`` (beside it, hidden)."""
    return path.with_name(f".{path.name}{_TAG}{os.getpid()}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)  # the rename itself reaches the disk


def write_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` at once: readers see the old file or the new one."""
    tmp = temporary(path)
    tmp.write_text(text)
    _commit(tmp, path)


def copy_file(source: Path, path: Path) -> None:
    """Copy ``source`` over ``path`` at once."""
    tmp = temporary(path)
    shutil.copyfile(source, tmp)
    _commit(tmp, path)


def write_torch(path: Path, obj) -> None:
    """``torch.save(obj)`` over ``path`` at once."""
    tmp = temporary(path)
    torch.save(obj, tmp)
    _commit(tmp, path)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` under a temporary folder, then renamed into place."""
    from safetensors.torch import save_file

    tmp_dir = temporary(path)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    try:
        tmp = tmp_dir / path.name
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _commit(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the engine's temporaries in ``folder`` whose writer process has exited (a
    save that crashed or was killed); a running writer's are kept. Returns what went."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
