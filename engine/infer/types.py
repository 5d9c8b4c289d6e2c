"""Request and response types of the inference API (Tinker's SamplingClient shapes)."""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class SamplingParams:
    """How to sample one continuation.

    max_tokens: new tokens at most (stop_reason "length" when reached); None (Tinker's
        default): as many as the model's context and the KV cache leave after the prompt.
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (-1 or 0: all).
    top_p: then keep the smallest set of most likely tokens whose probability (after
        top-k, renormalised) reaches top_p (1.0: all).
    stop: token ids (ints), or non-empty strings when the model has a tokenizer;
        generation ends after emitting a stop token (kept in the output) with stop_reason
        "stop". None (as Tinker): the tokenizer's EOS token stops (a model without a
        tokenizer has none); ``[]``: nothing stops a sequence before max_tokens.
    seed: an int; makes the sampled tokens reproducible, independently of what else runs
        in the same batch; None draws a fresh seed per request.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    stop: Sequence[int] | Sequence[str] | int | str | None = None
    seed: int | None = None


@dataclass
class SampledSequence:
    """tokens: the generated ids (prompt excluded).
    logprobs: per token, its log-probability under the distribution it was sampled from
        (after temperature, top-k and top-p, renormalised); for greedy (temperature 0) it
        is the raw logprob, the point mass being uninformative.
    raw_logprobs: per token, the model's own log-probability (temperature 1, no
        truncation): what ``compute_logprobs`` and the trainer compute.
    stop_reason: "stop" (a stop token was emitted) or "length" (max_tokens reached).
    weight_version: the weight version in effect when the first token was sampled."""

    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    raw_logprobs: list[float] = field(default_factory=list)
    weight_version: int = 0


@dataclass
class SampleResponse:
    """sequences: one per sample. prompt_logprobs: with include_prompt_logprobs, the
    prompt's per-token logprobs with None at position 0. topk_prompt_logprobs: with
    topk_prompt_logprobs=k, per prompt position a list of k (token, logprob) pairs (None
    at position 0)."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None
    metrics: dict = field(default_factory=dict)  # time_to_first_token_s, latency_s


class Future:
    """``.result(timeout)``, ``await fut`` or ``await fut.result_async(timeout)``, ``.done()``,
    ``.exception()``, and ``.future()``: the ``concurrent.futures.Future`` underneath (for
    ``concurrent.futures.wait`` / ``as_completed``), as Tinker's APIFuture. An error of one
    request is raised here; the engine keeps serving the others."""

    def __init__(self, inner: concurrent.futures.Future | None = None):
        self._inner = inner if inner is not None else concurrent.futures.Future()

    def result(self, timeout: float | None = None) -> Any:
        return self._inner.result(timeout)

    def done(self) -> bool:
        return self._inner.done()

    def exception(self, timeout: float | None = None):
        return self._inner.exception(timeout)

    async def result_async(self, timeout: float | None = None) -> Any:
        """The result, awaited on the running event loop; TimeoutError after ``timeout`` s
        (the call itself goes on: a timeout or a cancelled await never cancels it)."""
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._inner)), timeout)

    def future(self) -> concurrent.futures.Future:
        return self._inner

    async def coroutine(self) -> Any:
        """This future as a coroutine (for ``asyncio.create_task``)."""
        return await self.result_async()

    def __await__(self):
        return self.result_async().__await__()

    # Completion, by the engine thread (a second completion is ignored).
    def set_result(self, value) -> None:
        if not self._inner.done():
            self._inner.set_result(value)

    def set_exception(self, exc: BaseException) -> None:
        if not self._inner.done():
            self._inner.set_exception(exc)
