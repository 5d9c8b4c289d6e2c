#!/usr/bin/env bash
# Every GPU check, the tuning pass and the benchmarks in one call (for the lent H100):
#   bash benchmarks/gpu_check.sh --budget-s 780          # steps in priority order, none started past the budget
#   bash benchmarks/gpu_check.sh --budget-s 780 --dry-run # the plan only (runs on a CPU, touches no GPU)
#   bash benchmarks/gpu_check.sh tests bench_lora         # only some steps, by name, in the order given
# Steps, in their fixed priority order, with the seconds each is expected to take, are in
# benchmarks/gpu_steps.tsv (guesses until a run measures them: each run writes
# steps_measured.tsv beside its results; copy the measured seconds into gpu_steps.tsv).
# With --budget-s N no step starts whose expected time exceeds what is left of N seconds
# (tune, which takes a budget, starts when its min_s fits and sweeps what is left). Without
# it every step runs. A device command may run 10 minutes at most: a budget over ~570 s
# needs the script started in the background (setsid) and polled, or split over calls.
# Results and logs go to a work folder and are packed into $OUT/gpu_results.tgz (or
# ./gpu-out/) after every step and on exit or TERM, so a kill loses only the running step;
# unpack it under benchmarks/results/<gpu>/. Each step prints the time it spent compiling:
# Triton's own compile timings in the step's main process (benchmarks/compile_clock.py),
# and the kernels the Triton cache gained (all processes).
# Installs nothing from the network: the repo runs from PYTHONPATH; peers that are not on
# the image (liger-kernel, cut-cross-entropy) travel as wheels in .whl/ (carry it) and are
# installed into /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."

budget="" dry=0 steps=()
while [ $# -gt 0 ]; do
    case $1 in
        --budget-s) budget=${2:?--budget-s needs a number of seconds}; shift 2 ;;
        --budget-s=*) budget=${1#*=}; shift ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1 (--budget-s N, --dry-run, step names)" >&2; exit 2 ;;
        *) steps+=("$1"); shift ;;
    esac
done
if [ -n "$budget" ] && ! [[ $budget =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: --budget-s must be a whole number of seconds, got '$budget'" >&2; exit 2
fi

declare -A expected minimum
order=()
while IFS=$'\t' read -r name secs least _; do
    [[ -z $name || $name == \#* ]] && continue
    order+=("$name"); expected[$name]=$secs; minimum[$name]=$([ "$least" = "-" ] && echo "$secs" || echo "$least")
done < benchmarks/gpu_steps.tsv
[ ${#steps[@]} -eq 0 ] && steps=("${order[@]}")
for step in "${steps[@]}"; do
    if [ -z "${expected[$step]:-}" ]; then
        echo "gpu_check.sh: unknown step '$step'; the steps are: ${order[*]}" >&2; exit 2
    fi
done

if [ $dry -eq 1 ]; then
    printf '%-20s %9s %9s %11s  %s\n' step expected min cumulative plan
    total=0
    for step in "${steps[@]}"; do
        left=$(( ${budget:-999999} - total ))
        if [ "${expected[$step]}" -le "$left" ]; then
            total=$(( total + expected[$step] )); verdict=run
        elif [ "${minimum[$step]}" -le "$left" ]; then
            verdict="run, shrunk to the $left s left"; total=$(( total + left ))
        else
            verdict="skip: expects ${minimum[$step]} s, $left s left"
        fi
        printf '%-20s %8ss %8ss %10ss  %s\n' "$step" "${expected[$step]}" "${minimum[$step]}" "$total" "$verdict"
    done
    echo "budget: ${budget:-none} s; expected times from benchmarks/gpu_steps.tsv (dry run: nothing was run)"
    exit 0
fi

FINAL=${OUT:-$PWD/gpu-out}
OUT=$(mktemp -d /tmp/gpu-check.XXXX)
mkdir -p "$FINAL" "$OUT/results"
pack() {
    tar -czf "$FINAL/gpu_results.tgz.tmp" -C "$OUT" . && mv "$FINAL/gpu_results.tgz.tmp" "$FINAL/gpu_results.tgz"
}
trap 'pack; echo "results: $FINAL/gpu_results.tgz"' EXIT
trap 'echo "gpu_check.sh: stopped by a signal; packing what exists"; exit 143' TERM INT
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 BENCH_OUT=$OUT/results
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$OUT/../triton-cache-$$}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
timed() {  # a Python step under the compile clock: timed LOG SCRIPT|-m MODULE ARGS...
    local log=$1; shift
    ENGINE_COMPILE_LOG=$OUT/compile_$step.txt python3 -m benchmarks.compile_clock "$@" 2>&1 | tee "$log"
}

run_step() {
    case $1 in
        env)
            { nvidia-smi -L; python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
              python3 setup.py -q build_ext --inplace && python3 -c "import kernels._C; print('kernels._C built')"
            } 2>&1 | tee "$OUT/env.txt" ;;
        tests) timed "$OUT/gpu_tests.log" -m pytest -q -m gpu -s tests ;;
        determinism)
            if [ -f tests/test_gpu_determinism.py ]; then
                timed "$OUT/determinism.log" -m pytest -q -s tests/test_gpu_determinism.py
            else
                echo "tests/test_gpu_determinism.py is not in this tree: nothing to run"
            fi ;;
        tune)
            local sweep=300
            [ -n "$budget" ] && sweep=$(( left - 60 < 300 ? left - 60 : 300 ))
            timed "$OUT/tune.log" benchmarks/tune.py --budget-s "$sweep" || return 1
            mkdir -p "$OUT/results/kernel_configs" "$OUT/kernels/configs"
            local table
            table=$(python3 -c "import torch; from kernels import configs; \
print(configs.DIR / configs.file_name(torch.cuda.get_device_name()))") || return 1
            cp "$table" "$OUT/results/kernel_configs/" && cp "$table" "$OUT/kernels/configs/" ;;
        host) python3 -m pytest -q benchmarks/test_host_overheads.py --benchmark-json="$OUT/results/host_overheads.json" \
                  -p no:cacheprovider 2>&1 | tee "$OUT/host.log" | tail -8 ;;
        demo) timed "$OUT/demo.log" -m engine demo ;;
        bench_*) timed "$OUT/$1.log" "benchmarks/$1.py" ;;
    esac
}

cache_kernels() { find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l; }
start=$SECONDS status=0
printf 'step\texpected_s\tmeasured_s\tcompile_s\tcompiled\tstatus\n' > "$OUT/steps_measured.tsv"
for step in "${steps[@]}"; do
    left=$(( ${budget:-999999} - (SECONDS - start) ))
    if [ -n "$budget" ] && [ "${minimum[$step]}" -gt "$left" ]; then
        echo "== $step: skipped, expects ${minimum[$step]} s and $left s of the budget are left"
        printf '%s\t%s\t-\t-\t-\tskipped\n' "$step" "${expected[$step]}" >> "$OUT/steps_measured.tsv"
        continue
    fi
    echo "== $step (expected ${expected[$step]} s, $left s left)"
    t0=$SECONDS cubins=$(cache_kernels)
    run_step "$step"; rc=$?
    [ $rc -ne 0 ] && status=1
    compile_s=$(awk '{s += $1; n += $2} END {printf "%.1f", s}' "$OUT/compile_$step.txt" 2>/dev/null || echo 0)
    compiled=$(awk '{n += $2} END {print n + 0}' "$OUT/compile_$step.txt" 2>/dev/null || echo 0)
    echo "== $step: $((SECONDS - t0)) s (expected ${expected[$step]}), rc $rc; compiling: ${compile_s:-0} s for" \
         "${compiled:-0} kernels in its main process, $(( $(cache_kernels) - cubins )) new cubins in the Triton cache"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$step" "${expected[$step]}" "$((SECONDS - t0))" "${compile_s:-0}" \
        "${compiled:-0}" "rc $rc" >> "$OUT/steps_measured.tsv"
    pack
done
column -t -s $'\t' "$OUT/steps_measured.tsv" 2>/dev/null || cat "$OUT/steps_measured.tsv"
exit $status
