#!/usr/bin/env bash
# Every GPU check and benchmark in one call (for the lent H100):
#   bash benchmarks/gpu_check.sh                          # everything; results and logs under $OUT (or ./gpu-out)
#   bash benchmarks/gpu_check.sh tests bench_cross_entropy # only some steps: tests, demo, host, bench_<op>...
# Installs nothing from the network: the repo runs from PYTHONPATH; peers that are not on
# the image (liger-kernel, cut-cross-entropy) travel as wheels in .whl/ (carry it) and are
# installed into /tmp/site when present. A device command may run 10 minutes at most:
# split the steps over calls when everything does not fit.
set -uo pipefail
cd "$(dirname "$0")/.."
# Logs and results are written to a work folder and packed into $OUT/gpu_results.tgz at the
# end (the device tool returns at most 8 files); unpack it under benchmarks/results/.
FINAL=${OUT:-$PWD/gpu-out}
OUT=$(mktemp -d /tmp/gpu-check.XXXX)
mkdir -p "$FINAL"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then
    steps=(tests demo host)
    for bench in benchmarks/bench_*.py; do steps+=("$(basename "$bench" .py)"); done
fi
status=0
{ nvidia-smi -L; python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"
export BENCH_OUT=$OUT/results
mkdir -p "$BENCH_OUT"
for step in "${steps[@]}"; do
    echo "== $step"
    case $step in
        tests) python3 -m pytest -q -m gpu -s tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1 ;;
        demo) python3 -m engine demo 2>&1 | tee "$OUT/demo.log" || status=1 ;;
        host) python3 -m pytest -q benchmarks/test_host_overheads.py --benchmark-json="$BENCH_OUT/host_overheads.json" \
                  -p no:cacheprovider 2>&1 | tail -8 ;;
        bench_*) python3 "benchmarks/$step.py" 2>&1 | tee "$OUT/$step.log" || status=1 ;;
        *) echo "unknown step $step (tests, demo, host, bench_<op>)"; status=1 ;;
    esac
done
tar -czf "$FINAL/gpu_results.tgz" -C "$OUT" . && echo "results: $FINAL/gpu_results.tgz"
exit $status
