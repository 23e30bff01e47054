# Set-up and checks. `make test` and `make demo` work from a fresh clone with nothing pre-installed.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel is installed first so that the package's own `torch>=2.1` range is already satisfied
# and pip never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean train-cmd-embedded train-cmd-federated \
	kga-examples kga-fig4 kga-alpha kga-digits kga-memory

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

# Embedded CMD, basic P = 10% on the digits CNN, seeds 0-4, 150 epochs: SGD vs freeze="epoch" vs freeze="step";
# fails if a seed of either mode ends more than 1.5 points below SGD (several minutes; same as pytest -m paper)
.PHONY: train-cmd-semantics
train-cmd-semantics: install
	$(BIN)/python examples/embedded_semantics.py --model cnn --seeds 0 1 2 3 4 --out runs/semantics --check 1.5

bench: install
	$(BIN)/python bench/ingest.py

# Training-time KGA measurements (docs/kga-training.md): results json in build/kga/, figures in docs/figures/.
# About 2, 6, 10 and 2 minutes on two free cores; the tests run the same scripts at --quick size.
KGA_OUT = --out build/kga --figures docs/figures

kga-fig4: install
	$(BIN)/python examples/kga_fig4_mlp.py $(KGA_OUT)

kga-alpha: install
	$(BIN)/python examples/kga_alpha_sweep.py $(KGA_OUT)

kga-digits: install
	$(BIN)/python examples/kga_digits.py $(KGA_OUT)

kga-memory: install
	$(BIN)/python examples/kga_memory.py $(KGA_OUT)

kga-examples: kga-fig4 kga-alpha kga-digits kga-memory

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info cli/*.egg-info .pytest_cache
