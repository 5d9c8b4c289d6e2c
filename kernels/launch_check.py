"""``python -m kernels.launch_check``: compile every Triton kernel for an H100 (sm_90) exactly
as its launcher launches it, without a GPU, and check its resources.

The interpreter that runs the numeric tests sees nothing of what only the compiler and
``ptxas`` see: compile errors, shared memory, registers, spills. This module runs the ops'
launchers on CPU (or meta) tensors at the target shapes of ``kernels.launch_targets``, with
two things changed and nothing else:

* Triton's active driver is a stand-in that reports an sm_90 target (device 0, stream 0),
  and ``JITFunction.run`` is Triton's own ``run`` with ``warmup=True``: Triton's binder
  computes the specialisation a real launch gets (pointer and integer 16-divisibility,
  integers equal to 1 made constants, constexprs, ``triton.heuristics``, num_warps and
  num_stages), compiles it through its cache (``~/.triton/cache``), and launches nothing.
* ``triton_base.COMPILE_ONLY`` is set to an H100 (132 SMs): the device gates take CPU
  tensors, every launch heuristic takes its GPU branch (``gpu_branch``, ``sm_count``), and
  ``kernels.configs`` reads the H100's table, so a tuned entry is compiled as it launches.
  TRITON_INTERPRET is unset (the module re-executes itself without it), and every kernel
  module's ``interpreting`` is checked to be the base's and False, so no tile choice sees
  the interpreter's.

Then ``ptxas -v`` (the wheel's, through the backend's own ``make_cubin``: same arch,
sm_90a where Triton uses it, same options) reports each distinct compiled kernel's
registers and spills (kept in Triton's cache beside the kernel). Families run in a pool
of ``--jobs`` processes (2 by default). One table row per kernel: family, kernel, dtype,
config (warps, stages, tile constexprs, set flags, integers specialised to 1), shared
bytes (Triton's ``metadata.shared``), registers, spill bytes (stores + loads), wgmma (in
the PTX). Exit status 1 when a compile fails, or when a bf16/fp16 kernel (one with a bf16 or
fp16 pointer argument) spills or needs more than 232,448 B of shared memory (the H100's
per-block maximum); float32 kernels may spill (reported, marked "fp32 spill ok").

``--only attention,cross_entropy`` restricts the check to some families (see
``launch_targets.FAMILIES``). Against another Triton (the GPU image's 3.6):
``pip install --no-deps --target /tmp/t36 triton==3.6.0`` then
``PYTHONPATH=/tmp/t36 python -m kernels.launch_check``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import sys
import time

# Triton 3.6 and 3.9 fuse multiply-adds unless TRITON_DEFAULT_FP_FUSION says otherwise (3.9
# warns that 3.10 will not): the check compiles with that default, set explicitly.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

SHARED_LIMIT = 232_448  # bytes of shared memory one block may use on an H100 (227 KiB)
H100_NAME, H100_SMS = "NVIDIA H100 80GB HBM3", 132
LOW_PRECISION = ("bf16", "fp16")


def _reexec_without_interpreter() -> None:
    # @triton.jit reads TRITON_INTERPRET when a kernel is defined: it must be unset before
    # the kernels package is imported, and `python -m` has imported it already.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "kernels.launch_check", *sys.argv[1:]], env)


@dataclasses.dataclass
class Row:
    """One distinct compiled kernel (or failed compile) and its resources."""
    family: str
    kernel: str
    dtype: str
    config: str
    shared: int = 0
    registers: int = 0
    spill: int = 0
    wgmma: bool = False
    error: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [f"compile failed: {self.error}"]
        found = []
        if self.dtype in LOW_PRECISION and self.spill:
            found.append(f"spills {self.spill} B")
        if self.shared > SHARED_LIMIT:
            found.append(f"shared {self.shared} B > {SHARED_LIMIT}")
        return found


_TRITON_RUN = None  # Triton's own JITFunction.run, kept when the Recorder replaces it


class Recorder:
    """Turns every launch into a compile for sm_90 and records each distinct kernel."""

    def __init__(self):
        import torch
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction

        self.target = GPUTarget("cuda", 90, 32)
        self.family = ""
        self.rows: list[Row] = []
        self.kernels: dict[str, tuple[Row, object]] = {}  # kernel hash -> (row, CompiledKernel)
        global _TRITON_RUN
        if _TRITON_RUN is None:  # a worker process may check several families, one Recorder each
            _TRITON_RUN = JITFunction.run
        recorder, target, triton_run = self, self.target, _TRITON_RUN

        class StandInDriver:  # what JITFunction.run asks of the driver before it compiles
            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

            def get_current_target(self):
                return target

            def get_active_torch_device(self):
                return torch.device("cpu")

        def compile_only(fn, *args, grid, warmup, **kwargs):
            try:
                kernel = triton_run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # noqa: BLE001 - recorded as a failed row
                cause = e
                while cause.__cause__ is not None:
                    cause = cause.__cause__
                row = Row(recorder.family, fn.fn.__name__, "?", _options_text(kwargs),
                          error=f"{type(cause).__name__}: {str(cause)[-600:]}")
                if row not in recorder.rows:  # each launch of a failing kernel compiles it again
                    recorder.rows.append(row)
                return None
            recorder.add(fn.fn.__name__, kernel)
            return kernel

        driver.set_active(StandInDriver())
        JITFunction.run = compile_only

    def add(self, name: str, kernel) -> None:
        key = kernel.hash if hasattr(kernel, "hash") else kernel.metadata.hash
        if key in self.kernels:
            return
        md = kernel.metadata
        signature = kernel.src.signature
        pointers = [t[1:] for t in signature.values() if isinstance(t, str) and t.startswith("*")]
        dtype = next((t for t in pointers if t in LOW_PRECISION), pointers[0] if pointers else "-")
        constants = {kernel.src.fn.arg_names[path[0]]: value for path, value in kernel.src.constants.items()
                     if len(path) == 1}
        row = Row(self.family, name, dtype, _config_text(md.num_warps, md.num_stages, constants), shared=md.shared,
                  wgmma="wgmma" in kernel.asm["ptx"])
        self.rows.append(row)
        self.kernels[key] = (row, kernel)


def _options_text(kwargs: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in kwargs.items() if k in ("num_warps", "num_stages") or k.isupper())


def _config_text(warps: int, stages: int, constants: dict) -> str:
    parts = [f"w{warps} s{stages}"]
    for name, value in constants.items():
        if hasattr(value, "_fields"):  # a NamedTuple of flags: the set ones not shown already
            parts += [field for field in value._fields
                      if getattr(value, field) is True and constants.get(field.upper()) is not True]
        elif value is True:
            parts.append(name)
        elif isinstance(value, int) and not isinstance(value, bool) and name.isupper():
            parts.append(f"{name}={value}")
    return " ".join(parts)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_resources(ptx: str, options: dict) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) of one kernel's PTX: ptxas -v run by the CUDA
    backend's own make_cubin (Triton's arch and options), its log captured."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    fields = {f.name for f in dataclasses.fields(backend.parse_options({}))}
    opt = backend.parse_options({k: v for k, v in options.items() if k in fields})
    log, dump = io.StringIO(), knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas's -v log
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, {}, opt, target.arch)
    finally:
        knobs.nvidia.dump_ptxas_log = dump
    text = log.getvalue()
    used, spill = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text)
    if used is None or spill is None:
        raise RuntimeError(f"no resource line in the ptxas log:\n{text[-2000:]}")
    return int(used.group(1)), int(spill.group(1)) + int(spill.group(2))


def check_family(family: str) -> tuple[list[Row], list[str]]:
    """Compile one family's launches and measure each distinct kernel with ptxas (run in a
    worker process: families compile in parallel). Returns the rows and the scenarios' notes."""
    from kernels import launch_targets, triton_base

    recorder = Recorder()
    triton_base.COMPILE_ONLY = triton_base.StandInGPU(H100_NAME, H100_SMS)
    check_gpu_branches()
    recorder.family = family
    notes = launch_targets.FAMILIES[family]()
    for key, (row, kernel) in recorder.kernels.items():
        try:
            row.registers, row.spill = cached_resources(key, kernel)
        except Exception as e:  # noqa: BLE001 - a failed ptxas fails the check
            row.error = f"ptxas: {type(e).__name__}: {str(e)[-600:]}"
    return recorder.rows, notes


def cached_resources(key: str, kernel) -> tuple[int, int]:
    """ptxas_resources of a compiled kernel, kept beside it in Triton's cache (its hash
    covers the source, the options and the ptxas version)."""
    from triton.runtime.cache import get_cache_manager

    cache, name = get_cache_manager(key), "launch_check_ptxas.json"
    path = cache.get_file(name)
    if path is not None:
        with open(path) as f:
            return tuple(json.load(f))
    md = kernel.metadata
    options = md._asdict() if hasattr(md, "_asdict") else dict(md.__dict__)
    found = ptxas_resources(kernel.asm["ptx"], {k: v for k, v in options.items() if isinstance(v, (bool, int, str))})
    cache.put(json.dumps(found), name, binary=False)
    return found


def check_gpu_branches() -> None:
    """Every kernel module's ``interpreting`` must be the base's and say False: the tile
    choices this check compiles are then the GPU's."""
    from kernels import triton_base

    if triton_base.interpreting():
        raise RuntimeError("launch_check: TRITON_INTERPRET is set; the kernels would take the interpreter's tiles")
    for name, module in sorted(sys.modules.items()):
        if name.startswith("kernels.") and getattr(module, "interpreting", triton_base.interpreting) is not \
                triton_base.interpreting:
            raise RuntimeError(f"launch_check: {name}.interpreting is not triton_base.interpreting")


def format_table(rows: list[Row]) -> str:
    head = ("family", "kernel", "dtype", "config", "shared B", "regs", "spill B", "wgmma", "verdict")
    body = []
    for r in rows:
        problems = r.problems()
        verdict = "FAIL: " + "; ".join(problems) if problems else "fp32 spill ok" if r.spill else "ok"
        body.append((r.family, r.kernel, r.dtype, r.config, str(r.shared), str(r.registers), str(r.spill),
                     "yes" if r.wgmma else "no", verdict))
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1] for line in [head] + body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    _reexec_without_interpreter()
    from kernels import launch_targets, triton_base

    parser = argparse.ArgumentParser(prog="python -m kernels.launch_check", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated families: " + ",".join(launch_targets.FAMILIES))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one family each (default 2)")
    args = parser.parse_args(argv)
    families = [f for f in args.only.split(",") if f] or list(launch_targets.FAMILIES)
    unknown = sorted(set(families) - set(launch_targets.FAMILIES))
    if unknown:
        parser.error(f"--only: unknown families {unknown}; choose from {list(launch_targets.FAMILIES)}")

    import triton

    start = time.perf_counter()
    if args.jobs <= 1:
        results = {family: check_family(family) for family in families}
    else:  # the costliest families first, so that the pool ends together
        order = sorted(families, key=lambda f: -launch_targets.COST.get(f, 0))
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = {family: pool.submit(check_family, family) for family in order}
            results = {family: future.result() for family, future in futures.items()}
    rows = []
    for family in families:
        family_rows, notes = results[family]
        rows += sorted(family_rows, key=lambda r: (r.kernel, r.dtype, r.config))
        for note in notes:
            print(f"note  {family}: {note}")
    print(format_table(rows))
    bad = [r for r in rows if r.problems()]
    print(f"{len(rows)} kernel specialisations for sm_90 (triton {triton.__version__}) in "
          f"{time.perf_counter() - start:.0f} s; {len(bad)} failing: {sorted({r.kernel for r in bad})}")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
