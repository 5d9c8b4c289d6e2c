"""Worker processes that never re-import the caller's script.

multiprocessing's ``spawn`` runs the caller's main module again in every child (to find
the functions it pickled): a script without an ``if __name__ == "__main__":`` guard then
spawns again inside its own workers, and each dies with exit code 1, the cause visible only
in their stderr. ``WorkerProcess`` starts ``python -m engine.parallel.worker_main FD``
instead, a module that imports nothing of the caller, and feeds it over a socket pair
(a ``multiprocessing.connection.Connection`` on each side, as ``Pipe()`` gives):

1. plain data: the caller's ``sys.path`` (so the functions it names unpickle in the child),
   multiprocessing's authkey (tensors then travel through shared memory, as between
   spawned processes) and the caller's pid (the child exits once it is orphaned);
2. ``(target, args)``: pickled by reference; the child runs ``target(*args, conn)``.

The child's stderr comes back through a pipe: a thread copies it to the caller's
``sys.stderr`` line by line and keeps the last lines, so a worker that cannot start (an
import error, a function that does not unpickle) is reported with its own words
(``stderr_tail``). The child ignores SIGINT: Ctrl-C reaches the caller, which closes the
pool. The interface is ``multiprocessing.Process``'s (is_alive, exitcode, join,
terminate, kill) so the pool treats both alike.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding the engine package
_TAIL_LINES = 30


class WorkerProcess:
    """One worker: ``WorkerProcess(target, args, name)`` starts it; ``.conn`` is the
    caller's end of its connection, already past the set-up messages."""

    def __init__(self, target, args: tuple, *, name: str):
        self.name = name
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "engine.parallel.worker_main", str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE, env=env)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._reader = threading.Thread(target=self._copy_stderr, name=f"{name}-stderr", daemon=True)
        self._reader.start()
        try:
            self.conn.send((list(sys.path), bytes(multiprocessing.current_process().authkey), os.getpid()))
            self.conn.send((target, args))
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died at once: the pool reads its exit code and stderr
        except BaseException:  # target or args do not pickle: no worker to keep
            self.kill()
            self.join()
            self.conn.close()
            raise

    def _copy_stderr(self) -> None:
        for raw in iter(self._proc.stderr.readline, b""):
            line = raw.decode(errors="replace")
            self._tail.append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # the caller's stderr is closed
                pass
        self._proc.stderr.close()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; negative: the signal that ended it (as multiprocessing)."""
        return self._proc.poll()

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self._proc.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self._proc.kill()

    def stderr_tail(self) -> str:
        """The last lines it wrote to stderr (all of them once it has exited)."""
        if not self.is_alive():
            self._reader.join(timeout=2)
        return "\n".join(self._tail)
