"""Data by name: local dataset folders (save_to_disk, parquet, JSONL + images) and dataset ids, in the reference
schema and TRL's conversational vision schema, give the same rows as the reference JSONL they were made from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ROW_FIELDS, assert_same_rows

from mirage_trl.data.reference import load_reference_jsonl
from mirage_trl.data.sources import load_data
from mirage_trl.errors import MirageError

COMPARED = ROW_FIELDS


def _conversational(obj: dict, images) -> dict:
    """A reference object written by hand in TRL's conversational schema (an independent translation)."""
    before, after = obj["text_input"].split("<image>")
    user = [
        p
        for p in ({"type": "text", "text": before}, {"type": "image"}, {"type": "text", "text": after})
        if p.get("text", "x")
    ]
    pieces = obj["text_output"].split("<output_image>")
    assistant = []
    for i, piece in enumerate(pieces):
        if i:
            assistant.append({"type": "image"})
        if piece:
            assistant.append({"type": "text", "text": piece})
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "images": images,
        "helper_images": [obj["image_output"]],
        "helper_texts": [obj["image_output_text"]],  # what the helper image shows (the generated rows say)
        # the optional columns, read as in the reference schema
        **{k: obj[k] for k in ("map_desc", "answer", "level", "map_id") if k in obj},
    }


def _bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def _same_rows(got, expected):
    assert_same_rows(got, expected, COMPARED)


@pytest.fixture(scope="module")
def reference(env):
    return load_reference_jsonl(env["data"])


def test_saved_dataset_dict_with_image_bytes_in_conversational_schema(env, reference, tmp_path):
    from datasets import Dataset, DatasetDict, Image, List

    objs = env["objs"]
    rows = [_conversational(o, [{"bytes": _bytes(o["image_input"]), "path": None}]) for o in objs]
    train = Dataset.from_list(rows).cast_column("images", List(Image()))
    DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(tmp_path / "ds")
    _same_rows(load_data(str(tmp_path / "ds"), split="train"), reference)
    _same_rows(load_data(str(tmp_path / "ds"), split="test"), reference.select([0]))
    with pytest.raises(
        MirageError, match=r"ds: no split 'validation' \(splits: train, test\); set the split flag$"
    ):
        load_data(str(tmp_path / "ds"), split="validation")


def test_pil_images_and_a_system_turn(env, reference, tmp_path):
    from datasets import Dataset
    from PIL import Image

    objs = env["objs"]
    rows = []
    for o in objs:
        row = _conversational(o, [Image.open(o["image_input"]).convert("RGB")])
        row["messages"].insert(
            0, {"role": "system", "content": [{"type": "text", "text": "Plan carefully."}]}
        )
        rows.append(row)
    Dataset.from_list(rows).save_to_disk(tmp_path / "pil")
    got = load_data(str(tmp_path / "pil"))
    for g, e in zip(got, reference):
        assert g["messages"][0] == {
            "role": "system",
            "content": [{"type": "text", "text": "Plan carefully."}],
        }
        assert g["messages"][1:] == e["messages"]
        # PNG of the decoded pixels: the same picture
        assert Image.open(g["images"][0]).tobytes() == Image.open(e["images"][0]).convert("RGB").tobytes()


def test_parquet_folder_in_reference_schema_with_relative_images(env, reference, tmp_path):
    from datasets import Dataset

    folder = tmp_path / "pq"
    (folder / "images").mkdir(parents=True)
    objs = []
    for i, o in enumerate(env["objs"]):
        for field in ("image_input", "image_output"):
            shutil.copy(o[field], folder / "images" / f"{i}_{field}.png")
        objs.append(
            {
                **o,
                "image_input": f"images/{i}_image_input.png",
                "image_output": f"images/{i}_image_output.png",
            }
        )
    Dataset.from_list(objs).to_parquet(folder / "train.parquet")
    got = load_data(str(folder), split="train")
    _same_rows(got, reference)
    assert all(p.startswith(str(folder.resolve())) for r in got for p in r["images"])


def test_jsonl_with_an_images_folder_in_conversational_schema(env, reference, tmp_path):
    folder = tmp_path / "jl"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, o in enumerate(env["objs"]):
        shutil.copy(o["image_input"], folder / "images" / f"{i}.png")
        shutil.copy(o["image_output"], folder / "images" / f"{i}_helper.png")
        row = _conversational(o, [f"images/{i}.png"])
        row["helper_images"] = [f"images/{i}_helper.png"]
        lines.append(json.dumps(row))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    _same_rows(load_data(str(folder)), reference)  # the folder
    _same_rows(load_data(str(folder / "train.jsonl")), reference)  # the file itself


def test_a_dataset_id_goes_to_load_dataset_with_its_config_and_split(env, reference, monkeypatch):
    import datasets

    calls = []
    local = datasets.Dataset.from_list([_conversational(o, [o["image_input"]]) for o in env["objs"]])

    def fake_load_dataset(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    _same_rows(load_data("someone/vsp-conversational", split="train[:4]", config="planning"), reference)
    assert calls == [("someone/vsp-conversational", "planning", "train[:4]")]


def test_bad_datasets_fail_in_one_line(env, tmp_path):
    from datasets import Dataset

    o = env["objs"][0]
    with pytest.raises(
        MirageError, match=r"^--dataset_name x: streaming is not supported .*'train\[:1000\]'$"
    ):
        load_data("x", streaming=True)
    with pytest.raises(MirageError, match=r"^--data \./missing/rows\.jsonl: no such file or folder$"):
        load_data("./missing/rows.jsonl", flag="--data")  # a path, never tried as a dataset id
    cases = {
        "roles": (
            {"messages": [{"role": "assistant", "content": "hi"}], "images": []},
            r"\[0\]:messages: expected one user turn",
        ),
        "count": (
            {**_conversational(o, [o["image_input"], o["image_input"]])},
            r"\[0\]:images: 1 <image> marker\(s\) in text_input but 2 input image\(s\)",
        ),
        "helpers": (
            {**_conversational(o, [o["image_input"]]), "helper_images": []},
            r"\[0\]:helper_images: 1 <output_image> marker",
        ),
        "missing": ({**_conversational(o, ["nowhere.png"])}, r"\[0\]:images\[0\]: image not found"),
        "schema": (
            {"question": "?"},
            r"\[0\]: neither a reference row \(text_input\) nor a conversational one",
        ),
    }
    for name, (row, message) in cases.items():
        Dataset.from_list([row]).save_to_disk(tmp_path / name)
        with pytest.raises(MirageError, match=rf"^{tmp_path / name}\[train\]{message}"):
            load_data(str(tmp_path / name))


@pytest.mark.parametrize("schema", ["reference", "conversational"])
def test_stage1_trains_one_step_on_a_dataset_folder(env, tmp_path, schema, one_thread):
    """Through the recipe, with TRL's --dataset_name / --dataset_train_split flags."""
    from datasets import Dataset, DatasetDict, Image, List
    from helpers import _recipe_args, _recipe_argv, recipe_main

    objs = env["objs"]
    if schema == "reference":
        train = Dataset.from_list(objs)
    else:
        rows = [_conversational(o, [{"bytes": _bytes(o["image_input"]), "path": None}]) for o in objs]
        train = Dataset.from_list(rows).cast_column("images", List(Image()))
    DatasetDict({"fit": train}).save_to_disk(tmp_path / "ds")
    argv = _recipe_argv(env, tmp_path / "ds", tmp_path / "out", "--dataset_train_split", "fit")
    trainer = recipe_main("stage1_vsp")(*_recipe_args(argv))
    # the same rows as the JSONL they were made from: the same first step, to the last digit
    jsonl = recipe_main("stage1_vsp")(*_recipe_args(_recipe_argv(env, env["data"], tmp_path / "jsonl")))
    assert trainer.state.global_step == 1
    assert trainer.state.log_history[-1]["train_loss"] == jsonl.state.log_history[-1]["train_loss"] > 0


def test_eval_reads_a_dataset_folder_like_the_jsonl(env, tmp_path, capsys, one_thread):
    """`mirage-trl eval --data FOLDER --data-split S`: the same completions as on the JSONL."""
    from datasets import Dataset, DatasetDict
    from helpers import run_cli

    rows = [_conversational(o, [o["image_input"]]) for o in env["objs"]]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(tmp_path / "ds")
    completions = {}
    for name, data in (("jsonl", env["data"]), ("folder", tmp_path / "ds")):
        argv = ["eval", "--model", env["mirage"], "--benchmark", "vsp_planning", "--data", data, "--greedy"]
        argv += ["--max-new-tokens", 6, "--num-samples", 2, "--no-progress", "--out", tmp_path / name]
        rc, _, err = run_cli(argv, capsys)
        assert rc == 0, err
        lines = (tmp_path / name / "completions.jsonl").read_text().splitlines()
        completions[name] = [json.loads(line)["completion"] for line in lines]
    assert len(completions["jsonl"]) == 2 and completions["folder"] == completions["jsonl"]
    assert json.loads((tmp_path / "folder" / "results.json").read_text())["data_split"] == "test"


def test_a_saved_split_must_be_the_one_asked_for_and_nothing_is_written_into_the_folder(
    env, reference, tmp_path, caplog
):
    """A save_to_disk folder of one Dataset: its split name is checked (eval's default `test` must not grade a
    `train` split), an unnamed split is used with a warning, and loading writes no cache file into the folder."""
    from datasets import Dataset, NamedSplit

    rows = [_conversational(o, [o["image_input"]]) for o in env["objs"]]
    named = Dataset.from_list(rows, split=NamedSplit("train"))
    named.save_to_disk(tmp_path / "named")
    before = sorted(p.name for p in (tmp_path / "named").rglob("*"))
    _same_rows(load_data(str(tmp_path / "named"), split="train"), reference)
    with pytest.raises(MirageError, match=r"^--dataset_name .*named: no split 'test' \(splits: train\); set the split flag$"):  # fmt: skip
        load_data(str(tmp_path / "named"), split="test")
    assert sorted(p.name for p in (tmp_path / "named").rglob("*")) == before  # no cache-*.arrow
    Dataset.from_list(rows).save_to_disk(tmp_path / "unnamed")
    with caplog.at_level("WARNING"):
        _same_rows(load_data(str(tmp_path / "unnamed"), split="test"), reference)
    assert "one split without a name, used as 'test'" in caplog.text
