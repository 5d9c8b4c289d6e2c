"""The entry of a worker process: ``python -m engine.parallel.worker_main FD``.

Started by ``engine.parallel.launch.WorkerProcess``, which sends over the connection on
file descriptor FD first (sys.path, authkey, parent pid), then ``(target, args)``; this
runs ``target(*args, conn)``. Nothing here imports the caller's script, and nothing else
imports this module (``python -m`` runs it as ``__main__``).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

_PARENT_POLL_S = 0.5


def _exit_when_orphaned(parent: int) -> None:
    """A caller killed outright (SIGKILL) closes no pool: its workers, reparented, exit here
    within half a second instead of waiting in a collective for ever."""
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    conn = Connection(fd)
    sys_path, authkey, parent = conn.recv()
    sys.path[:] = sys_path
    multiprocessing.current_process().authkey = authkey
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="orphan-watch", daemon=True).start()
    try:
        target, args = conn.recv()
    except Exception:  # reported through stderr, whose end the caller's error quotes
        traceback.print_exc()
        print("engine worker: the function it was given to run does not import here; functions a worker runs "
              "must live in an importable module, not in the script run as __main__ nor in a notebook cell",
              file=sys.stderr, flush=True)
        os._exit(1)  # at once: the caller reads the exit code when it sees the connection close
    target(*args, conn)


if __name__ == "__main__":
    main(int(sys.argv[1]))
