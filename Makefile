# mirage-trl: `make demo` (install + the offline pipeline on a tiny model) and `make test` (install + tests).
# An active virtual environment is used as it is; otherwise .venv is made.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Which torch build: TORCH_INDEX_URL, when set, is where torch comes from on any machine (for example
# https://download.pytorch.org/whl/cpu for the CPU build, .../whl/cu128 for CUDA 12.8). Unset, a machine
# with an NVIDIA driver keeps pip's default (a CUDA build) and one without gets CPU_TORCH from the
# configured index (a CPU wheel only where that index serves one; elsewhere set TORCH_INDEX_URL).
TORCH_INDEX_URL ?=
CPU_TORCH ?= torch==2.13.0
DEMO ?= outputs/demo
SHARED_TEST ?= ../shared/data/mirage_official/data/vsp_spatial_planning/test_direct.jsonl
# Torch threads per process as accelerate would pick them (its physical cores), passed so that it does not warn;
# an OMP_NUM_THREADS of the user's wins
THREADS = $(shell $(PY) -c "import psutil; print(max(1, psutil.cpu_count(logical=False) or 1))")
LAUNCH = $(BIN)/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
	$(if $(OMP_NUM_THREADS),,--num_cpu_threads_per_process $(THREADS))

.PHONY: install demo experiment experiment-latents screen-latents test test-min quality style bench gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if [ -n "$(TORCH_INDEX_URL)" ]; then $(PY) -m pip install -q "$(CPU_TORCH)" --index-url "$(TORCH_INDEX_URL)"; \
		elif command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: pip's default torch"; \
		else $(PY) -m pip install -q "$(CPU_TORCH)"; fi; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/mirage-trl tiny-model --model-type qwen3_vl --out $(DEMO)/tiny-model --overwrite --tokenizer-corpus benchmarks \
		--image-pixels tiles --hidden-size 128 --layers 4 --vocab-size 1000
	$(BIN)/mirage-trl data vsp --task planning --split test --style direct --levels 3 --num-samples 100 --seed 1 \
		--tile-px 28 --out $(DEMO)/test-data --overwrite
	$(BIN)/mirage-trl data vsp --task grounding --split train --levels 3 --num-samples 3000 --seed 2 --max-hole-frac 0.4 \
		--tile-px 28 --out $(DEMO)/grounding --overwrite --exclude $(DEMO)/test-data/planning_test_direct.jsonl
	$(BIN)/mirage-trl data vsp --task planning --split train --style direct --levels 3 --num-samples 360 --seed 0 \
		--tile-px 28 --out $(DEMO)/data --overwrite --exclude $(DEMO)/test-data/planning_test_direct.jsonl \
		$(if $(wildcard $(SHARED_TEST)),$(SHARED_TEST))
	rm -rf $(DEMO)/grounded $(DEMO)/stage1 $(DEMO)/stage2  # a previous run's files must not mix with this one's
	# 1. grounding warm-up: the random model learns to read a map (text SFT), then 2. Mirage stage 1 and 3. stage 2
	$(LAUNCH) recipes/text_sft_vsp.py --config recipes/tiny/text_sft/config_vsp_grounding_demo.yaml
	$(LAUNCH) recipes/stage1_vsp.py --config recipes/tiny/stage1/config_vsp_demo.yaml
	$(LAUNCH) recipes/stage2_vsp.py --config recipes/tiny/stage2/config_vsp_demo.yaml
	@if [ -n "$(GRPO)" ]; then $(LAUNCH) recipes/grpo_vsp.py --config recipes/tiny/grpo/config_vsp_smoke.yaml; fi
	$(BIN)/mirage-trl export --model $(DEMO)/stage2 --out $(DEMO)/export --overwrite
	$(BIN)/mirage-trl eval --model $(DEMO)/export --benchmark vsp_planning \
		--data $(DEMO)/test-data/planning_test_direct.jsonl --max-new-tokens 24 --batch-size 50 --greedy \
		--latents model zero shuffle remove --out $(DEMO)/eval --overwrite --no-progress
	$(BIN)/mirage-trl card $(DEMO)/export --eval-json $(DEMO)/eval/results.json  # the accuracy table in its card
	@echo "demo done: the table above is $(DEMO)/eval/results.json (plot: $(DEMO)/eval/accuracy.png); the model and its"
	@echo "card are in $(DEMO)/export. The learning experiment (every arm, seeds, statistics, plots) is make experiment;"
	@echo "make demo GRPO=1 adds a short GRPO step."

experiment: install
	$(BIN)/mirage-trl experiment --out outputs/experiment --overwrite

# Do the latents carry the map? Each latent option against today's Mirage, markers-only and text-only, three seeds,
# every ablation and the bottleneck probe (docs/experiments.md; under an hour on a 2-core CPU)
experiment-latents: install
	$(BIN)/mirage-trl experiment --config vsp_planning_latents --out outputs/experiment-latents --overwrite

# A screen of a stage-1 option (docs/experiments.md, "Screens"), after `make demo`: Mirage direct stages 1 and 2 from
# the demo's grounded model with FLAGS, greedy evaluation of 100 validation maps (neither the demo's training nor its
# test maps) with the latent ablations. FLAGS override the demo's stage-1 settings, which hold the chosen latent
# options since 2026-12-03; the paper's: make screen-latents ARM=cosine FLAGS="--latent_target pooled
# --latent_loss cosine --latent_variance_weight 0 --latent_bottleneck none"
ARM ?= cosine
FLAGS ?=
SCREEN := outputs/screen
screen-latents: install
	test -d $(DEMO)/grounded || { echo "run make demo first (the screens start from its grounded model)"; exit 2; }
	test -f $(SCREEN)/val/planning_test_direct.jsonl || $(BIN)/mirage-trl data vsp --task planning --split test \
		--style direct --levels 3 --num-samples 100 --seed 11 --tile-px 28 --out $(SCREEN)/val --overwrite \
		--exclude $(DEMO)/data/planning_train_direct.jsonl $(DEMO)/test-data/planning_test_direct.jsonl
	rm -rf $(SCREEN)/$(ARM)
	$(LAUNCH) recipes/stage1_vsp.py --config recipes/tiny/stage1/config_vsp_demo.yaml --output_dir $(SCREEN)/$(ARM)/stage1 $(FLAGS)
	$(LAUNCH) recipes/stage2_vsp.py --config recipes/tiny/stage2/config_vsp_demo.yaml \
		--model_name_or_path $(SCREEN)/$(ARM)/stage1 --output_dir $(SCREEN)/$(ARM)/stage2
	$(BIN)/mirage-trl eval --model $(SCREEN)/$(ARM)/stage2 --benchmark vsp_planning \
		--data $(SCREEN)/val/planning_test_direct.jsonl --max-new-tokens 24 --batch-size 50 --greedy \
		--latents model zero shuffle remove --out $(SCREEN)/$(ARM)/eval --overwrite --no-progress

# The tests also cover DeepSpeed ZeRO-2 (2 processes on CPU): the `deepspeed` extra, built against the torch above.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.19.8"
	$(PY) -m pip install -q "bitsandbytes>=0.46.1"  # its CPU backend runs the QLoRA path's 4-bit layers here
	# lmms-eval (the `--model mirage` test): its dependency list asks for torchvision, opencv, wandb and more that
	# neither its command line nor our model imports, and that a CPU test machine should not get; it is installed
	# without them, with what its command line does import (filelock < 4: lmms-eval 0.7.3 patches filelock._api)
	$(PY) -m pip install -q --no-deps "lmms-eval==0.7.3"
	$(PY) -m pip install -q loguru sacrebleu evaluate pytz tenacity pytablewriter "filelock<4"
	touch $@

test: install $(VENV)/.installed-test
	$(PY) -m pytest -q --timeout 900 --durations=15

# The declared lower bounds are tested: a second environment with the oldest version of each library
# (mirage_trl/versions.py TESTED, the bounds in pyproject.toml) runs the exactness tests (stage 1, stage 2,
# decoding, GRPO, export).
MIN_VENV ?= .venv-min
MIN_TESTS ?= tests/trainers/test_sft.py tests/latent/test_stage2.py tests/test_generation.py tests/trainers/test_grpo.py tests/test_export.py
test-min: install
	test -x $(MIN_VENV)/bin/python || python3 -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --upgrade pip
	$(MIN_VENV)/bin/python -m pip install -q "$(CPU_TORCH)"
	$(MIN_VENV)/bin/python -m pip install -q -e . pytest pytest-timeout \
		$$($(PY) -c "from mirage_trl.versions import TESTED; print(' '.join(f'{k}=={v[0]}' for k, v in TESTED.items() if k not in ('torch', 'deepspeed')))")
	$(MIN_VENV)/bin/python -m pytest -q --timeout 900 -p no:cacheprovider $(MIN_TESTS)

# The wheels a lent GPU machine lacks (it has Python 3.12, torch, accelerate, huggingface_hub 1.x and no network;
# DEVELOPERS.md), for bench/gpu_runbook.sh: the oldest tested transformers (the newest needs huggingface_hub 2),
# the tested trl, peft, datasets, bitsandbytes, and what VSP rendering and datasets import. A device call carries
# at most 64 MiB with the checkout: the target fails if the wheels and the tracked files would not fit.
GPU_WHEELS ?= .whl
GPU_WHEEL_PINS ?= transformers==5.18.0 regex==2026.11.19 trl==1.16.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 \
	multiprocess==0.70.19 bitsandbytes==0.50.2 gymnasium==0.29.1 farama-notifications==0.0.6 num2words==0.5.14
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	@total=$$(( $$(du -cb $(GPU_WHEELS)/*.whl | tail -1 | cut -f1) + $$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) )); \
	echo "wheels + checkout: $$((total / 1048576)) MiB of the 64 MiB a device call carries"; \
	test $$total -lt 67108864 || { echo "gpu-wheels: error: over 64 MiB; carry fewer wheels" >&2; exit 1; }

quality: install
	$(BIN)/ruff check mirage_trl tests recipes bench
	$(BIN)/ruff format --check mirage_trl tests recipes bench

style: install
	$(BIN)/ruff check --fix mirage_trl tests recipes bench
	$(BIN)/ruff format mirage_trl tests recipes bench

bench: install
	$(PY) -m bench --json bench/results.json

clean:
	rm -rf $(DEMO) .pytest_cache
