"""Datasets that travel: `data vsp|jigsaw --format dataset` writes a Hub dataset folder (parquet with the images
inside, a dataset card) that loads back with `datasets` and `--dataset_name` as the same rows as the JSONL the
same command writes, and `--push-to-hub` uploads that folder through the Hub client (mocked at its boundary:
there is no network here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from helpers import ROW_FIELDS, assert_cli_error, assert_same_rows, run_cli
from PIL import Image

from mirage_trl.data.sources import load_data

COMPARED = ROW_FIELDS
VSP = ["data", "vsp", "--task", "planning", "--levels", "3", "4", "--num-samples", "6", "--seed", "5"]


def _pixels(path) -> bytes:
    return Image.open(path).convert("RGB").tobytes()


def _same_rows(got, expected):
    assert_same_rows(got, expected, COMPARED)


@pytest.fixture(scope="module")
def vsp_both(tmp_path_factory):
    """The same generator command written both ways."""
    import io
    from contextlib import redirect_stdout

    from mirage_trl.cli import main

    root = tmp_path_factory.mktemp("vsp_both")
    with redirect_stdout(io.StringIO()):
        assert main([*VSP, "--out", str(root / "jsonl")]) == 0
        assert main([*VSP, "--format", "dataset", "--out", str(root / "dataset")]) == 0
    return root / "jsonl" / "planning_train_cot.jsonl", root / "dataset"


def test_a_dataset_folder_holds_the_rows_the_jsonl_holds(vsp_both):
    jsonl, folder = vsp_both
    _same_rows(load_data(str(folder), split="train"), load_data(str(jsonl)))
    # the Hub's layout: one parquet file per split, the card, the images inside (no file to lose, no local path)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [".mirage-trl.json", "README.md", "data/train-00000-of-00001.parquet"]
    assert str(folder.parent) not in (folder / "README.md").read_text()


def test_datasets_reads_the_folder_with_image_features_and_the_card(vsp_both):
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    jsonl, folder = vsp_both
    rows = load_dataset(str(folder), split="train")
    assert isinstance(rows.features["images"].feature, ImageFeature)
    first = json.loads(jsonl.read_text().splitlines()[0])
    assert rows[0]["images"][0].tobytes() == _pixels(jsonl.parent / first["image_input"])
    assert rows[0]["messages"][1]["content"][1] == {
        "type": "image",
        "text": None,
    }  # where the latent span goes
    card = (folder / "README.md").read_text()
    meta = card.split("---")[1]
    assert "configs:" in meta and "path: data/train-*" in meta and "image-text-to-text" in meta
    assert "| `seed` | `5` |" in card and "| `levels` | `[3, 4]` |" in card
    assert (
        "mirage-trl data vsp --task planning --levels 3 4 --num-samples 6 --seed 5 --format dataset" in card
    )


def test_the_same_command_writes_the_same_dataset(vsp_both, tmp_path, capsys):
    _, folder = vsp_both
    rc, _, err = run_cli([*VSP, "--format", "dataset", "--out", tmp_path / "again"], capsys)
    assert rc == 0, err
    _same_rows(load_data(str(tmp_path / "again"), split="train"), load_data(str(folder), split="train"))


def test_a_training_reads_the_folder_by_dataset_name(env, vsp_both, tmp_path):
    from helpers import _recipe_args, _recipe_argv, recipe_main

    _, folder = vsp_both
    trainer = recipe_main("stage1_vsp")(*_recipe_args(_recipe_argv(env, folder, tmp_path / "out")))
    assert trainer.state.global_step == 1 and len(trainer.train_dataset) == 6


def test_jigsaw_as_a_dataset_folder(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(0)
    for i in range(2):
        Image.frombytes("RGB", (64, 48), rng.randbytes(64 * 48 * 3)).save(src / f"{i}.png")
    common = ["data", "jigsaw", "--images", src, "--num-samples", "3", "--seed", "1"]
    assert run_cli([*common, "--out", tmp_path / "j"], capsys)[0] == 0
    assert run_cli([*common, "--format", "dataset", "--out", tmp_path / "jd"], capsys)[0] == 0
    _same_rows(
        load_data(str(tmp_path / "jd"), split="train", benchmark="jigsaw"),
        load_data(str(tmp_path / "j" / "jigsaw.jsonl"), benchmark="jigsaw"),
    )


class FakeHub:
    """`HfApi` at its boundary: what would go over the network is recorded instead."""

    calls: list = []

    def __init__(self, endpoint=None, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        FakeHub.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        FakeHub.calls.append(("upload_folder", kwargs, files))
        return type("Info", (), {"commit_url": f"https://hub/{kwargs['repo_id']}/commit/1"})()


def test_push_to_hub_uploads_the_folder_as_a_dataset_repo(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    FakeHub.calls = []
    out = tmp_path / "ds"
    rc, stdout, err = run_cli(
        [*VSP, "--format", "dataset", "--out", out, "--push-to-hub", "me/vsp", "--private"], capsys
    )
    assert rc == 0, err
    (create, repo, kwargs), (upload, upload_kwargs, files) = FakeHub.calls
    assert (create, repo, kwargs["repo_type"], kwargs["private"]) == (
        "create_repo",
        "me/vsp",
        "dataset",
        True,
    )
    assert upload_kwargs["repo_type"] == "dataset" and Path(upload_kwargs["folder_path"]) == out
    assert upload_kwargs["ignore_patterns"] == [".mirage-trl.json"]  # bookkeeping stays local
    assert "README.md" in files and "data/train-00000-of-00001.parquet" in files
    assert "pushed" in stdout and "https://hub/me/vsp/commit/1" in stdout
    assert "hf_secret_value_123" not in stdout + err + (out / "README.md").read_text()


def test_push_and_format_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    rc, _, err = run_cli([*VSP, "--out", tmp_path / "a", "--push-to-hub", "me/vsp"], capsys)
    assert_cli_error(rc, err, "data", r"--push-to-hub: only with --format dataset")
    assert not (tmp_path / "a").exists()
    rc, _, err = run_cli([*VSP, "--format", "dataset", "--out", tmp_path / "b", "--private"], capsys)
    assert_cli_error(rc, err, "data", r"--private: only with --push-to-hub REPO$")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no stored token either
    rc, _, err = run_cli(
        [*VSP, "--format", "dataset", "--out", tmp_path / "c", "--push-to-hub", "me/vsp"], capsys
    )
    assert_cli_error(
        rc, err, "data", r"--push-to-hub me/vsp: no Hub token .*; the dataset is complete in \S+c$"
    )
    assert load_data(str(tmp_path / "c"), split="train")  # the local folder is whole
