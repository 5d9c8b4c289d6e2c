"""Ranks placed by Ray: one actor per rank, for a single controller whose ranks span nodes.

``RayWorkerPool(tp, setup, *args, dp=1)`` has WorkerPool's interface (``run``, ``close``,
``closed``, ``tp``, ``dp``, ``world``) and runs the same per-rank code: it reserves a
placement group of ``dp · tp`` bundles (one per rank: a CPU, plus a GPU when the cluster
has GPUs; ``PACK``, so the ranks of a tp group land on one node when they fit), starts one
actor per bundle, and each actor joins torch.distributed at rank 0's address
(``init_distributed(tp=tp)``, the same as a local worker or a torchrun rank) and runs
``state = setup(ctx, *args)``. ``run(fn, *args)`` calls ``fn(state, *args)`` on every rank.
Ray pickles ``setup`` and ``fn`` by reference: they must be importable on every node (the
engine's own are; a script's own functions need Ray's ``runtime_env`` ``py_modules``).

Chosen by ``spawn_train(..., launcher="ray")``, or by default when ``ray.init`` was called in
this process (``start_pool``); Ray is the optional extra ``engine[ray]``.

Failures: an actor whose call raised fails that call (``WorkerError`` naming the rank; the
pool stays usable when every rank answered); a dead actor, or ranks that did not answer
within ``ERROR_GRACE_S`` of another's failure, close the pool (actors killed, placement
group removed).
"""
from __future__ import annotations

import os
import sys
import time

import torch

from .workers import (DEFAULT_TIMEOUT_S, ERROR_GRACE_S, PoolLifecycle, WorkerError, WorkerPool, free_port,
                      init_distributed, shutdown)

LAUNCHERS = ("local", "ray")


def start_pool(launcher: str | None, tp: int, setup, *args, dp: int = 1):
    """A WorkerPool (``"local"``) or a RayWorkerPool (``"ray"``); ``None``: Ray when this
    process called ``ray.init``, else local processes."""
    if launcher is None:
        ray = sys.modules.get("ray")
        launcher = "ray" if ray is not None and ray.is_initialized() else "local"
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS} or None, got {launcher!r}")
    cls = RayWorkerPool if launcher == "ray" else WorkerPool
    return cls(tp, setup, *args, dp=dp)


class _Rank:
    """The body of one rank's actor (wrapped by ``ray.remote`` in RayWorkerPool)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.state = rank, world, None

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def start(self, addr: str, port: int, tp: int, timeout_s: float, setup, args) -> None:
        import ray

        local = "0" if ray.get_gpu_ids() else str(self.rank)  # Ray shows each actor its own GPU as cuda:0
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank), WORLD_SIZE=str(self.world),
                          LOCAL_RANK=local)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        self.state = setup(init_distributed(timeout_s, tp=tp), *args)

    def call(self, fn, args):
        return fn(self.state, *args)

    def stop(self) -> None:
        self.state = None  # everything that reaches the process group, before it is destroyed
        shutdown(barrier=False)


class RayWorkerPool(PoolLifecycle):
    """``dp · tp`` Ray actors, one per bundle of a placement group."""

    def __init__(self, tp: int, setup, *args, dp: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S):
        try:
            import ray
            from ray.util.placement_group import placement_group, remove_placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise ImportError("launcher='ray' needs Ray: pip install 'engine[ray]'") from e
        for name, n in (("tp", tp), ("dp", dp)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if not ray.is_initialized():
            ray.init()
        self.tp, self.dp, self.world, self.timeout_s = tp, dp, dp * tp, timeout_s
        self._ray, self._remove = ray, remove_placement_group
        self._closed_by = ""
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
        self._group = placement_group([bundle] * self.world, strategy="PACK")
        self._actors = []
        try:
            if not ray.wait([self._group.ready()], timeout=timeout_s)[0]:
                raise WorkerError(f"Ray could not place {self.world} bundles of {bundle} within {timeout_s:.0f} s "
                                  f"(cluster: {ray.cluster_resources()})")
            actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(_Rank)
            self._actors = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._group, placement_group_bundle_index=r)).remote(r, self.world)
                for r in range(self.world)]
            addr, port = ray.get(self._actors[0].address.remote(), timeout=timeout_s)
            self._collect([a.start.remote(addr, port, tp, timeout_s, setup, args) for a in self._actors],
                          timeout_s + 60)
        except BaseException:
            self.close(force=True)
            raise

    @property
    def closed(self) -> bool:
        return not self._actors

    def run(self, fn, *args, timeout_s: float | None = None) -> list:
        """``fn(state, *args)`` on every rank; results in rank order (WorkerPool.run)."""
        if not self._actors:
            raise WorkerError("the worker pool is closed" + (f" ({self._closed_by})" if self._closed_by else ""))
        return self._collect([a.call.remote(fn, args) for a in self._actors], timeout_s or self.timeout_s)

    def _collect(self, refs: list, timeout_s: float) -> list:
        ray = self._ray
        results, failures = {}, {}
        index = {ref: r for r, ref in enumerate(refs)}
        pending, deadline, grace = list(refs), time.monotonic() + timeout_s, None
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.05)
            for ref in ready:
                rank = index[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None) or e
                    failures[rank] = ("raised", f"raised {type(cause).__name__}: {cause}")
                except ray.exceptions.RayActorError as e:
                    failures[rank] = ("died", f"died ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            now = time.monotonic()
            if failures and grace is None:
                grace = now + ERROR_GRACE_S
            if now > deadline or (grace is not None and now > grace):
                break
        if not failures and not pending:
            return [results[r] for r in range(len(refs))]
        parts = [f"rank {r} {what}" for r, (_, what) in sorted(failures.items())]
        if pending:
            parts.append(f"rank(s) {sorted(index[ref] for ref in pending)} did not answer")
        message = "; ".join(parts)
        if pending or any(kind == "died" for kind, _ in failures.values()):
            self._closed_by = message
            self.close(force=True)
            raise WorkerError(message + "; the worker pool is closed", pool_closed=True)
        raise WorkerError(message, pool_closed=False)

    def close(self, force: bool = False) -> None:
        """Stop every actor (letting it leave torch.distributed unless ``force``), then kill
        them and remove the placement group."""
        ray = self._ray
        if self._actors and not force:
            try:
                ray.get([a.stop.remote() for a in self._actors], timeout=30)
            except Exception:  # noqa: BLE001 - a rank already gone: kill below
                pass
        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if getattr(self, "_group", None) is not None:
            self._remove(self._group)
            self._group = None
