"""Adapter slots: which PEFT adapters the engine serves, and the requests waiting for one.

The model holds up to ``max_adapters`` adapters at once, stacked (``set_adapter_stack``:
slot k serves the tokens whose adapter id is k, -1 the base model), so one step mixes
requests on different adapters. A slot holds one *version* of an adapter folder, keyed by
its resolved path and ``adapter_stamp`` (inode, modification time and size of its files).

The reload rule: when a request is admitted, its folder's stamp is read. A version no slot
holds is read whole (``read_peft_snapshot``: both files between two equal stamps), checked
against the unsharded model's shapes and loaded into a free slot; the request is bound to
that version (``Request.adapter_key``) until it ends, preemptions included. So an adapter
re-saved to the same folder serves every request admitted after the save, and a request
admitted before it finishes on the tensors it started with: a step may hold both versions,
in two slots, but no request ever sees both. A slot is free when no admitted request is
bound to it (the folder's outdated version is replaced first); a request finding none free
waits in ``waiting`` (with one slot, the new version waits for the old one's last request).

Loading ships the new version's tensors, and only those, to every rank (``install``: each
rank keeps the versions of its slots, so no file is read again), which rebuilds the stacks
and drops the CUDA graphs captured with the old ones.
"""
from __future__ import annotations

from typing import Callable, Iterable

from engine.models import adapter_stamp, adapter_tensors, read_peft_adapter, read_peft_snapshot, set_adapter_stack

from .scheduler import Request, resolve_adapter


class AdapterSlots:
    """The host side of the adapter pool: ``keys[k]`` is the (resolved folder, stamp) of the
    adapter version in slot k.

    Args:
        max_adapters: the number of slots.
        shapes: returns the unsharded model on the meta device; an adapter is checked
            against it before any rank sees it (a bad adapter fails its request only).
        install: ``install(keys, new)`` stacks the versions of ``keys`` on every rank, those
            of ``new`` ({key: (state dict, adapter_config dict)}) added (the engine core
            finishes the step in flight first: it may still read the old stacks).
    """

    def __init__(self, max_adapters: int, shapes: Callable, install: Callable[[list, dict], None]):
        self.max_adapters = max_adapters
        self.keys: list[tuple[str, tuple]] = []
        self.waiting: list[Request] = []  # requests whose adapter has no slot yet
        self._shapes = shapes
        self._install = install

    def defer(self, req: Request) -> None:
        self.waiting.append(req)

    def slot(self, req: Request) -> int:
        """The adapter id of a request's tokens (-1: the base model)."""
        return -1 if req.adapter_key is None else self.keys.index(req.adapter_key)

    def admit(self, active: Iterable[Request]) -> list[Request]:
        """The waiting requests that may run now, bound to the current version of their
        adapter, loaded; the others keep waiting. ``active`` (a live view): the admitted
        requests, whose versions keep their slots. A request whose adapter cannot be read
        fails its own future."""
        ready, still, stamps = [], [], {}
        for req in self.waiting:
            try:
                if req.adapter is not None:
                    if req.adapter not in stamps:  # one look at each folder per call
                        stamps[req.adapter] = adapter_stamp(req.adapter)
                    key = (req.adapter, stamps[req.adapter])
                    if key not in self.keys:
                        key = self._load(req.adapter, [*active, *ready])
                        if key is None:
                            still.append(req)  # no free slot yet
                            continue
                        stamps[req.adapter] = key[1]
                    req.adapter_key = key
            except Exception as e:  # noqa: BLE001 - unreadable adapter: this request only
                req.future.set_exception(_unloadable(req.adapter, e))
                continue
            ready.append(req)
        self.waiting = still
        return ready

    def check(self, adapter) -> str:
        """The resolved folder of ``adapter``, read and checked now (InferenceModel's
        default adapter: a bad one fails the construction, not every request)."""
        path = resolve_adapter(adapter)
        try:
            self._read(path)
        except Exception as e:  # noqa: BLE001 - re-raised naming the adapter
            raise _unloadable(path, e) from e
        return path

    def _read(self, path: str):
        # Validate first (names, shapes and values against the unsharded model): an error
        # leaves the pool as it was, and under tensor parallelism never reaches the ranks.
        state, config, stamp = read_peft_snapshot(path)
        adapter_tensors(self._shapes(), *read_peft_adapter(state, config))
        return state, config, stamp

    def _load(self, path: str, users: list[Request]) -> tuple | None:
        """Load the current version of ``path`` into a free slot; its key, or None when
        every slot is bound to an admitted request."""
        keys, used = list(self.keys), {r.adapter_key for r in users}
        free = [i for i, k in enumerate(keys) if k not in used]
        outdated = [i for i in free if keys[i][0] == path]
        at = outdated[0] if outdated else len(keys) if len(keys) < self.max_adapters else free[0] if free else None
        if at is None:
            return None
        state, config, stamp = self._read(path)
        key = (path, stamp)
        if key not in keys:
            keys[at:at + 1] = [key]
            self._install(keys, {key: (state, config)})
            self.keys = keys
        return key

    @staticmethod
    def install(model, graphs, held: dict, keys: list, new: dict) -> dict:
        """On a rank: stack the versions of ``keys`` (from ``new``, else from ``held``, the
        versions this rank holds) into ``model`` and drop the CUDA graphs (``graphs``, or
        None), whose captured projections may be replaced modules. The versions now held."""
        held = {k: new[k] if k in new else held[k] for k in keys}
        set_adapter_stack(model, [held[k] for k in keys])
        if graphs is not None:
            graphs.reset()
        return held


def _unloadable(adapter: str, err: Exception) -> ValueError:
    return ValueError(f"adapter {adapter!r} could not be loaded: {err}")
