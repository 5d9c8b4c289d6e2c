"""Run a Python script or module with Triton's compile time counted, for gpu_check.sh's
"compile" line of each step:

    python -m benchmarks.compile_clock benchmarks/bench_lora.py --smoke
    python -m benchmarks.compile_clock -m pytest -q -m gpu tests

What it counts: ``triton.knobs.compilation.listener`` (triton 3.6 and 3.9) is called by
the compiler after every compilation with its own timings (making the IR, every lowering
stage down to the cubin, ptxas included, and storing the result); the times of the ones
that were not cache hits are summed. Not counted: the JIT's argument specialisation and
loading the cubin into the driver (milliseconds), and processes this one spawns (their
compilations still show in the Triton cache, which gpu_check.sh counts as well). At exit
one line ``<seconds> <compilations> <cache hits>`` is appended to ``$ENGINE_COMPILE_LOG``
(printed when it is unset).
"""
from __future__ import annotations

import atexit
import os
import runpy
import sys

TOTALS = {"us": 0, "compiles": 0, "hits": 0}


def _listener(*, src, metadata, metadata_group, times, cache_hit) -> None:
    if cache_hit:
        TOTALS["hits"] += 1
    else:
        TOTALS["compiles"] += 1
        TOTALS["us"] += times.total


def _report() -> None:
    line = f"{TOTALS['us'] / 1e6:.1f} {TOTALS['compiles']} {TOTALS['hits']}\n"
    path = os.environ.get("ENGINE_COMPILE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line)
    else:
        print(f"triton compilation: {line.split()[0]} s in {TOTALS['compiles']} compilations", file=sys.stderr)


def install() -> bool:
    """Count this process's Triton compilations from now on; False without triton."""
    try:
        from triton import knobs
    except ImportError:
        return False
    knobs.compilation.listener = _listener
    atexit.register(_report)
    return True


def main() -> None:
    args = sys.argv[1:]
    if not args or (args[0] == "-m" and len(args) < 2):
        sys.exit("usage: python -m benchmarks.compile_clock (SCRIPT | -m MODULE) [ARGS...]")
    install()
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
