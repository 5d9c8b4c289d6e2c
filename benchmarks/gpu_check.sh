#!/usr/bin/env bash
# Every GPU check and benchmark in one call (for the lent H100):
#   bash benchmarks/gpu_check.sh            # results and logs under $OUT (or ./gpu-out)
# Installs nothing from the network: the repo runs from PYTHONPATH; peers that are not on
# the image travel as wheels in .whl/ and are installed into /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
status=0
{ nvidia-smi -L; python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -q -m gpu -s tests 2>&1 | tee "$OUT/gpu_tests.log" || status=1
python3 -m engine demo 2>&1 | tee "$OUT/demo.log" || status=1
export BENCH_OUT=$OUT/results
mkdir -p "$BENCH_OUT"
python3 -m pytest -q benchmarks/test_host_overheads.py --benchmark-json="$BENCH_OUT/host_overheads.json" -p no:cacheprovider 2>&1 | tail -8
for bench in benchmarks/bench_*.py; do
    echo "== $bench"
    python3 "$bench" 2>&1 | tee "$OUT/$(basename "$bench" .py).log" || status=1
done
exit $status
