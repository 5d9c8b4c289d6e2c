"""AReaL's ``InferenceEngine`` on the engine's ``InferenceModel`` (paged KV cache, in process).

``EngineInferenceEngine(config, model_path=...)`` is what AReaL's rollout side drives: its
workflows ``await engine.agenerate(ModelRequest)``, and ``submit`` / ``wait`` /
``rollout_batch`` / ``prepare_batch`` run them through AReaL's own ``WorkflowExecutor``
(staleness control, filtering, batching), exactly as its remote engines do. Imported
through ``engine.integrations.areal``.

One ``agenerate``, hop by hop:

1. Wait while generation is paused (``pause_generation``, as AReaL pauses around a
   weight update).
2. ``GenerationHyperparameters`` become the engine's ``SamplingParams``: ``max_new_tokens``
   (capped by ``max_tokens`` minus the prompt), ``greedy`` (temperature 0) or
   ``temperature``, ``top_k``, ``top_p``, and the stop set: ``stop_token_ids`` plus the
   request tokenizer's EOS unless ``ignore_eos``.
3. ``InferenceModel.sample`` runs the request with the others in flight; awaiting its
   future does not block the workflow's event loop.
4. ``ModelResponse``: output tokens, their logprobs under the distribution they were
   sampled from (temperature applied, as the trainer's ``config.temperature``), per token
   the AReaL weight version in effect when the sequence's first token was sampled, the stop
   reason ("stop" / "length"), latency and time to first token.

Weight versions: AReaL's version is this object's counter (``set_version``);
``update_weights_from_disk`` copies a Hugging Face folder's weights into the served model
between two decode steps and sets the version to ``meta.version`` (else one more).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import threading
import uuid
from typing import Any, Callable

from areal.api.cli_args import InferenceEngineConfig
from areal.api.engine_api import InferenceEngine
from areal.api.io_struct import ModelRequest, ModelResponse, WeightUpdateMeta
from areal.api.workflow_api import RolloutWorkflow
from areal.infra import WorkflowExecutor
from areal.infra.remote_inf_engine import GroupedRolloutWorkflow
from areal.utils import logging
from areal.utils.dynamic_import import import_from_string

from engine.infer.model import InferenceModel
from engine.infer.types import SamplingParams
from engine.models import load_model


def sampling_params(req: ModelRequest) -> SamplingParams:
    """The engine's SamplingParams for an AReaL request (step 2 of the module docstring)."""
    g = req.gconfig
    if g.n_samples != 1:
        raise ValueError(f"agenerate returns one sequence: gconfig.n_samples must be 1, got {g.n_samples} "
                         f"(AReaL workflows call agenerate once per sample)")
    if g.stop:
        raise ValueError(f"gconfig.stop (strings {g.stop!r}) is not supported; give gconfig.stop_token_ids")
    max_new = g.max_new_tokens
    if g.max_tokens is not None:
        max_new = min(max_new, g.max_tokens - len(req.input_ids))
    stop = list(g.stop_token_ids or [])
    eos = getattr(req.tokenizer, "eos_token_id", None)
    if eos is not None and not g.ignore_eos and eos not in stop:
        stop.append(eos)
    return SamplingParams(max_tokens=max(max_new, 0), temperature=0.0 if g.greedy else g.temperature,
                          top_k=g.top_k if g.top_k and g.top_k > 0 else -1, top_p=g.top_p, stop=stop)


class EngineInferenceEngine(InferenceEngine):
    """AReaL's InferenceEngine on the engine's sampler (see the module docstring).

    Args:
        config: AReaL's InferenceEngineConfig (the WorkflowExecutor's settings:
            ``max_concurrent_rollouts``, ``consumer_batch_size``, ``max_head_offpolicyness``...).
        model_path: a local Hugging Face folder to serve (or pass ``model`` to ``initialize``).
        **infer_kwargs: ``InferenceModel`` options (``max_batch_size``, ``kv_cache_tokens``,
            ``dtype``, ``device``...).
    """

    def __init__(self, config: InferenceEngineConfig, model_path: str | None = None, **infer_kwargs):
        self.config = config
        self.model_path = model_path
        self.infer_kwargs = infer_kwargs
        self.infer: InferenceModel | None = None
        self._version = 0
        self._versions: dict[int, int] = {}  # the InferenceModel's weight version -> AReaL's
        self._running = threading.Event()
        self._running.set()
        self._executor: WorkflowExecutor | None = None
        self._owns_model = False
        self.logger = logging.getLogger("EngineInferenceEngine")

    def initialize(self, engine_id: str | None = None, addr=None, train_data_parallel_size: int | None = None,
                   model=None):
        """Start the sampler on ``model`` (an ``InferenceModel``, or a loaded ``Transformer``
        to share, e.g. the trainer's) or on ``model_path``, then AReaL's WorkflowExecutor.
        ``addr`` is for remote servers and must be None."""
        if addr:
            raise ValueError(f"EngineInferenceEngine serves in process; addr must be None, got {addr!r}")
        if model is None and not self.model_path:
            raise ValueError("EngineInferenceEngine needs model_path= (a Hugging Face folder) or initialize(model=...)")
        source = self.model_path if model is None else model
        self._owns_model = not isinstance(source, InferenceModel)  # destroy() closes only a sampler of ours
        self.infer = InferenceModel(source, **self.infer_kwargs) if self._owns_model else source
        self._versions = {self.infer.version: self._version}
        self.engine_id = engine_id or uuid.uuid4().hex
        self._executor = WorkflowExecutor(config=self.config, inference_engine=self)
        self._executor.initialize(logger=self.logger, train_data_parallel_size=train_data_parallel_size or 1)
        return self

    @property
    def initialized(self) -> bool:
        return self.infer is not None

    def destroy(self):
        if self._executor is not None:
            self._executor.destroy()
            self._executor = None
        if self.infer is not None and self._owns_model:
            self.infer.close()
        self.infer = None

    @property
    def workflow_executor(self) -> WorkflowExecutor:
        if self._executor is None:
            raise RuntimeError("EngineInferenceEngine is not initialized: call initialize() first")
        return self._executor

    def _model(self) -> InferenceModel:
        if self.infer is None:
            raise RuntimeError("EngineInferenceEngine is not initialized: call initialize() first")
        return self.infer

    # -- generation --------------------------------------------------------------------------
    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        """Steps 1-4 of the module docstring."""
        while not self._running.is_set():
            await asyncio.sleep(0.01)
        params = sampling_params(req)
        out = await self._model().sample(list(req.input_ids), 1, params)
        seq = out.sequences[0]
        version = self._versions.get(seq.weight_version, self._version)
        return ModelResponse(input_tokens=list(req.input_ids), output_tokens=list(seq.tokens),
                             output_logprobs=[float(x) for x in seq.logprobs],
                             output_versions=[version] * len(seq.tokens), stop_reason=seq.stop_reason,
                             tokenizer=req.tokenizer, latency=out.metrics.get("latency_s", float("inf")),
                             ttft=out.metrics.get("time_to_first_token_s", float("inf")))

    def pause_generation(self):
        """New ``agenerate`` calls wait until ``continue_generation`` (sequences already in the
        engine go on; weight updates apply between two decode steps)."""
        self._running.clear()

    def continue_generation(self):
        self._running.set()

    # -- weights and versions ----------------------------------------------------------------
    def update_weights_from_disk(self, meta: WeightUpdateMeta) -> concurrent.futures.Future:
        """Load the Hugging Face folder ``meta.path`` (full weights, as ``EngineTrainEngine``
        writes them) into the served model between two steps; future of None. The version
        becomes ``meta.version``, else the current one plus 1; the folder is removed once
        read when ``meta.clear_checkpoint_after_load`` (AReaL's default)."""
        if meta.type != "disk" or not meta.path:
            raise ValueError(f"update_weights_from_disk needs WeightUpdateMeta(type='disk', path=folder), got "
                             f"type={meta.type!r} path={meta.path!r}")
        if meta.use_lora:
            raise ValueError("LoRA weight updates are not supported: serve the adapter folder with "
                             "InferenceModel(adapter=...)")
        infer = self._model()
        served = next(iter(infer.model.parameters())) if infer.model is not None else None
        fresh = load_model(meta.path, dtype=None if served is None else served.dtype,
                           device=None if served is None else served.device)
        if meta.clear_checkpoint_after_load:
            shutil.rmtree(meta.path, ignore_errors=True)
        version = meta.version if meta.version is not None else self._version + 1
        done: concurrent.futures.Future = concurrent.futures.Future()

        def finish(fut):
            try:
                engine_version = fut.result()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's future
                done.set_exception(e)
                return
            self._versions[engine_version] = version
            self._version = version
            done.set_result(None)

        infer.update_weights(fresh.state_dict()).future().add_done_callback(finish)
        return done

    def set_version(self, version: int) -> None:
        self._version = version
        if self.infer is not None:
            self._versions[self.infer.version] = version

    def get_version(self) -> int:
        return self._version

    # -- workflows (AReaL's WorkflowExecutor) --------------------------------------------------
    def _workflow(self, workflow, workflow_kwargs: dict | None, group_size: int) -> RolloutWorkflow:
        """A RolloutWorkflow instance, class (built with ``workflow_kwargs``) or dotted path."""
        if isinstance(workflow, str):
            workflow = import_from_string(workflow)
        if isinstance(workflow, type) and issubclass(workflow, RolloutWorkflow):
            workflow = workflow(**(workflow_kwargs or {}))
        if not isinstance(workflow, RolloutWorkflow):
            raise TypeError(f"workflow must be a RolloutWorkflow instance, class or dotted path, got {workflow!r}")
        return GroupedRolloutWorkflow(workflow, group_size, self.logger) if group_size > 1 else workflow

    @staticmethod
    def _accept_fn(fn: Callable | str | None) -> Callable | None:
        return import_from_string(fn) if isinstance(fn, str) else fn

    def submit(self, data: dict[str, Any], workflow, workflow_kwargs: dict | None = None,
               should_accept_fn: Callable | str | None = None, group_size: int = 1, task_id: int | None = None,
               is_eval: bool = False) -> int:
        return self.workflow_executor.submit(data, workflow=self._workflow(workflow, workflow_kwargs, group_size),
                                             should_accept_fn=self._accept_fn(should_accept_fn), task_id=task_id,
                                             is_eval=is_eval)

    def wait(self, count: int, timeout: float | None = None, raise_timeout: bool = True):
        return self.workflow_executor.wait(count, timeout=timeout, raise_timeout=raise_timeout)

    def wait_for_task(self, task_id: int, timeout: float | None = None, raise_timeout: bool = True):
        return self.workflow_executor.wait_for_task(task_id, timeout, raise_timeout)

    def rollout_batch(self, data: list[dict[str, Any]], workflow, workflow_kwargs: dict | None = None,
                      group_size: int = 1) -> list[dict[str, Any]]:
        return self.workflow_executor.rollout_batch(data=data,
                                                    workflow=self._workflow(workflow, workflow_kwargs, group_size))

    def prepare_batch(self, dataloader, workflow, workflow_kwargs: dict | None = None,
                      should_accept_fn: Callable | str | None = None, group_size: int = 1,
                      dynamic_bs: bool = False) -> list[dict[str, Any]]:
        return self.workflow_executor.prepare_batch(dataloader=dataloader,
                                                    workflow=self._workflow(workflow, workflow_kwargs, group_size),
                                                    should_accept_fn=self._accept_fn(should_accept_fn),
                                                    dynamic_bs=dynamic_bs)

    def pause(self):
        return self.workflow_executor.pause()

    def resume(self):
        return self.workflow_executor.resume()

    def export_stats(self) -> dict[str, float]:
        from areal.utils import stats_tracker
        return stats_tracker.export_all(reduce_group=None)

    def offload(self):
        """Nothing to offload: the sampler keeps its weights and KV cache."""

    def onload(self, tags: list[str] | None = None):
        """Nothing to onload (see ``offload``)."""
