"""Run ``python -m engine serve`` as a child process and wait until it serves (tests,
benchmarks, notebooks)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]


def launch(models: dict[str, str | Path], *, checkpoint_dir: str | Path, api_key: str | None = None,
           args: tuple[str, ...] = (), stderr=None, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start the server on a free loopback port; returns the process and its base URL once it
    printed ``serving on http://...``. A server that does not get there within ``timeout``
    seconds is killed and RuntimeError raised. ``stderr``: where its log goes (a file)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, "-m", "engine", "serve", "--port", "0", "--checkpoint-dir", str(checkpoint_dir)]
    for name, path in models.items():
        command += ["--model", f"{name}={path}"]
    command += ["--api-key", api_key] if api_key else []
    proc = subprocess.Popen(command + list(args), stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=timeout)
    if not line or not line[0].startswith("serving on http://"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"python -m engine serve did not start within {timeout:g} s (stdout: {line!r})")
    return proc, line[0].split()[-1]
