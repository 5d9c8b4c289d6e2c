"""Shared benchmark harness: timing, peak memory, and results as JSON + PNG.

Every result file records the device, library versions, git commit and the shapes, so a
number can always be traced to what produced it. GPU timings are medians of
``triton.testing.do_bench``; on CPU a wall-clock loop stands in (for smoke runs only).
Results go to ``benchmarks/results/<device>/<op>.{json,png}``, or under ``$BENCH_OUT``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def device_slug() -> str:
    name = device_name().lower().replace("nvidia ", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ENGINE_COMMIT")


def environment() -> dict:
    env = {
        "device": device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    return env


def gpu_or_smoke(argv: list[str] | None, doc: str, script: str) -> argparse.Namespace | None:
    """Parse a GPU benchmark's command line (``--smoke``: a tiny CPU run of the same code
    paths). None, after a line saying why, when there is no GPU and no ``--smoke``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (checks the code paths)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print(f"{script} measures GPU training throughput and needs a CUDA GPU; use --smoke for a CPU check")
        return None
    return args


def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds per call. ``warmup`` and ``rep`` are milliseconds on GPU (as in
    do_bench) and call counts on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(min(warmup, 3)):
        fn()
    times = []
    for _ in range(max(3, min(rep, 10))):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable[[], object]) -> int | None:
    """Peak device memory allocated by ``fn`` above what was allocated before it (GPU only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def results_dir() -> Path:
    out = os.environ.get("BENCH_OUT")
    return Path(out) if out else ROOT / "results" / device_slug()


def save(op: str, rows: list[dict], *, x: str, y: str, series: str, title: str, ylabel: str,
         meta: dict | None = None, plot_rows: list[dict] | None = None) -> Path:
    """Write ``<op>.json`` (environment, meta, rows) and ``<op>.png`` (``y`` against ``x``,
    one line per distinct ``series``, over ``plot_rows`` if given); returns the JSON path."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{op}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"op": op, "env": environment(), "meta": meta or {}, "rows": rows}, indent=1))
    tmp.replace(path)
    _plot(out / f"{op}.png", plot_rows or rows, x=x, y=y, series=series, title=f"{title}\n{device_name()}", ylabel=ylabel)
    return path


def _plot(path: Path, rows, *, x, y, series, title, ylabel) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in dict.fromkeys(r[series] for r in rows):
        pts = [(r[x], r[y]) for r in rows if r[series] == name and r.get(y) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=str(name))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` for the end of a benchmark's output."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)
