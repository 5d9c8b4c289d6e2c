"""The engine core: one step is schedule -> launch -> collect the previous step -> update.

``EngineCore.step`` is the whole of the engine's work on a request; the engine thread
(model.py) calls it in a loop between the commands it receives. One request, hop by hop:

1. ``model.py InferenceModel.sample`` checks the arguments and builds the request
   (``scheduler.py Request.create``: token ids, stop ids or strings, one seed per
   sample), returns its Future and queues the request for the engine thread.
2. ``model.py InferenceModel._serve`` (engine thread) hands it to ``EngineCore.add``: it
   waits in ``adapters.py AdapterSlots.waiting`` until ``EngineCore.admit`` binds it to
   the current version of its adapter, in a slot (a version read from the folder once and
   loaded on every rank: ``runner.py StepRunner.set_adapters`` -> ``AdapterSlots.install``,
   which drops the CUDA graphs). It then joins the scheduler as one leader sequence
   (``Request.leader``) that prefills the prompt for every sample.
3. ``EngineCore.step``: ``scheduler.py Scheduler.schedule`` packs it into a step (a chunk
   of its prompt, later one token per step), allocating KV-cache blocks, preempting the
   newest sequence when none are free.
4. ``EngineCore._launch`` describes the step as host lists (``runner.py StepSpec``: its
   chunk, block ids, adapter slot, sampling parameters of its rows) and hands them to
   the executor (``runner.py LocalExecutor.launch``, or the tensor-parallel ranks):
   ``StepRunner.launch`` builds the device batch (``forward.py StepBatch.build``), runs
   the decoder over the paged cache (``cuda_graphs.py DecodeGraphs.run`` for decode-only
   steps, else ``forward.py forward_with_cache``), computes the logits of the rows to
   score or sample and samples them (``sampling_op.py sample_tokens``), all without
   waiting: it returns a ``runner.py LaunchedStep``.
5. The next ``EngineCore.step`` launches step n+1 first, then collects step n
   (``LaunchedStep.collect``: waits for that step's copies, gives a ``StepResult``).
6. ``EngineCore._update`` writes the results into the request: prompt logprobs; the
   leader's first draws fork the samples (``Scheduler.fork``: the clones share the
   prompt's full blocks); then one token per step per sample; ``_check_done`` ends a
   sample at a stop token or max_tokens (``Seq.result``), and the last sample to end
   resolves the Future with the ``SampleResponse``.

The overlap (tp=1, ``LocalExecutor.overlaps``): the host plans step n+1 while the device
runs step n. A sequence that step n samples gets a placeholder token (-1) at once, so it
can be scheduled in step n+1; ``_placeholders`` maps it to (placeholder position, sample
index in step n), and step n+1's ``StepSpec.feed`` makes that row read step n's draw on
the device (``StepRunner.launch(spec, after=step n)``). Collecting step n writes the real
token over the placeholder. A sequence that step n ends (a stop token) has computed one
token too many in step n+1, which is dropped. Steps that fork samples, and every step of
a synchronous (tensor-parallel) executor, are collected at once.
"""
from __future__ import annotations

import time

import torch

from engine.models import Transformer

from .adapters import AdapterSlots
from .runner import LaunchedStep, LocalExecutor, StepResult, StepSpec
from .scheduler import Request, Scheduler, Seq
from .types import SampledSequence, SampleResponse


class EngineCore:
    """The scheduler, the executor, the adapter slots and the overlap state of one engine;
    every method runs on the engine thread."""

    def __init__(self, executor, *, max_batch_size: int, max_adapters: int, tokenizer=None):
        self.executor = executor
        self.config = executor.config
        self.tokenizer = tokenizer  # decodes the output for string stop sequences
        self.scheduler = Scheduler(executor.blocks, max_batch_size)
        self.adapters = AdapterSlots(max_adapters, self.shapes, self._install_adapters)
        self.overlap = executor.overlaps  # launch step n+1 before collecting step n
        self.version = 0  # the weight version
        self.active: dict[int, Request] = {}  # admitted requests, by id
        self.inflight: LaunchedStep | None = None  # launched, not yet collected
        self._placeholders: dict[Seq, tuple[int, int]] = {}  # (position, sample index in the step in flight)
        self._shapes: Transformer | None = None
        self.stats = {"steps": 0, "overlapped_steps": 0, "preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0}

    @property
    def busy(self) -> bool:
        """A sequence to schedule or a step to collect."""
        return not self.scheduler.idle or self.inflight is not None

    def add(self, req: Request) -> None:
        self.adapters.defer(req)  # admitted once its adapter has a slot

    def admit(self) -> None:
        """Waiting requests whose adapter has a slot join the scheduler."""
        for req in self.adapters.admit(self.active.values()):
            self.active[req.id] = req
            self.scheduler.add(req.leader())

    def step(self) -> None:
        """Schedule and launch one step, then collect the step launched before it and hand
        its results to their requests (see the module docstring)."""
        plan = self.scheduler.schedule()
        self.stats["preemptions"] = self.scheduler.num_preemptions
        launched = self._launch(plan) if plan else None
        previous, self.inflight = self.inflight, launched
        if previous is not None:
            result = previous.collect()
            self._update(previous, result)
        if launched is not None and not launched.overlapped:  # forks, synchronous executors
            self.inflight = None
            self._update(launched, launched.collect())

    def drain(self) -> None:
        """Collect the step in flight and update its requests: no step is in flight after."""
        if self.inflight is not None:
            launched, self.inflight = self.inflight, None
            self._update(launched, launched.collect())

    def _launch(self, plan: list[tuple[Seq, int]]) -> LaunchedStep:
        """Describe the planned (sequence, new tokens) pairs as a StepSpec, launch it, and
        record whose rows it samples (placeholders when it stays in flight)."""
        plan.sort(key=lambda sn: sn[1] != 1)  # one-token chunks first: they take the paged kernel
        spec = StepSpec(chunks=[], copies=self.scheduler.copies)
        self.scheduler.copies = []
        slots = self.adapters
        if slots.keys:
            spec.adapter_ids = []
        scored, owners, zero = [], [], []
        stats, placeholders = self.stats, self._placeholders
        start = 0  # the chunk's first row in the step
        for seq, n in plan:  # one pass: this runs for every sequence at every step
            req, tokens, first = seq.req, seq.tokens, seq.num_cached
            spec.chunks.append((tokens[first:first + n], first, seq.blocks))
            if spec.adapter_ids is not None:
                spec.adapter_ids.append(slots.slot(req))
            # A token still on the device (sampled by the step in flight): fed from its draws.
            fed = placeholders.get(seq)
            if fed is not None and first <= fed[0] < first + n:
                spec.feed.append((start + fed[0] - first, fed[1]))
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
                if req.max_tokens == 0:
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
        launched = self.executor.launch(spec, after=self.inflight)
        launched.scored, launched.zero, launched.version = scored, zero, self.version
        launched.overlapped = self.overlap and all(seq.fork == 1 for seq in owners)
        stats["steps"] += 1
        stats["overlapped_steps"] += launched.overlapped
        # A placeholder for each token this step samples, so the next step can be planned
        # now; not for the last token of a sequence (nothing follows it).
        for k, seq in enumerate(owners):
            pos = None
            if launched.overlapped and seq.num_generated + 1 < seq.req.max_tokens:
                seq.tokens.append(-1)
                pos = len(seq.tokens) - 1
                placeholders[seq] = (pos, k)
            launched.owners.append((seq, pos))
        return launched

    def _update(self, launched: LaunchedStep, result: StepResult) -> None:
        """Hand a collected step's results to their sequences and finished requests."""
        for (req, first), (lps, top) in zip(launched.scored, result.prompt):
            if req.prompt_logprobs is not None:
                req.prompt_logprobs[first + 1:first + 1 + len(lps)] = lps
            if top is not None:
                req.topk[first + 1:first + 1 + len(top)] = top
        for seq in launched.zero:
            if not seq.finished:
                self._finish_zero(seq)
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
                if self._placeholders.get(seq, (None,))[0] == pos:
                    del self._placeholders[seq]
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
        if reason is None and pos + 1 - len(req.prompt) >= req.max_tokens:
            reason = "length"
        if reason is None:
            return
        del seq.tokens[pos + 1:]
        self._drop(seq)
        req.results[seq.index] = seq.result(reason)
        req.pending -= 1
        if req.pending == 0:
            self.active.pop(req.id, None)
            metrics = {"time_to_first_token_s": req.first_token - req.submitted,
                       "latency_s": time.perf_counter() - req.submitted}
            req.future.set_result(SampleResponse(sequences=req.results, prompt_logprobs=req.prompt_logprobs,
                                                  topk_prompt_logprobs=req.topk, metrics=metrics))

    def _finish_zero(self, seq: Seq) -> None:
        """max_tokens == 0 (compute_logprobs): nothing to sample."""
        req = seq.req
        self._drop(seq)
        self.active.pop(req.id, None)
        if req.logprobs_only:
            req.future.set_result(req.prompt_logprobs)
        else:
            empty = [SampledSequence([], [], "length", [], self.version) for _ in range(req.num_samples)]
            req.future.set_result(SampleResponse(empty, req.prompt_logprobs, req.topk))

    def _drop(self, seq: Seq) -> None:
        self.scheduler.drop(seq)
        self._placeholders.pop(seq, None)
        seq.finished = True

    def fail_all(self, err: Exception) -> None:
        """Fail every request, admitted or waiting, with ``err``; free their blocks."""
        self.inflight = None
        self._placeholders.clear()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._drop(seq)
        for req in list(self.active.values()) + self.adapters.waiting:
            req.future.set_exception(err)
        self.active.clear()
        self.adapters.waiting = []

    # ------------------------------------------------------------------ weights and adapters

    def update_weights(self, state) -> int:
        """Copy ``state`` (names as in ``model.state_dict()``; pairs accepted; None: only
        bump the version) into the model, no step in flight; the new weight version."""
        if state is not None:
            items = list(state.items() if isinstance(state, dict) else state)
            if not isinstance(self.executor, LocalExecutor):  # check here: an error on a rank stops the pool
                own = {n: p.shape for n, p in self.shapes().state_dict().items()}
                for name, value in items:
                    if name not in own:
                        raise KeyError(f"update_weights: {name!r} is not a weight of the model")
                    if tuple(own[name]) != tuple(value.shape):
                        raise ValueError(f"update_weights: {name} has shape {tuple(value.shape)}, the model's "
                                         f"{tuple(own[name])}")
            self.executor.copy_weights(items)
        self.version += 1
        return self.version

    def shapes(self) -> Transformer:
        """The unsharded model on the meta device (shapes only, no memory): checks updates
        and adapters before they reach the ranks."""
        if self._shapes is None:
            with torch.device("meta"):
                self._shapes = Transformer(self.config)
        return self._shapes

    def _install_adapters(self, keys: list, new: dict) -> None:
        self.drain()  # the step in flight may still read the old stacks
        self.executor.set_adapters(keys, new)
