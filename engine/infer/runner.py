"""The device side of the engine: a step's forward, prompt logprobs and sampling.

The engine core (core.py) schedules on the host and describes each step as a
:class:`StepSpec`: plain lists (token ids, block ids, sampling parameters), so it can be
pickled to tensor-parallel ranks. A :class:`StepRunner` owns one model (or one
tensor-parallel shard of it), its KV cache and its CUDA graphs, and turns a spec into
host results. Three executors hand specs to runners:

* ``LocalExecutor``: tp=1, the runner lives in the caller's process;
* ``TPExecutor``: one runner per rank in ``WorkerPool`` processes, either a pool of its own
  (``spawn_inference`` with tp > 1) or the pool of a tensor-parallel ``RemoteTrainer``,
  whose models the runners share (a sampling client of a tp > 1 TrainingModel);
* ``SPMDExecutor``: ranks launched by torchrun (``serve_tp``): rank 0's runner drives and
  broadcasts each call to the others, which ``follow``.

Under tensor parallelism every rank runs the same step on its heads and its slice of the
vocabulary; the logits of the rows that are sampled or scored are all-gathered over the
vocabulary (``gather_vocab``: [rows, V], never the whole step's tokens), and rank 0 alone
samples and answers. The block copies of forked samples (``Scheduler.copies``) are made
first in every step, on every rank.

A step is ``launch``-ed (its device work queued, inputs copied from pinned memory without
waiting): every executor returns a :class:`LaunchedStep`, whose ``collect()`` gives its
results (copied out the same way; waits on that step's event only). At tp=1
(``LocalExecutor.overlaps``) the engine core launches step n+1 before it collects step n,
passing step n as ``after``: the rows of ``StepSpec.feed`` read their tokens from step n's
draws on the device. The other executors run each step to the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.models import load_config, load_model
from engine.parallel import WorkerPool, check_tp, gather_vocab, load_tp_model, shard_tensor, tp_group

from .adapters import AdapterSlots
from .cache import BlockSpace, KVCache, host_to_device
from .cuda_graphs import DecodeGraphs
from .forward import StepBatch, forward_with_cache
from .sampling_op import sample_tokens


@dataclass
class StepSpec:
    """One engine step, host data only.

    chunks: per sequence (new token ids, number already cached, block ids);
    adapter_ids: per sequence (-1: base), or None when no adapter is loaded;
    copies: (src, dst) KV blocks to copy before the forward;
    prompt: per scored prompt chunk (first row in the step, next-token targets, top-k);
    rows: step rows whose logits are sampled, ``expand`` mapping each sample to its row,
    and per sample: temperature, top_k, top_p, seed, step (tokens generated so far);
    feed: (row, sample) pairs: the token of that row is the draw for that sample of the step
    launched before (``launch``'s ``after``), still on the device (overlapped steps, tp=1;
    the host list holds a placeholder).
    """

    chunks: list[tuple[list[int], int, list[int]]]
    adapter_ids: list[int] | None = None
    copies: list[tuple[int, int]] = field(default_factory=list)
    prompt: list[tuple[int, list[int], int]] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    expand: list[int] = field(default_factory=list)
    temps: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    truncate: bool = False
    feed: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class StepResult:
    """prompt: per ``StepSpec.prompt`` entry (logprobs, top-k [(id, logprob)] lists or None);
    draws: per sample (token, logprob of the sampled distribution, raw logprob)."""

    prompt: list[tuple[list[float], list | None]]
    draws: list[tuple[int, float, float]]


@dataclass(eq=False)
class LaunchedStep:
    """A launched step, whatever its kind (overlapped or run to the end, any tp, with or
    without rows to sample): what every executor's ``launch`` returns.

    Device side (set by the executor): ``outputs``, the step's device results being copied
    to pinned host memory, laid out by ``prompt`` (``StepSpec.prompt``), with ``done`` the
    event recorded after the copies (None off CUDA); ``draws``, the sampled tokens [samples]
    still on the device, which the next step's ``feed`` rows read; or ``result`` when the
    results are on the host already (a synchronous executor, a step without sampled or
    scored rows; None on a tensor-parallel rank other than 0).

    Engine side (set by the engine core, core.py, when it launches the step): ``scored``,
    per scored prompt chunk (request, first position); ``owners``, per sampling sequence
    (sequence, position of its placeholder token or None: append); ``zero``, the
    max_tokens=0 sequences that end with it; ``version``, the weight version it ran with;
    ``overlapped``, whether it stays in flight while the next step is launched.
    """

    prompt: list = field(default_factory=list)
    outputs: list[torch.Tensor] | None = None
    done: Any = None
    draws: torch.Tensor | None = None
    result: StepResult | None = None
    scored: list = field(default_factory=list)
    owners: list = field(default_factory=list)
    zero: list = field(default_factory=list)
    version: int = 0
    overlapped: bool = False

    def collect(self) -> StepResult | None:
        """The step's host results (waits for this step's device work only)."""
        if self.outputs is None:
            return self.result
        if self.done is not None:
            self.done.synchronize()
        out = iter(self.outputs)
        prompt = []
        for _, _, topk in self.prompt:
            lps = next(out).tolist()
            top = None
            if topk:
                vals, idx = next(out), next(out)
                top = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
            prompt.append((lps, top))
        draws = next(out, None)
        self.outputs = None
        self.result = StepResult(prompt, [] if draws is None else [(int(t), a, b) for t, a, b in draws.tolist()])
        return self.result


class StepRunner:
    """One rank's model, KV cache and CUDA graphs. ``step`` returns a StepResult on rank 0
    (the only rank with tp=1) and None on the others."""

    def __init__(self, model, *, block_size: int, kv_cache_tokens: int | None, gpu_memory_fraction: float,
                 use_cuda_graphs: bool):
        self.model = model.eval()
        self.device = model.embed.weight.device
        group = tp_group(model)
        self.lead = group is None or torch.distributed.get_rank(group) == 0
        self.cache = KVCache.for_model(model, block_size=block_size, num_tokens=kv_cache_tokens,
                                       gpu_fraction=gpu_memory_fraction)
        self.graphs = None
        self.adapters: dict = {}  # the adapter versions of the slots (AdapterSlots.install)
        # Capturing collectives in a graph is left to a later change: graphs at tp=1 only.
        if use_cuda_graphs and self.device.type == "cuda" and group is None:
            max_blocks = min(self.cache.num_blocks, self.cache.blocks_needed(model.config.max_position_embeddings))
            self.graphs = DecodeGraphs(model, self.cache, max_blocks)

    def step(self, spec: StepSpec) -> StepResult | None:
        return self.launch(spec).collect()

    @torch.no_grad()
    def launch(self, spec: StepSpec, after: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the step's device work; ``collect()`` of the returned step waits for its
        results. ``after``: the step launched before, possibly not collected yet, whose
        draws the ``feed`` rows read on the device."""
        if spec.copies:
            self.cache.copy_blocks([s for s, _ in spec.copies], [d for _, d in spec.copies])
        batch = StepBatch.build(spec.chunks, self.cache.block_size, self.device, spec.adapter_ids)
        # Every row that is scored or sampled: their logits are computed (and gathered) once.
        scored = [r for start, targets, _ in spec.prompt for r in range(start, start + len(targets))]
        rows, targets, expand, top_k, seeds, steps, feed_rows, feed_from = host_to_device(
            self.device, torch.int64, scored + spec.rows, [t for _, ts, _ in spec.prompt for t in ts], spec.expand,
            spec.top_k, spec.seeds, spec.steps, [r for r, _ in spec.feed], [k for _, k in spec.feed])
        temps, top_p = host_to_device(self.device, torch.float32, spec.temps, spec.top_p)
        if spec.feed:
            if after is None or after.draws is None:
                raise RuntimeError("StepSpec.feed names draws of a previous step that sampled nothing")
            batch.input_ids[feed_rows] = after.draws[feed_from]
        hidden = None if self.graphs is None else self.graphs.run(batch)
        if hidden is None:
            hidden = forward_with_cache(self.model, self.cache, batch)
        if not rows.numel():
            return LaunchedStep(result=StepResult([], []) if self.lead else None)
        logits = gather_vocab(self.model, self.model.compute_logits(hidden[rows]))
        if not self.lead:
            return LaunchedStep()
        logits = logits.float()
        # Device results, copied out without waiting (collect waits for this step only):
        # per scored chunk its target logprobs and top-k, then the draws.
        out, at = [], 0
        for _, chunk_targets, topk in spec.prompt:
            logp = logits[at:at + len(chunk_targets)].log_softmax(-1)
            out.append(logp.gather(1, targets[at:at + len(chunk_targets), None])[:, 0])
            at += len(chunk_targets)
            if topk:
                out.extend(logp.topk(min(topk, logp.shape[-1]), dim=-1))
        tok = None
        if spec.rows:
            tok, lp, raw = sample_tokens(logits[at:][expand], temps, top_k, top_p, seeds, steps, truncate=spec.truncate)
            out.append(torch.stack([tok.double(), lp.double(), raw.double()], 1))
        done = None
        if logits.is_cuda:
            out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in out]
            done = torch.cuda.Event()
            done.record()
        return LaunchedStep(prompt=spec.prompt, outputs=out, done=done, draws=tok)

    def set_adapters(self, keys: list, new: dict) -> None:
        self.adapters = AdapterSlots.install(self.model, self.graphs, self.adapters, keys, new)

    @torch.no_grad()
    def copy_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Copy unsharded weights (names of ``model.state_dict()`` at tp=1) into the model;
        a tensor-parallel rank keeps its shard of each."""
        own = self.model.state_dict()
        group = tp_group(self.model)
        for name, value in items:
            if name not in own:
                raise KeyError(f"update_weights: {name!r} is not a parameter of the model")
            if group is not None:
                value = shard_tensor(self.model.config, group, name, value)
            if tuple(own[name].shape) != tuple(value.shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, the model's "
                                 f"{tuple(own[name].shape)}")
            own[name].copy_(value)


class _Synchronous:
    """Executors whose step returns its results (no step stays in flight)."""

    overlaps = False

    def launch(self, spec: StepSpec, after: LaunchedStep | None = None) -> LaunchedStep:
        return LaunchedStep(result=self.step(spec))


class LocalExecutor:
    """tp=1: the runner in this process; a step may stay in flight while the next one is
    launched (``overlaps``)."""

    overlaps = True

    def __init__(self, runner: StepRunner):
        self.runner = runner
        self.blocks: BlockSpace = runner.cache
        self.config = runner.model.config

    def launch(self, spec: StepSpec, after: LaunchedStep | None = None) -> LaunchedStep:
        return self.runner.launch(spec, after)

    def set_adapters(self, keys: list, new: dict) -> None:
        self.runner.set_adapters(keys, new)

    def copy_weights(self, items) -> None:
        self.runner.copy_weights(items)

    def close(self) -> None:
        pass


def _runner(state) -> StepRunner:
    """The rank's runner: the pool's state itself, or the one attached to a rank's Trainer."""
    return state if isinstance(state, StepRunner) else state.step_runner


def _setup_rank(ctx, path, dtype, runner_kwargs):
    return StepRunner(load_tp_model(path, ctx.group, dtype=dtype, device=ctx.device), **runner_kwargs)


def _attach_rank(trainer, runner_kwargs):
    trainer.step_runner = StepRunner(trainer.model, **runner_kwargs)
    return trainer.step_runner.cache.num_blocks


def _detach_rank(trainer):
    trainer.step_runner = None
    trainer.model.eval()


def _on_rank(state, method, *args):
    return getattr(_runner(state), method)(*args)


def _describe_rank(state):
    runner = _runner(state)
    return runner.cache.num_blocks, runner.model.config


class SPMDExecutor(_Synchronous):
    """tp > 1 under torchrun (every rank launched by it, each holding its shard): rank 0
    drives, broadcasting each call to the other ranks, which run ``follow``."""

    def __init__(self, runner: StepRunner):
        self.runner = runner
        self.blocks: BlockSpace = BlockSpace(runner.cache.num_blocks, runner.cache.block_size)
        self.config = runner.model.config
        self.tp = torch.distributed.get_world_size(self.group)

    @property
    def group(self):
        return tp_group(self.runner.model)  # held weakly: see engine.parallel.shutdown

    def _call(self, method: str | None, *args):
        torch.distributed.broadcast_object_list([(method, args)], src=torch.distributed.get_global_rank(self.group, 0),
                                                group=self.group)
        return None if method is None else getattr(self.runner, method)(*args)

    def step(self, spec: StepSpec) -> StepResult:
        return self._call("step", spec)

    def set_adapters(self, keys: list, new: dict) -> None:
        self._call("set_adapters", keys, new)

    def copy_weights(self, items) -> None:
        self._call("copy_weights", [(n, v.detach().cpu()) for n, v in items])

    def close(self) -> None:
        self._call(None)


def follow(runner: StepRunner, group) -> None:
    """A rank other than 0 under torchrun: run rank 0's calls until it closes."""
    src = torch.distributed.get_global_rank(group, 0)
    while True:
        box = [None]
        torch.distributed.broadcast_object_list(box, src=src, group=group)
        method, args = box[0]
        if method is None:
            return
        getattr(runner, method)(*args)


class TPExecutor(_Synchronous):
    """tp > 1: one StepRunner per rank of ``pool``; every call runs on every rank."""

    def __init__(self, pool: WorkerPool, *, block_size: int, owns_pool: bool):
        self.pool, self.owns_pool, self.tp = pool, owns_pool, pool.tp
        num_blocks, self.config = pool.run(_describe_rank)[0]
        self.blocks = BlockSpace(num_blocks, block_size)

    @classmethod
    def spawn(cls, path, tp: int, *, dtype, **runner_kwargs) -> "TPExecutor":
        """A pool of ``tp`` ranks, each loading its shard of the checkpoint at ``path``."""
        return cls(WorkerPool(tp, _setup_rank, path, dtype, runner_kwargs), block_size=runner_kwargs["block_size"],
                   owns_pool=True)

    @classmethod
    def attach(cls, pool: WorkerPool, **runner_kwargs) -> "TPExecutor":
        """Runners on the ranks of a RemoteTrainer's pool, sharing each rank's model."""
        pool.run(_attach_rank, runner_kwargs)
        return cls(pool, block_size=runner_kwargs["block_size"], owns_pool=False)

    def step(self, spec: StepSpec) -> StepResult:
        return self.pool.run(_on_rank, "step", spec)[0]

    def set_adapters(self, keys: list, new: dict) -> None:
        self.pool.run(_on_rank, "set_adapters", keys, new)

    def copy_weights(self, items) -> None:
        self.pool.run(_on_rank, "copy_weights", [(n, v.detach().cpu()) for n, v in items])

    def close(self) -> None:
        if self.owns_pool:
            self.pool.close()
        elif not self.pool.closed:
            self.pool.run(_detach_rank)  # free the KV cache; the trainer keeps its ranks


def _runner_kwargs(max_batch_size, block_size, kv_cache_tokens, gpu_memory_fraction, use_cuda_graphs,
                   on_cuda: bool) -> dict:
    """StepRunner's arguments; off CUDA the KV cache defaults to 4 x max_batch_size tokens."""
    if kv_cache_tokens is None and not on_cuda:
        kv_cache_tokens = 4 * max_batch_size
    return dict(block_size=block_size, kv_cache_tokens=kv_cache_tokens, gpu_memory_fraction=gpu_memory_fraction,
                use_cuda_graphs=use_cuda_graphs)


def open_executor(model_or_path, *, tp: int, dtype, device, max_batch_size: int, block_size: int,
                  kv_cache_tokens: int | None, gpu_memory_fraction: float, use_cuda_graphs: bool):
    """The executor of an InferenceModel (its arguments, see model.py): a tensor-parallel
    trainer's pool, tp > 1 ranks of its own, a torchrun shard (``serve_tp``) or tp=1."""
    sizes = (max_batch_size, block_size, kv_cache_tokens, gpu_memory_fraction, use_cuda_graphs)
    if isinstance(model_or_path, WorkerPool):  # a tensor-parallel trainer's ranks
        return TPExecutor.attach(model_or_path, **_runner_kwargs(*sizes, torch.cuda.is_available()))
    if isinstance(model_or_path, (str, Path)) and tp > 1:
        check_tp(load_config(model_or_path), tp)
        return TPExecutor.spawn(model_or_path, tp, dtype=dtype, **_runner_kwargs(*sizes, torch.cuda.is_available()))
    if tp > 1:
        raise ValueError(f"tp={tp} needs a checkpoint folder (each rank loads its own shard), not a model")
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        model = load_model(model_or_path, dtype=dtype, device=device)
    runner = StepRunner(model, **_runner_kwargs(*sizes, model.embed.weight.device.type == "cuda"))
    return LocalExecutor(runner) if tp_group(model) is None else SPMDExecutor(runner)  # see serve_tp


def follow_shard(model, *, max_batch_size: int, block_size: int, kv_cache_tokens: int | None,
                 gpu_memory_fraction: float, use_cuda_graphs: bool) -> None:
    """``serve_tp`` on a rank other than 0: serve this rank's shard until rank 0 closes."""
    on_cuda = model.embed.weight.device.type == "cuda"
    follow(StepRunner(model, **_runner_kwargs(max_batch_size, block_size, kv_cache_tokens, gpu_memory_fraction,
                                              use_cuda_graphs, on_cuda)), tp_group(model))
