"""Sampling clients of a TrainingModel, and the future of a client that Tinker returns.

``TrainingModel.save_weights_and_get_sampling_client(kind=...)`` (Tinker's two kinds):

* ``"snapshot"`` (the default, as Tinker's): the weights as they are when the call runs
  (after every call submitted before it), fixed from then on. Under LoRA the adapter is
  copied (a PEFT folder in the model's snapshot folder) and served by the model's shared
  engine as a per-request adapter, on the base weights the trainer holds: the base is not
  copied. Full fine-tuning copies the model into an engine of the snapshot's own (in
  memory at tp=1; exported and loaded at tp > 1).
* ``"inflight"``: the shared engine itself, an ``InferenceModel`` over the trainer's own
  weights (adapter included, no copy): after each ``optim_step`` it samples the new weights
  and its version (``SampledSequence.weight_version``) increases.

A snapshot's resources (its adapter folder, its own engine) are freed by ``close()`` or
when the client is garbage-collected, so a loop that takes a new snapshot each step holds
one at a time; keep a client while its samples are pending.
"""
from __future__ import annotations

import concurrent.futures
import shutil
import weakref
from typing import Any, Callable

from engine.infer import InferenceModel

from .types import Future


class ClientFuture(Future):
    """A future of a client (sampling or training) that is also usable as the client, as
    Tinker 0.38's (``.result()`` / ``await`` give the client; ``sample``, ``forward_backward``
    and every other public attribute of the client wait for it, then answer as it does)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result(), name)

    def __enter__(self):
        return self.result().__enter__()

    def __exit__(self, *exc):
        return self.result().__exit__(*exc)

    def __repr__(self) -> str:
        inner = self.future()
        state = "pending" if not inner.done() else f"failed: {inner.exception()!r}" if inner.exception() \
            else repr(inner.result())
        return f"<ClientFuture: {state}>"

    @classmethod
    def of(cls, client) -> "ClientFuture":
        """A future already holding ``client``."""
        inner = concurrent.futures.Future()
        inner.set_result(client)
        return cls(inner)


class SamplingClient:
    """Samples fixed weights: those ``engine`` serves with ``adapter`` (a PEFT folder served
    per request on the engine's base weights, or None for the engine's own weights).
    Tinker's SamplingClient methods: ``sample``, ``compute_logprobs`` (futures), their
    ``_async`` forms, ``get_tokenizer``, ``get_base_model``. ``cleanup`` runs once, at
    ``close()`` or when the client is garbage-collected."""

    def __init__(self, engine: InferenceModel, *, adapter: str | None = None, cleanup: Callable[[], None]):
        self.engine = engine
        self.adapter = adapter
        self._cleanup = weakref.finalize(self, cleanup)

    @property
    def closed(self) -> bool:
        return not self._cleanup.alive or self.engine.closed

    def sample(self, prompt, num_samples: int = 1, sampling_params=None, include_prompt_logprobs: bool = False,
               topk_prompt_logprobs: int = 0) -> Future:
        """As ``InferenceModel.sample``, on this client's weights."""
        if not self._cleanup.alive:
            return _closed()
        return self.engine.sample(prompt, num_samples, sampling_params, include_prompt_logprobs=include_prompt_logprobs,
                                  topk_prompt_logprobs=topk_prompt_logprobs, adapter=self.adapter)

    def compute_logprobs(self, prompt) -> Future:
        """As ``InferenceModel.compute_logprobs``, on this client's weights."""
        if not self._cleanup.alive:
            return _closed()
        return self.engine.compute_logprobs(prompt, adapter=self.adapter)

    async def sample_async(self, *args, **kwargs):
        return await self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, prompt) -> list:
        return await self.compute_logprobs(prompt)

    def get_tokenizer(self):
        return self.engine.get_tokenizer()

    def get_base_model(self) -> str:
        return self.engine.get_base_model()

    async def get_base_model_async(self) -> str:
        return self.get_base_model()

    def close(self) -> None:
        self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _closed() -> Future:
    fut = Future()
    fut.set_exception(RuntimeError("this sampling client is closed"))
    return fut


def remove_folder(folder) -> Callable[[], None]:
    """A cleanup that deletes ``folder`` (a snapshot's adapter copy)."""
    return lambda: shutil.rmtree(folder, ignore_errors=True)


def close_engine(engine: InferenceModel, folder=None) -> Callable[[], None]:
    """A cleanup that closes a snapshot's own engine, then deletes its exported folder."""
    def cleanup():
        try:
            engine.close()
        except RuntimeError:  # collected on the engine's own thread: it stops after this step anyway
            pass
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return cleanup
