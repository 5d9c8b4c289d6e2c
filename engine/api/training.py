"""TrainingModel: the object ``spawn_train`` returns.

Every method returns a :class:`Future` and runs on one worker thread per model, so calls
execute in submission order (a ``forward_backward`` and an ``optim_step`` may both be
submitted before waiting) and an exception lands in its future, leaving the model usable.
Inputs are checked inside the call, so a bad datum fails its own future, not the caller;
they are checked before any rank sees them, so under tensor parallelism too only a dead
rank ends the model.

Checkpoint names: ``save_state(name)`` and ``save_weights_for_sampler(name)`` write a bare
name (no ``/``) inside ``checkpoint_dir``; an explicit location is a ``pathlib.Path`` or an
absolute path string, used as given; a relative path string with ``/``, any ``..``, an empty
name and the root are refused. ``load_state`` takes what ``save_state`` returned (a
path-like SaveWeightsResponse), its ``path``, or a bare name, looked up inside
``checkpoint_dir``.

Sampling clients (``save_weights_and_get_sampling_client``: a snapshot of the weights, or
the inflight engine that shares them) are described in engine/api/sampling.py.
"""
from __future__ import annotations

import concurrent.futures
import copy
import itertools
import json
import numbers
import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Callable

import torch

from engine.infer import InferenceModel
from engine.models import load_tokenizer
from engine.train import check_groups, losses
from engine.train.trainer import Trainer, check_hyperparameters

from .sampling import ClientFuture, SamplingClient, close_engine, remove_folder
from .types import (AdamParams, Future, ForwardBackwardOutput, GetInfoResponse, ModelData, OptimStepOutput,
                    SaveWeightsForSamplerResponse, SaveWeightsResponse, TensorData, as_ints, as_tensor)

_INT_INPUTS = ("target_tokens",)


class TrainingModel:
    def __init__(self, trainer: Trainer, *, source: Path, checkpoint_dir: Path, info: dict):
        self._trainer = trainer
        self._source = source
        self._checkpoint_dir = Path(checkpoint_dir).absolute()  # names stay where they were meant
        self._info = info
        self._model_id = f"{info['model'].rsplit('/', 1)[-1]}-{uuid.uuid4().hex[:12]}"
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-train")
        self._sampler = None  # the shared engine: the "inflight" sampling client (engine/api/sampling.py)
        self._tokenizer = None
        # Snapshots' adapter copies and exports; removed at close (or exit) with what is left in it.
        self._snapshots = Path(tempfile.mkdtemp(prefix="engine-snapshots-"))
        self._snapshot_ids = itertools.count()
        weakref.finalize(self, shutil.rmtree, self._snapshots, ignore_errors=True)

    def _submit(self, fn: Callable, *args) -> Future:
        def call():
            if self._sampler is None:
                return fn(*args)
            # A sampling client shares the weights: train between its steps, never during one.
            return self._sampler.run_between_steps(lambda: fn(*args)).result()
        return Future(self._executor.submit(call))

    # -- inputs -------------------------------------------------------------------------------
    def _prepare(self, data, required: tuple[str, ...], optional: dict[str, float], scalar: tuple[str, ...] = ()):
        """Token lists and per-token CPU tensors of ``data``, each checked, errors naming the
        datum and key; a key of ``scalar`` may also be one number for the whole datum."""
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise ValueError(f"data must be a list of Datum, got {type(data).__name__}")
        out = []
        for i, datum in enumerate(data):
            if not hasattr(datum, "model_input") or not hasattr(datum, "loss_fn_inputs"):
                raise ValueError(f"data[{i}] must be a Datum(model_input, loss_fn_inputs), got {type(datum).__name__}")
            tokens = as_ints(datum.model_input, where=f"data[{i}].model_input")
            n = len(tokens)
            if n == 0:
                raise ValueError(f"data[{i}].model_input is empty; every datum needs at least one token")
            bad = [t for t in tokens if not 0 <= t < self._trainer.vocab]
            if bad:
                raise ValueError(f"data[{i}].model_input holds token id {bad[0]}, outside the vocabulary "
                                 f"[0, {self._trainer.vocab})")
            given = dict(datum.loss_fn_inputs or {})
            missing = [k for k in required if k not in given]
            if missing:
                raise ValueError(f"data[{i}].loss_fn_inputs is missing {missing}; this loss needs {list(required)}"
                                 + (f" (optional: {sorted(optional)})" if optional else ""))
            unknown = sorted(set(given) - set(required) - set(optional))
            if unknown:
                raise ValueError(f"data[{i}].loss_fn_inputs has unknown key(s) {unknown}; this loss takes "
                                 f"{list(required) + sorted(optional)}")
            inputs = {}
            for key in list(required) + sorted(optional):
                where = f"data[{i}].loss_fn_inputs[{key!r}]"
                if key not in given:
                    inputs[key] = torch.full((n,), float(optional[key]))
                    continue
                value = given[key]
                if key in scalar and hasattr(value, "tolist") and isinstance(value.tolist(), numbers.Real):
                    value = value.tolist()  # a 0-d tensor or array
                if key in scalar and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    value = [float(value)] * n
                t = as_tensor(value, where=where)
                if t.shape[0] != n:
                    raise ValueError(f"{where} has length {t.shape[0]}, model_input has {n} tokens (one value per token)")
                if key in _INT_INPUTS:
                    if t.is_floating_point() and not torch.equal(t, t.round()):
                        raise ValueError(f"{where} must hold integer token ids, got {t.dtype}")
                    t = t.long()
                    if n and (int(t.min()) < 0 or int(t.max()) >= self._trainer.vocab):
                        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
                        raise ValueError(f"{where} holds token id {bad}, outside the vocabulary [0, {self._trainer.vocab})")
                else:
                    t = t.float()
                    bad = (~torch.isfinite(t)).nonzero()
                    if len(bad):
                        j = int(bad[0])
                        raise ValueError(f"{where} holds {float(t[j])} at position {j}; every value must be finite")
                inputs[key] = t
            out.append((tokens, inputs))
        return out

    def _builtin(self, data, loss_fn, loss_fn_config, backward: bool) -> ForwardBackwardOutput:
        spec, _ = losses.resolve_loss(loss_fn, loss_fn_config, scoring=self._trainer.value_head is not None)
        prepared = self._prepare(data, spec.inputs, spec.defaults, spec.per_token)
        check_groups(len(prepared), spec.group)  # here, not on the ranks
        outputs, metrics = self._trainer.run(prepared, loss_fn, loss_fn_config, backward)
        return _output(outputs, metrics)

    # -- the API ------------------------------------------------------------------------------
    def forward(self, data, loss_fn: str, loss_fn_config: dict | None = None) -> Future:
        """Loss and per-datum outputs without gradients."""
        return self._submit(self._builtin, data, loss_fn, loss_fn_config, False)

    def forward_backward(self, data, loss_fn: str, loss_fn_config: dict | None = None) -> Future:
        """Accumulate the gradient of a built-in loss (sum over tokens) into the model."""
        return self._submit(self._builtin, data, loss_fn, loss_fn_config, True)

    def forward_backward_custom(self, data, fn: Callable[[list, list[torch.Tensor]], tuple[torch.Tensor, dict]]) -> Future:
        """``fn(data, logprobs_list) -> (loss, metrics)``: any differentiable loss of the
        per-datum logprob tensors [N_i]; costs one extra forward pass."""
        def call():
            prepared = self._prepare(data, ("target_tokens",), {"weights": 1.0})
            outputs, metrics = self._trainer.forward_backward_custom(prepared, lambda _, lps: fn(data, lps))
            return _output(outputs, metrics)
        return self._submit(call)

    def optim_step(self, optim_params: AdamParams | None = None, *, adam_params: AdamParams | None = None) -> Future:
        """One AdamW step (torch.optim.AdamW with these hyperparameters) on the accumulated
        gradients, after clipping their global norm when ``grad_clip_norm`` > 0; then zero them.
        The parameters come as ``optim_params`` (Tinker's name) or ``adam_params=`` (its older one).
        A hyperparameter AdamW cannot use (lr=inf, beta2=1, NaN, eps <= 0, ...) raises
        ValueError naming it. A NaN or inf gradient norm skips the step (weights, optimizer
        state and step counter unchanged, the gradient dropped, a RuntimeWarning, metric
        ``skipped_nonfinite_grad:sum`` = 1); metrics ``grad_norm`` and ``step`` always."""
        if optim_params is not None and adam_params is not None:
            raise ValueError("give optim_params or adam_params, not both")
        adam_params = optim_params if adam_params is None else adam_params
        if adam_params is None:
            raise ValueError("optim_step needs optim_params (an AdamParams)")

        def call():
            names = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
            for name in names:
                if not hasattr(adam_params, name):
                    raise ValueError(f"adam_params must be an AdamParams, missing {name!r}")
            values = [getattr(adam_params, name) for name in names]
            values[-1] = values[-1] or 0.0  # grad_clip_norm=None: no clipping
            check_hyperparameters(*values)
            out = OptimStepOutput(self._trainer.optim_step(*map(float, values)))
            if out.metrics["skipped_nonfinite_grad:sum"]:
                warnings.warn("optim_step skipped: the gradient norm is not finite; weights and optimizer state are "
                              "unchanged and the gradient was dropped", RuntimeWarning, stacklevel=2)
            else:
                self._weights_changed()
            return out
        return self._submit(call)

    def _weights_changed(self) -> None:
        if self._sampler is not None and not self._sampler.closed:  # its shared weights changed: new version
            self._sampler.update_weights()

    def _path(self, name: str | Path) -> Path:
        """Where a save of ``name`` goes (module docstring, "Checkpoint names")."""
        if not isinstance(name, (str, Path)):
            raise ValueError(f"name must be a str or a pathlib.Path, got {type(name).__name__}")
        path, text = Path(name), str(name)
        hint = (f"give a bare name (a folder inside checkpoint_dir={str(self._checkpoint_dir)!r}), "
                "or a pathlib.Path / an absolute path for a folder elsewhere")
        if not text.strip() or text == "." or ".." in path.parts or path == Path(path.anchor):
            raise ValueError(f"name {text!r} is empty, the root, or climbs with '..'; {hint}")
        if isinstance(name, Path) or path.is_absolute():
            return path
        if "/" in text or os.sep in text:
            raise ValueError(f"name {text!r} is a relative path; {hint}")
        return self._checkpoint_dir / path

    def _load_path(self, path: str | Path) -> Path:
        if isinstance(path, os.PathLike) and not isinstance(path, Path):  # what save_state returned
            path = os.fspath(path)
        if not isinstance(path, (str, Path)) or not str(path):
            raise ValueError(f"path must be a non-empty str or pathlib.Path, got {path!r}")
        bare = isinstance(path, str) and "/" not in path and os.sep not in path and path not in (".", "..")
        return self._checkpoint_dir / path if bare else Path(path)

    def save_state(self, name: str | Path, ttl_seconds: int | None = None) -> Future:
        """Trainable weights, optimizer state and step counter, committed at once (a save that
        crashes leaves the previous state); future of a SaveWeightsResponse whose ``path`` is
        the absolute folder. ``ttl_seconds`` (Tinker's retention) is checked, then has no
        effect: a local folder stays until removed."""
        _check_ttl(ttl_seconds)
        return self._submit(lambda: SaveWeightsResponse(str(self._trainer.save_state(self._path(name)))))

    def _load(self, path, with_optimizer: bool) -> None:
        self._trainer.load_state(self._load_path(path), with_optimizer)
        self._weights_changed()

    def load_state(self, path: str | Path) -> Future:
        """Weights only; the optimizer state starts fresh. All or nothing: a state that does
        not match this model exactly (keys, shapes, dtypes, LoRA rank and targets, tp) or
        was never committed is refused and the model is left as it was; gradients are zeroed."""
        return self._submit(self._load, path, False)

    def load_state_with_optimizer(self, path: str | Path) -> Future:
        """Weights, AdamW state and step counter (as ``load_state``)."""
        return self._submit(self._load, path, True)

    def save_weights_for_sampler(self, name: str | Path, ttl_seconds: int | None = None) -> Future:
        """A PEFT adapter folder under LoRA, else a folder that transformers loads; future of a
        SaveWeightsForSamplerResponse (``path``). ``ttl_seconds`` as in ``save_state``."""
        _check_ttl(ttl_seconds)
        return self._submit(lambda: SaveWeightsForSamplerResponse(str(self._export(self._path(name)))))

    def _export(self, folder: Path) -> Path:
        return self._trainer.save_for_sampler(self._source, folder)

    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config=None, *,
                                             kind: str = "snapshot", **kwargs) -> ClientFuture:
        """Future of a sampling client of this model's weights, usable as the client itself
        (Tinker's). ``kind="snapshot"`` (default): the weights when the call runs, fixed;
        ``kind="inflight"``: the shared engine (``InferenceModel``) over the live weights, one
        per model (engine/api/sampling.py). With ``name``, the weights are also saved for a
        sampler there first. ``kwargs`` (kv_cache_tokens, ...) go to the engine when one is
        made (the shared one is made once). ``retry_config`` has no use in-process (nothing
        is sent over a network) and is accepted so that Tinker code runs unchanged."""
        if kind not in ("snapshot", "inflight"):
            raise ValueError(f"kind must be 'snapshot' or 'inflight', got {kind!r}")
        if self._trainer.value_head is not None:
            raise ValueError("a scoring model has no sampler")

        def call():
            if name is not None:
                self._export(self._path(name))
            if kind == "inflight":
                return self._shared(kwargs)
            folder = self._snapshots / f"snapshot-{next(self._snapshot_ids)}"
            if self._trainer.lora:  # the adapter copied; the base weights are the shared engine's
                self._export(folder)
                return SamplingClient(self._shared(kwargs), adapter=str(folder), cleanup=remove_folder(folder))
            if getattr(self._trainer, "model", None) is not None:  # in this process: a copy of the model
                model = copy.deepcopy(self._trainer.model).requires_grad_(False).eval()
                engine, folder = self._engine(model, kwargs), None
            else:  # every rank's shard, gathered into a folder and loaded by a pool of its own
                self._export(folder)
                engine = self._engine(folder, dict(kwargs, tp=self._info["tp"]))
            return SamplingClient(engine, cleanup=close_engine(engine, folder))
        return ClientFuture(self._submit(call).future())

    def _engine(self, model, kwargs: dict) -> InferenceModel:
        kwargs = {"gpu_memory_fraction": 0.3,  # it shares the GPU with training
                  "max_batch_size": 2048, "tokenizer": self._get_tokenizer(), "base_model": self._info["model"],
                  **kwargs}
        return InferenceModel(model, **kwargs)

    def _shared(self, kwargs: dict) -> InferenceModel:
        """The shared engine, made on first use (on the training thread: no call of this
        model is in flight meanwhile)."""
        if self._sampler is None or self._sampler.closed:
            # A tensor-parallel trainer's ranks serve their own shards (engine/infer/runner.py).
            target = getattr(self._trainer, "model", None)
            self._sampler = None
            self._sampler = self._engine(self._trainer.pool if target is None else target, kwargs)
        return self._sampler

    async def save_weights_and_get_sampling_client_async(self, *a, **k):
        return await self.save_weights_and_get_sampling_client(*a, **k)

    def create_sampling_client(self, model_path: str | os.PathLike, retry_config=None, **kwargs) -> ClientFuture:
        """Future (already done) of a sampling client (``InferenceModel``) of weights saved by
        ``save_weights_for_sampler``: a PEFT adapter folder (served on this model's base
        checkpoint) or a full Hugging Face folder; usable as the client itself. It runs at
        this model's tp unless ``tp=`` says otherwise; ``retry_config`` as above."""
        folder = Path(model_path)
        kwargs.setdefault("tp", self._info["tp"])  # the same number of ranks as this model
        kwargs.setdefault("base_model", self._info["model"])
        if (folder / "adapter_config.json").is_file():
            kwargs.setdefault("tokenizer", self._get_tokenizer())
            client = InferenceModel(self._source, adapter=str(folder), **kwargs)
        elif (folder / "config.json").is_file():
            kwargs.setdefault("tokenizer", load_tokenizer(folder) or self._get_tokenizer())
            client = InferenceModel(folder, **kwargs)
        else:
            raise FileNotFoundError(f"path {str(model_path)!r}: neither a PEFT adapter folder nor a Hugging Face "
                                    f"model folder")
        return ClientFuture.of(client)

    async def create_sampling_client_async(self, *a, **k) -> InferenceModel:
        return await self.create_sampling_client(*a, **k)

    def get_info(self) -> GetInfoResponse:
        """Tinker's model description (``model_id``, ``model_data``, ``is_lora``,
        ``lora_rank``) and this engine's (``step``, ``tp``, ``dtype``, ...)."""
        info, lora = self._info, self._info["lora"]
        try:
            arch = json.loads((self._source / "config.json").read_text()).get("architectures", [None])[0]
        except (OSError, ValueError, IndexError):
            arch = None
        tokenizer_id = str(self._source) if self._get_tokenizer() is not None else None
        return GetInfoResponse(
            model_id=self._model_id, model_data=ModelData(arch or info["model_type"], info["model"], tokenizer_id),
            is_lora=lora is not None, lora_rank=None if lora is None else lora["rank"], model_name=info["model"],
            step=self._trainer.step, tp=info["tp"], dtype=info["dtype"], device=info["device"],
            max_batch_size=info["max_batch_size"], path=info["path"], model_type=info["model_type"],
            scoring_model=info["scoring_model"], lora=lora, parameters=info["parameters"],
            trainable_parameters=info["trainable_parameters"],
            activation_checkpointing=info["activation_checkpointing"], dp=info["dp"],
            master_weights=info["master_weights"])

    async def get_info_async(self) -> GetInfoResponse:
        return self.get_info()

    def _get_tokenizer(self):
        """The checkpoint's tokenizer (loaded once), or None when it ships none."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._source) or False
        return self._tokenizer or None

    def get_tokenizer(self):
        """The checkpoint folder's tokenizer (``AutoTokenizer``); ValueError when it ships none."""
        tokenizer = self._get_tokenizer()
        if tokenizer is None:
            load_tokenizer(self._source, required=True)  # raises, naming the files looked for
        return tokenizer

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._sampler is not None:
            self._sampler.close()
        if hasattr(self._trainer, "close"):
            self._trainer.close()
        shutil.rmtree(self._snapshots, ignore_errors=True)

    # Tinker's *_async spelling: ``fut = await model.forward_backward_async(...)``, then ``await fut``.
    async def forward_async(self, *a, **k) -> Future:
        return self.forward(*a, **k)

    async def forward_backward_async(self, *a, **k) -> Future:
        return self.forward_backward(*a, **k)

    async def forward_backward_custom_async(self, *a, **k) -> Future:
        return self.forward_backward_custom(*a, **k)

    async def optim_step_async(self, *a, **k) -> Future:
        return self.optim_step(*a, **k)

    async def save_state_async(self, *a, **k) -> Future:
        return self.save_state(*a, **k)

    async def save_weights_for_sampler_async(self, *a, **k) -> Future:
        return self.save_weights_for_sampler(*a, **k)

    async def load_state_async(self, *a, **k) -> Future:
        return self.load_state(*a, **k)

    async def load_state_with_optimizer_async(self, *a, **k) -> Future:
        return self.load_state_with_optimizer(*a, **k)


def _output(outputs: list[dict[str, torch.Tensor]], metrics: dict) -> ForwardBackwardOutput:
    return ForwardBackwardOutput([{k: TensorData.from_torch(v) for k, v in o.items()} for o in outputs], metrics)


def _check_ttl(ttl_seconds) -> None:
    if ttl_seconds is not None and (isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int)
                                    or ttl_seconds <= 0):
        raise ValueError(f"ttl_seconds must be None or a positive int (seconds), got {ttl_seconds!r}")
