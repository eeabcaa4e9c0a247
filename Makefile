# chatsse — every target bootstraps what it needs: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin
export UV_PYTHON_DOWNLOADS := never

.DEFAULT_GOAL := help
KERNEL := $(VENV)/share/jupyter/kernels/chatsse/kernel.json
NOTEBOOKS := $(wildcard notebooks/*.ipynb)

URL ?= http://127.0.0.1:8000
LOAD_ARGS ?= --requests 200 --concurrency 20

.PHONY: help install run run-dev test lint format type-check check-all bench bench-asgi load-test lab notebooks-html lock clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-extras --python $(PYTHON)
	@touch $@

$(KERNEL): $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name chatsse --display-name "chatsse (.venv)" >/dev/null

install: $(STAMP) $(KERNEL) ## create .venv with the locked dependencies and its Jupyter kernel

run: $(STAMP) ## serve on http://127.0.0.1:8000 under gunicorn (CHATSSE_WORKERS uvicorn workers)
	./scripts/start.sh

run-dev: $(STAMP) ## one uvicorn process with auto-reload on code changes
	$(BIN)/chatsse serve --reload

test: $(STAMP) $(KERNEL) ## run the test suite and every notebook (quick mode)
	CHATSSE_QUICK=1 $(BIN)/pytest tests notebooks --nbmake --nbmake-timeout=180 $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check; notebooks committed without outputs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/nbstripout --verify $(NOTEBOOKS)

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

type-check: $(STAMP) ## mypy --strict on the package
	$(BIN)/mypy

check-all: lint type-check test ## everything CI checks

bench: $(STAMP) ## chatsse vs reference SSE servers over sockets: CPU per event and request, memory, streams held
	$(BIN)/python scripts/bench_server.py --output build/bench.json

bench-asgi: $(STAMP) ## per-event CPU of the response machinery alone, in-process (no sockets)
	$(BIN)/python scripts/bench_sse.py

load-test: $(STAMP) ## a short load test against a chatsse server it starts (or URL=... LOAD_ARGS=...)
	$(BIN)/python scripts/run_load_test.py $(if $(filter command line environment,$(origin URL)),$(URL),--serve) $(LOAD_ARGS)

lab: $(STAMP) $(KERNEL) ## open the workbook in JupyterLab (kernel "chatsse (.venv)")
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

notebooks-html: $(STAMP) $(KERNEL) ## execute the notebooks into build/notebooks/*.html
	mkdir -p build/notebooks
	# figures also as HTML with plotly.js inline, so the pages show them offline
	PLOTLY_RENDERER=plotly_mimetype+notebook $(BIN)/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.timeout=600 \
		--output-dir build/notebooks $(NOTEBOOKS)

lock: $(UV) ## re-resolve uv.lock after changing dependencies
	$(UV) lock --python $(PYTHON)

clean: ## remove the environments and caches
	rm -rf $(VENV) $(TOOLS) build .mypy_cache .pytest_cache .ruff_cache
