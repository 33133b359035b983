#!/usr/bin/env bash
# The GPU figures of one 15-minute device lease, in one script that stops at the first failure.
#
#   bash bench/gpu_runbook.sh            # on the GPU machine, from the repository root (at most 8 minutes, H200)
#   bash bench/gpu_runbook.sh --tiny     # the same steps at tiny shapes on a CPU (CI runs this: tests/test_gpu_runbook.py)
#
# Before the lease, here: `make gpu-wheels` puts in .whl/ the wheels the GPU machine lacks (the tested
# transformers, trl, peft, datasets, bitsandbytes, gymnasium, num2words; within the 64 MiB a call carries).
# The device call carries .whl and runs this script; the wheels are installed into /tmp/site, nothing else is
# needed (the package runs from this checkout, the data is generated).
#
# Prints one JSON (and writes it to $OUT/gpu_runbook.json, or ./gpu_runbook.json): the 7B-shaped LoRA stage 1
# and stage 2 with and without checkpointing (samples/s, tokens/s, MFU, peak memory, rounds, SDPA kernels),
# QLoRA stage 1 and stage 2, latent decoding against `generate` at batch 1, 16 and 64, batched evaluation
# against batch 1, the GRPO step against TRL's (exact, and with constant rollout latents), and the library
# versions. Each step has its own time limit; the first failure stops the script with its step named.
set -euo pipefail

TINY=0
case "${1:-}" in
    --tiny) TINY=1 ;;
    "") ;;
    *) echo "gpu_runbook.sh: error: unknown argument ${1} (only --tiny)" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS COMMAND...: run one step under its limit, naming it if it fails
    local name="$1" limit="$2"
    shift 2
    local start=$SECONDS
    echo "== ${name} (limit ${limit} s)"
    if ! timeout "$limit" "$@"; then
        echo "gpu_runbook.sh: error: step '${name}' failed or ran past ${limit} s" >&2
        exit 1
    fi
    echo "== ${name}: $((SECONDS - start)) s"
}

# --tiny runs in the environment it is started in (CI's); the carried wheels are for the GPU machine's Python 3.12
if [ "$TINY" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    step "install the carried wheels" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

step "versions" 60 "$PY" -m mirage_trl env --json "$WORK/env.json"
if [ "$TINY" = 1 ]; then
    step "LoRA stage 1 / stage 2, decoding" 300 "$PY" bench/gpu_7b.py --tiny --json "$WORK/lora.json"
    step "QLoRA stage 1 / stage 2" 300 "$PY" bench/gpu_7b.py --tiny --load-in-4bit --decode-batches --json "$WORK/qlora.json"
    step "batched evaluation" 300 "$PY" bench/eval_throughput.py --quick --json "$WORK/eval.json"
    step "GRPO step against TRL's" 300 "$PY" bench/grpo.py --quick --json "$WORK/grpo.json"
else
    step "LoRA stage 1 / stage 2, decoding" 200 "$PY" bench/gpu_7b.py --repeats 3 --new-tokens 64 --json "$WORK/lora.json"
    step "QLoRA stage 1 / stage 2" 170 "$PY" bench/gpu_7b.py --load-in-4bit --repeats 3 --decode-batches --json "$WORK/qlora.json"
    step "batched evaluation" 80 "$PY" bench/eval_throughput.py --json "$WORK/eval.json"
    step "GRPO step against TRL's" 60 "$PY" bench/grpo.py --device cuda --rounds 2 --steps 2 --json "$WORK/grpo.json"
fi

"$PY" - "$WORK" "$RESULTS/gpu_runbook.json" "$TINY" <<'EOF'
import json, sys, time
from pathlib import Path

work, out, tiny = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
parts = {name: json.loads((work / f"{name}.json").read_text()) for name in ("env", "lora", "qlora", "eval", "grpo")}
report = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "tiny": tiny,
    "device": parts["lora"]["device"],
    "versions": parts["env"]["versions"],
    "lora": {k: parts["lora"][k] for k in ("batch", "tokens_per_batch", "runs", "stage2_over_stage1", "stage2_over_stage1_ckpt")},
    "qlora": {k: parts["qlora"][k] for k in ("runs", "stage2_over_stage1", "stage2_over_stage1_ckpt")},
    "decoding": parts["lora"]["decoding"],
    "eval": {"ratio": parts["eval"]["ratio"], **parts["eval"]["timings"], "config": parts["eval"]["config"]},
    "grpo": {k: parts["grpo"][k] for k in ("ratio", "ratio_constant", "plain", "mirage", "constant", "setup")},
    # the goals a lease checks (docs/benchmarks.md, GPU figures)
    "goals": {"stage2_over_stage1": 1.3, "grpo_step_over_trl": 1.2},
}
text = json.dumps(report, indent=2)
out.write_text(text)
print(text)
EOF
