"""Bad inputs that reach the trainer: rows without helpers, truncation through a span, a broken helper image, a latent size that disagrees, a model without a vision tower. (docs/reliability.md)."""

from __future__ import annotations

import re

import pytest
from helpers import (
    _recipe_args,
    _recipe_argv,
    assert_cli_error,
    broken_image,
    copy_objs,
    no_checkpoint,
    run_cli,
    sft_trainer,
    write_rows,
)

from mirage_trl.errors import MirageError


def test_stage1_on_rows_without_helper_images(env, tmp_path):
    from mirage_trl.data.reference import load_reference_jsonl

    objs = copy_objs(env)
    for o in objs:
        o["text_output"] = o["text_output"].replace("<output_image>", " ")
        o.pop("image_output")
        o.pop("image_output_text")  # what the helper image showed goes with it
    ds = load_reference_jsonl(write_rows(tmp_path / "nohelp.jsonl", objs))
    with pytest.raises(MirageError, match=r"nohelp\.jsonl:1: stage 1 needs helper images"):
        sft_trainer(tmp_path / "out", ds)
    assert not (tmp_path / "out").exists()
    # Stage 2 trains on the same rows (self-generated latents need no helper image).
    sft_trainer(tmp_path / "out2", ds, stage=2)


def test_truncation_through_a_latent_span(rows, tmp_path):
    trainer = sft_trainer(tmp_path / "out", rows, max_length=120)
    with pytest.raises(
        MirageError, match=r"data/planning_train_cot\.jsonl:\d+: max_length=120 would cut through"
    ):
        trainer.train()
    assert no_checkpoint(tmp_path / "out")


def test_broken_helper_image_stops_training_naming_the_row(env, tmp_path):
    from mirage_trl.data.reference import load_reference_jsonl

    objs = copy_objs(env)[:2]
    objs[0]["image_output"] = broken_image(tmp_path / "img", "truncated")
    trainer = sft_trainer(tmp_path / "out", load_reference_jsonl(write_rows(tmp_path / "bad.jsonl", objs)))
    with pytest.raises(MirageError, match=r"bad\.jsonl:1:helper_images: broken or truncated image"):
        trainer.train()
    assert no_checkpoint(tmp_path / "out")


def test_latent_size_disagreeing_with_checkpoint(env, rows, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    from mirage_trl.models.load import load_model
    from mirage_trl.models.processors import load_processor

    mirage = env["mirage"]
    model = AutoModelForImageTextToText.from_pretrained(mirage)
    with pytest.raises(
        MirageError, match=r"latent_size=4 disagrees with .*mirage, which was trained with latent_size=2"
    ):
        sft_trainer(tmp_path / "out", rows, model=model, processor=load_processor(str(mirage)), latent_size=4)
    with pytest.raises(
        MirageError, match=r"mirage: latent_size=3 disagrees with .*config\.json 'mirage' \(k=2\)"
    ):
        load_model(mirage, latent_size=3)
    rc, _, err = run_cli(["export", "--model", mirage, "--out", tmp_path / "x", "--latent-size", "3"], capsys)
    assert_cli_error(rc, err, "export", r"mirage: latent_size=3 disagrees")
    # The recipe path: the checkpoint's k against --latent_size.
    from helpers import recipe_main

    script_args, training_args, model_args = _recipe_args(
        _recipe_argv(env, env["data"], tmp_path / "r", "--latent_size", "4")
    )
    with pytest.raises(MirageError, match=r"latent_size=4 disagrees"):
        recipe_main("stage2_vsp")(script_args, training_args, model_args)
    assert not (tmp_path / "x").exists() and no_checkpoint(tmp_path / "out") and no_checkpoint(tmp_path / "r")


def test_model_without_vision_tower(env, tmp_path, capsys):
    from mirage_trl.models.load import load_model

    text_only = env["text_only"]
    with pytest.raises(MirageError, match=re.escape(str(text_only))):
        load_model(text_only)
    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            text_only,
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--out",
            tmp_path / "e",
            "--no-progress",
        ],
        capsys,
    )
    assert_cli_error(
        rc,
        err,
        "eval",
        re.escape(str(text_only / "config.json"))
        + r": model type 'qwen2' is not a supported vision-language",
    )
    rc, _, err = run_cli(["export", "--model", text_only, "--out", tmp_path / "x"], capsys)
    assert_cli_error(
        rc,
        err,
        "export",
        re.escape(str(text_only / "config.json"))
        + r": model type 'qwen2' is not a supported vision-language",
    )
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()
