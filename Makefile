# fedhelix: two commands on a fresh machine.
#   make demo   set up .venv and run the bundled TCGA-BRCA simulated federation
#   make test   set up .venv (with test extras) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# torch first, pinned: the CPU wheel (a looser range pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedhelix simulate

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/tcga_seeds.py
	$(BIN)/python bench/dp_utility.py
	$(BIN)/python bench/dp_overhead.py
	$(BIN)/python bench/secagg_overhead.py --sites 10 50 100
	$(BIN)/python bench/gse7390.py
	$(BIN)/python bench/omics_scale.py
	$(BIN)/python bench/molecules.py
	$(BIN)/python bench/round_overhead.py --secagg
	$(BIN)/python bench/hostile.py

clean:
	rm -rf $(VENV) runs .pytest_cache
