"""Adapter slots: which PEFT adapters the engine serves, and the requests waiting for one.

The model holds up to ``max_adapters`` adapters at once, stacked (``set_adapter_stack``:
slot k serves the tokens whose adapter id is k, -1 the base model), so one step mixes
requests on different adapters. A request naming an adapter not in a slot waits in
``waiting`` until a slot is free (its adapter used by no active request), then its
adapter is read, checked against the unsharded model's shapes and loaded. Loading
replaces the stacks on every rank (``install``), which drops the CUDA graphs captured
with the old ones.
"""
from __future__ import annotations

from typing import Callable, Iterable

from engine.models import adapter_tensors, read_peft_adapter, set_adapter_stack

from .scheduler import Request


class AdapterSlots:
    """The host side of the adapter pool: ``paths[k]`` is the resolved folder in slot k.

    Args:
        max_adapters: the number of slots.
        shapes: returns the unsharded model on the meta device; an adapter is checked
            against it before any rank sees it (a bad adapter fails its request only).
        install: loads a new list of paths on every rank (the engine core finishes the
            step in flight first: it may still read the old stacks).
    """

    def __init__(self, max_adapters: int, shapes: Callable, install: Callable[[list[str]], None]):
        self.max_adapters = max_adapters
        self.paths: list[str] = []
        self.waiting: list[Request] = []  # requests whose adapter has no slot yet
        self._shapes = shapes
        self._install = install

    def defer(self, req: Request) -> None:
        self.waiting.append(req)

    def slot(self, adapter: str | None) -> int:
        """The adapter id of a request's tokens (-1: the base model)."""
        return -1 if adapter is None else self.paths.index(adapter)

    def admit(self, active: Iterable[Request]) -> list[Request]:
        """The waiting requests that may run now, their adapters loaded; the others keep
        waiting. ``active`` (a live view): the admitted requests, whose adapters keep their
        slots. A request whose adapter cannot be read fails its own future."""
        ready, still = [], []
        for req in self.waiting:
            needs_slot = req.adapter is not None and req.adapter not in self.paths
            try:
                if needs_slot and not self._load(req.adapter, [*active, *ready]):
                    still.append(req)  # no free slot yet
                    continue
            except Exception as e:  # noqa: BLE001 - unreadable adapter: this request only
                req.future._set_exception(ValueError(f"adapter {req.adapter!r} could not be loaded: {e}"))
                continue
            ready.append(req)
        self.waiting = still
        return ready

    def _load(self, path: str, users: list[Request]) -> bool:
        # Validate first (names and shapes against the unsharded model): an error leaves the
        # pool as it was, and under tensor parallelism never reaches the ranks.
        adapter_tensors(self._shapes(), *read_peft_adapter(path))
        paths = list(self.paths)
        if len(paths) >= self.max_adapters:
            used = {r.adapter for r in users}
            free = [i for i, a in enumerate(paths) if a not in used]
            if not free:
                return False
            paths[free[0]] = path
        else:
            paths.append(path)
        self._install(paths)
        self.paths = paths
        return True

    @staticmethod
    def install(model, graphs, paths: list[str]) -> None:
        """On a rank: stack the adapters of ``paths`` into ``model`` and drop the CUDA graphs
        (``graphs``, or None), whose captured projections may be replaced modules."""
        set_adapter_stack(model, paths)
        if graphs is not None:
            graphs.reset()
