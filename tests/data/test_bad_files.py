"""Bad data files and broken images at every entry point: the loader, `data check`, `eval`, the recipes. (docs/reliability.md)."""

from __future__ import annotations

import pytest
from helpers import (
    DATA_CASES,
    _recipe_args,
    _recipe_argv,
    assert_cli_error,
    broken_image,
    copy_objs,
    run_cli,
    write_rows,
)

from mirage_trl.errors import MirageError


@pytest.mark.parametrize("entry", ["loader", "data check", "eval", "recipe"])
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file(env, tmp_path, capsys, case, entry):
    path, pattern = DATA_CASES[case](env, tmp_path)
    out = tmp_path / "out"
    if entry == "loader":
        from mirage_trl.data.reference import load_reference_jsonl

        with pytest.raises(MirageError, match=pattern) as e:
            load_reference_jsonl(path)
        assert "\n" not in str(e.value)
    elif entry == "data check":
        assert_cli_error(*run_cli(["data", "check", "--data", path], capsys)[::2], "data", pattern)
    elif entry == "eval":
        rc, _, err = run_cli(
            [
                "eval",
                "--model",
                env["mirage"],
                "--benchmark",
                "vsp_planning",
                "--data",
                path,
                "--out",
                out,
                "--no-progress",
            ],
            capsys,
        )
        assert_cli_error(rc, err, "eval", pattern)
    else:  # the stage-1 recipe in-process: what recipes/stage1_vsp.py runs after TrlParser
        from helpers import recipe_main

        script_args, training_args, model_args = _recipe_args(_recipe_argv(env, path, out))
        with pytest.raises(MirageError, match=pattern):
            recipe_main("stage1_vsp")(script_args, training_args, model_args)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["unreadable", "truncated"])
@pytest.mark.parametrize(
    ("entry", "field"),  # eval reads no helper image; the trainer: test_broken_helper_image_stops_training...
    [
        ("data check", "image_input"),
        ("data check", "image_output"),
        ("collator", "image_input"),
        ("collator", "image_output"),
        ("eval", "image_input"),
    ],
)
def test_broken_image(env, tmp_path, capsys, kind, field, entry):
    objs = copy_objs(env)
    objs[1][field] = broken_image(tmp_path / "img", kind)
    path = write_rows(tmp_path / "bad.jsonl", objs)
    reason = "not a readable image" if kind == "unreadable" else "broken or truncated image"
    column = {"image_input": "images", "image_output": "helper_images"}[field]
    out = tmp_path / "out"
    if entry == "data check":
        rc, stdout, err = run_cli(["data", "check", "--data", path], capsys)
        assert_cli_error(rc, err, "data", rf"bad\.jsonl:2:{field}: {reason}:? .*{kind}\.png")
        assert "all valid" not in stdout
    elif entry == "collator":
        from mirage_trl.data.reference import load_reference_jsonl
        from mirage_trl.latent.collator import MirageDataCollator
        from mirage_trl.models.tokens import LatentTokens

        ds = load_reference_jsonl(
            path, check_images=False
        )  # the loader would find an unreadable header first
        collator = MirageDataCollator(env["processor"], LatentTokens.from_tokenizer(env["processor"], 2))
        with pytest.raises(MirageError, match=rf"bad\.jsonl:2:{column}: {reason}:? .*{kind}\.png"):
            collator([ds[0], ds[1]])
    else:
        rc, _, err = run_cli(
            [
                "eval",
                "--model",
                env["mirage"],
                "--benchmark",
                "vsp_planning",
                "--data",
                path,
                "--out",
                out,
                "--no-progress",
                "--max-new-tokens",
                "2",
                "--greedy",
            ],
            capsys,
        )
        # An unreadable header is found when the rows load (before the model), a truncated body when decoded.
        where = field if kind == "unreadable" else column
        assert_cli_error(rc, err, "eval", rf"bad\.jsonl:2:{where}: {reason}")
        assert not out.exists()
