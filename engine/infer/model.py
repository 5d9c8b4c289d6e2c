"""InferenceModel: a sampling client over the paged-KV-cache engine.

The public API and the engine thread. Callers on any thread or event loop get a
:class:`Future` at once; their requests and commands go through a queue to one background
thread, which owns the engine core (core.py: schedule -> launch -> collect -> update, one
step at a time, the step at tp=1 in flight on the device while the next is planned) and
runs commands (weight updates, calls) between two steps, with no step in flight. A bad
request fails its own future and the engine keeps serving the others.
"""
from __future__ import annotations

import itertools
import queue
import threading
import traceback
from numbers import Real
from pathlib import Path
from typing import Iterable

import torch

from engine.parallel import tp_group

from .core import EngineCore
from .runner import LocalExecutor, follow_shard, open_executor
from .scheduler import Request
from .types import Future, SampleResponse, SamplingParams


class InferenceModel:
    """Serve a model: ``sample``, ``compute_logprobs``, ``update_weights``.

    Args:
        model_or_path: a loaded ``Transformer`` (shared, not copied: in-place weight
            updates are seen by the next step) or a Hugging Face checkpoint folder.
        tp: tensor-parallel degree; tp > 1 (a checkpoint folder) runs one worker process
            per rank (runner.py): each holds its shard and its share of the KV cache, and
            the scheduler stays in this process. ``model_or_path`` may also be the
            ``WorkerPool`` of a tensor-parallel trainer (each rank's state has a ``model``):
            the ranks then serve the shards they train, shared, not copied.
        max_batch_size: token budget of one step (prefill chunks + decoding tokens).
        dtype, device: when loading from a path.
        tokenizer: optional, with ``encode``/``decode``: enables string stop sequences, and
            ``stop=None`` stops at its EOS token.
        base_model: the name ``get_base_model()`` answers (default: the checkpoint folder,
            or None for a loaded model).
        block_size: tokens per KV-cache block.
        kv_cache_tokens: cache size in tokens; default: on CUDA ``gpu_memory_fraction`` of
            the free memory, elsewhere 4 x max_batch_size.
        max_adapters: slots of the adapter pool (requests naming more distinct adapters at
            once wait for a slot).
        adapter: PEFT adapter folder served to requests that name none (a sampling client
            of a trained adapter); read and checked here, so a bad one fails the construction.
            A request is served the version of its adapter's files current when it is
            admitted, to its end (adapters.py: an adapter re-saved to its folder is reloaded).
        use_cuda_graphs: on CUDA, replay captured graphs for decode-only steps, with or
            without per-request adapters (cuda_graphs.py; each graph captured on the first
            step of its batch size). Ignored elsewhere and, for now, under tensor parallelism.
    """

    def __init__(self, model_or_path, *, max_batch_size: int = 2048, dtype: torch.dtype | None = None, device=None,
                 tokenizer=None, block_size: int = 16, kv_cache_tokens: int | None = None,
                 gpu_memory_fraction: float = 0.9, max_adapters: int = 16, adapter=None,
                 use_cuda_graphs: bool = True, tp: int = 1, base_model: str | None = None):
        sizes = dict(max_batch_size=max_batch_size, tp=tp, block_size=block_size, max_adapters=max_adapters,
                     kv_cache_tokens=1 if kv_cache_tokens is None else kv_cache_tokens)
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(gpu_memory_fraction, Real) or not 0 < gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction!r}")
        executor = open_executor(model_or_path, tp=tp, dtype=dtype, device=device, max_batch_size=max_batch_size,
                                 block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                                 gpu_memory_fraction=gpu_memory_fraction, use_cuda_graphs=use_cuda_graphs)
        self._core = EngineCore(executor, max_batch_size=max_batch_size, max_adapters=max_adapters,
                                tokenizer=tokenizer)
        if adapter is not None:
            try:
                adapter = self._core.adapters.check(adapter)
            except Exception:
                executor.close()  # a tensor-parallel pool of our own ends here too
                raise
        self.config = executor.config
        local = isinstance(executor, LocalExecutor)
        self.tp = 1 if local else executor.tp
        self.model = executor.runner.model if local else None  # None: the shards live in the rank processes
        self.tokenizer = tokenizer
        self.base_model = base_model if base_model is not None or not isinstance(model_or_path, (str, Path)) \
            else str(model_or_path)
        self.cache = executor.blocks  # the host view: block ids and allocator
        self.scheduler = self._core.scheduler
        self.stats = self._core.stats
        self.max_batch_size = max_batch_size
        self.max_adapters = max_adapters
        self.default_adapter = adapter
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # orders close() against calls that queue work
        self._thread = threading.Thread(target=self._loop, name="engine-infer", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        """The weight version (bumped by each ``update_weights``)."""
        return self._core.version

    # ------------------------------------------------------------------ public API

    def sample(self, prompt, num_samples: int = 1, sampling_params: SamplingParams | dict | None = None,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, *, adapter=None) -> Future:
        """Future of a :class:`SampleResponse` with ``num_samples`` continuations of ``prompt``
        (list of ids, or an object with ``to_ints()``); ``sampling_params``: a SamplingParams
        or a dict of its fields; ``adapter``: a PEFT adapter folder."""
        return self._submit(prompt, num_samples, sampling_params or SamplingParams(), adapter,
                            include_prompt_logprobs=include_prompt_logprobs, topk_prompt_logprobs=topk_prompt_logprobs)

    def compute_logprobs(self, prompt, *, adapter=None) -> Future:
        """Future of the prompt's per-token logprobs (temperature 1): a list, None at 0."""
        return self._submit(prompt, 1, SamplingParams(max_tokens=0), adapter, include_prompt_logprobs=True,
                            logprobs_only=True)

    async def sample_async(self, *args, **kwargs) -> SampleResponse:
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, *args, **kwargs) -> list:
        return await self.compute_logprobs(*args, **kwargs)

    def get_tokenizer(self):
        """The tokenizer given at construction (Tinker's SamplingClient.get_tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("this sampling client has no tokenizer (its checkpoint folder ships none; "
                             "pass tokenizer= to InferenceModel)")
        return self.tokenizer

    def get_base_model(self) -> str:
        """The name of the base model this client samples (Tinker's SamplingClient.get_base_model)."""
        if self.base_model is None:
            raise ValueError("this sampling client was made from a loaded model without a name; "
                             "pass base_model= to InferenceModel")
        return self.base_model

    async def get_base_model_async(self) -> str:
        return self.get_base_model()

    def update_weights(self, state_dict: dict[str, torch.Tensor] | Iterable | None = None) -> Future:
        """Copy ``state_dict`` (names as in ``model.state_dict()``; pairs accepted) into the
        model in place between two steps and bump the weight version; with no argument,
        only bump it (the weights were changed in place by their owner, e.g. a trainer that
        shares them). Future of the new version. Sequences in flight keep their cached
        keys/values; tokens sampled after the update use the new weights."""
        fut = Future()
        if not self._queue(("update", state_dict, fut)):
            fut.set_exception(RuntimeError("InferenceModel is closed"))
        return fut

    def run_between_steps(self, fn) -> Future:
        """Run ``fn()`` on the engine's thread between two steps (no step is in flight);
        future of its result. A trainer sharing this model's weights runs its work this way,
        so a decode step never sees half-updated weights."""
        fut = Future()
        if self._queue(("call", fn, fut)):
            return fut
        self._thread.join()  # closed: no step will run again, so fn runs here
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - delivered to the caller
            fut.set_exception(e)
        return fut

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:  # a call queued before this runs before the engine stops
            if self._closed:
                return
            self._closed = True
            self._inbox.put(("close",))
        self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _submit(self, prompt, num_samples, params, adapter, **options) -> Future:
        fut = Future()
        try:
            if self._closed:
                raise RuntimeError("InferenceModel is closed")
            req = Request.create(next(self._ids), prompt, num_samples, params, fut, config=self.config,
                                 capacity_tokens=self.cache.capacity_tokens, tokenizer=self.tokenizer,
                                 adapter=self.default_adapter if adapter is None else adapter, **options)
        except Exception as e:  # noqa: BLE001 - handed to the caller's future
            fut.set_exception(e)
            return fut
        if not self._queue(("request", req)):
            fut.set_exception(RuntimeError("InferenceModel is closed"))
        return fut

    def _queue(self, item: tuple) -> bool:
        """Queue ``item`` for the engine thread unless the engine is closed (False): checked
        and queued under the lock, so nothing is queued after close's own message."""
        with self._lock:
            if not self._closed:
                self._inbox.put(item)
                return True
        return False

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        """Serve until closed; then, or if the thread fails, fail every future not answered
        (admitted, waiting for an adapter, or still queued) and close the executor."""
        err = RuntimeError("InferenceModel was closed")
        try:
            self._serve()
        except BaseException as e:
            err = RuntimeError(f"the inference engine stopped: {e!r}\n{traceback.format_exc()}")
            raise
        finally:
            with self._lock:
                self._closed = True
            self._core.fail_all(err)
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item[0] != "close":
                    (item[1].future if item[0] == "request" else item[2]).set_exception(err)
            self._core.executor.close()

    def _serve(self) -> None:
        core = self._core
        while True:
            waiting = bool(core.adapters.waiting)  # polled: a slot frees when a request ends
            try:
                item = self._inbox.get(block=not core.busy and not waiting,
                                       timeout=None if core.busy or not waiting else 0.01)
            except queue.Empty:
                item = None
            while item is not None:
                if item[0] != "request":
                    core.drain()  # commands run with no step in flight
                if item[0] == "close":
                    return
                self._handle(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            try:
                core.admit()
                if core.busy:
                    core.step()
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                core.fail_all(RuntimeError(f"inference step failed: {e!r}\n{traceback.format_exc()}"))

    def _handle(self, item) -> None:
        if item[0] == "request":
            self._core.add(item[1])
            return
        _, arg, fut = item
        try:
            fut.set_result(arg() if item[0] == "call" else self._core.update_weights(arg))
        except BaseException as e:  # noqa: BLE001 - delivered to the caller
            fut.set_exception(e)


def serve_tp(model, *, max_batch_size: int = 2048, block_size: int = 16, kv_cache_tokens: int | None = None,
             gpu_memory_fraction: float = 0.9, use_cuda_graphs: bool = True, **kwargs) -> InferenceModel | None:
    """Serve a tensor-parallel model from ranks that torchrun launched: every rank calls this
    with its shard (``engine.parallel.load_tp_model(path, ctx.group)``) and the same
    arguments. Rank 0 gets the InferenceModel, whose scheduler drives every rank
    (``runner.SPMDExecutor``); the other ranks serve it (``runner.follow_shard``) and return
    None once rank 0 closes it. Every rank then ends with ``engine.parallel.shutdown()``."""
    group = tp_group(model)
    if group is None:
        raise ValueError("serve_tp needs a tensor-parallel shard (load_tp_model(path, group)); "
                         "serve a plain model with InferenceModel(model)")
    sizes = dict(max_batch_size=max_batch_size, block_size=block_size, kv_cache_tokens=kv_cache_tokens,
                 gpu_memory_fraction=gpu_memory_fraction, use_cuda_graphs=use_cuda_graphs)
    if torch.distributed.get_rank(group) == 0:
        return InferenceModel(model, **sizes, **kwargs)
    follow_shard(model, **sizes)
    return None
