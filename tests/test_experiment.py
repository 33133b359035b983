"""`mirage-trl experiment --quick` through the command line: every field of the report is produced.

No accuracy threshold (a toy run learns nothing); what is checked is that every arm trained and was
graded per level, every ablation and comparison carries its statistics, the `remove` ablation
decoded no span, the plots are PNG files, and a bad config is one line before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mirage_trl.experiment import ABLATIONS, DEFAULT_ARMS, MIRAGE_ARMS


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mirage_trl", "experiment", "--quick", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_every_arm_is_trained_graded_and_reported(quick_run):
    out, proc = quick_run
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results["runs"]] == list(DEFAULT_ARMS)
    assert results["data"]["test_maps_excluded_from_training"] is True
    assert {"platform", "processor", "torch_threads", "torch"} <= set(results["machine"])
    summary = results["summary"]
    assert set(summary["arms"]) == set(DEFAULT_ARMS)
    for arm, a in summary["arms"].items():
        assert set(a["groups"]) == {"3", "4", "all"}
        for key, g in a["groups"].items():
            assert 0.0 <= g["ci95"][0] <= g["accuracy"] <= g["ci95"][1] <= 1.0
            assert g["n"] == {"3": 4, "4": 4, "all": 8}[key]
        assert ("latent_health" in a) == (arm in MIRAGE_ARMS)
    for arm in ("mirage_direct", "mirage_cot"):
        assert list(summary["ablations"][arm]) == list(ABLATIONS)
        health = summary["arms"][arm]["latent_health"]["eval"]
        assert {"trigger_rate", "spans_per_answer"} <= set(health)
    assert list(summary["ablations"]["markers_cot"]) == ["remove"]
    for modes in summary["ablations"].values():
        for m in modes.values():
            assert {"delta", "ci95", "p_value", "a_only", "b_only"} <= set(m)
            assert 0.0 <= m["p_value"] <= 1.0
    assert [(c["b"], c["a"]) for c in summary["comparisons"]] == [
        ("mirage_cot", "text_cot"),
        ("mirage_direct", "text_direct"),
        ("mirage_cot", "markers_cot"),
        ("markers_cot", "text_cot"),
        ("helper_input", "mirage_cot"),
    ]
    # the remove ablation decodes no span at all
    for run in results["runs"]:
        if "remove" in run["eval"]:
            assert run["eval"]["remove"]["groups"]["all"]["mean_latent_spans"] == 0
            assert not any("<output_image>" in t for t in run["eval"]["remove"]["examples"])
    # training curves: loss per arm and stage, and the held-out validation accuracy during training
    for run in results["runs"]:
        stages = [c["stage"] for c in run["curves"]]
        assert stages == (["stage1", "stage2"] if run["arm"] in MIRAGE_ARMS else ["sft"])
        assert all(c["loss"] and c["val"] for c in run["curves"])
    assert "latent/norm" in results["runs"][2]["curves"][0]["latent"][-1]
    # the grounding warm-up: one per seed, graded on its own held-out maps, the arms' starting point
    (warmup,) = results["warmups"]
    assert warmup["seed"] == 0 and warmup["curves"][0]["stage"] == "grounding"
    assert warmup["curves"][0]["loss"] and warmup["curves"][0]["val"]
    assert set(warmup["groups"]) == {"3", "4", "all"} and warmup["groups"]["all"]["n"] == 8
    assert len(warmup["correct"]) == 8 and results["data"]["grounding_rows"] == 20
    grounding = summary["grounding"]["groups"]["all"]
    assert 0.0 <= grounding["ci95"][0] <= grounding["accuracy"] <= grounding["ci95"][1] <= 1.0
    assert results["config"]["model"]["model_type"] == "qwen3_vl"
    assert (out / "seed0" / "grounding" / "model" / "model.safetensors").is_file()


def test_report_and_plots_are_written(quick_run):
    out, proc = quick_run
    report = (out / "report.md").read_text()
    for section in (
        "## Accuracy per arm and level",
        "## Grounding warm-up",
        "## Arm against arm",
        "## Latent ablations",
        "## Latent health",
        "## Plots",
        "McNemar",
        "Wilson",
    ):
        assert section in report
    for name in ("training_curves.png", "accuracy.png", "ablations.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({name})" in report
    assert "report.md" in proc.stdout


@pytest.mark.parametrize(
    "text,message",
    [
        ("arms: [text_direct, mystery]\n", "arms ['mystery']: choose from"),
        ("train: {text_steps: 0}\n", "train.text_steps 0: must be an integer >= 1"),
        ("data: {colour: red}\n", "data.colour is not a setting"),
        ("- a list\n", "an experiment config is a mapping"),
        ("model: {model_type: llama}\n", "model.model_type 'llama': choose from"),
        ("train: {grounding_steps: 5}\ndata: {grounding_rows: 0}\n", "a grounding warm-up needs both"),
    ],
)
def test_bad_config_is_one_line_before_any_work(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirage_trl",
            "experiment",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
