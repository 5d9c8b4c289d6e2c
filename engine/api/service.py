"""``engine.ServiceClient``: Tinker's ``ServiceClient`` (SDK 0.38) in this process, so a
recipe written against ``tinker`` runs here with only its client construction changed::

    service_client = tinker.ServiceClient(base_url="http://127.0.0.1:8000", api_key=KEY)  # python -m engine serve
    service_client = engine.ServiceClient(models={"Qwen/Qwen3-0.6B": "/ckpt/Qwen3-0.6B"})  # in-process

Served models: ``models`` maps each ``base_model`` name clients pass to a local Hugging Face
folder; ``models=None`` serves every name registered with ``engine.register_model`` at
construction. A base loads once, at its first client (``ModelBuilder.shared_base()`` at
tp=1, as ``python -m engine serve`` does): every LoRA training client on it and its base
sampler share those weights, each trainer holding only its adapter and optimizer state.

As Tinker's, ``create_*`` return at once a future of the client that is also usable as the
client (``.result()``, ``await``, or call its methods directly); clients are made one at a
time on one thread, and an error (an unserved ``base_model``, a bad path) fails that future.
The ``_async`` forms await it. Training clients are ``TrainingModel``s, sampling clients
``SamplingClient``s (engine/api/training.py, sampling.py).

Checkpoints: each training client saves in a run folder of its own,
``checkpoint_dir/run-<id>/<name>``, beside a ``run.json`` that names its base model and LoRA
configuration; so ``create_training_client_from_state[_with_optimizer](path)`` and
``create_sampling_client(model_path=path)`` take the ``path`` a save returned (a local
folder where Tinker has a ``tinker://`` URI) and find its base.

Tinker's arguments that mean nothing in one process are accepted and have no effect:
``user_metadata``, ``project_id``, ``display_name``, ``retry_config``,
``weights_access_token``. ``seed=None`` takes the engine's fixed LoRA seed (0; Tinker draws
one), so runs repeat. The unembedding is never adapted: ``train_unembed=True`` (Tinker's
default) adapts attention and MLP only, and a config that adapts neither is refused. An
``optimizer`` other than AdamW, ``record_stability_info=True``, ``base_url`` and ``api_key``
raise, naming the argument.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.infer import InferenceModel
from engine.models import load_config
from engine.models.files import write_text
from engine.train.checkpoint import MARKER

from .builder import ModelBuilder, model as open_model, registered_models
from .sampling import ClientFuture, SamplingClient
from .training import TrainingModel
from .types import Future, GetServerCapabilitiesResponse, SupportedModel

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_STATUSES = ("success", "errored", "interrupted")


def lora_targets(train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True) -> list[str]:
    """The PEFT module names a Tinker ``LoraConfig`` adapts on this engine (module
    docstring: the unembedding is never adapted)."""
    targets = (ATTN_MODULES if train_attn else ()) + (MLP_MODULES if train_mlp else ())
    if not targets:
        raise ValueError(f"train_attn and train_mlp are both False (train_unembed={train_unembed!r}); this engine "
                         "adapts attention and/or MLP layers, never the unembedding alone")
    return list(targets)


def check_optimizer(optimizer: Any) -> None:
    """None or Tinker's ``AdamOptimizerConfig`` (``type == "adamw"``, or such a dict)."""
    kind = optimizer.get("type", "adamw") if isinstance(optimizer, Mapping) else getattr(optimizer, "type", optimizer)
    if optimizer is not None and kind != "adamw":
        raise ValueError(f"optimizer type {kind!r} is not supported; this engine runs AdamW ('adamw')")


class ServiceClient:
    """Creates training and sampling clients of the served base models (module docstring).

    Args:
        models: ``{base_model name: local HF checkpoint folder}``; None: the names
            registered with ``engine.register_model``.
        checkpoint_dir: where each training client's run folder goes.
        max_batch_size: tokens per micro-batch of every training client, and the token
            budget of one step of each base sampler.
        tp: tensor-parallel degree of every model (tp > 1: one process per rank, and each
            client loads its own copy of the base).
        user_metadata, project_id, display_name: Tinker's session labels; no effect.
        base_url, api_key: must be None (there is no server; for one, use
            ``tinker.ServiceClient`` against ``python -m engine serve``).
    """

    def __init__(self, *, models: Mapping[str, str | Path] | None = None, checkpoint_dir: str | Path = "checkpoints",
                 max_batch_size: int = 8192, tp: int = 1, user_metadata: dict[str, str] | None = None,
                 project_id: str | None = None, display_name: str | None = None, base_url: str | None = None,
                 api_key: str | None = None):
        for name, value in (("base_url", base_url), ("api_key", api_key)):
            if value is not None:
                raise ValueError(f"{name}={value!r}: engine.ServiceClient runs in this process and talks to no "
                                 "server; to use one, run `python -m engine serve` and tinker.ServiceClient")
        models = registered_models() if models is None else models
        if not isinstance(models, Mapping) or not models:
            raise ValueError("models must map base_model names to local Hugging Face folders, e.g. "
                             "{'Qwen/Qwen3-0.6B': '/ckpt/Qwen3-0.6B'} (or register names with engine.register_model), "
                             f"got {models!r}")
        self._paths: dict[str, Path] = {}
        for name, path in models.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"models: each name must be a non-empty string, got {name!r}")
            if not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"models[{name!r}]: {str(path)!r} is not a checkpoint folder with a "
                                        "config.json")
            self._paths[name] = Path(path).absolute()
        for name, value in (("max_batch_size", max_batch_size), ("tp", tp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._checkpoint_dir = Path(checkpoint_dir).absolute()
        self._max_batch_size, self._tp = max_batch_size, tp
        self.user_metadata, self.project_id, self.display_name = user_metadata, project_id, display_name
        # Touched on the one creation thread only (and by close(), once it has stopped).
        self._builders: dict[str, ModelBuilder] = {}
        self._samplers: dict[str, InferenceModel] = {}
        self._trainers: list[TrainingModel] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-service")
        self._lock = threading.Lock()
        self._closed = False

    def _submit(self, fn, *args) -> ClientFuture:
        with self._lock:
            if self._closed:
                raise RuntimeError("ServiceClient is closed")
            return ClientFuture(self._executor.submit(fn, *args))

    def _builder(self, base_model: Any) -> ModelBuilder:
        if not isinstance(base_model, str) or base_model not in self._paths:
            raise ValueError(f"base_model {base_model!r} is not served; served: {sorted(self._paths)}")
        if base_model not in self._builders:
            builder = open_model(self._paths[base_model]).named(base_model).tp(self._tp)
            self._builders[base_model] = builder.shared_base() if self._tp == 1 else builder
        return self._builders[base_model]

    def _sampler(self, base_model: Any) -> InferenceModel:
        """The base's sampler, made at first use: it serves the base and, per request, adapters."""
        builder = self._builder(base_model)
        if base_model not in self._samplers:
            self._samplers[base_model] = builder.spawn_inference(max_batch_size=self._max_batch_size,
                                                                 gpu_memory_fraction=0.3)
        return self._samplers[base_model]

    # -- training clients -------------------------------------------------------------------------
    def _spawn(self, base_model: Any, rank: Any, alpha: float | None, targets: list[str], seed: Any) -> TrainingModel:
        builder = self._builder(base_model).with_adapter(rank=rank, alpha=alpha, target_modules=targets,
                                                          seed=0 if seed is None else seed)
        run = self._checkpoint_dir / f"run-{uuid.uuid4().hex[:12]}"
        trainer = builder.spawn_train(self._max_batch_size, checkpoint_dir=run)
        self._trainers.append(trainer)
        run.mkdir(parents=True, exist_ok=True)
        write_text(run / "run.json", json.dumps({"base_model": base_model, "lora": trainer.get_info().lora}))
        return trainer

    def _base_of(self, folder: Path, what: str) -> str:
        """The base model named by the run.json beside a saved folder."""
        run = folder.parent / "run.json"
        if not run.is_file():
            raise ValueError(f"{what} {str(folder)!r} was not saved by a training client of an engine.ServiceClient "
                             "(no run.json beside it); name its base with base_model=")
        return json.loads(run.read_text())["base_model"]

    def _from_state(self, path: Any, base_model: str | None, optimizer: Any, with_optimizer: bool) -> TrainingModel:
        check_optimizer(optimizer)
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise ValueError(f"path must be a folder that save_state wrote (a str or path-like), got {path!r}")
        folder = Path(os.fspath(path)).absolute()
        if not (folder / MARKER).is_file():
            raise FileNotFoundError(f"path {str(folder)!r} holds no training state ({MARKER}); pass the path "
                                    "save_state returned")
        lora = json.loads((folder / MARKER).read_text()).get("lora")
        if lora is None:
            raise ValueError(f"path {str(folder)!r} is a full-weight training state; engine.ServiceClient trains "
                             "LoRA adapters only")
        base_model = self._base_of(folder, "path") if base_model is None else base_model
        trainer = self._spawn(base_model, lora["rank"], lora["alpha"], lora["target_modules"], None)
        try:
            (trainer.load_state_with_optimizer if with_optimizer else trainer.load_state)(folder).result()
        except BaseException:
            self._trainers.remove(trainer)
            trainer.close()
            raise
        return trainer

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict[str, str] | None = None, optimizer: Any = None) -> ClientFuture:
        """Future of a ``TrainingModel`` training a LoRA adapter of ``rank`` (alpha = 2 *
        rank) on ``base_model`` with AdamW; ``seed`` draws its A matrices (None: 0)."""
        def create() -> TrainingModel:
            check_optimizer(optimizer)
            return self._spawn(base_model, rank, None, lora_targets(train_mlp, train_attn, train_unembed), seed)
        return self._submit(create)

    def create_training_client_from_state(self, path: str | os.PathLike, base_model: str | None = None,
                                          user_metadata: dict[str, str] | None = None,
                                          weights_access_token: str | None = None,
                                          optimizer: Any = None) -> ClientFuture:
        """Future of a training client holding the weights that ``save_state`` wrote at
        ``path`` (same LoRA configuration), its optimizer starting fresh. ``base_model``:
        the base to load them on (default: the one the state was trained on)."""
        return self._submit(self._from_state, path, base_model, optimizer, False)

    def create_training_client_from_state_with_optimizer(self, path: str | os.PathLike, base_model: str | None = None,
                                                         user_metadata: dict[str, str] | None = None,
                                                         weights_access_token: str | None = None) -> ClientFuture:
        """As ``create_training_client_from_state``, with the AdamW state and step counter too:
        training goes on bit-exactly as if never stopped."""
        return self._submit(self._from_state, path, base_model, None, True)

    # -- sampling clients -------------------------------------------------------------------------
    def create_sampling_client(self, model_path: str | os.PathLike | None = None, base_model: str | None = None,
                               retry_config: Any = None, record_stability_info: bool = False) -> ClientFuture:
        """Future of a ``SamplingClient`` of ``base_model``, or of the adapter that
        ``save_weights_for_sampler`` wrote at ``model_path`` (served per request by its
        base's sampler, sharing the base weights; ``base_model`` overrides that base)."""
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")

        def create() -> SamplingClient:
            if record_stability_info:
                raise ValueError("record_stability_info=True is not supported (this engine has no stable_reinforce)")
            if model_path is None:
                return SamplingClient(self._sampler(base_model), cleanup=_nothing)
            folder = Path(os.fspath(model_path)).absolute()
            if not (folder / "adapter_config.json").is_file():
                raise FileNotFoundError(f"model_path {str(folder)!r} holds no LoRA adapter (adapter_config.json); "
                                        "pass the path save_weights_for_sampler returned")
            base = self._base_of(folder, "model_path") if base_model is None else base_model
            return SamplingClient(self._sampler(base), adapter=str(folder), cleanup=_nothing)
        return self._submit(create)

    def get_server_capabilities(self) -> GetServerCapabilitiesResponse:
        """The served models, each trainable and sampleable, with its context length."""
        return GetServerCapabilitiesResponse([
            SupportedModel(model_name=name, max_context_length=load_config(path).max_position_embeddings,
                           trainable=True, sampleable=True) for name, path in self._paths.items()])

    # Tinker's ``_async`` forms: the client itself, awaited.
    async def create_lora_training_client_async(self, *args, **kwargs) -> TrainingModel:
        return await self.create_lora_training_client(*args, **kwargs)

    async def create_training_client_from_state_async(self, *args, **kwargs) -> TrainingModel:
        return await self.create_training_client_from_state(*args, **kwargs)

    async def create_training_client_from_state_with_optimizer_async(self, *args, **kwargs) -> TrainingModel:
        return await self.create_training_client_from_state_with_optimizer(*args, **kwargs)

    async def create_sampling_client_async(self, *args, **kwargs) -> SamplingClient:
        return await self.create_sampling_client(*args, **kwargs)

    async def get_server_capabilities_async(self) -> GetServerCapabilitiesResponse:
        return self.get_server_capabilities()

    # -- the end ----------------------------------------------------------------------------------
    def close(self, status: str = "success", detail: str | None = None) -> Future:
        """End the session (Tinker's ``close``): wait for the clients being made, then close
        every training client and sampler this client made; their futures fail from then on.
        ``status`` ("success", "errored", "interrupted") and ``detail`` are checked, then
        unused. A done future of None; a second close does nothing."""
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        done = Future()
        done.set_result(None)
        with self._lock:
            if self._closed:
                return done
            self._closed = True
        self._executor.shutdown(wait=True)
        for trainer in self._trainers:
            trainer.close()
        for sampler in self._samplers.values():
            sampler.close()
        self._trainers, self._samplers = [], {}
        return done

    def __enter__(self) -> "ServiceClient":
        if self._closed:
            raise RuntimeError("ServiceClient is closed")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        status = "success" if exc_type is None else "errored" if issubclass(exc_type, Exception) else "interrupted"
        self.close(status).result()


def _nothing() -> None:
    """A sampling client's cleanup when its engine is the base's shared sampler (closed with the service)."""
