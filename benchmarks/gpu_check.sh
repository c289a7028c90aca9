#!/usr/bin/env bash
# One prepared GPU check (issues #12 GPU profile, #13 throughput): run it on a lent GPU machine.
#
# Here (once, in the repo root): fetch the cp312 wheels the GPU image lacks into .whl/ (git-ignored):
#   bash benchmarks/gpu_check.sh --fetch
# There (the device tool, carry .whl): runs the throughput table, train.compile on/off, the CUDA
# tests, and prints the throughput table last:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="albumentations==2.0.8 albucore==0.0.24 stringzilla simsimd pydantic pydantic-core annotated-types
typing-inspection typing_extensions>=4.16 optuna alembic colorlog sqlalchemy"
if [ "${1:-}" = "--fetch" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
    for w in $WHEELS; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_24_x86_64 -d .whl "$w"
    done
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# the tests that touch CUDA paths (precision auto, batch size auto, device augmentation, predict)
python3 -m pytest -q -x tests/test_device_augment.py tests/test_augment.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
# compile off vs on, one setting, interleaved with the table's own runs
python3 benchmarks/throughput.py --device cuda --persons 1500 --extra train.compile=true 2>&1 | tee "$OUT/compile.txt" | tail -12
python3 benchmarks/throughput.py --device cuda --persons 1500 2>&1 | tee "$OUT/throughput.txt" | tail -12
