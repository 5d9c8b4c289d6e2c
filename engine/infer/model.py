"""InferenceModel: a sampling client over the paged-KV-cache engine.

One background thread owns the model and the cache and runs the loop: take new requests
and commands, schedule a step (continuous batching, chunked prefill, preemption: see
scheduler.py), launch it (forward.py, sampling.py), then finish the step before it: hand
its tokens to their sequences and finished requests their results. At tp=1 one step is
thus in flight on the device while the host plans the next (``_step``). Callers on any
thread or event loop get a :class:`Future` at once; a bad request fails its own future and
the engine keeps serving the others.
"""
from __future__ import annotations

import itertools
import queue
import random
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from engine.models import Transformer, adapter_tensors, load_config, load_model, read_peft_adapter
from engine.parallel import WorkerPool, check_tp

from .runner import LocalExecutor, SPMDExecutor, StepRunner, StepSpec, TPExecutor, follow
from .sampling import derive_seed
from .scheduler import Request, Scheduler, Seq
from .types import Future, SampledSequence, SampleResponse, SamplingParams


@dataclass
class _Launched:
    """A step whose device work is queued: the executor's handle, what to do with its
    results (scored prompt chunks; per sampled sequence the position of its placeholder
    token, or None: append; max_tokens=0 requests that end with it), the weight version it
    ran with, and whether it may stay in flight while the next step is launched."""

    handle: Any
    scored: list
    owners: list[tuple[Seq, int | None]]
    zero: list[Seq]
    version: int
    deferred: bool


def _as_ints(prompt: Any) -> list[int]:
    if hasattr(prompt, "to_ints"):
        prompt = prompt.to_ints()
    elif hasattr(prompt, "chunks"):
        prompt = [t for c in prompt.chunks for t in c.tokens]
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise ValueError(f"prompt must be a list of token ids or an object with to_ints(), got {type(prompt).__name__}")
    out = []
    for t in prompt:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise ValueError(f"prompt holds {t!r}, not a token id")
        out.append(t.__index__())
    return out


def _runner_kwargs(max_batch_size, block_size, kv_cache_tokens, gpu_memory_fraction, use_cuda_graphs,
                   on_cuda: bool) -> dict:
    """StepRunner's arguments; off CUDA the KV cache defaults to 4 x max_batch_size tokens."""
    if kv_cache_tokens is None and not on_cuda:
        kv_cache_tokens = 4 * max_batch_size
    return dict(block_size=block_size, kv_cache_tokens=kv_cache_tokens, gpu_memory_fraction=gpu_memory_fraction,
                use_cuda_graphs=use_cuda_graphs)


def serve_tp(model, *, max_batch_size: int = 2048, block_size: int = 16, kv_cache_tokens: int | None = None,
             gpu_memory_fraction: float = 0.9, use_cuda_graphs: bool = True, **kwargs) -> "InferenceModel | None":
    """Serve a tensor-parallel model from ranks that torchrun launched: every rank calls this
    with its shard (``engine.parallel.load_tp_model(path, ctx.group)``) and the same
    arguments. Rank 0 gets the InferenceModel, whose scheduler drives every rank; the other
    ranks serve it and return None once rank 0 closes it."""
    if getattr(model, "tp_group", None) is None:
        raise ValueError("serve_tp needs a tensor-parallel shard (load_tp_model(path, group)); "
                         "serve a plain model with InferenceModel(model)")
    if torch.distributed.get_rank(model.tp_group) == 0:
        return InferenceModel(model, max_batch_size=max_batch_size, block_size=block_size,
                              kv_cache_tokens=kv_cache_tokens, gpu_memory_fraction=gpu_memory_fraction,
                              use_cuda_graphs=use_cuda_graphs, **kwargs)
    on_cuda = model.embed.weight.device.type == "cuda"
    follow(StepRunner(model, **_runner_kwargs(max_batch_size, block_size, kv_cache_tokens, gpu_memory_fraction,
                                              use_cuda_graphs, on_cuda)), model.tp_group)
    return None


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
        tokenizer: optional, with ``encode``/``decode``: enables string stop sequences.
        block_size: tokens per KV-cache block.
        kv_cache_tokens: cache size in tokens; default: on CUDA ``gpu_memory_fraction`` of
            the free memory, elsewhere 4 x max_batch_size.
        max_adapters: slots of the adapter pool (requests naming more distinct adapters at
            once wait for a slot).
        adapter: PEFT adapter folder served to requests that name none (a sampling client
            of a trained adapter).
        use_cuda_graphs: on CUDA, replay captured graphs for decode-only steps, with or
            without per-request adapters (cuda_graphs.py; each graph captured on the first
            step of its batch size). Ignored elsewhere and, for now, under tensor parallelism.
    """

    def __init__(self, model_or_path, *, max_batch_size: int = 2048, dtype: torch.dtype | None = None, device=None,
                 tokenizer=None, block_size: int = 16, kv_cache_tokens: int | None = None,
                 gpu_memory_fraction: float = 0.9, max_adapters: int = 16, adapter=None,
                 use_cuda_graphs: bool = True, tp: int = 1):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int (tokens per step), got {max_batch_size!r}")
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive int, got {tp!r}")
        runner_kwargs = _runner_kwargs(max_batch_size, block_size, kv_cache_tokens, gpu_memory_fraction,
                                       use_cuda_graphs, torch.cuda.is_available())
        if isinstance(model_or_path, WorkerPool):  # a tensor-parallel trainer's ranks
            executor = TPExecutor.attach(model_or_path, **runner_kwargs)
        elif isinstance(model_or_path, (str, Path)) and tp > 1:
            check_tp(load_config(model_or_path), tp)
            executor = TPExecutor.spawn(model_or_path, tp, dtype=dtype, **runner_kwargs)
        else:
            if tp > 1:
                raise ValueError(f"tp={tp} needs a checkpoint folder (each rank loads its own shard), not a model")
            model = model_or_path
            if isinstance(model_or_path, (str, Path)):
                model = load_model(model_or_path, dtype=dtype, device=device)
            runner = StepRunner(model, **_runner_kwargs(max_batch_size, block_size, kv_cache_tokens,
                                                        gpu_memory_fraction, use_cuda_graphs,
                                                        model.embed.weight.device.type == "cuda"))
            group = getattr(model, "tp_group", None)
            executor = LocalExecutor(runner) if group is None else SPMDExecutor(runner, group)  # see serve_tp
        self._executor = executor
        self.config = executor.config
        local = isinstance(executor, LocalExecutor)
        self.tp = 1 if local else executor.tp
        self.model = executor.runner.model if local else None  # None: the shards live in the rank processes
        self.tokenizer = tokenizer
        self.cache = executor.blocks  # the host view: block ids and allocator
        self.scheduler = Scheduler(self.cache, max_batch_size)
        self._shapes = None  # a meta-device model: checks updates and adapters before they reach the ranks
        self.max_batch_size = max_batch_size
        self.max_adapters = max_adapters
        self.default_adapter = adapter
        self.version = 0
        self._adapters: list[str] = []  # slot -> resolved adapter path
        self._deferred: list[Request] = []  # requests waiting for an adapter slot
        self._inflight: _Launched | None = None  # the step launched and not yet finished
        self._active: dict[int, Request] = {}
        self._ids = itertools.count()
        self._inbox: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # orders close() against calls that queue work
        self.stats = {"steps": 0, "overlapped_steps": 0, "preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="engine-infer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def sample(self, prompt, num_samples: int = 1, sampling_params: SamplingParams | None = None, *,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, adapter=None) -> Future:
        """Future of a :class:`SampleResponse` with ``num_samples`` continuations of ``prompt``
        (list of ids, or an object with ``to_ints()``); ``adapter``: a PEFT adapter folder."""
        fut = Future()
        adapter = self.default_adapter if adapter is None else adapter
        try:
            req = self._make_request(prompt, num_samples, sampling_params or SamplingParams(), fut,
                                     include_prompt_logprobs, topk_prompt_logprobs, adapter, False)
        except Exception as e:  # noqa: BLE001 - handed to the caller's future
            fut._set_exception(e)
            return fut
        self._inbox.put(("request", req))
        return fut

    def compute_logprobs(self, prompt, *, adapter=None) -> Future:
        """Future of the prompt's per-token logprobs (temperature 1): a list, None at 0."""
        fut = Future()
        adapter = self.default_adapter if adapter is None else adapter
        try:
            req = self._make_request(prompt, 1, SamplingParams(max_tokens=0), fut, True, 0, adapter, True)
        except Exception as e:  # noqa: BLE001
            fut._set_exception(e)
            return fut
        self._inbox.put(("request", req))
        return fut

    async def sample_async(self, *args, **kwargs) -> SampleResponse:
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, *args, **kwargs) -> list:
        return await self.compute_logprobs(*args, **kwargs)

    def update_weights(self, state_dict: dict[str, torch.Tensor] | Iterable | None = None) -> Future:
        """Copy ``state_dict`` (names as in ``model.state_dict()``; pairs accepted) into the
        model in place between two steps and bump the weight version; with no argument,
        only bump it (the weights were changed in place by their owner, e.g. a trainer that
        shares them). Future of the new version. Sequences in flight keep their cached
        keys/values; tokens sampled after the update use the new weights."""
        fut = Future()
        with self._lock:
            if self._closed:
                fut._set_exception(RuntimeError("InferenceModel is closed"))
            else:
                self._inbox.put(("update", state_dict, fut))
        return fut

    def run_between_steps(self, fn) -> Future:
        """Run ``fn()`` on the engine's thread between two steps (no step is in flight);
        future of its result. A trainer sharing this model's weights runs its work this way,
        so a decode step never sees half-updated weights."""
        fut = Future()
        with self._lock:
            if not self._closed:
                self._inbox.put(("call", fn, fut))
                return fut
        self._thread.join()  # closed: no step will run again, so fn runs here
        try:
            fut._set_result(fn())
        except BaseException as e:  # noqa: BLE001 - delivered to the caller
            fut._set_exception(e)
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

    # ------------------------------------------------------------------ validation

    def _make_request(self, prompt, num_samples, params, fut, include_prompt_logprobs, topk, adapter, logprobs_only):
        if self._closed:
            raise RuntimeError("InferenceModel is closed")
        tokens = _as_ints(prompt)
        if not tokens:
            raise ValueError("prompt is empty; it needs at least one token")
        vocab = self.config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt holds token id {bad[0]}, outside the vocabulary [0, {vocab})")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        p = params
        if not isinstance(p.max_tokens, int) or p.max_tokens < 0:
            raise ValueError(f"sampling_params.max_tokens must be a non-negative int, got {p.max_tokens!r}")
        ctx = self.config.max_position_embeddings
        if len(tokens) + p.max_tokens > ctx:
            raise ValueError(f"prompt ({len(tokens)} tokens) + max_tokens ({p.max_tokens}) exceeds the model's "
                             f"context of {ctx} tokens")
        if len(tokens) + p.max_tokens > self.cache.capacity_tokens:
            raise ValueError(f"prompt ({len(tokens)} tokens) + max_tokens ({p.max_tokens}) exceeds the KV cache "
                             f"({self.cache.capacity_tokens} tokens); raise kv_cache_tokens")
        if not p.temperature >= 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {p.temperature!r}")
        if not 0 < p.top_p <= 1:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {p.top_p!r}")
        if not isinstance(p.top_k, int):
            raise ValueError(f"sampling_params.top_k must be an int (-1: all), got {p.top_k!r}")
        if not isinstance(topk, int) or topk < 0:
            raise ValueError(f"topk_prompt_logprobs must be a non-negative int, got {topk!r}")
        stops = [] if p.stop is None else [p.stop] if isinstance(p.stop, (int, str)) else list(p.stop)
        stop_ids = frozenset(s for s in stops if isinstance(s, int) and not isinstance(s, bool))
        stop_strings = tuple(s for s in stops if isinstance(s, str))
        if len(stop_ids) + len(stop_strings) != len(stops):
            raise ValueError(f"sampling_params.stop must hold token ids or strings, got {p.stop!r}")
        if stop_strings and self.tokenizer is None:
            raise ValueError("sampling_params.stop holds strings but this model has no tokenizer; pass token ids")
        if adapter is not None:
            path = Path(adapter)
            if not path.is_dir():
                raise FileNotFoundError(f"adapter {str(adapter)!r}: no such folder (expected a PEFT adapter folder)")
            adapter = str(path.resolve())
        seed = p.seed if p.seed is not None else random.getrandbits(63)
        seeds = [derive_seed(int(seed), i) for i in range(num_samples)]
        return Request(id=next(self._ids), prompt=tokens, num_samples=num_samples, params=p, stop_ids=stop_ids,
                       stop_strings=stop_strings, seeds=seeds, future=fut,
                       include_prompt_logprobs=include_prompt_logprobs, topk_prompt_logprobs=topk,
                       adapter=adapter, logprobs_only=logprobs_only, submitted=time.perf_counter())

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            busy = not self.scheduler.idle or self._inflight is not None
            try:
                item = self._inbox.get(block=not busy and not self._deferred,
                                       timeout=None if busy or not self._deferred else 0.01)
            except queue.Empty:
                item = None
            while item is not None:
                if item[0] != "request":
                    self._finish_inflight()  # commands run with no step in flight
                if item[0] == "close":
                    self._fail_all(RuntimeError("InferenceModel was closed"))
                    self._executor.close()
                    return
                self._handle(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            self._admit_deferred()
            if self.scheduler.idle:
                continue
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug must not kill the server
                err = RuntimeError(f"inference step failed: {e!r}\n{traceback.format_exc()}")
                self._fail_all(err)

    def _handle(self, item) -> None:
        if item[0] == "request":
            self._deferred.append(item[1])
        elif item[0] == "call":
            _, fn, fut = item
            try:
                fut._set_result(fn())
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut._set_exception(e)
        elif item[0] == "update":
            _, state, fut = item
            try:
                if state is not None:
                    self._copy_weights(state)
                self.version += 1
                fut._set_result(self.version)
            except Exception as e:  # noqa: BLE001
                fut._set_exception(e)

    def _copy_weights(self, state) -> None:
        items = list(state.items() if isinstance(state, dict) else state)
        if self.model is None:  # check here: an error raised on a rank would stop the pool
            own = {n: p.shape for n, p in self._shape_model().state_dict().items()}
            for name, value in items:
                if name not in own:
                    raise KeyError(f"update_weights: {name!r} is not a weight of the model")
                if tuple(own[name]) != tuple(value.shape):
                    raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, the model's "
                                     f"{tuple(own[name])}")
        self._executor.copy_weights(items)

    def _shape_model(self) -> Transformer:
        """The unsharded model on the meta device (shapes only, no memory)."""
        if self._shapes is None:
            with torch.device("meta"):
                self._shapes = Transformer(self.config)
        return self._shapes

    def _admit_deferred(self) -> None:
        still = []
        for req in self._deferred:
            try:
                if req.adapter is not None and req.adapter not in self._adapters and not self._load_adapter(req.adapter):
                    still.append(req)  # no free slot yet
                    continue
            except Exception as e:  # noqa: BLE001 - unreadable adapter: this request only
                req.future._set_exception(ValueError(f"adapter {req.adapter!r} could not be loaded: {e}"))
                continue
            self._active[req.id] = req
            self.scheduler.add(Seq(req=req, index=0, fork=req.num_samples, tokens=list(req.prompt)))
        self._deferred = still

    def _load_adapter(self, path: str) -> bool:
        # Validate first (names and shapes against the unsharded model): an error leaves the
        # pool as it was, and under tensor parallelism never reaches the ranks.
        adapter_tensors(self._shape_model(), *read_peft_adapter(path))
        slots = list(self._adapters)
        if len(slots) >= self.max_adapters:
            used = {r.adapter for r in self._active.values()}
            free = [i for i, a in enumerate(slots) if a not in used]
            if not free:
                return False
            slots[free[0]] = path
        else:
            slots.append(path)
        self._finish_inflight()  # the step in flight may still read the old stacks
        self._executor.set_adapters(slots)
        self._adapters = slots
        return True

    def _fail_all(self, err: Exception) -> None:
        self._inflight = None
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._drop(seq)
        for req in list(self._active.values()) + self._deferred:
            req.future._set_exception(err)
        self._active.clear()
        self._deferred = []

    def _step(self) -> None:
        """Schedule and launch one step, then finish the step launched before it.

        At tp=1 a step is launched before the previous one is finished: its decode rows take
        their input token from the previous step's draws on the device (a placeholder on
        the host until then), so the host schedules and builds step n+1 while the device
        still runs step n, and only then waits for step n's tokens. A sequence that step n
        ends (a stop token) has computed one token too many in step n+1, which is dropped.
        Steps that fork samples are finished at once (the clones join the next step)."""
        plan = self.scheduler.schedule()
        self.stats["preemptions"] = self.scheduler.num_preemptions
        if not plan:
            self._finish_inflight()
            return
        launched = self._launch(plan)
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            self._finish(previous)
        if not launched.deferred:
            self._inflight = None
            self._finish(launched)

    def _finish_inflight(self) -> None:
        if self._inflight is not None:
            launched, self._inflight = self._inflight, None
            self._finish(launched)

    def _launch(self, plan: list[tuple[Seq, int]]) -> "_Launched":
        plan.sort(key=lambda sn: sn[1] != 1)  # one-token chunks first: they take the paged kernel
        spec = StepSpec(chunks=[], copies=self.scheduler.copies)
        self.scheduler.copies = []
        adapters = self._adapters
        if adapters:
            spec.adapter_ids = []
        scored, owners, zero = [], [], []
        stats = self.stats
        start = 0  # the chunk's first row in the step
        for seq, n in plan:  # one pass: this runs for every sequence at every step
            req, tokens, first = seq.req, seq.tokens, seq.num_cached
            spec.chunks.append((tokens[first:first + n], first, seq.blocks))
            if adapters:
                spec.adapter_ids.append(adapters.index(req.adapter) if req.adapter else -1)
            # A token still on the device (sampled by the step in flight): fed from its draws.
            if seq.pending is not None and first <= seq.pending[0] < first + n:
                spec.feed.append((start + seq.pending[0] - first, seq.pending[1]))
            # Prompt logprobs (leaders that asked for them): rows of positions whose next
            # token is in the prompt.
            n_prompt = len(req.prompt)
            end = min(first + n, n_prompt - 1)
            if seq.index == 0 and end > first and (req.prompt_logprobs is not None or req.topk):
                spec.prompt.append((start, req.prompt[first + 1:end + 1], req.topk_prompt_logprobs))
                scored.append((req, first))
            generated = len(tokens) - n_prompt
            decoding = n == 1 and first == len(tokens) - 1 and generated
            stats["decode_tokens" if decoding else "prefill_tokens"] += n
            seq.num_cached = first + n
            # A sequence whose last token is in the step samples its next one.
            if first + n == len(tokens):
                p = req.params
                if p.max_tokens == 0:
                    zero.append(seq)
                else:
                    spec.rows.append(start + n - 1)
                    for i in range(seq.index, seq.index + seq.fork):
                        spec.expand.append(len(owners))
                        spec.temps.append(float(p.temperature))
                        spec.top_k.append(int(p.top_k))
                        spec.top_p.append(float(p.top_p))
                        spec.seeds.append(req.seeds[i])
                        spec.steps.append(generated)
                    owners.append(seq)
            start += n
        spec.truncate = any(0 < k < self.config.vocab_size for k in spec.top_k) or any(p < 1.0 for p in spec.top_p)
        handle = self._executor.launch(spec)
        stats["steps"] += 1
        deferred = self._executor.overlaps and all(seq.fork == 1 for seq in owners)
        stats["overlapped_steps"] += deferred
        # A placeholder for each token this step samples, so the next step can be planned
        # now; not for the last token of a sequence (nothing follows it).
        slots = []
        for k, seq in enumerate(owners):
            pos = None
            if deferred and seq.num_generated + 1 < seq.req.params.max_tokens:
                seq.tokens.append(-1)
                pos = len(seq.tokens) - 1
                seq.pending = (pos, k)
            slots.append((seq, pos))
        return _Launched(handle, scored, slots, zero, self.version, deferred)

    def _finish(self, launched: "_Launched") -> None:
        """Wait for a launched step's results and hand them to their sequences."""
        result = self._executor.collect(launched.handle)
        for (req, first), (lps, top) in zip(launched.scored, result.prompt):
            if req.prompt_logprobs is not None:
                req.prompt_logprobs[first + 1:first + 1 + len(lps)] = lps
            if top is not None:
                req.topk[first + 1:first + 1 + len(top)] = top
        for seq in launched.zero:
            if not seq.finished:
                self._finish_request_zero(seq)
        now = time.perf_counter()
        k = 0
        for seq, pos in launched.owners:
            draws = result.draws[k:k + seq.fork]
            k += seq.fork
            if seq.finished:  # ended by the step before (its row here was one token too many)
                continue
            if seq.req.first_token is None:
                seq.req.first_token = now
            if seq.fork > 1:
                for s in self.scheduler.fork(seq, draws, launched.version):
                    self._check_done(s, len(s.tokens) - 1)
                continue
            t, a, b = draws[0]
            if pos is None:
                seq.tokens.append(t)
                pos = len(seq.tokens) - 1
            else:
                seq.tokens[pos] = t
                if seq.pending is not None and seq.pending[0] == pos:
                    seq.pending = None
            seq.logprobs.append(a)
            seq.raw_logprobs.append(b)
            if seq.version is None:
                seq.version = launched.version
            self._check_done(seq, pos)

    def _check_done(self, seq: Seq, pos: int) -> None:
        """After the token at ``pos`` was sampled: end the sequence there when it is done
        (placeholders after it, for a step already launched, are dropped)."""
        req = seq.req
        reason = None
        if seq.tokens[pos] in req.stop_ids:
            reason = "stop"
        elif req.stop_strings:
            text = self.tokenizer.decode(seq.tokens[len(req.prompt):pos + 1])
            if any(s in text for s in req.stop_strings):
                reason = "stop"
        if reason is None and pos + 1 - len(req.prompt) >= req.params.max_tokens:
            reason = "length"
        if reason is None:
            return
        del seq.tokens[pos + 1:]
        seq.pending = None
        self._drop(seq)
        req.results[seq.index] = seq.result(reason)
        req.pending -= 1
        if req.pending == 0:
            self._active.pop(req.id, None)
            metrics = {"time_to_first_token_s": req.first_token - req.submitted,
                       "latency_s": time.perf_counter() - req.submitted}
            req.future._set_result(SampleResponse(sequences=req.results, prompt_logprobs=req.prompt_logprobs,
                                                  topk_prompt_logprobs=req.topk, metrics=metrics))

    def _drop(self, seq: Seq) -> None:
        self.scheduler.drop(seq)
        seq.finished = True

    def _finish_request_zero(self, seq: Seq) -> None:
        """max_tokens == 0 (compute_logprobs): nothing to sample."""
        req = seq.req
        self._drop(seq)
        self._active.pop(req.id, None)
        if req.logprobs_only:
            req.future._set_result(req.prompt_logprobs)
        else:
            empty = [SampledSequence([], [], "length", [], self.version) for _ in range(req.num_samples)]
            req.future._set_result(SampleResponse(empty, req.prompt_logprobs, req.topk))
