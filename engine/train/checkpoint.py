"""Training state on disk: committed at once, loaded all-or-nothing.

A state is a folder::

    state.json                          the commit marker, written last: format, save id, step,
                                        tp, model kind, LoRA rank / alpha / targets, the files
    state-<id>.safetensors              at tp=1; at tp=n one file per rank:
    state-<id>.tp<n>-rank<r>.safetensors

Each file holds the trainable weights (the adapter alone under LoRA, plus the value head of
a scoring model) as ``weights.<name>``, in fp32 where the trainer keeps fp32 master
weights of a bf16/fp16 model (the masters, so a resumed run is the uninterrupted one), AdamW's moments as ``optimizer.<name>.exp_avg`` /
``.exp_avg_sq`` / ``.step``, and in its metadata the save id, step, tp and rank.

Save: every rank writes its file under a new save id (the committed state's files stay),
the ranks agree that all files are on disk, rank 0 replaces the marker (one atomic rename)
and deletes the superseded files. A save killed at any point leaves the previous state or
the new one, never a mix; the temporaries it leaves are removed by the next save or load
in that folder (engine/models/files.py).

Load: every rank checks the marker against the model (tp, kind, LoRA), then its whole file
(save id and step as the marker says, weight keys both ways, shapes, dtypes, finite values,
optimizer entries) before anything is touched; the ranks agree, then copy, then zero the
gradients. A failed load leaves every rank as it was.

Sampler exports: a PEFT adapter folder under LoRA, else a Hugging Face folder
(config.json + model.safetensors) that transformers loads.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from engine.models import save_peft_lora
from engine.models.files import copy_file, remove_stale_temporaries, write_safetensors, write_text
from engine.parallel import full_state

MARKER = "state.json"
_FORMAT = "engine-train-state-v2"
_STATE_FILE = re.compile(r"^state-[0-9]+-[0-9a-f]+(\.tp[0-9]+-rank[0-9]+)?\.safetensors$")
_ADAM = ("step", "exp_avg", "exp_avg_sq")
# Files a sampler export copies from the base checkpoint when present.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def _layout(trainer) -> tuple[int, int]:
    if trainer.group is None:
        return 1, 0
    return dist.get_world_size(trainer.group), dist.get_rank(trainer.group)


def _kind(trainer) -> str:
    return ("lora" if trainer.lora else "full") + ("+value_head" if trainer.value_head is not None else "")


def signature(trainer) -> dict:
    """What a state must match to load into ``trainer``: tp, kind, LoRA rank/alpha/targets."""
    lora = None
    if trainer.lora:
        c = trainer.model.lora_config
        lora = {"rank": c.rank, "alpha": c.alpha, "target_modules": sorted(c.target_modules)}
    return {"tp": _layout(trainer)[0], "kind": _kind(trainer), "lora": lora}


def new_save_id(step: int) -> str:
    return f"{step:08d}-{secrets.token_hex(4)}"


def _file_name(save_id: str, tp: int, rank: int) -> str:
    return f"state-{save_id}.safetensors" if tp == 1 else f"state-{save_id}.tp{tp}-rank{rank}.safetensors"


def writable_folder(folder: Path) -> Path:
    """Create ``folder`` and check that it takes files (before any rank writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"path {str(folder)!r}: the folder is not writable")
    return folder


def agree(trainer, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, so the ranks stay alike: all go on, or all
    raise the same error naming the rank(s) that failed. Every rank calls it; what may fail
    before it must not skip a collective (check, agree, then act)."""
    if trainer.group is None:
        if error is not None:
            raise error
        return
    mine = None
    if error is not None:  # a builtin type whose constructor takes one message travels; others are named
        cls = type(error)
        plain = cls.__module__ == "builtins" and issubclass(cls, (ValueError, OSError))
        mine = (cls, str(error)) if plain else (RuntimeError, f"{cls.__name__}: {error}")
    everyone = [None] * dist.get_world_size(trainer.group)
    dist.all_gather_object(everyone, mine, group=trainer.group)
    failed = [(rank, got) for rank, got in enumerate(everyone) if got is not None]
    if not failed:
        return
    kinds = {cls for _, (cls, _) in failed}
    cls = kinds.pop() if len(kinds) == 1 else RuntimeError
    raise cls("; ".join(f"rank {rank}: {text}" for rank, (_, text) in failed)) from error


# -- save -------------------------------------------------------------------------------------------
def save_state(trainer, folder: Path, save_id: str | None = None) -> Path:
    """Write this rank's file, agree, commit (rank 0), agree. ``save_id``: the same on every
    rank (the caller of a WorkerPool picks it); under torchrun rank 0's is broadcast."""
    tp, rank = _layout(trainer)
    if save_id is None:
        box = [new_save_id(trainer.step)]
        if trainer.group is not None:
            dist.broadcast_object_list(box, src=dist.get_global_rank(trainer.group, 0), group=trainer.group)
        save_id = box[0]
    names = [_file_name(save_id, tp, r) for r in range(tp)]
    error = None
    try:
        writable_folder(folder)
        if rank == 0:
            remove_stale_temporaries(folder)
        tensors = {f"weights.{n}": p for n, p in trainer.optim_params}
        for n, p in trainer.optim_params:
            for key in _ADAM:
                value = trainer.optimizer.state.get(p, {}).get(key)
                if value is not None:
                    tensors[f"optimizer.{n}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        meta = {"format": _FORMAT, "save_id": save_id, "step": str(trainer.step), "tp": str(tp), "rank": str(rank),
                "kind": _kind(trainer)}
        write_safetensors(folder / names[rank], tensors, meta)
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    # Files of a save that fails from here on are never named by a marker: the next save
    # deletes them (never this one: a rank cannot know whether rank 0 has committed).
    agree(trainer, error)  # every rank's file is on disk
    error = None
    if rank == 0:
        try:
            marker = {"format": _FORMAT, "save_id": save_id, "step": trainer.step, **signature(trainer),
                      "files": names}
            write_text(folder / MARKER, json.dumps(marker, indent=1))
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = e
    agree(trainer, error)  # committed
    if rank == 0:
        for entry in folder.iterdir():  # the superseded state, or files of saves that never committed
            if _STATE_FILE.match(entry.name) and entry.name not in names:
                entry.unlink(missing_ok=True)
    return folder


# -- load -------------------------------------------------------------------------------------------
def _describe(sig: dict) -> str:
    lora = sig.get("lora")
    what = f"tp={sig.get('tp')} {sig.get('kind')}"
    if lora:
        what += f" (LoRA rank {lora.get('rank')}, alpha {lora.get('alpha')}, target modules {lora.get('target_modules')})"
    return what


def read_marker(path: Path, sig: dict) -> tuple[Path, dict]:
    """The state folder at ``path`` and its commit marker, checked against the model's
    signature; clear errors for a folder that is missing, uncommitted or of another model."""
    folder = path.parent if path.name == MARKER else path
    where = f"path {str(path)!r}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: no such folder (give a folder written by save_state)")
    if not (folder / MARKER).is_file():
        older = " (its state.safetensors is of an older format)" if (folder / "state.safetensors").is_file() else ""
        raise ValueError(f"{where} has no {MARKER} commit marker: not a state written by save_state{older}, or its "
                         "save was interrupted before it committed")
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: its {MARKER} commit marker cannot be read ({e})") from e
    if not isinstance(marker, dict) or marker.get("format") != _FORMAT:
        raise ValueError(f"{where}: {MARKER} is not a commit marker of save_state (format {_FORMAT})")
    step, tp, files = marker.get("step"), marker.get("tp"), marker.get("files")
    if (not isinstance(step, int) or step < 0 or not isinstance(tp, int) or not isinstance(files, list)
            or len(files) != tp or not all(isinstance(f, str) and _STATE_FILE.match(f) for f in files)):
        raise ValueError(f"{where}: {MARKER} is malformed (step {step!r}, tp {tp!r}, files {files!r})")
    found = {k: marker.get(k) for k in sig}
    if found != sig:
        raise ValueError(f"{where} holds a {_describe(found)} state; this model is {_describe(sig)} "
                         "(a state loads into the kind of model, LoRA targets and tp that saved it)")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{where}: the commit marker names {missing}, which are missing")
    return folder, marker


def _check_tensor(errors: list, key: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape:
        errors.append(f"{key} has shape {tuple(t.shape)}, the model's is {tuple(like.shape)}")
    elif t.dtype != like.dtype:
        errors.append(f"{key} has dtype {t.dtype}, the model's is {like.dtype}")
    elif not torch.isfinite(t).all():
        errors.append(f"{key} holds non-finite values")


def _plan(trainer, folder: Path, marker: dict, rank: int) -> dict:
    """Read and check this rank's whole file; what to install. Touches nothing."""
    file = folder / marker["files"][rank]
    where = f"path {str(folder)!r}: {file.name}"
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("save_id") != marker["save_id"]:
        raise ValueError(f"{where} (rank {rank}) belongs to save {meta.get('save_id')!r}, the commit marker to save "
                         f"{marker['save_id']!r}: the folder mixes files of different saves")
    if meta.get("step") != str(marker["step"]) or meta.get("rank") != str(rank):
        raise ValueError(f"{where}: its metadata (step {meta.get('step')!r}, rank {meta.get('rank')!r}) disagrees "
                         f"with the commit marker (step {marker['step']}, rank {rank})")
    params = dict(trainer.optim_params)
    errors: list[str] = []
    weights, optimizer = [], []
    for n, p in trainer.optim_params:
        key = f"weights.{n}"
        if key not in tensors:
            errors.append(f"{key} is missing")
        else:
            _check_tensor(errors, key, tensors[key], p.detach())
            weights.append((p, tensors[key]))
        present = [k for k in _ADAM if f"optimizer.{n}.{k}" in tensors]
        if present and len(present) != len(_ADAM):
            errors.append(f"optimizer.{n} has {present}, AdamW's state is {list(_ADAM)}")
        elif present:
            state = {k: tensors[f"optimizer.{n}.{k}"] for k in _ADAM}
            for k in ("exp_avg", "exp_avg_sq"):
                _check_tensor(errors, f"optimizer.{n}.{k}", state[k], p.detach())
            s = state["step"]
            if s.numel() != 1 or not s.is_floating_point() or not bool(torch.isfinite(s).all()) or float(s) < 0:
                errors.append(f"optimizer.{n}.step must be one finite count >= 0, got {s.dtype} {tuple(s.shape)}")
            optimizer.append((p, state))
    known = {f"weights.{n}" for n in params} | {f"optimizer.{n}.{k}" for n in params for k in _ADAM}
    extra = sorted(set(tensors) - known)
    if extra:
        errors.append(f"unexpected tensor(s) {extra[:4]}{' ...' if len(extra) > 4 else ''} "
                      "(saved from a different model?)")
    if errors:
        raise ValueError(f"{where}: " + "; ".join(errors[:6]) + (" ..." if len(errors) > 6 else ""))
    return {"weights": weights, "optimizer": optimizer, "step": marker["step"]}


def load_state(trainer, path: Path, *, with_optimizer: bool) -> None:
    _, rank = _layout(trainer)
    plan, error = None, None
    try:
        folder, marker = read_marker(path, signature(trainer))
        if rank == 0:
            remove_stale_temporaries(folder)
        plan = _plan(trainer, folder, marker, rank)
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    agree(trainer, error)
    with torch.no_grad():
        for p, t in plan["weights"]:
            p.copy_(t)
    trainer.sync_from_masters()
    trainer.optimizer.state.clear()
    if with_optimizer:
        for p, state in plan["optimizer"]:
            trainer.optimizer.state[p] = {"step": state["step"].reshape(()).float(),
                                          "exp_avg": state["exp_avg"].to(p.device),
                                          "exp_avg_sq": state["exp_avg_sq"].to(p.device)}
        trainer.step = plan["step"]
    trainer.optimizer.zero_grad(set_to_none=True)  # a gradient from before the load is not the loaded model's


# -- sampler exports --------------------------------------------------------------------------------
def save_for_sampler(trainer, source: Path, folder: Path) -> Path:
    """PEFT adapter (LoRA) or full HF folder (the model's dtype: bf16 weights are the
masters rounded); a scoring model adds value_head.safetensors.
    Under tensor parallelism every rank gathers and rank 0 writes; the ranks then agree."""
    writer = _layout(trainer)[1] == 0
    error = None
    try:  # every rank gathers first; only then can the writer fail
        if trainer.lora:
            save_peft_lora(trainer.model, folder, write=writer)
        else:
            state = full_state(trainer.model)
            if writer:
                write_safetensors(writable_folder(folder) / "model.safetensors", state, {"format": "pt"})
        if writer and not trainer.lora:
            config = json.loads((source / "config.json").read_text())
            write_text(folder / "config.json", json.dumps(config, indent=2))
            for name in _TOKENIZER_FILES:
                if (source / name).is_file():
                    copy_file(source / name, folder / name)
        if writer and trainer.value_head is not None:
            write_safetensors(folder / "value_head.safetensors",
                              {"weight": trainer.value_head.weight, "bias": trainer.value_head.bias},
                              {"format": "pt"})
        if writer:
            remove_stale_temporaries(folder)  # of an export that crashed here before
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    agree(trainer, error)
    return folder
