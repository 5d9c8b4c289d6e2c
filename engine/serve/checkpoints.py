"""Tinker checkpoint URIs inside ``--checkpoint-dir``.

``tinker://<run>/weights/<name>`` is a training state (``save_state``: weights, AdamW state,
step) and ``tinker://<run>/sampler_weights/<name>`` a PEFT adapter folder
(``save_weights_for_sampler``); on disk they are ``DIR/<run>/<kind>/<name>``, and
``DIR/<run>/run.json`` records the run's base model and LoRA configuration so a state can
start a new training client. A URI resolves only to a folder strictly inside DIR: each
part is one plain path component, and the resolved path (symlinks followed) must stay
under DIR.
"""
from __future__ import annotations

import json
from pathlib import Path

from engine.models.files import write_text

SCHEME = "tinker://"
KINDS = ("weights", "sampler_weights")


def check_name(name: str, *, what: str) -> str:
    """``name`` if it is one plain path component (no '/', '\\', '..', NUL, not empty)."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ValueError(f"{what} {name!r} must be a plain name: not empty, no '/', '\\\\', NUL, '.' or '..'")
    return name


class CheckpointDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._real = self.root.resolve()

    def run_folder(self, run: str) -> Path:
        return self._inside(self.root / check_name(run, what="run"), f"run {run!r}")

    def folder(self, run: str, kind: str, name: str) -> Path:
        """Where ``tinker://run/kind/name`` lives (it may not exist yet)."""
        if kind not in KINDS:
            raise ValueError(f"checkpoint kind {kind!r} must be one of {KINDS}")
        path = self.root / check_name(run, what="run") / kind / check_name(name, what="checkpoint name")
        return self._inside(path, f"{SCHEME}{run}/{kind}/{name}")

    def uri(self, run: str, kind: str, name: str) -> str:
        return f"{SCHEME}{run}/{kind}/{name}"

    def resolve(self, uri: str, *, kind: str | None = None) -> tuple[str, str, Path]:
        """(run, kind, existing folder) of a ``tinker://`` URI; ``kind`` demands that kind."""
        if not isinstance(uri, str) or not uri.startswith(SCHEME):
            raise ValueError(f"path {uri!r} must be a {SCHEME}<run>/<weights|sampler_weights>/<name> URI")
        parts = uri[len(SCHEME):].split("/")
        if len(parts) != 3 or parts[1] not in KINDS:
            raise ValueError(f"path {uri!r} must be {SCHEME}<run>/weights/<name> or "
                             f"{SCHEME}<run>/sampler_weights/<name>")
        run, found, name = parts
        if kind is not None and found != kind:
            hint = "save_weights_for_sampler" if kind == "sampler_weights" else "save_state"
            raise ValueError(f"path {uri!r} is a {found} checkpoint; this call needs {kind} (saved by {hint})")
        folder = self.folder(run, found, name)
        if not folder.is_dir():
            raise FileNotFoundError(f"path {uri!r}: no such checkpoint in the checkpoint dir")
        return run, found, folder

    def _inside(self, path: Path, what: str) -> Path:
        real = path.resolve()
        if real == self._real or self._real not in real.parents:
            raise ValueError(f"{what} resolves outside the checkpoint dir {str(self.root)!r}")
        return path

    # -- run metadata ---------------------------------------------------------------------------
    def write_run(self, run: str, info: dict) -> None:
        """``run.json``, written to a temporary name then renamed (never half-written)."""
        folder = self.run_folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "run.json", json.dumps(info))

    def read_run(self, run: str) -> dict:
        path = self.run_folder(run) / "run.json"
        if not path.is_file():
            raise FileNotFoundError(f"run {run!r} has no run.json in the checkpoint dir (not saved by this server)")
        return json.loads(path.read_text())
