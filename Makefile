# Two commands for a fresh machine (both install what they need into .venv):
#   make demo   - start a local cluster with a small random model and drive it
#   make test   - run the test suite (what .ci/run runs)
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU build of torch for local installs; on a GPU machine install your CUDA torch first
# (TORCH_SPEC= make demo skips this step).
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test unit integration bench protos

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moe-serve demo

# The import contracts (the architecture, in pyproject.toml) first; then the suite. pytest's exit
# code 5 (no tests collected) is a failure here, never a silent pass.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -p no:cacheprovider -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/integration

bench: $(STAMP)
	$(PY) -m bench.bench_serving --out bench/results/serving.json

protos: $(STAMP)
	$(PY) -m protos.codegen
