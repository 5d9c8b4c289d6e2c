"""One worker process per rank, driven from the caller's process.

``WorkerPool(tp, setup, *args, dp=1)`` starts ``dp · tp`` processes (``python -m`` entries
fed over a socket, launch.py: the caller's script is never re-imported, so it needs no
``if __name__ == "__main__":`` guard), each of which joins torch.distributed (NCCL on GPUs,
gloo on CPUs, collectives with a timeout; with dp > 1 a ``(dp, tp)`` DeviceMesh,
engine/parallel/mesh.py) and runs ``state = setup(ctx, *args)``. ``pool.run(fn, *args)``
then runs ``fn(state, *args)`` on every rank and returns the results in rank order. ``fn``
and ``setup`` must be picklable (module-level functions of an importable module).

The same setup code runs unchanged under ``torchrun``: call ``init_distributed()`` in each
rank (``init_distributed(tp=t)`` for a ``(world / t, t)`` mesh), then ``setup(ctx, ...)``
yourself, and ``shutdown()`` last.

Workers ignore SIGINT: a Ctrl-C, which a terminal sends to every process of the group,
is the caller's to handle (it closes the pool, so the workers exit).

Failures: a worker that raises reports the exception with its rank and traceback; a worker
that dies is noticed by polling its exit code, and reported with the end of its stderr.
Either way ``run`` raises ``WorkerError`` naming the rank at once. When every rank
answered (each returned or raised) the pool stays usable: that call alone failed, and code that validates before any collective (so all ranks
raise alike) leaves every rank as it was. When a rank died, timed out, or did not answer
within ``ERROR_GRACE_S`` of another rank's error (it waits in a collective the failed rank
never joined), the pool shuts down, terminating and joining every process: no orphans,
and the rendezvous port is released. The message puts the dead rank and its signal first
and shortens the other ranks' reports (their errors follow from the death).
"""
from __future__ import annotations

import datetime
import gc
import os
import signal
import socket
import time
import traceback
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing  # noqa: F401 - registers the tensor reductions (shared memory) on the pipes

from kernels.collectives import GroupRef

from .launch import WorkerProcess
from .mesh import mesh_groups

DEFAULT_TIMEOUT_S = 120.0
ERROR_GRACE_S = 2.0  # how long the other ranks have to answer once one rank failed


_PENDING = object()


class WorkerError(RuntimeError):
    """A tensor-parallel worker raised or died; the message names the rank.
    ``pool_closed``: the pool shut down (a rank died or hung); otherwise it is usable."""

    def __init__(self, message: str, *, pool_closed: bool = True):
        super().__init__(message)
        self.pool_closed = pool_closed


@dataclass
class RankContext:
    rank: int
    world_size: int
    group_ref: GroupRef  # the torch.distributed group of the tensor-parallel ranks, held weakly
    device: torch.device
    dp_group_ref: GroupRef = field(default_factory=lambda: GroupRef(None))  # its replicas' (dp > 1), weakly
    dp: int = 1
    dp_rank: int = 0

    @property
    def group(self):
        return self.group_ref()

    @property
    def dp_group(self):
        """The group over which this rank's replicas sum gradients; None at dp=1."""
        return self.dp_group_ref()


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, *, tp: int | None = None) -> RankContext:
    """Join the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) unless already initialised; pick this rank's device.
    ``tp``: the tensor-parallel degree; the world then forms a ``(world / tp, tp)``
    DeviceMesh (data × tensor parallelism). Default: every rank in one tp group."""
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when
        # first imported (torch._dynamo imports it): imported after the group exists, it would
        # keep the group alive past shutdown(). Imported now, its defaults are None.
        import torch.distributed.nn.functional  # noqa: F401

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if tp is None or tp == world:
        return RankContext(rank, world, GroupRef(dist.group.WORLD), device)
    tp_group, dp_group = mesh_groups(device.type, tp)
    return RankContext(rank, world, GroupRef(tp_group), device, GroupRef(dp_group), world // tp, rank // tp)


def shutdown(*, barrier: bool = True) -> None:
    """End this process's part in torch.distributed: call it last, on every rank, in a script
    that torchrun launched (WorkerPool's workers call it themselves).

    Waits for every rank (``barrier=False`` when a peer may be gone), then destroys the
    process groups. The engine holds groups weakly (``GroupRef``), so that frees them and
    joins gloo's worker threads here. Left running into the interpreter's shutdown, such a
    thread may release a Python object there and abort the process ("terminate called
    without an active exception", exit -6). A group that something else still holds stays
    alive: this warns, naming the holders' types."""
    if not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    world = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()  # reference cycles (autograd graphs, tracebacks) that reach a group
    if world() is not None:
        warnings.warn(f"engine.parallel.shutdown: the process group is still referenced (by {_holders(world())}), "
                      "so gloo's threads outlive destroy_process_group and may abort the interpreter's exit; "
                      "drop those references (keep ctx.group, not the group itself) before shutdown()",
                      RuntimeWarning, stacklevel=2)


def _holders(obj) -> str:
    """What holds ``obj``: objects that refer to it directly or through untracked tuples
    (function defaults, argument tuples), for shutdown's warning."""
    def holds(o, depth=0):
        return any(r is obj or (depth < 2 and type(r) is tuple and not gc.is_tracked(r) and holds(r, depth + 1))
                   for r in gc.get_referents(o))

    names = {f"{o.__module__}.{o.__qualname__}" if callable(o) and hasattr(o, "__qualname__") else type(o).__name__
             for o in gc.get_objects() if holds(o)}
    return ", ".join(sorted(names)) or "objects outside Python's garbage collector"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, tp, port, timeout_s, setup, args, conn):
    # Ctrl-C in a terminal reaches the whole process group: the parent handles it and closes
    # the pool (EOF on the pipe ends ``_serve``); a worker that also raised KeyboardInterrupt
    # would print its own traceback and could leave its peers waiting in a collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        _serve(conn, setup, args, timeout_s, tp)
    finally:
        shutdown(barrier=False)  # a peer may be gone: no collective


def _serve(conn, setup, args, timeout_s, tp) -> None:
    """Run setup, then the caller's calls until it closes the pipe; the rank's state (and
    everything that reaches its process group) is dropped on return."""
    try:
        state = setup(init_distributed(timeout_s, tp=tp), *args)
        conn.send(("ok", None))
    except BaseException as e:  # noqa: BLE001 - reported to the caller, then exit
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        except Exception as e:  # noqa: BLE001 - an unreadable call (its arguments' sender is gone)
            conn.send(("error", f"could not read the call: {type(e).__name__}: {e}"))
            continue
        if msg is None:
            break
        fn, fargs = msg
        try:
            conn.send(("ok", fn(state, *fargs)))
        except BaseException as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class PoolLifecycle:
    """``with`` and garbage collection for a worker pool (local processes or Ray actors):
    ``close()`` on leaving the block, ``close(force=True)`` on collection of a pool still open."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            still_open = not self.closed
        except AttributeError:  # __init__ failed before its workers existed
            return
        if still_open:
            self.close(force=True)


class WorkerPool(PoolLifecycle):
    """``dp · tp`` worker processes: ``dp`` replicas of a ``tp``-way group (rank order: the
    tp ranks of replica 0, then of replica 1, ...)."""

    def __init__(self, tp: int, setup, *args, dp: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S):
        for name, n in (("tp", tp), ("dp", dp)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        world = dp * tp
        if torch.cuda.is_available() and torch.cuda.device_count() < world:
            raise ValueError(f"dp·tp={world} needs {world} GPUs, this machine has {torch.cuda.device_count()}")
        self.tp, self.dp, self.world, self.timeout_s = tp, dp, world, timeout_s
        port = free_port()
        self._conns, self._procs = [], []
        self._closed_by = ""
        try:
            for rank in range(world):
                proc = WorkerProcess(_worker, (rank, world, tp, port, timeout_s, setup, args),
                                     name=f"engine-tp-rank{rank}")
                self._conns.append(proc.conn)
                self._procs.append(proc)
        except BaseException:  # setup or args do not pickle: stop the ranks already started
            self.close(force=True)
            raise
        try:
            self._collect(timeout_s + 60)  # setup results (model loading)
        except WorkerError as e:  # a rank whose setup failed has exited
            self.close(force=True)
            e.pool_closed = True
            raise

    @property
    def closed(self) -> bool:
        return not self._procs

    def run(self, fn, *args, timeout_s: float | None = None) -> list:
        """``fn(state, *args)`` on every rank; results in rank order. Raises ``WorkerError``
        if a rank raised (the pool stays usable) or died (the pool closes)."""
        if not self._procs:
            raise WorkerError("the worker pool is closed" + (f" ({self._closed_by})" if self._closed_by else ""))
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((fn, args))
            except (BrokenPipeError, OSError):
                self._procs[rank].join(timeout=1)
                self._fail(f"rank {rank} {_exit_text(self._procs[rank].exitcode)}")
        return self._collect(timeout_s or self.timeout_s)

    def _collect(self, timeout_s: float) -> list:
        results, pending = [_PENDING] * self.world, set(range(self.world))
        failures: dict[int, tuple[str, str]] = {}  # rank -> ("died" | "raised", what)
        deadline, grace = time.monotonic() + timeout_s, None
        while pending:
            for rank in sorted(pending):
                failure = self._poll(rank, results)
                if failure is not None:
                    failures[rank] = failure
                if failure is not None or results[rank] is not _PENDING:
                    pending.discard(rank)
            now = time.monotonic()
            if failures and grace is None:
                # The others either fail too (their collectives break) or answer, or they wait
                # in a collective the failed rank never joined: they get a short while.
                grace = now + ERROR_GRACE_S
            if not pending or now > deadline or (grace is not None and now > grace):
                break
            time.sleep(0.005)
        if not failures and not pending:
            return results
        died = sorted((r, what) for r, (kind, what) in failures.items() if kind == "died")
        raised = sorted((r, what) for r, (kind, what) in failures.items() if kind == "raised")
        summaries, detail = _raised(raised, full=not died)
        for r, _ in died:  # why it died, in its own words (an import error, a crash in setup)
            tail = self._procs[r].stderr_tail()
            detail += f"\nrank {r}'s stderr ends with:\n{tail}" if tail else ""
        parts = [f"rank {r} {what}" for r, what in died] + summaries
        if pending:
            first = min(failures) if failures else None
            parts.append(f"rank(s) {sorted(pending)} did not answer " + (
                f"within {timeout_s:.0f} s" if first is None else
                f"within {ERROR_GRACE_S:g} s of rank {first}'s failure (waiting in a collective it never joined)"))
        if died or pending:
            self._fail("; ".join(parts), detail)
        raise WorkerError("; ".join(parts) + detail, pool_closed=False)

    def _poll(self, rank: int, results: list) -> tuple[str, str] | None:
        """Store rank's answer in results if it came; return a failure (kind, what), if any."""
        conn, proc = self._conns[rank], self._procs[rank]
        if not conn.poll():
            if proc.is_alive():
                return None
            if not conn.poll():  # an answer sent just before it exited is still read
                return "died", _exit_text(proc.exitcode)
        try:
            status, value = conn.recv()
        except Exception as e:  # noqa: BLE001 - EOF, or a tensor whose sender died before it was read
            # EOF: it closed its end and is exiting; the interpreter's teardown (torch's) may take seconds.
            proc.join(timeout=5 if isinstance(e, EOFError) else 1)
            if proc.is_alive():
                return "died", f"sent an answer that cannot be read ({type(e).__name__}: {e})"
            return "died", _exit_text(proc.exitcode)
        if status == "error":
            return "raised", value
        results[rank] = value
        return None

    def _fail(self, message: str, detail: str = ""):
        self._closed_by = message
        self.close(force=True)
        raise WorkerError(message + "; the worker pool is closed" + detail, pool_closed=True)

    def close(self, force: bool = False) -> None:
        """Stop every worker (politely unless ``force``) and wait for them to exit."""
        for conn in self._conns:
            try:
                if not force:
                    conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=0 if force else 10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"died (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f"died (killed by signal {-code})"
    return f"died (exit code {code})"


def _raised(raised: list[tuple[int, str]], *, full: bool) -> tuple[list[str], str]:
    """("rank r raised <first line>" per distinct error, ranks that raised alike sharing one
    entry; the first error's traceback when ``full``). With a dead rank the others' errors
    follow from the death: their first line says enough."""
    groups: dict[str, list[int]] = {}
    for rank, text in raised:
        line = (text.splitlines() or [""])[0]
        line = line if len(line) <= 160 else line[:157] + "..."
        groups.setdefault(line, []).append(rank)
    parts = [f"{'rank' if len(ranks) == 1 else 'ranks'} {', '.join(map(str, ranks))} raised {line}"
             for line, ranks in groups.items()]
    detail = ""
    if full and raised:
        rank, text = raised[0]
        detail = "\n".join(text.splitlines()[1:]).strip()
        detail = f"\nrank {rank}: {detail}" if detail else ""
    return parts, detail
