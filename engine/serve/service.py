"""What the server serves: base models, sessions, training runs, sampling sessions.

Each ``--model NAME=PATH`` is loaded once (``ModelBuilder.shared_base()`` at tp=1): every
LoRA training client of that base and its one sampler (an ``InferenceModel`` serving the
base and, per request, any saved adapter folder) share those weights. A training run is a
``TrainingModel`` plus its :class:`SeqQueue`; a sampling session names a base and an
optional adapter folder (a snapshot: ``save_weights_for_sampler`` wrote it at that call).

Blocking work (loading a trainer, closing one) runs on one admin thread, so the event loop
keeps answering polls; engine calls return engine futures, awaited on the loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.api import AdamParams, Datum, ModelInput, TrainingModel
from engine.api import model as open_model
from engine.api.service import check_optimizer, lora_targets
from engine.models import load_config

from . import wire
from .checkpoints import CheckpointDir, check_name
from .futures import Futures, Reply, SeqQueue, json_reply, settle

_EPHEMERAL = "ephemeral-"  # sampler snapshots that only a sampling session names
_UNSUPPORTED_SAMPLE = ("topk_prompt_logprobs", "topk_sample_logprobs", "target_prompt_logprobs",
                       "prompt_alt_tokens_k", "prompt_logprobs_last_n", "record_stability_info")


@dataclass
class Base:
    """One served base model."""

    name: str
    path: Path
    builder: Any  # ModelBuilder with shared_base()
    sampler: Any  # InferenceModel
    context: int
    model_type: str
    eos: int | None


@dataclass
class Run:
    """One training client: ``model_id`` is ``<session>:train:<model_seq_id>`` (the SDK
    derives it too), ``folder`` its name under the checkpoint dir."""

    model_id: str
    session_id: str
    base: Base
    lora: dict
    queue: SeqQueue = field(default_factory=SeqQueue)
    requests: dict[int, str] = field(default_factory=dict)  # seq_id -> request id
    model: TrainingModel | None = None  # None while loading

    @property
    def folder(self) -> str:
        return self.model_id.replace(":", "_")


class Service:
    def __init__(self, models: dict[str, Path], *, checkpoint_dir: str | Path, max_batch_size: int, tp: int):
        self.checkpoints = CheckpointDir(checkpoint_dir)
        self.max_batch_size = max_batch_size
        self.tp = tp
        self.futures = Futures()
        self.bases: dict[str, Base] = {}
        self.sessions: dict[str, bool] = {}  # id -> finished
        self.runs: dict[str, Run] = {}
        self.samplers: dict[str, tuple[Base, Path | None, str | None]] = {}  # id -> base, adapter, uri
        self._completed: dict[str, list[tuple[str, str]]] = {}  # sampler id -> (request id, state), in order
        self._pending: dict[str, dict[str, concurrent.futures.Future]] = {}
        self._admin = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-serve-admin")
        for name, path in models.items():
            builder = open_model(path).tp(tp)
            builder = builder.shared_base() if tp == 1 else builder
            sampler = builder.spawn_inference(max_batch_size=max_batch_size, gpu_memory_fraction=0.3)
            tokenizer = sampler.tokenizer
            config = load_config(path)
            self.bases[name] = Base(name, Path(path).absolute(), builder, sampler, config.max_position_embeddings,
                                    config.model_type, getattr(tokenizer, "eos_token_id", None))

    async def _blocking(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._admin, fn, *args)

    def base(self, name: Any) -> Base:
        if name not in self.bases:
            raise ValueError(f"base_model {name!r} is not served; served: {sorted(self.bases)}")
        return self.bases[name]

    # -- sessions ---------------------------------------------------------------------------------
    def create_session(self) -> str:
        session_id = f"s{uuid.uuid4().hex[:12]}"
        self.sessions[session_id] = False
        return session_id

    async def finish_session(self, session_id: str) -> None:
        """Mark finished; its training runs end once their current call has, and the sampler
        snapshots of ``save_weights_and_get_sampling_client`` (named by no URI) are deleted."""
        self.sessions[session_id] = True
        for sampler_id in [k for k in self.samplers if k.startswith(f"{session_id}:")]:
            del self.samplers[sampler_id]
            self._completed.pop(sampler_id, None)
            self._pending.pop(sampler_id, None)
        for run in [r for r in self.runs.values() if r.session_id == session_id]:
            del self.runs[run.model_id]
            run.queue.close(f"session {session_id} finished")
            if run.model is not None:
                await self._blocking(run.model.close)
            folder = self.checkpoints.run_folder(run.folder) / "sampler_weights"
            for snapshot in folder.glob(f"{_EPHEMERAL}*") if folder.is_dir() else ():
                await self._blocking(shutil.rmtree, snapshot, True)

    # -- training runs ----------------------------------------------------------------------------
    def _reserve(self, session_id: Any, model_seq_id: Any, base_model: Any) -> Run:
        if self.sessions.get(session_id) is not False:
            raise ValueError(f"session_id {session_id!r} is not an open session of this server")
        if isinstance(model_seq_id, bool) or not isinstance(model_seq_id, int):
            raise ValueError(f"model_seq_id must be an int, got {model_seq_id!r}")
        model_id = f"{session_id}:train:{model_seq_id}"
        if model_id in self.runs:
            raise ValueError(f"model_seq_id {model_seq_id} was already used in session {session_id}")
        run = Run(model_id, session_id, self.base(base_model), {})
        self.runs[model_id] = run
        return run

    def _spawn(self, run: Run, lora: dict) -> TrainingModel:
        targets = lora_targets(lora.get("train_mlp", True), lora.get("train_attn", True),
                               lora.get("train_unembed", True))
        rank = lora.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora_config.rank must be a positive int, got {rank!r}")
        seed = 0 if lora.get("seed") is None else lora["seed"]  # None: the engine's fixed seed, as in-process
        builder = run.base.builder.with_adapter(rank=rank, target_modules=targets, seed=seed)
        return builder.spawn_train(self.max_batch_size, checkpoint_dir=self.checkpoints.root)

    def _start(self, run: Run, lora: dict, model: TrainingModel) -> None:
        run.lora, run.model = lora, model
        self.checkpoints.write_run(run.folder, {"base_model": run.base.name, "lora_config": lora,
                                                "model_id": run.model_id})

    def create_model(self, body: dict) -> str:
        async def create() -> Reply:
            run = self._reserve(body.get("session_id"), body.get("model_seq_id"), body.get("base_model"))
            try:
                lora = body.get("lora_config")
                if not isinstance(lora, dict):
                    raise ValueError("lora_config is missing; this server trains LoRA adapters only")
                check_optimizer(body.get("optimizer_config"))
                self._start(run, lora, await self._blocking(self._spawn, run, lora))
            except BaseException:
                self.runs.pop(run.model_id, None)
                raise
            return json_reply({"model_id": run.model_id, "type": "create_model"})
        return self.futures.run(create)

    def run(self, model_id: Any) -> Run:
        run = self.runs.get(model_id)
        if run is None or run.model is None:
            raise ValueError(f"model_id {model_id!r} is not a training client of this server (or is still loading)")
        return run

    def get_info(self, model_id: Any) -> dict:
        run = self.run(model_id)
        return {"type": "get_info", "model_id": run.model_id, "is_lora": True, "lora_rank": run.lora.get("rank"),
                "model_name": run.base.name, "optimizer_config": {"type": "adamw"},
                "model_data": {"arch": run.base.model_type, "model_name": run.base.name,
                               "tokenizer_id": str(run.base.path)}}

    def queued(self, body: dict, make: Callable[[Run], Reply | Any]) -> str:
        """A request id at once; ``make(run)`` (a coroutine of the reply) runs in the run's
        seq_id order. A request naming no known run fails its own future only."""
        try:
            run = self.run(body.get("model_id"))
        except ValueError as e:
            return self._failed(e)
        return self._enqueue(run, body.get("seq_id"), lambda: make(run))

    def _failed(self, error: Exception) -> str:
        request_id, fut = self.futures.new()
        fut.set_exception(error)
        return request_id

    def _enqueue(self, run: Run, seq_id: Any, work: Callable[[], Any]) -> str:
        """File ``work`` under ``seq_id``; a post of a seq_id already filed (the SDK retries a
        post whose answer it lost) gets that request's id back, and nothing runs twice."""
        known = run.requests.get(seq_id) if isinstance(seq_id, int) else None
        if known is not None:
            return known
        request_id, fut = self.futures.new()
        run.queue.submit(seq_id, fut, work)
        if not fut.done():
            run.requests[seq_id] = request_id
        return request_id

    def forward_backward(self, body: bytes, content_type: str, *, forward_only: bool = False) -> str:
        try:
            if wire.PROTOBUF not in content_type:
                raise ValueError(f"forward_backward body must be {wire.PROTOBUF}, got {content_type or 'none'!r}")
            call = wire.decode_forward_backward(body)
            run = self.run(call.model_id)
        except ValueError as e:
            return self._failed(e)

        async def work() -> Reply:
            data = [Datum(ModelInput(tokens), inputs) for tokens, inputs in call.data]
            method = run.model.forward if forward_only or call.forward_only else run.model.forward_backward
            out = await method(data, call.loss_fn, call.loss_fn_config)
            return wire.PROTOBUF, wire.encode_forward_backward_output(out.loss_fn_outputs, out.metrics)
        return self._enqueue(run, call.seq_id, work)

    def optim_step(self, body: dict) -> str:
        async def work(run: Run) -> Reply:
            params = body.get("adam_params")
            if not isinstance(params, dict):
                raise ValueError("optim_step needs adam_params; this server runs AdamW only")
            names = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
            out = await run.model.optim_step(AdamParams(**{k: params[k] for k in names if k in params}))
            # As in-process (``grad_norm``, ``step``...): the SDK combines no optim_step metrics.
            return json_reply({"type": "optim_step", "metrics": out.metrics})
        return self.queued(body, work)

    def save_weights(self, body: dict) -> str:
        async def work(run: Run) -> Reply:
            name = check_name(body.get("path"), what="save_state name")
            folder = self.checkpoints.folder(run.folder, "weights", name)
            if folder.exists() and not body.get("overwrite"):
                raise FileExistsError(f"checkpoint {self.checkpoints.uri(run.folder, 'weights', name)} exists")
            await run.model.save_state(folder)
            return json_reply({"type": "save_weights", "path": self.checkpoints.uri(run.folder, "weights", name)})
        return self.queued(body, work)

    def save_weights_for_sampler(self, body: dict) -> str:
        async def work(run: Run) -> Reply:
            name = body.get("path")
            session_seq = body.get("sampling_session_seq_id")
            if name is None:  # save_weights_and_get_sampling_client: a snapshot for a new sampling session
                if isinstance(session_seq, bool) or not isinstance(session_seq, int):
                    raise ValueError("save_weights_for_sampler needs a path or a sampling_session_seq_id")
                name = f"{_EPHEMERAL}{session_seq}"
            check_name(name, what="save_weights_for_sampler name")
            folder = self.checkpoints.folder(run.folder, "sampler_weights", name)
            if folder.exists():
                raise FileExistsError(f"checkpoint {self.checkpoints.uri(run.folder, 'sampler_weights', name)} exists")
            await run.model.save_weights_for_sampler(folder)
            uri = self.checkpoints.uri(run.folder, "sampler_weights", name)
            if body.get("path") is not None:
                return json_reply({"type": "save_weights_for_sampler", "path": uri})
            sampler_id = f"{run.session_id}:sample:{session_seq}"
            self.samplers[sampler_id] = (run.base, folder, uri)
            return json_reply({"type": "save_weights_for_sampler", "sampling_session_id": sampler_id})
        return self.queued(body, work)

    def load_weights(self, body: dict) -> str:
        if body.get("session_id") is None:  # into an existing training client, in its seq_id order
            async def into(run: Run) -> Reply:
                _, _, folder = self.checkpoints.resolve(body.get("path"), kind="weights")
                await (run.model.load_state_with_optimizer if body.get("optimizer") else run.model.load_state)(folder)
                return json_reply({"type": "load_weights", "path": body.get("path"), "model_id": run.model_id})
            return self.queued(body, into)

        async def create() -> Reply:  # a new training client, created from the state
            src_run, _, folder = self.checkpoints.resolve(body.get("path"), kind="weights")
            saved = self.checkpoints.read_run(src_run)
            if body.get("base_model") not in (None, saved["base_model"]):
                raise ValueError(f"base_model {body['base_model']!r} differs from the checkpoint's "
                                 f"{saved['base_model']!r}")
            run = self._reserve(body.get("session_id"), body.get("model_seq_id"), saved["base_model"])
            try:
                model = await self._blocking(self._spawn, run, saved["lora_config"])
                load = model.load_state_with_optimizer if body.get("optimizer") else model.load_state
                try:
                    await load(folder)
                except BaseException:
                    await self._blocking(model.close)
                    raise
                self._start(run, saved["lora_config"], model)
            except BaseException:
                self.runs.pop(run.model_id, None)
                raise
            return json_reply({"type": "load_weights", "path": body["path"], "model_id": run.model_id})
        return self.futures.run(create)

    # -- sampling ---------------------------------------------------------------------------------
    def create_sampling_session(self, body: dict) -> str:
        session_id, seq = body.get("session_id"), body.get("sampling_session_seq_id")
        if self.sessions.get(session_id) is not False:
            raise ValueError(f"session_id {session_id!r} is not an open session of this server")
        sampler_id = f"{session_id}:sample:{seq}"
        self.samplers[sampler_id] = self._sampler_target(body.get("base_model"), body.get("model_path"))
        return sampler_id

    def _sampler_target(self, base_model: Any, model_path: Any) -> tuple[Base, Path | None, str | None]:
        if model_path is None:
            if base_model is None:
                raise ValueError("name a base_model or a model_path to sample from")
            return self.base(base_model), None, None
        run, _, folder = self.checkpoints.resolve(model_path, kind="sampler_weights")
        saved = self.checkpoints.read_run(run)
        if base_model not in (None, saved["base_model"]):
            raise ValueError(f"base_model {base_model!r} differs from {model_path!r}'s {saved['base_model']!r}")
        return self.base(saved["base_model"]), folder, model_path

    def get_sampler(self, sampler_id: str) -> dict:
        if sampler_id not in self.samplers:
            raise KeyError(sampler_id)
        base, _, uri = self.samplers[sampler_id]
        return {"sampler_id": sampler_id, "base_model": base.name, "model_path": uri}

    def sample(self, body: dict) -> dict:
        num_samples = body.get("num_samples", 1)
        request_id, fut = self.futures.new()
        self._track(body.get("sampling_session_id"), request_id, fut)
        reply = {"request_id": request_id,
                 "sample_sequence_ids": [f"{request_id}:{i}" for i in range(num_samples if isinstance(num_samples, int)
                                                                           else 0)]}
        try:
            if body.get("sampling_session_id") is not None:
                if body["sampling_session_id"] not in self.samplers:
                    raise ValueError(f"sampling_session_id {body['sampling_session_id']!r} is not a sampling "
                                     "session of this server")
                base, adapter, _ = self.samplers[body["sampling_session_id"]]
            else:
                base, adapter, _ = self._sampler_target(body.get("base_model"), body.get("model_path"))
            asked = [k for k in _UNSUPPORTED_SAMPLE if body.get(k)]
            if asked:
                raise ValueError(f"{', '.join(asked)}: not supported by this server")
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
            tokens = wire.model_input_tokens(body.get("prompt"), where="prompt")
            params = wire.sampling_params(body.get("sampling_params"), prompt_len=len(tokens), context=base.context,
                                          eos=base.eos)
        except ValueError as e:
            fut.set_exception(e)
            return reply
        engine_future = base.sampler.sample(tokens, num_samples, params, adapter=adapter,
                                            include_prompt_logprobs=bool(body.get("prompt_logprobs")))

        async def work() -> Reply:
            return wire.PROTOBUF, wire.encode_sample_response(await engine_future)
        asyncio.get_running_loop().create_task(settle(fut, work))
        return reply

    def _track(self, sampler_id: Any, request_id: str, fut: concurrent.futures.Future) -> None:
        """Record the completion order of a sampling session's requests (retrieve_futures)."""
        if not isinstance(sampler_id, str):
            return
        done = self._completed.setdefault(sampler_id, [])
        pending = self._pending.setdefault(sampler_id, {})
        pending[request_id] = fut

        def finished(f: concurrent.futures.Future) -> None:
            pending.pop(request_id, None)
            done.append((request_id, "failed" if f.exception() is not None else "finished"))
        fut.add_done_callback(finished)

    def completions(self, sampler_id: Any) -> tuple[list[tuple[str, str]], list[concurrent.futures.Future]]:
        """A sampling session's completed requests in order, and its pending futures."""
        return list(self._completed.get(sampler_id, [])), list(self._pending.get(sampler_id, {}).values())

    # -- shutdown ---------------------------------------------------------------------------------
    def stop(self, message: str) -> None:
        """Fail every pending request with ``message``; nothing new starts."""
        self.futures.stop(message)
        for run in self.runs.values():
            run.queue.close(message)

    def close(self) -> None:
        """End the engines (each trainer's current call ends first: a save is never cut)."""
        self._admin.shutdown(wait=True)
        for run in self.runs.values():
            if run.model is not None:
                run.model.close()
        for base in self.bases.values():
            base.sampler.close()

