"""Continuous batching over the paged KV cache (host side only).

Every step the scheduler packs at most ``token_budget`` new tokens: first the running
sequences, oldest first (a decoding one needs 1 token, one mid-prefill its next chunk),
then waiting sequences in arrival order, as long as blocks are free; a prompt longer than
what is left of the budget is prefilled in chunks over several steps.

Preemption: when a running sequence needs a block and none is free, the newest running
sequence not yet packed in this step is preempted (its blocks freed, its tokens kept) and
goes back to the waiting queue; it is recomputed later by prefilling its prompt plus what
it had generated. The newest may be the sequence itself. Since a request is only accepted
when its prompt plus max_tokens fits in the whole cache, the oldest sequence always makes
progress: no out-of-memory, no deadlock.

Samples of one prompt: the request enters as one *leader* sequence that prefills the
prompt once; when its prefill completes, its last logits give the first token of every
sample and it forks: the clones share the prompt's full blocks (refcounts) and get a copy
of the partial last block (copy-on-write at fork time; the copy is recorded in ``copies``
and made on the device at the start of the next step, before any key/value is written). A clone that finds no free block
for that copy waits and recomputes its prompt.
"""
from __future__ import annotations

import bisect
import random
import time
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from .cache import BlockSpace
from .sampling import derive_seed
from .types import Future, SampledSequence, SamplingParams


def as_token_ids(prompt: Any, where: str = "prompt") -> list[int]:
    """A prompt as a list of ints: a list of ids, a tensor, or an object with ``to_ints()``
    or ``chunks`` (Tinker's ModelInput). Anything but an integer (a float, even 2.0, a bool)
    is refused, never truncated; ``where`` names the argument in the error."""
    if hasattr(prompt, "to_ints"):
        prompt = prompt.to_ints()
    elif hasattr(prompt, "chunks"):
        prompt = [t for c in prompt.chunks for t in c.tokens]
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
        raise ValueError(f"{where} must be a list of token ids or an object with to_ints(), "
                         f"got {type(prompt).__name__}")
    out = []
    for t in prompt:
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise ValueError(f"{where} holds {t!r}, not a token id (an int)")
        out.append(t.__index__())
    return out


def as_sampling_params(params: Any) -> SamplingParams:
    """``sampling_params`` as given: a SamplingParams (or an object with its fields, such as
    Tinker's), or a dict of its fields, as Tinker's SDK accepts."""
    if isinstance(params, dict):
        unknown = sorted(set(params) - set(SamplingParams.__dataclass_fields__))
        if unknown:
            raise ValueError(f"sampling_params has no field {unknown[0]!r}; its fields: "
                             f"{', '.join(SamplingParams.__dataclass_fields__)}")
        return SamplingParams(**params)
    if not all(hasattr(params, f) for f in SamplingParams.__dataclass_fields__):
        raise ValueError(f"sampling_params must be a SamplingParams or a dict of its fields, got "
                         f"{type(params).__name__}")
    return params


def eos_ids(tokenizer) -> list[int]:
    """The EOS token id(s) of a tokenizer (none without one): what ``stop=None`` stops at."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def resolve_adapter(adapter) -> str:
    """The resolved folder of a PEFT adapter given as a path."""
    path = Path(adapter)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter {str(adapter)!r}: no such folder (expected a PEFT adapter folder)")
    return str(path.resolve())


@dataclass(eq=False)  # identity: requests and sequences are looked up in lists
class Request:
    """One ``sample`` call."""

    id: int
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    max_tokens: int  # params.max_tokens, None resolved
    stop_ids: frozenset
    stop_strings: tuple
    seeds: list[int]
    future: Future
    include_prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    adapter: str | None = None
    adapter_key: tuple | None = None  # (folder, stamp) of the adapter version it is bound to (adapters.py)
    logprobs_only: bool = False  # compute_logprobs: resolve with prompt_logprobs
    results: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    topk: list | None = None
    pending: int = 0
    submitted: float = 0.0  # time.perf_counter() at submission
    first_token: float | None = None

    def __post_init__(self):
        self.results = [None] * self.num_samples
        self.pending = self.num_samples
        if self.include_prompt_logprobs or self.logprobs_only:
            self.prompt_logprobs = [None] * len(self.prompt)
        if self.topk_prompt_logprobs > 0:
            self.topk = [None] * len(self.prompt)

    @classmethod
    def create(cls, id: int, prompt, num_samples: int, params: SamplingParams, future: Future, *, config,
               capacity_tokens: int, tokenizer=None, include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0, adapter=None, logprobs_only: bool = False) -> "Request":
        """A checked request for a model of ``config`` (vocabulary, context length) and a KV
        cache of ``capacity_tokens``: each bad argument raises one error naming it.
        ``adapter``: a PEFT folder (resolved here); the seed of sample i is derived from
        ``params.seed`` (a fresh one when None)."""
        tokens = as_token_ids(prompt)
        p = as_sampling_params(params)
        if not tokens:
            raise ValueError("prompt is empty; it needs at least one token")
        vocab = config.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt holds token id {bad[0]}, outside the vocabulary [0, {vocab})")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        max_tokens = p.max_tokens
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens < 0):
            raise ValueError(f"sampling_params.max_tokens must be a non-negative int or None, got {max_tokens!r}")
        ctx = config.max_position_embeddings
        if max_tokens is None:  # all that is left: at least one token
            max_tokens = max(min(ctx, capacity_tokens) - len(tokens), 1)
        if len(tokens) + max_tokens > ctx:
            raise ValueError(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {ctx} tokens")
        if len(tokens) + max_tokens > capacity_tokens:
            raise ValueError(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the KV cache "
                             f"({capacity_tokens} tokens); raise kv_cache_tokens")
        if not isinstance(p.temperature, Real) or not p.temperature >= 0:
            raise ValueError(f"sampling_params.temperature must be >= 0, got {p.temperature!r}")
        if not isinstance(p.top_p, Real) or not 0 < p.top_p <= 1:
            raise ValueError(f"sampling_params.top_p must be in (0, 1], got {p.top_p!r}")
        if not isinstance(p.top_k, int):
            raise ValueError(f"sampling_params.top_k must be an int (-1: all), got {p.top_k!r}")
        if not isinstance(topk_prompt_logprobs, int) or topk_prompt_logprobs < 0:
            raise ValueError(f"topk_prompt_logprobs must be a non-negative int, got {topk_prompt_logprobs!r}")
        stops = eos_ids(tokenizer) if p.stop is None else [p.stop] if isinstance(p.stop, (int, str)) else list(p.stop)
        stop_ids = frozenset(s for s in stops if isinstance(s, int) and not isinstance(s, bool))
        stop_strings = tuple(s for s in stops if isinstance(s, str))
        if len(stop_ids) + len(stop_strings) != len(stops):
            raise ValueError(f"sampling_params.stop must hold token ids or strings, got {p.stop!r}")
        if "" in stop_strings:
            raise ValueError(f"sampling_params.stop holds an empty string, which every output contains, got {p.stop!r}")
        if stop_strings and tokenizer is None:
            raise ValueError("sampling_params.stop holds strings but this model has no tokenizer; pass token ids")
        if p.seed is not None and (isinstance(p.seed, bool) or not hasattr(p.seed, "__index__")):
            raise ValueError(f"sampling_params.seed must be an int or None, got {p.seed!r}")
        if adapter is not None:
            adapter = resolve_adapter(adapter)
        seed = p.seed.__index__() if p.seed is not None else random.getrandbits(63)
        return cls(id=id, prompt=tokens, num_samples=num_samples, params=p, max_tokens=max_tokens, stop_ids=stop_ids,
                   stop_strings=stop_strings, seeds=[derive_seed(seed, i) for i in range(num_samples)],
                   future=future, include_prompt_logprobs=include_prompt_logprobs,
                   topk_prompt_logprobs=topk_prompt_logprobs, adapter=adapter, logprobs_only=logprobs_only,
                   submitted=time.perf_counter())

    def leader(self) -> "Seq":
        """The sequence that prefills the prompt once for all ``num_samples`` samples."""
        return Seq(req=self, index=0, fork=self.num_samples, tokens=list(self.prompt))


@dataclass(eq=False)
class Seq:
    """One sample of a request (or the leader that prefills the prompt for ``fork`` samples)."""

    req: Request
    index: int
    fork: int
    tokens: list[int]
    num_cached: int = 0
    blocks: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    version: int | None = None
    finished: bool = False

    @property
    def arrival(self) -> tuple[int, int]:
        return (self.req.id, self.index)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.req.prompt)

    def result(self, reason: str) -> SampledSequence:
        return SampledSequence(tokens=self.tokens[len(self.req.prompt):], logprobs=self.logprobs, stop_reason=reason,
                               raw_logprobs=self.raw_logprobs, weight_version=self.version or 0)


class Scheduler:
    def __init__(self, cache: BlockSpace, token_budget: int):
        self.cache = cache
        self.alloc = cache.allocator
        self.token_budget = token_budget
        self.running: list[Seq] = []  # sorted by arrival
        self.waiting: list[Seq] = []  # sorted by arrival
        self.num_preemptions = 0
        self.copies: list[tuple[int, int]] = []  # (src, dst) block copies the next step makes first

    def add(self, seq: Seq) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def _grow(self, seq: Seq, num_tokens: int) -> bool:
        """Give ``seq`` blocks for ``num_tokens`` tokens; False when not enough are free."""
        extra = self.cache.blocks_needed(num_tokens) - len(seq.blocks)
        if extra <= 0:
            return True
        if extra > self.alloc.num_free:
            return False
        seq.blocks += self.alloc.allocate(extra)
        return True

    def release(self, seq: Seq) -> None:
        self.alloc.free(seq.blocks)
        seq.blocks = []

    def preempt(self, seq: Seq) -> None:
        self.release(seq)
        seq.num_cached = 0
        self.running.remove(seq)
        self.add(seq)
        self.num_preemptions += 1

    def drop(self, seq: Seq) -> None:
        """Remove a finished or failed sequence and free its blocks."""
        self.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> list[tuple[Seq, int]]:
        """The (sequence, number of new tokens) pairs of the next step, blocks allocated."""
        budget = self.token_budget
        plan: list[tuple[Seq, int]] = []
        planned: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:
                continue  # preempted by an older sequence in this loop
            n = min(len(seq.tokens) - seq.num_cached, budget)
            if n == 0:
                continue  # its last token is being sampled by the step in flight
            while not self._grow(seq, seq.num_cached + n):
                victim = next(s for s in reversed(self.running) if id(s) not in planned)
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                plan.append((seq, n))
                planned.add(id(seq))
                budget -= n
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            n = min(len(seq.tokens) - seq.num_cached, budget, self.alloc.num_free * self.cache.block_size)
            if n <= 0:
                break
            self.waiting.pop(0)
            self._grow(seq, seq.num_cached + n)
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            plan.append((seq, n))
            planned.add(id(seq))
            budget -= n
        return plan

    def fork(self, leader: Seq, firsts: list[tuple[int, float, float]], version: int) -> list[Seq]:
        """After the leader's prefill: the samples 0..fork-1, each with its first token
        (token, logprob, raw logprob). Sample 0 is the leader itself."""
        seqs = [leader]
        n_prompt = leader.num_cached
        full = n_prompt // self.cache.block_size
        partial = n_prompt % self.cache.block_size != 0
        for i in range(1, leader.fork):
            clone = Seq(req=leader.req, index=i, fork=1, tokens=list(leader.tokens))
            if not partial or self.alloc.num_free > 0:
                self.alloc.share(leader.blocks[:full])
                clone.blocks = list(leader.blocks[:full])
                if partial:
                    (blk,) = self.alloc.allocate(1)
                    self.copies.append((leader.blocks[full], blk))
                    clone.blocks.append(blk)
                clone.num_cached = n_prompt
                bisect.insort(self.running, clone, key=lambda s: s.arrival)
            else:
                self.add(clone)  # recomputes its prompt when blocks free up
            seqs.append(clone)
        leader.fork = 1
        for seq, (tok, lp, raw) in zip(seqs, firsts):
            seq.tokens.append(tok)
            seq.logprobs.append(lp)
            seq.raw_logprobs.append(raw)
            seq.version = version
        return seqs
