#!/usr/bin/env bash
# Every CPU benchmark, each printing its figure beside an anchor measured in the same run.
# Usage: benchmarks/run_cpu.sh [PYTHON]   (about 25 minutes on 2 cores)
set -uo pipefail
PY=${1:-.venv/bin/python}
cd "$(dirname "$0")/.."
for b in bench_io bench_phantom bench_preprocess bench_augment bench_predict bench_memory bench_preprocess_workers \
    bench_stress_clinical; do
  echo "=== $b"; "$PY" "benchmarks/$b.py" || echo "$b failed"
done
echo "=== bench_models (quick)"; "$PY" benchmarks/bench_models.py --device cpu --quick || echo "bench_models failed"
echo "=== bench_train_pipeline (quick)"; "$PY" benchmarks/bench_train_pipeline.py --quick || echo "bench_train_pipeline failed"
