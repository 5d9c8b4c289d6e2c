"""Fill the device's kernel config table (``kernels/configs/<device>.json``) on a GPU.

For each tuned kernel (the names and shape classes are listed in ``kernels/configs``) and
each shape class at the issue's target shapes, every candidate config (the kernel
module's own ``candidates`` list, the heuristic's first) is forced in turn
(``kernels.configs.forced``), run once and checked against a float64/float32 truth, then
timed with ``triton.testing.do_bench`` (median). A candidate that fails to compile or to
launch, whose result misses the bound, or that compiled a bf16/fp16 kernel spilling
registers (``n_spills`` of the kernels its first run compiled, as ``python -m
kernels.launch_check`` rejects them on the CPU), is printed and skipped. The fastest that passed
becomes the class's entry; the file is written (temporary name, then rename) with the
device name, torch and triton versions and the date, after each kernel family, so that a
kill loses only the family in progress. Nothing here runs inside a training step.

Check bound: ``err <= 2 * err_ref + atol`` (relative Frobenius errors against the truth;
``err_ref`` that of the torch reference in the working dtype; atol 1e-2 for bf16/fp16
outputs, the band METHOD.md gives bf16 operands, 1e-4 for float32). The buffers launchers
allocate through ``triton_base.empty`` are poisoned (NaN) during the check run, so an
element left unwritten there fails; a wrong tile (skipped block, wrong indexing) gives
errors of order one. The GPU tests hold the heuristics to the tight bound; this check keeps
a broken candidate out of the table. A candidate that faults on the device (an illegal
address) leaves the CUDA context unusable: the rest of the run fails, and the table keeps
the families written before it.

Budget: ``--budget-s`` (default 300 s, so that the run ends within 6 minutes on an H100
with the imports, the CUDA start, the inputs and truths of each class and the one candidate
a family may finish past its deadline) is shared out by family in priority order (lora.gemm,
attention, cross-entropy, paged decode, LoRA blocks, fused ops); time a family leaves
unused goes to the next. No candidate starts past its family's deadline; the heuristic of
every class is measured first, so a cut sweep still compares against it. Compile time is
taken as the first (untimed, synchronised) run of each candidate, which is nearly all
compilation: printed per candidate and summed per family.

    python benchmarks/tune.py                      # every family, writes the device's table
    python benchmarks/tune.py --only lora.gemm,varlen_attention --budget-s 200
    python benchmarks/tune.py --dry-run            # the sweep plan; runs on a CPU
    python benchmarks/tune.py --smoke --out /tmp/t.json --only lora.gemm  # CPU: tiny shapes under
                                                   # the interpreter, checks the script, not a measurement
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--smoke" in sys.argv[1:]:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks import tune_cases  # noqa: E402
from kernels import configs  # noqa: E402

# (family, share of the budget), in priority order: the LoRA scheme first (it replaced
# timing inside the step), then the kernels of every training step, then inference.
FAMILIES = (("lora.gemm", 0.25), ("varlen_attention", 0.30), ("linear_logprobs", 0.15),
            ("paged_attention", 0.12), ("lora", 0.10), ("fused_ops", 0.08))


@dataclass
class Result:
    kernel: str
    shape_class: str
    chosen: object = None
    score: float = math.inf  # mean time over the class's shapes, relative to the first candidate that passed
    measured: list = field(default_factory=list)  # [candidate, ms per probe or the reason it was skipped]


def family(kernel: str) -> str:
    return "lora.gemm" if kernel == "lora.gemm" else kernel.split(".")[0]


def selected(cases: list, only: list[str] | None) -> list:
    if not only:
        return cases
    return [c for c in cases if c.kernel in only or family(c.kernel) in only]


def plan(cases: list, budget_s: float) -> None:
    print(f"sweep plan (budget {budget_s:.0f} s):")
    for fam, share in FAMILIES:
        mine = [c for c in cases if family(c.kernel) == fam]
        if mine:
            print(f"  {fam}: {share * budget_s:.0f} s, {len(mine)} shape classes, "
                  f"{sum(len(c.candidates) for c in mine)} candidates")
        for c in mine:
            print(f"    {c.kernel:26s} {c.shape_class:58s} {len(c.candidates):3d} candidates  at {c.shape}")


def check(outputs, truth, bounds) -> str | None:
    """None when every output is within its bound, else what missed."""
    for i, (o, t, bound) in enumerate(zip(outputs, truth, bounds)):
        err = tune_cases.rel_err(o, t)
        if not err <= bound:
            return f"output {i}: error {err:.2e} over the bound {bound:.2e}"
    return None


def sweep(case, deadline: float, smoke: bool = False) -> tuple[Result, float]:
    """Check and time every candidate of one class until ``deadline``; returns the result
    and the seconds spent in first runs (compilation)."""
    import kernels.triton_base as triton_base
    from benchmarks.harness import time_ms

    res, compile_s = Result(case.kernel, case.shape_class), 0.0
    probes = case.setup()  # [(run, truth, bounds)]: one per target shape of the class
    base = None
    for cand in case.candidates:
        if time.monotonic() > deadline:
            res.measured.append([cand, "not measured: family budget spent"])
            continue
        try:
            with configs.forced({**case.also_forced, case.kernel: cand}):
                triton_base.POISON = True
                try:
                    start, before = time.monotonic(), compiled_kernels()
                    outs = [run() for run, _, _ in probes]
                    sync()
                    first = time.monotonic() - start
                finally:
                    triton_base.POISON = False
                compile_s += first
                bad = spills(before) or next((m for (_, t, b), o in zip(probes, outs) if (m := check(o, t, b))), None)
                if bad:
                    raise ValueError(bad)
                del outs
                ms = [time_ms(run, warmup=1, rep=3) if smoke else time_ms(run, warmup=10, rep=40)
                      for run, _, _ in probes]
        except Exception as e:  # noqa: BLE001 - a candidate that cannot compile, launch or pass is skipped
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            res.measured.append([cand, f"skipped: {msg}"])
            print(f"  {case.kernel} [{case.shape_class}] {cand}: SKIPPED {msg}", flush=True)
            continue
        base = base or ms
        score = sum(m / b for m, b in zip(ms, base)) / len(ms)
        res.measured.append([cand, ms])
        if score < res.score:
            res.chosen, res.score = cand, score
        print(f"  {case.kernel} [{case.shape_class}] {cand}: {' / '.join(f'{m:.3f}' for m in ms)} ms "
              f"({score:.2f}x the first that passed), first run {first:.1f} s", flush=True)
    if res.chosen is not None:
        print(f"  {case.kernel} [{case.shape_class}] chosen: {res.chosen} ({res.score:.2f}x the first that passed)",
              flush=True)
    return res, compile_s


def compiled_kernels() -> dict:
    """{(kernel name, cache key): CompiledKernel} of every Triton kernel of ``kernels`` compiled
    so far in this process, on every device."""
    from triton.runtime.jit import JITFunction

    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("kernels."):
            continue
        for obj in vars(module).values():
            fn = obj
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # heuristics / autotune wrappers
                fn = fn.fn
            if isinstance(fn, JITFunction):
                for caches in fn.device_caches.values():
                    found.update({(fn.__name__, key): k for key, k in caches[0].items()})
    return found


def spills(before: dict) -> str | None:
    """None, or the first bf16/fp16 kernel compiled since ``before`` that spills registers
    (a candidate the table must not name: issue 16 item 2)."""
    for (name, key), kernel in compiled_kernels().items():
        if (name, key) in before or not hasattr(kernel, "n_spills"):
            continue
        low = any(t in ("*bf16", "*fp16") for t in getattr(kernel.src, "signature", {}).values())
        if low and kernel.n_spills:
            return f"{name} spills {kernel.n_spills} registers ({kernel.n_regs} used)"
    return None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_table(path: Path, results: list[Result]) -> None:
    """Merge the chosen entries into the table at ``path`` (other entries kept) and write
    it under a temporary name, then rename."""
    import triton

    from benchmarks.harness import device_name

    old = json.loads(path.read_text()) if path.exists() else {}
    entries, measured = old.get("entries", {}), old.get("measured", {})
    for r in results:
        measured.setdefault(r.kernel, {})[r.shape_class] = r.measured
        if r.chosen is not None:
            entries.setdefault(r.kernel, {})[r.shape_class] = r.chosen
    table = {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "note": "filled by benchmarks/tune.py; measured: [candidate, ms per target shape or why skipped]",
             "entries": entries, "measured": measured}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=1, default=list) + "\n")
    tmp.replace(path)
    configs.reload()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds for the whole sweep (default 300)")
    ap.add_argument("--only", default="", help="comma-separated kernels or families, e.g. lora.gemm,varlen_attention")
    ap.add_argument("--dry-run", action="store_true", help="print the sweep plan and exit (no GPU needed)")
    ap.add_argument("--out", type=Path, default=None, help="table to write (default: kernels/configs/<device>.json)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU under the Triton interpreter (needs --out; checks the script only)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    shapes = tune_cases.SMOKE if args.smoke else tune_cases.Shapes()
    cases = selected(tune_cases.cases(shapes), only)
    if only and not cases:
        print(f"tune.py: --only {args.only} names no tuned kernel or family; the kernels are: "
              f"{sorted({c.kernel for c in tune_cases.cases()})}", file=sys.stderr)
        return 2
    if args.dry_run:
        plan(cases, args.budget_s)
        return 0
    if args.smoke and args.out is None:
        print("tune.py: --smoke needs --out (a smoke run's table is no device's)", file=sys.stderr)
        return 2
    if not args.smoke and not torch.cuda.is_available():
        print("tune.py: no CUDA device here; the sweep needs a GPU (use --dry-run for the plan)", file=sys.stderr)
        return 2
    out = args.out or configs.DIR / configs.file_name(torch.cuda.get_device_name())
    torch.backends.cuda.matmul.allow_tf32 = False  # the truths are true float32
    start, spent = time.monotonic(), 0.0
    print(f"tuning {'the CPU (smoke)' if args.smoke else torch.cuda.get_device_name()} into {out}, "
          f"budget {args.budget_s:.0f} s", flush=True)
    for fam, share in FAMILIES:
        spent += share
        mine = [c for c in cases if family(c.kernel) == fam]
        if not mine:
            continue
        deadline = start + spent * args.budget_s
        t0, results, compile_s = time.monotonic(), [], 0.0
        print(f"== {fam}: {len(mine)} classes, until {deadline - start:.0f} s", flush=True)
        for case in mine:
            if time.monotonic() > deadline:
                print(f"  {case.kernel} [{case.shape_class}]: not measured, family budget spent", flush=True)
                continue
            try:
                res, c_s = sweep(case, deadline, args.smoke)
            except Exception as e:  # noqa: BLE001 - a class whose inputs cannot be built is reported, not fatal
                print(f"  {case.kernel} [{case.shape_class}]: FAILED to set up ({type(e).__name__}: {e})", flush=True)
                continue
            results.append(res)
            compile_s += c_s
        tune_cases.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        write_table(out, results)
        print(f"== {fam}: {time.monotonic() - t0:.0f} s, of which first runs (compilation) {compile_s:.0f} s; "
              f"{sum(r.chosen is not None for r in results)} entries written", flush=True)
    print(f"tune.py: done in {time.monotonic() - start:.0f} s; table {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
