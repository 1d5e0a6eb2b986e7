# Two entry points, each installs what it needs into ./.venv:
#   make demo   - the main job: phantom data -> CTIA vs MIA cross-validation -> ensemble -> report/
#   make test   - the type check (mypy) and the layer check (lint-imports; both configured in pyproject.toml,
#                 the layers in docs/ARCHITECTURE.md), then the test suite (CPU)
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; set TORCH=torch (or a CUDA build) to use your own.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test typecheck install bench clean ablation ablation-length

# --no-compile: Python compiles what it imports on first use instead of all of torch up front (~15 s less)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile "$(TORCH)"
	$(PY) -m pip install -q --no-compile -e ".[test]"
	$(PY) -m pip install -q --no-compile --no-deps "dynamic-network-architectures>=0.3"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ctseg demo --out demo-output

typecheck: $(STAMP)
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

test: $(STAMP) typecheck
	@bash scripts/ensure-chromium.sh
	$(PY) -m pytest -q tests

bench: $(STAMP)
	bash benchmarks/run_cpu.sh $(PY)

clean:
	rm -rf demo-output .pytest_cache .mypy_cache

# The augmentation ablation of docs/ABLATION.md (issue 16) on 2 CPU cores; results in ablation-output/
ablation: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/ctseg phantom --task kidney --cases 18 --seed 0 --out ablation-output/data
	OMP_NUM_THREADS=1 $(VENV)/bin/ctseg experiment --config configs/ablation.yaml --data ablation-output/data --out ablation-output --jobs 3

# Training length of the two paper arms (1x, 2x, 4x the demo's steps), one folder and one process each (in parallel)
ablation-length: $(STAMP)
	test -f ablation-output/data/phantom.json || $(VENV)/bin/ctseg phantom --task kidney --cases 18 --seed 0 --out ablation-output/data
	pids=""; for n in 1x 2x 4x; do OMP_NUM_THREADS=1 $(VENV)/bin/ctseg experiment --config configs/ablation.yaml \
		--profile length-$$n --data ablation-output/data --out ablation-output/length-$$n --no-progress \
		> ablation-output/length-$$n.log 2>&1 & pids="$$pids $$!"; done; \
	for p in $$pids; do wait $$p || { echo "a length run failed: see ablation-output/length-*.log"; exit 1; }; done
