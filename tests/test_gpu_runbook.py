"""`bench/gpu_runbook.sh`, the script one GPU lease runs, tested here in its `--tiny` mode on the CPU: every step
runs and the one JSON holds every figure the lease is for; a failing step stops it, naming the step, with no JSON
left behind. (The figures themselves are timings: not asserted.)"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_runbook.sh"


def _run(tmp_path, *args, python=sys.executable):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=str(python), OMP_NUM_THREADS="2")
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
    )


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'mirage-trl[quantization]'): the runbook's QLoRA step needs it",
)
def test_the_runbook_runs_every_step_and_reports_every_figure(tmp_path):
    p = _run(tmp_path, "--tiny")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_runbook.json").read_text())
    assert report["tiny"] is True
    last = p.stdout.rsplit("== GRPO step against TRL's: ", 1)[1]
    assert json.loads(last[last.index("{") :]) == report  # the same JSON, last on screen
    assert report["versions"]["transformers version"]
    for kind in ("lora", "qlora"):
        runs = report[kind]["runs"]
        assert set(runs) == {"stage1", "stage2", "stage1_ckpt", "stage2_ckpt"}
        for run in runs.values():
            assert run["samples_per_s"] > 0 and run["tokens_per_s"] > 0 and run["mfu"] > 0
        assert runs["stage2"]["method"] == "rounds" and runs["stage2_ckpt"]["method"] == "rounds_checkpointed"
        assert runs["stage2"]["rounds"] > 1 and runs["stage2_ckpt"]["rounds"] >= runs["stage2"]["rounds"]
        assert sum(runs["stage2"]["sdpa_kernels"].values()) > 0  # which kernel the rounds' attention used
    assert [d["batch"] for d in report["decoding"]] == [1]  # --tiny: batch 1 only (16 and 64 on the GPU)
    assert all(d["same_tokens"] for d in report["decoding"])
    assert report["eval"]["ratio"] > 0 and report["eval"]["batch_1"]["rows_per_s"] > 0
    assert report["grpo"]["ratio"]["step"] > 0 and report["grpo"]["ratio_constant"]["step"] > 0
    assert report["goals"] == {"stage2_over_stage1": 1.3, "grpo_step_over_trl": 1.2}


def test_a_failing_step_stops_the_runbook_naming_it(tmp_path):
    failing = tmp_path / "python"
    failing.write_text("#!/bin/sh\nexit 3\n")
    failing.chmod(0o755)
    p = _run(tmp_path, "--tiny", python=failing)
    assert p.returncode == 1
    assert (
        p.stderr.strip().splitlines()[-1] == "gpu_runbook.sh: error: step 'versions' failed or ran past 60 s"
    )
    assert "LoRA" not in p.stdout  # nothing after the failed step ran
    assert not (tmp_path / "gpu_runbook.json").exists()


def test_an_unknown_argument_is_one_line_and_exit_2(tmp_path):
    p = _run(tmp_path, "--fast")
    assert p.returncode == 2
    assert p.stderr.strip() == "gpu_runbook.sh: error: unknown argument --fast (only --tiny)"
