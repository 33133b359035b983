"""Evaluation: known completions give the expected tables; `mirage-trl eval` on a tiny model and reference rows."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest
import torch

from mirage_trl.cli import main
from mirage_trl.data.reference import load_rows
from mirage_trl.errors import MirageError
from mirage_trl.evaluation import check_latent_modes, evaluate, print_tables
from mirage_trl.models.tiny import build_tiny_processor

GRID3 = [[1, 0, 2], [0, 0, 0], [0, 0, 0]]  # start (0,0), goal (0,2): "RR"
GRID4 = [[1, -1, 0, 2], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]  # "RRR" falls in the hole; "DRRRU" wins

# id -> (grid, "model" completion, spans). Prompt lengths differ so sorting reorders the rows.
ROWS = {
    0: (GRID3, "think <output_image> \\boxed{R R}", 1),  # correct
    1: (GRID3, "\\boxed{D}", 0),  # valid, wrong
    2: (GRID3, "no answer at all", 2),  # invalid
    3: (GRID4, "\\boxed{RRR}", 0),  # valid, falls in the hole
    4: (GRID4, "\\boxed{D, R, R, R, U}", 3),  # correct
    5: (GRID4, "\\boxed{}", 0),  # invalid
}
HIDDEN = 8


def write_vsp_jsonl(path, ids=ROWS, drop=None):
    with open(path, "w") as f:
        for i in ids:
            row = {
                "text_input": f"ID={i} " + "plan the route " * (1 + (i * 5) % 7),
                "image_input": [],
                "map_desc": ROWS[i][0],
            }
            if drop:
                row.pop(drop)
            f.write(json.dumps(row) + "\n")
    return path


class FakeGenerate:
    """Known outputs per (mode, row id); the row id is read back from the prompt tokens."""

    def __init__(self, processor):
        self.tok = processor.tokenizer
        self.calls = []

    def __call__(self, model, processor, batch, **kw):
        ids = [
            int(re.search(r"ID=(\d+)", self.tok.decode(row, skip_special_tokens=True)).group(1))
            for row in batch["input_ids"]
        ]
        mode = kw["latent_mode"]
        self.calls.append({"ids": ids, "mode": mode, "length": batch["input_ids"].shape[1], **kw})
        if mode == "model":
            texts = [ROWS[i][1] for i in ids]
            spans = [ROWS[i][2] for i in ids]
        else:  # every ablated answer is wrong-but-valid, with one span
            texts = ["\\boxed{L}"] * len(ids)
            spans = [1] * len(ids)
        latents = (
            [torch.full((4 * s, HIDDEN), float(i)) for i, s in zip(ids, spans)]
            if kw["return_latents"]
            else None
        )
        return SimpleNamespace(
            texts=texts,
            num_latent_spans=torch.tensor(spans),
            num_generated_tokens=torch.tensor([10 + i for i in ids]),
            latents=latents,
        )


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture
def vsp_rows(tmp_path):
    return load_rows(write_vsp_jsonl(tmp_path / "t.jsonl"), benchmark="vsp_planning")


def test_known_completions_give_expected_table(processor, vsp_rows):
    fake = FakeGenerate(processor)
    model = torch.nn.Linear(1, 1)
    res = evaluate(model, processor, vsp_rows, "vsp_planning", batch_size=4, progress=False, generate_fn=fake)
    g = res.modes["model"].groups
    assert list(g) == [3, 4, "all"]
    assert g[3]["n"] == 3 and g[3]["correct"] == 1 and g[3]["invalid"] == 1
    assert g[3]["accuracy"] == pytest.approx(1 / 3) and g[3]["invalid_rate"] == pytest.approx(1 / 3)
    assert g[3]["mean_latent_spans"] == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    assert g[4]["accuracy"] == pytest.approx(1 / 3) and g[4]["invalid_rate"] == pytest.approx(1 / 3)
    assert g[4]["mean_latent_spans"] == pytest.approx(1.0)  # (0 + 3 + 0) / 3
    assert g["all"] == {
        "n": 6,
        "correct": 2,
        "invalid": 2,
        "accuracy": pytest.approx(1 / 3),
        "invalid_rate": pytest.approx(1 / 3),
        "latent_spans": 6,
        "mean_latent_spans": pytest.approx(1.0),
        "trigger_rate": pytest.approx(3 / 6),  # spans 1, 0, 2 / 0, 3, 0: three answers open one
    }
    assert g[3]["trigger_rate"] == pytest.approx(2 / 3) and g[4]["trigger_rate"] == pytest.approx(1 / 3)
    health = res.modes["model"].latent_health
    assert health["trigger_rate"] == pytest.approx(0.5) and health["spans_per_answer"] == pytest.approx(1.0)
    # Completions come back in the rows' order, whatever the batching order was.
    comp = res.modes["model"].completions
    assert [c["completion"] for c in comp] == [ROWS[i][1] for i in range(6)]
    assert [c["correct"] for c in comp] == [True, False, False, False, True, False]
    assert [c["invalid"] for c in comp] == [False, False, True, False, False, True]
    assert [c["answer"] for c in comp] == ["RR", "D", None, "RRR", "DRRRU", None]
    assert [c["level"] for c in comp] == [3, 3, 3, 4, 4, 4]
    assert res.modes["model"].num_generated_tokens == sum(10 + i for i in range(6))
    # Batches: sorted by prompt length (longest first), 4 + 2 rows, paper sampling settings by default.
    assert [len(c["ids"]) for c in fake.calls] == [4, 2]
    assert fake.calls[0]["length"] >= fake.calls[1]["length"]
    assert sorted(fake.calls[0]["ids"] + fake.calls[1]["ids"]) == list(range(6))
    call = fake.calls[0]
    assert (call["do_sample"], call["temperature"], call["top_p"], call["max_new_tokens"]) == (
        True,
        0.7,
        0.9,
        1024,
    )
    assert res.modes["model"].tokens_per_s > 0 and res.modes["model"].rows_per_s > 0

    out = io.StringIO()
    from rich.console import Console

    print_tables(res, Console(file=out, width=120))
    text = out.getvalue()
    assert "33.3" in text and "1.00" in text and "all" in text


def test_modes_same_rows_same_seed_and_mean_from_model_run(processor, vsp_rows):
    fake = FakeGenerate(processor)
    res = evaluate(
        torch.nn.Linear(1, 1),
        processor,
        vsp_rows,
        "vsp_planning",
        batch_size=16,
        seed=7,
        latent_modes=("zero", "mean", "remove"),
        progress=False,
        generate_fn=fake,
    )
    # "mean" needs the model run: it is added and runs first.
    assert list(res.modes) == ["model", "zero", "mean", "remove"]
    assert [c["mode"] for c in fake.calls] == ["model", "zero", "mean", "remove"]
    assert all(c["ids"] == fake.calls[0]["ids"] for c in fake.calls)
    assert fake.calls[0]["return_latents"] and not fake.calls[1]["return_latents"]
    # Each run starts from the same seed: the generators draw the same numbers.
    draws = {c["mode"]: torch.rand(1, generator=c["generator"]) for c in fake.calls}
    assert len({float(v) for v in draws.values()}) == 1
    # Mean latent: spans 1, 2, 3 of rows 0, 2, 4 hold 4, 8, 12 vectors of value 0, 2, 4.
    expected = (4 * 0 + 8 * 2 + 12 * 4) / 24
    mean = fake.calls[2]["latent_mean"]
    assert mean.shape == (HIDDEN,) and torch.allclose(mean, torch.full((HIDDEN,), expected))
    for mode in ("zero", "mean", "remove"):
        g = res.modes[mode].groups["all"]
        assert (g["accuracy"], g["invalid_rate"], g["mean_latent_spans"]) == (0.0, 0.0, 1.0)
    assert len(res.completion_rows()) == 24


def test_num_samples_and_bad_modes(processor, vsp_rows):
    fake = FakeGenerate(processor)
    res = evaluate(
        torch.nn.Linear(1, 1),
        processor,
        vsp_rows,
        "vsp_planning",
        num_samples=2,
        progress=False,
        generate_fn=fake,
    )
    assert res.modes["model"].groups["all"]["n"] == 2 and res.settings["num_rows"] == 2
    with pytest.raises(MirageError, match="valid modes: model, zero, noise, mean, shuffle, remove"):
        check_latent_modes(["model", "blur"])
    with pytest.raises(MirageError, match="jigsaw rows need answer"):
        evaluate(
            torch.nn.Linear(1, 1),
            processor,
            [dict(vsp_rows[0], answer="")],
            "jigsaw",
            progress=False,
            generate_fn=fake,
        )


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, latent_size=2)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference_rows(official_data, tmp_path_factory):
    """Five rows of the reference VSP planning test set (levels mixed), image paths as in the file."""
    lines = (official_data / "vsp_spatial_planning" / "test_direct.jsonl").read_text().splitlines()[:5]
    path = tmp_path_factory.mktemp("ref") / "test5.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, official_data.parent


def run_cli(args, capsys):
    rc = main(["eval", "--no-progress", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_cli_on_reference_rows(tiny_model_dir, reference_rows, tmp_path, capsys):
    data, root = reference_rows
    out = tmp_path / "eval"
    rc, stdout, _ = run_cli(
        [
            "--model",
            tiny_model_dir,
            "--benchmark",
            "vsp_planning",
            "--data",
            data,
            "--root",
            root,
            "--batch-size",
            2,
            "--max-new-tokens",
            6,
            "--num-samples",
            4,
            "--out",
            out,
        ],
        capsys,
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["benchmark"] == "vsp_planning" and results["num_rows"] == 4
    assert results["settings"]["temperature"] == 0.7 and results["settings"]["top_p"] == 0.9
    assert results["settings"]["num_samples"] == 4 and results["settings"]["seed"] == 42
    assert results["model"] == str(tiny_model_dir.resolve()) and results["data"] == str(data.resolve())
    assert results["date"]
    groups = results["modes"]["model"]["groups"]
    assert groups["all"]["n"] == 4 and sum(v["n"] for k, v in groups.items() if k != "all") == 4
    comps = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(comps) == 4
    assert [c["source"] for c in comps] == [f"{data}:{i}" for i in range(1, 5)]
    for c in comps:
        assert c["mode"] == "model" and c["benchmark"] == "vsp_planning" and c["level"] in (3, 4, 5, 6)
        assert {"completion", "answer", "correct", "invalid", "num_latent_spans"} <= set(c)
        assert 1 <= c["num_generated_tokens"] <= 6
    assert "accuracy" in stdout and "all" in stdout

    # Existing folder without --overwrite: exit 2, one line, nothing touched.
    before = (out / "results.json").read_text()
    rc, _, err = run_cli(
        [
            "--model",
            tiny_model_dir,
            "--benchmark",
            "vsp_planning",
            "--data",
            data,
            "--root",
            root,
            "--num-samples",
            1,
            "--out",
            out,
        ],
        capsys,
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert (out / "results.json").read_text() == before


def test_cli_latent_ablation(tiny_model_dir, reference_rows, tmp_path, capsys):
    data, root = reference_rows
    out = tmp_path / "abl"
    rc, stdout, _ = run_cli(
        [
            "--model",
            tiny_model_dir,
            "--benchmark",
            "vsp_planning",
            "--data",
            data,
            "--root",
            root,
            "--greedy",
            "--max-new-tokens",
            5,
            "--num-samples",
            3,
            "--latents",
            "model",
            "zero",
            "remove",
            "--out",
            out,
        ],
        capsys,
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["modes"]) == ["model", "zero", "remove"]
    assert results["settings"]["do_sample"] is False and results["settings"]["temperature"] is None
    for mode in ("model", "zero", "remove"):
        assert results["modes"][mode]["groups"]["all"]["n"] == 3
    comps = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [c["mode"] for c in comps] == ["model"] * 3 + ["zero"] * 3 + ["remove"] * 3
    assert "latent ablation" in stdout
    from PIL import Image

    assert Image.open(out / "accuracy.png").format == "PNG"


@pytest.mark.parametrize(
    "flag,expected", [([], "none"), (["--bottleneck"], "image"), (["--bottleneck", "strict"], "strict")]
)
def test_cli_decodes_under_the_bottleneck_asked_for(
    tiny_model_dir, reference_rows, tmp_path, capsys, monkeypatch, flag, expected
):
    """`mirage-trl eval --bottleneck [image|strict]`: every mode is decoded under it (the probe), and the results say
    so; without the flag, as the model was trained (this one: without)."""
    import mirage_trl.evaluation as evaluation

    seen = []
    real = evaluation.generate_with_latents

    def spy(*args, **kwargs):
        seen.append((kwargs["latent_mode"], kwargs["bottleneck"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate_with_latents", spy)
    data, root = reference_rows
    out = tmp_path / "probe"
    rc, stdout, _ = run_cli(
        ["--model", tiny_model_dir, "--benchmark", "vsp_planning", "--data", data, "--root", root, "--greedy",
         "--max-new-tokens", 5, "--num-samples", 2, "--latents", "model", "zero", "--out", out, *flag],
        capsys,
    )  # fmt: skip
    assert rc == 0
    assert sorted(set(seen)) == [("model", expected), ("zero", expected)]
    assert json.loads((out / "results.json").read_text())["settings"]["bottleneck"] == expected
    assert (f"visual bottleneck ({expected})" in stdout) == (expected != "none")


def test_accuracy_plot_bars_are_wilson_intervals_of_the_table():
    """What `accuracy.png` draws: each mode's accuracy per group with the Wilson interval written out here."""
    import math

    from mirage_trl.evaluation import EvalResult, ModeResult, accuracy_bars

    result = EvalResult(benchmark="vsp_planning", settings={})
    cells = {3: {"n": 10, "correct": 7, "accuracy": 0.7}, "all": {"n": 10, "correct": 7, "accuracy": 0.7}}
    result.modes["model"] = ModeResult("model", cells, [], 0.0, 0)
    result.modes["zero"] = ModeResult("zero", {3: dict(cells[3], correct=0, accuracy=0.0)}, [], 0.0, 0)
    bars = accuracy_bars(result)
    z, n, p = 1.959963984540054, 10, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    group, acc, lo, hi = bars["model"][0]
    assert group == 3 and acc == pytest.approx(70.0)
    assert (lo, hi) == pytest.approx((100 * (centre - half), 100 * (centre + half)), abs=1e-9)
    assert (
        [g for g, *_ in bars["model"]] == [3, "all"]
        and bars["zero"][0][1] == 0.0
        and bars["zero"][0][2] == 0.0
    )


def test_cli_bad_input(tiny_model_dir, reference_rows, tmp_path, capsys):
    data, root = reference_rows
    common = ["--model", tiny_model_dir, "--data", data, "--root", root, "--out", tmp_path / "x"]
    rc, _, err = run_cli([*common, "--benchmark", "vsp_planning", "--latents", "model", "blur"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "'blur'" in err and "model, zero, noise, mean, shuffle, remove" in err

    rc, _, err = run_cli([*common, "--benchmark", "vsp_plan"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt" in err

    no_map = write_vsp_jsonl(tmp_path / "nomap.jsonl", drop="map_desc")
    rc, _, err = run_cli(
        ["--model", tiny_model_dir, "--data", no_map, "--benchmark", "vsp_planning", "--out", tmp_path / "y"],
        capsys,
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "map_desc" in err

    # The upper bound needs helper images (the reference test rows have none).
    rc, _, err = run_cli([*common, "--benchmark", "vsp_planning", "--helper-as-input"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and ":image_output:" in err

    # Choice benchmarks need the reference answer.
    rc, _, err = run_cli(
        [
            "--model",
            tiny_model_dir,
            "--data",
            data,
            "--root",
            root,
            "--benchmark",
            "jigsaw",
            "--out",
            tmp_path / "z",
        ],
        capsys,
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and ":answer:" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_cli_helper_as_input(tiny_model_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for name, seed in (("in.png", 0), ("helper.png", 1)):
        Image.fromarray((np.random.RandomState(seed).rand(56, 56, 3) * 255).astype("uint8")).save(
            tmp_path / name
        )
    row = {
        "text_input": "<image>Find the path.",
        "image_input": "in.png",
        "text_output": "<output_image> \\boxed{R}",
        "image_output": "helper.png",
        "map_desc": [[1, 2]],
    }
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(row) + "\n")
    out = tmp_path / "upper"
    rc, _, _ = run_cli(
        ["--model", tiny_model_dir, "--benchmark", "vsp_planning", "--data", data, "--root", tmp_path,
         "--helper-as-input", "--max-new-tokens", 3, "--out", out],
        capsys,
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["helper_as_input"] is True and results["modes"]["model"]["groups"]["all"]["n"] == 1


def test_cli_bottleneck_choices_are_the_settings_ones():
    """The parser spells the bottlenecks out (its --help loads no torch): they must be the settings' own."""
    import argparse

    from mirage_trl.cli.eval import register
    from mirage_trl.models.settings import BOTTLENECKS

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    action = next(
        a for a in parser._subparsers._group_actions[0].choices["eval"]._actions if a.dest == "bottleneck"
    )
    assert tuple(action.choices) == BOTTLENECKS
