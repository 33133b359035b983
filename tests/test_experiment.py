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

from mirage_trl.experiment import ABLATIONS, BUILTIN_ARMS, DEFAULT_ARMS, planned_comparisons, resolve_arm

MIRAGE_ARMS = [name for name, arm in BUILTIN_ARMS.items() if arm.is_mirage]


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
        ("mirage_direct", "text_direct"),
        ("mirage_cot", "text_cot"),
        ("mirage_cot", "markers_cot"),
        ("markers_cot", "text_cot"),
        ("helper_input", "text_cot"),
        ("helper_input", "mirage_cot"),
    ]
    assert all(len(c["per_seed"]) == 1 and c["per_seed"][0]["seed"] == 0 for c in summary["comparisons"])
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


def test_arms_are_data_and_comparisons_follow_from_them():
    option = resolve_arm(
        {"name": "c", "method": "mirage", "style": "direct", "settings": {"latent_loss": "contrastive"}},
        "test",
    )
    assert option.is_mirage and option.label == "c" and option.stage2 == {}
    arms = [BUILTIN_ARMS[n] for n in ("text_direct", "markers_direct", "mirage_direct")] + [option]
    assert planned_comparisons(arms) == [
        ["markers_direct", "text_direct"],
        ["mirage_direct", "text_direct"],
        ["mirage_direct", "markers_direct"],
        ["c", "text_direct"],
        ["c", "markers_direct"],
        ["c", "mirage_direct"],
    ]


def test_the_latents_experiment_runs_every_option_with_the_probe(tmp_path):
    """`make experiment-latents` at toy size: every option arm trains with its settings (saved with its model), every
    Mirage arm is decoded with the ablations and under the bottleneck probe, seed by seed statistics."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mirage_trl", "experiment", "--config", "vsp_planning_latents", "--quick",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["arms"]["combined"]["settings"] == {
        "latent_loss": "contrastive",
        "latent_variance_weight": 1.0,
        "latent_bottleneck": "strict",
    }
    saved = json.loads((out / "seed0" / "combined" / "stage2" / "mirage_config.json").read_text())
    assert (saved["latent_loss"], saved["latent_variance_weight"], saved["latent_bottleneck"]) == (
        "contrastive", 1.0, "strict",
    )  # fmt: skip
    plain = json.loads((out / "seed0" / "mirage_direct" / "stage2" / "mirage_config.json").read_text())
    assert (plain["latent_loss"], plain["latent_bottleneck"]) == ("cosine", "none")
    summary = results["summary"]
    mirage = [a for a, spec in results["arms"].items() if spec["method"] == "mirage"]
    assert set(summary["probe"]) == {*mirage, "markers_direct"}
    for arm in mirage:
        assert list(summary["ablations"][arm]) == ["zero", "shuffle", "remove"]
        assert list(summary["probe"][arm]["ablations"]) == ["probe_zero", "probe_shuffle"]
        assert summary["probe"][arm]["groups"]["all"]["n"] == 8
    assert summary["probe"]["markers_direct"]["ablations"] == {}
    fixed = results["best_fixed_answer"]
    assert set(fixed) == {"3", "all"} and 0.0 <= fixed["all"]["accuracy"] <= 1.0 and fixed["all"]["n"] == 8
    assert ["combined", "mirage_direct"] in results["comparisons"]
    report = (out / "report.md").read_text()
    for section in ("## Arms", "## Visual-bottleneck probe", "best fixed answer", "latent_bottleneck=strict"):
        assert section in report


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
        (
            "arms: [{name: x, method: magic, style: cot}]\n",
            "arm x: method 'magic': choose one of text, mirage",
        ),
        (
            "arms: [{name: x, method: mirage, style: cot, settings: {colour: red}}]\n",
            "arm x: settings ['colour']",
        ),
        (
            "arms: [{name: x, method: text, style: cot, settings: {latent_loss: contrastive}}]\n",
            "arm x: Mirage settings need method mirage or markers",
        ),
        (
            "arms: [{name: x, method: mirage, style: cot, settings: {latent_loss: l2}}]\n",
            "arm x: --latent_loss 'l2': choose one of cosine, contrastive",
        ),
        (
            "arms: [{name: x, method: mirage, style: cot, stage2: {latent_bottleneck_steps: 5}}]\n",
            "arm x: --latent_bottleneck_steps schedules the bottleneck",
        ),
        ("arms: [text_cot, text_cot]\n", "arms: a name appears twice (text_cot)"),
        ("probe: maybe\n", "probe 'maybe': false, true (image), image or strict"),
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
