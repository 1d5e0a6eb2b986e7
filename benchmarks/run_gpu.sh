#!/usr/bin/env bash
# All GPU checks in one run (for a machine with one CUDA GPU; about 8 minutes):
# CUDA tests, CTIA on the GPU, training steps/s fp32 vs bf16 for the four networks, the whole training
# pipeline vs the model alone, whole-volume inference. Results land in $OUT (or ./bench-output).
set -uo pipefail
PY=${PYTHON:-python}
OUT=${OUT:-bench-output}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/device.txt"
"$PY" -m pytest -q tests/test_models.py tests/test_augment.py tests/test_trainer.py tests/test_predict.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
"$PY" benchmarks/bench_augment.py --device cuda 2>&1 | tee "$OUT/augment.txt"
"$PY" benchmarks/bench_models.py --device cuda --amp both --json "$OUT/models.json" 2>&1 | tee "$OUT/models.txt"
"$PY" benchmarks/bench_train_pipeline.py --device cuda --amp bf16 --workers 6 --json "$OUT/pipeline.json" 2>&1 | tee "$OUT/pipeline.txt"
"$PY" benchmarks/bench_predict.py --device cuda --slices 300 --features 32 --stages 6 --members 3 2>&1 | tee "$OUT/predict.txt"
