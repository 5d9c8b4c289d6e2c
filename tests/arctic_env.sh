#!/usr/bin/env bash
# The ArcticTraining integration test in its own virtual environment: arctic-training pins
# transformers<5 (the main environment has 5) and builds DeepSpeed from source.
#   bash tests/arctic_env.sh [VENV]      (default VENV: .venv-arctic in the repository root)
# Creates VENV when it lacks arctic_training (torch first, then `engine[arctic]` and pytest at
# transformers 4.57), then runs tests/test_arctic_integration.py, plus with ARCTIC_ENGINE_TESTS=1
# the engine tests that check transformers 4 compatibility. DeepSpeed's CPU Adam op is compiled
# (ninja + g++) on the first run and cached under ~/.cache/torch_extensions.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-arctic}"
if ! "$venv/bin/python" -c "import arctic_training" 2>/dev/null; then
    python -m venv "$venv"
    "$venv/bin/pip" install torch==2.13.0
    # DeepSpeed's ops are not prebuilt (DS_BUILD_OPS=0): the test JIT-builds CPU Adam only.
    DS_BUILD_OPS=0 "$venv/bin/pip" install -e ".[arctic]" "transformers>=4.57,<5" pytest pytest-timeout accelerate matplotlib
fi
tests=(tests/test_arctic_integration.py)
if [ "${ARCTIC_ENGINE_TESTS:-0}" = 1 ]; then
    tests+=(tests/test_models.py tests/test_loading.py tests/test_hf_integration.py tests/test_train_api.py)
fi
DS_ACCELERATOR=cpu "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
