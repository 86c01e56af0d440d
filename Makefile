# mpllama developer tasks. On a fresh machine: `make run` (the demo), `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# llama.cpp for `make bench`, in an environment of its own (never .venv or the tests' path).
BENCH_VENV := .bench-venv
# Tests run on local Ray with auth off; real clusters keep Ray's token auth on.
TEST_ENV := RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
# The bench process (its in-process parts and baselines, llama.cpp's child) with glibc's
# huge-page malloc, as mpllama's local runtime starts its ranks (ray_session.py).
BENCH_MALLOC := GLIBC_TUNABLES=glibc.malloc.hugetlb=1

.PHONY: install test run bench bench-env bench-serve gpu-check gpu-wheels lint soak clean

# Create .venv in the repo and install mpllama editable with its test and cluster extras.
install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Run the whole test suite (CPU, Gloo, one shared local Ray; a few minutes on 2 cores).
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q

# The demo: the committed model in demo/model (a small Llama trained on Python's own docs
# by demo/train.py), two shards on two ranks over Gloo. Old results are removed first: the
# job resumes, so it would otherwise print them again. All results: demo/results.jsonl.
run: $(STAMP)
	rm -f demo/results.jsonl
	$(TEST_ENV) $(VENV)/bin/mpllama run configs/jobs/demo.yaml

# Speed and memory benchmarks, printed as ratios against baselines from the same run.
# The llama.cpp env is built first (once). Where it cannot be built, the bench's llamacpp
# part says so in one line and the rest runs; a failed build is retried by bench-env only.
bench: $(STAMP)
	@[ -f $(BENCH_VENV)/.failed ] || $(MAKE) -s --no-print-directory bench-env 2>/dev/null || true
	$(TEST_ENV) $(BENCH_MALLOC) MPLLAMA_BENCH_ENV=$(BENCH_VENV) $(PY) benchmarks/bench.py

# The llamacpp part's llama.cpp: llama-cpp-python built from source with native CPU flags
# (AVX-512, VNNI, bf16 where present) and llama.cpp's GGUF converter, into .bench-venv
# (benchmarks/llamacpp_env.sh; about 5 minutes on 2 cores, redone only when it changes).
bench-env: $(BENCH_VENV)/.built
$(BENCH_VENV)/.built: benchmarks/llamacpp_env.sh
	sh benchmarks/llamacpp_env.sh $(BENCH_VENV)

# mpllama serve against transformers serve --continuous-batching over HTTP (openai client,
# Poisson arrivals): throughput, TTFT and ITL at three load levels (about 5 minutes).
bench-serve: $(STAMP)
	$(TEST_ENV) $(PY) benchmarks/bench_serve.py

# On a machine with a CUDA GPU: the GPU-marked tests (parity with cuda ranks among them)
# and the bench's gpu part, in one go (benchmarks/gpu_check.sh). It uses that machine's
# Python and torch; WHEELS=folder installs mpllama's other packages from wheels first.
gpu-check:
	benchmarks/gpu_check.sh

# Those wheels, for an offline GPU machine's Python 3.12, into .gpu-wheels (about 46 MiB).
gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_wheels.py .gpu-wheels --python 3.12

# Lint and format check with ruff.
lint: $(STAMP)
	$(VENV)/bin/ruff check mpllama tests benchmarks launch demo
	$(VENV)/bin/ruff format --check mpllama tests benchmarks launch demo

# The slow soak test: thousands of requests while ranks are killed at random.
soak: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m slow

# Remove the venv, what demo runs wrote (the committed demo/model stays) and caches.
clean:
	rm -rf $(VENV) demo/tiny demo/results.jsonl demo/parquet_out .pytest_cache .ruff_cache
