"""Training state on disk: committed at once, loaded all-or-nothing.

A state is a folder::

    state.json                          the commit marker, written last: format, save id, step,
                                        model kind, LoRA rank / alpha / targets, the (dp, tp)
                                        that saved it (for information), the file
    state-<id>.safetensors              the state, unsharded

The file holds the trainable weights (the adapter alone under LoRA, plus the value head of a
scoring model) as ``weights.<name>``, in fp32 where the trainer keeps fp32 master weights of
a bf16/fp16 model (the masters, so a resumed run is the uninterrupted one), AdamW's moments
as ``optimizer.<name>.exp_avg`` / ``.exp_avg_sq`` / ``.step``, each tensor whole (as at tp=1:
``unshard_param`` gathers the tensor-parallel slices, and the ZeRO-1 owner of each
parameter's moments sends them to the first rank), and in its metadata the save id and
step. So a state loads at any (dp, tp): each rank cuts its slices (``shard_param``) and keeps
the moments of the parameters it owns.

Save: the first rank (dp rank 0, tp rank 0) writes the file under a new save id (the
committed state's file stays), the ranks agree that it is on disk, the first rank replaces
the marker (one atomic rename) and deletes the superseded files. A save killed at any point
leaves the previous state or the new one, never a mix; the temporaries it leaves are
removed by the next save or load in that folder (engine/models/files.py).

Load: every rank checks the marker against the model (kind, LoRA), then the whole file (save
id and step as the marker says, weight keys both ways, shapes of its slices, dtypes, finite
values, optimizer entries) before anything is touched; the ranks agree, then copy, then zero
the gradients. A failed load leaves every rank as it was.

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
from engine.parallel import full_state, shard_param, unshard_param

MARKER = "state.json"
_FORMAT = "engine-train-state-v3"
_STATE_FILE = re.compile(r"^state-[0-9]+-[0-9a-f]+(\.tp[0-9]+-rank[0-9]+)?\.safetensors$")
_ADAM = ("step", "exp_avg", "exp_avg_sq")
# Files a sampler export copies from the base checkpoint when present.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def _layout(trainer) -> tuple[int, int]:
    """(tp, tp rank)."""
    if trainer.group is None:
        return 1, 0
    return dist.get_world_size(trainer.group), dist.get_rank(trainer.group)


def _first(trainer) -> bool:
    """Whether this is the rank that writes (tp rank 0 of replica 0)."""
    return trainer.dp_rank == 0 and _layout(trainer)[1] == 0


def _groups(trainer) -> list:
    return [g for g in (trainer.group, trainer.dp_group) if g is not None]


def _kind(trainer) -> str:
    return ("lora" if trainer.lora else "full") + ("+value_head" if trainer.value_head is not None else "")


def signature(trainer) -> dict:
    """What a state must match to load into ``trainer``: kind, LoRA rank/alpha/targets (any
    tp and dp: the state is stored unsharded)."""
    lora = None
    if trainer.lora:
        c = trainer.model.lora_config
        lora = {"rank": c.rank, "alpha": c.alpha, "target_modules": sorted(c.target_modules)}
    return {"kind": _kind(trainer), "lora": lora}


def new_save_id(step: int) -> str:
    return f"{step:08d}-{secrets.token_hex(4)}"


def _file_name(save_id: str) -> str:
    return f"state-{save_id}.safetensors"


def writable_folder(folder: Path) -> Path:
    """Create ``folder`` and check that it takes files (before any rank writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"path {str(folder)!r}: the folder is not writable")
    return folder


def agree(trainer, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, so the ranks stay alike: all go on, or all
    raise the same error naming the (global) rank(s) that failed. Every rank calls it; what
    may fail before it must not skip a collective (check, agree, then act). Failures travel
    over the tp group, then over the dp group: every rank of the mesh learns of all."""
    groups = _groups(trainer)
    if not groups:
        if error is not None:
            raise error
        return
    failed = []
    if error is not None:  # a builtin type whose constructor takes one message travels; others are named
        cls = type(error)
        plain = cls.__module__ == "builtins" and issubclass(cls, (ValueError, OSError))
        failed = [(dist.get_rank(), (cls, str(error)) if plain else (RuntimeError, f"{cls.__name__}: {error}"))]
    for group in groups:
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, failed, group=group)
        failed = sorted(f for got in everyone for f in got)
    if not failed:
        return
    kinds = {cls for _, (cls, _) in failed}
    cls = kinds.pop() if len(kinds) == 1 else RuntimeError
    raise cls("; ".join(f"rank {rank}: {text}" for rank, (_, text) in failed)) from error


# -- save -------------------------------------------------------------------------------------------
def _same_everywhere(trainer, value):
    """Rank (dp 0, tp 0)'s ``value`` on every rank: broadcast over dp, then over tp."""
    box = [value]
    for group in reversed(_groups(trainer)):
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _unsharded_state(trainer) -> dict[str, torch.Tensor]:
    """The file's tensors, whole, on the first rank (other ranks: a part or nothing). Every
    rank calls it: the tp gathers run in the replica that holds each tensor."""
    tensors: dict[str, torch.Tensor] = {}
    for (n, p), owner in zip(trainer.optim_params, trainer.owner):
        if trainer.dp_rank == 0:
            tensors[f"weights.{n}"] = unshard_param(trainer.model, n, p.detach())
        if owner != trainer.dp_rank:
            continue
        state = trainer.optimizer.state.get(p, {})  # alike on the ranks of a replica
        for key in _ADAM:
            value = state.get(key)
            if value is None:
                continue
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optimizer.{n}.{key}"] = value if key == "step" else unshard_param(trainer.model, n, value)
    if trainer.dp_group is not None and _layout(trainer)[1] == 0:  # the owners' moments to replica 0
        group = trainer.dp_group
        parts = [None] * dist.get_world_size(group) if trainer.dp_rank == 0 else None
        mine = {k: v.cpu() for k, v in tensors.items() if k.startswith("optimizer.")} if trainer.dp_rank else {}
        dist.gather_object(mine, parts, dst=dist.get_global_rank(group, 0), group=group)
        for part in parts or []:
            tensors.update(part)
    return tensors


def save_state(trainer, folder: Path, save_id: str | None = None) -> Path:
    """Gather, write (the first rank), agree, commit (the first rank), agree. ``save_id``:
    the same on every rank (the caller of a WorkerPool picks it); under torchrun the first
    rank's is broadcast."""
    tp = _layout(trainer)[0]
    writer = _first(trainer)
    if save_id is None:
        save_id = _same_everywhere(trainer, new_save_id(trainer.step))
    name = _file_name(save_id)
    error = None
    tensors = _unsharded_state(trainer)
    try:
        if writer:
            writable_folder(folder)
            remove_stale_temporaries(folder)
            meta = {"format": _FORMAT, "save_id": save_id, "step": str(trainer.step), "kind": _kind(trainer)}
            write_safetensors(folder / name, tensors, meta)
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    # A file of a save that fails from here on is never named by a marker: the next save
    # deletes it (never this one: a rank cannot know whether the writer has committed).
    agree(trainer, error)  # the file is on disk
    error = None
    if writer:
        try:
            marker = {"format": _FORMAT, "save_id": save_id, "step": trainer.step, **signature(trainer),
                      "tp": tp, "dp": trainer.dp, "files": [name]}
            write_text(folder / MARKER, json.dumps(marker, indent=1))
        except Exception as e:  # noqa: BLE001 - agreed on below
            error = e
    agree(trainer, error)  # committed
    if writer:
        for entry in folder.iterdir():  # the superseded state, or files of saves that never committed
            if _STATE_FILE.match(entry.name) and entry.name != name:
                entry.unlink(missing_ok=True)
    return folder


# -- load -------------------------------------------------------------------------------------------
def _describe(sig: dict) -> str:
    lora = sig.get("lora")
    what = f"{sig.get('kind')}"
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
    step, files = marker.get("step"), marker.get("files")
    if (not isinstance(step, int) or step < 0 or not isinstance(files, list) or len(files) != 1
            or not all(isinstance(f, str) and _STATE_FILE.match(f) for f in files)):
        raise ValueError(f"{where}: {MARKER} is malformed (step {step!r}, files {files!r})")
    found = {k: marker.get(k) for k in sig}
    if found != sig:
        raise ValueError(f"{where} holds a {_describe(found)} state; this model is {_describe(sig)} "
                         "(a state loads into the kind of model and LoRA targets that saved it, at any tp and dp)")
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


def _local(trainer, errors: list, key: str, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """This rank's slice of a whole tensor of the file, checked against ``like``."""
    try:
        t = shard_param(trainer.model, name, full)
    except (RuntimeError, IndexError, ValueError) as e:
        errors.append(f"{key} has shape {tuple(full.shape)}, which does not split into this model's ({e})")
        return None
    _check_tensor(errors, key, t, like)
    return t


def _plan(trainer, folder: Path, marker: dict) -> dict:
    """Read and check the file (this rank's slices of it); what to install. Touches nothing."""
    file = folder / marker["files"][0]
    where = f"path {str(folder)!r}: {file.name}"
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("save_id") != marker["save_id"]:
        raise ValueError(f"{where} belongs to save {meta.get('save_id')!r}, the commit marker to save "
                         f"{marker['save_id']!r}: the folder mixes files of different saves")
    if meta.get("step") != str(marker["step"]):
        raise ValueError(f"{where}: its metadata (step {meta.get('step')!r}) disagrees with the commit marker "
                         f"(step {marker['step']})")
    params = dict(trainer.optim_params)
    errors: list[str] = []
    weights, optimizer = [], []
    for (n, p), owner in zip(trainer.optim_params, trainer.owner):
        key = f"weights.{n}"
        if key not in tensors:
            errors.append(f"{key} is missing")
        else:
            weights.append((p, _local(trainer, errors, key, n, tensors[key], p.detach())))
        present = [k for k in _ADAM if f"optimizer.{n}.{k}" in tensors]
        if present and len(present) != len(_ADAM):
            errors.append(f"optimizer.{n} has {present}, AdamW's state is {list(_ADAM)}")
        elif present:
            state = {k: _local(trainer, errors, f"optimizer.{n}.{k}", n, tensors[f"optimizer.{n}.{k}"], p.detach())
                     for k in ("exp_avg", "exp_avg_sq")}
            s = state["step"] = tensors[f"optimizer.{n}.step"]
            if s.numel() != 1 or not s.is_floating_point() or not bool(torch.isfinite(s).all()) or float(s) < 0:
                errors.append(f"optimizer.{n}.step must be one finite count >= 0, got {s.dtype} {tuple(s.shape)}")
            if owner == trainer.dp_rank:  # ZeRO-1: this replica keeps the moments it steps
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
    plan, error = None, None
    try:
        folder, marker = read_marker(path, signature(trainer))
        if _first(trainer):
            remove_stale_temporaries(folder)
        plan = _plan(trainer, folder, marker)
    except Exception as e:  # noqa: BLE001 - agreed on below
        error = e
    agree(trainer, error)
    with torch.no_grad():
        for p, t in plan["weights"]:
            p.copy_(t)
    trainer.sync_from_masters()
    if trainer.optimizer is not None:
        trainer.optimizer.state.clear()
    if with_optimizer:
        for p, state in plan["optimizer"]:
            trainer.optimizer.state[p] = {"step": state["step"].reshape(()).float(),
                                          "exp_avg": state["exp_avg"].to(p.device),
                                          "exp_avg_sq": state["exp_avg_sq"].to(p.device)}
        trainer.step = plan["step"]
    trainer.drop_gradients()  # a gradient from before the load is not the loaded model's


# -- sampler exports --------------------------------------------------------------------------------
def save_for_sampler(trainer, source: Path, folder: Path) -> Path:
    """PEFT adapter (LoRA) or full HF folder (the model's dtype: bf16 weights are the masters
    rounded); a scoring model adds value_head.safetensors. Under tensor parallelism the ranks
    of replica 0 gather and the first rank writes (one folder whatever the layout); every
    rank then agrees."""
    writer = _first(trainer)
    error = None
    try:  # every rank of replica 0 gathers first (the others hold the same weights); then the writer writes
        if trainer.dp_rank == 0 and trainer.lora:
            save_peft_lora(trainer.model, folder, write=writer)
        elif trainer.dp_rank == 0:
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
