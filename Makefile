# Set-up and checks. `make test` and `make demo` work from a fresh clone with nothing pre-installed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel is installed first so that the package's own `torch>=2.1` range is already satisfied
# and pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean train-cmd-embedded train-cmd-federated

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python examples/demo.py

# Training-time CMD on digits at full size (docs/training.md): 3 seeds x 5 runs of 150 epochs; 5 seeds x 2 FL runs
train-cmd-embedded: install
	$(BIN)/python examples/embedded_digits.py --out runs/embedded --figures docs/figures

train-cmd-federated: install
	$(BIN)/python examples/federated_digits.py --out runs/federated --figures docs/figures

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info cli/*.egg-info .pytest_cache
