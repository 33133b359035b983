# mirage-trl: `make demo` (install + the offline pipeline on a tiny model) and `make test` (install + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# CPU machines get this torch (the CPU wheel here); machines with an NVIDIA driver keep pip's usual CUDA build.
CPU_TORCH ?= torch==2.13.0
DEMO ?= outputs/demo
SHARED_TEST ?= ../shared/data/mirage_official/data/vsp_spatial_planning/test_direct.jsonl
LAUNCH := $(BIN)/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: install demo test quality style bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
		if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: pip's default torch"; \
		else $(PY) -m pip install -q "$(CPU_TORCH)"; fi; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/mirage-trl tiny-model --out $(DEMO)/tiny-model --overwrite
	$(BIN)/mirage-trl data vsp --task planning --split train --style cot --levels 3 4 --num-samples 64 --seed 0 \
		--out $(DEMO)/data --overwrite $(if $(wildcard $(SHARED_TEST)),--exclude $(SHARED_TEST))
	$(BIN)/mirage-trl data vsp --task planning --split test --style cot --levels 3 4 --num-samples 16 --seed 1 \
		--out $(DEMO)/test-data --overwrite
	$(LAUNCH) recipes/stage1_vsp.py --config recipes/vsp/stage1_tiny.yaml
	$(LAUNCH) recipes/stage2_vsp.py --config recipes/vsp/stage2_tiny.yaml
	@if [ -n "$(GRPO)" ]; then $(LAUNCH) recipes/grpo_vsp.py --config recipes/vsp/grpo_tiny.yaml; fi
	$(BIN)/mirage-trl export --model $(DEMO)/stage2 --out $(DEMO)/export-adapter --overwrite
	$(BIN)/mirage-trl export --model $(DEMO)/stage2 --merge --out $(DEMO)/export-merged --overwrite
	$(BIN)/mirage-trl eval --model $(DEMO)/export-merged --benchmark vsp_planning \
		--data $(DEMO)/test-data/planning_test_cot.jsonl --max-new-tokens 64 --batch-size 16 \
		--latents model zero remove --out $(DEMO)/eval-generated --overwrite --no-progress
	@if [ -f $(SHARED_TEST) ]; then $(BIN)/mirage-trl eval --model $(DEMO)/export-adapter --benchmark vsp_planning \
		--data $(SHARED_TEST) --num-samples 64 --max-new-tokens 64 --batch-size 32 \
		--out $(DEMO)/eval-reference --overwrite --no-progress; fi
	@echo "demo done: models, exports and eval results under $(DEMO) (numbers from a tiny random model are low;"
	@echo "the pipeline is what the demo shows). Optional: make demo GRPO=1 adds a short GRPO step."

# The tests also cover DeepSpeed ZeRO-2 (2 processes on CPU): the `deepspeed` extra, built against the torch above.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q --no-build-isolation "deepspeed>=0.15"
	touch $@

test: install $(VENV)/.installed-test
	$(PY) -m pytest -q --timeout 900

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
