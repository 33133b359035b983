"""The bad-input matrix (issue 10): every entry point fed every applicable bad input.

Each case asserts (a) one `MirageError` line naming the place (file:line:field, a flag or a path),
(b) for the CLI: exit code 2, that one line on stderr and no stack trace (`--debug` shows one),
(c) no partial output. Plus the numerical guards, atomic writers and security defaults.
docs/reliability.md lists every case with the test that proves it.

Entry points: the loader (`load_reference_jsonl`), `mirage-trl data check|vsp|jigsaw`, `mirage-trl eval`,
`mirage-trl export`, `load_model`, the collator, `MirageSFTTrainer`, and the recipes' `main` with
TrlParser-built arguments (in-process; one subprocess shows what a recipe user sees).
Slow setups (tiny models, generated data) are built once per module.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mirage_trl.cli import main
from mirage_trl.errors import MirageError

REPO = Path(__file__).resolve().parents[1]
SECRET = "hf_reliabilitySECRET0123456789"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny models on disk (plain VL, Mirage k=2, text-only), 4 generated VSP rows with their images."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mirage_trl.data.vsp import generate_vsp
    from mirage_trl.latent.tokens import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model, build_tiny_tokenizer, save_tiny_model

    root = tmp_path_factory.mktemp("reliability")
    base = save_tiny_model(root / "base")  # a vision-language model, but not a Mirage one
    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, latent_size=2)
    mirage = root / "mirage"
    model.save_pretrained(mirage)
    processor.save_pretrained(mirage)
    # A model without a vision tower, with the latent tokens and settings of a Mirage model.
    tok = build_tiny_tokenizer()
    text_only = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok) + 16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    add_latent_tokens(tok, text_only, latent_size=2)
    text_only.save_pretrained(root / "text-only")
    tok.save_pretrained(root / "text-only")

    data = generate_vsp(
        "planning", [3], 4, split="train", style="cot", seed=0, out_dir=root / "data", progress=False
    )
    objs = [json.loads(line) for line in data.read_text().splitlines()]
    for o in objs:  # absolute image paths, so bad files can live anywhere
        o["image_input"] = str((data.parent / o["image_input"]).resolve())
        o["image_output"] = str((data.parent / o["image_output"]).resolve())
    return dict(
        root=root,
        base=base,
        mirage=mirage,
        text_only=root / "text-only",
        data=data,
        objs=objs,
        processor=processor,
    )


@pytest.fixture(scope="module")
def rows(env):
    from mirage_trl.data.reference import load_reference_jsonl

    return load_reference_jsonl(env["data"])


def write_rows(path: Path, objs, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(o) for o in objs]
    for i, text in (raw_lines or {}).items():
        lines[i] = text
    path.write_text("".join(line + "\n" for line in lines))
    return path


def copy_objs(env):
    return [dict(o) for o in env["objs"]]


def broken_image(folder: Path, kind: str) -> str:
    """'unreadable': text bytes under a .png name; 'truncated': a real PNG cut in half."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.png"
    if kind == "unreadable":
        path.write_text("this is not an image")
    else:
        from PIL import Image

        tmp = folder / "whole.png"
        Image.effect_noise((96, 96), 64).convert("RGB").save(tmp)
        data = tmp.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_cli_error(rc, err, command: str, pattern: str):
    """Exit 2, exactly one `mirage-trl <command>: error: ...` line matching `pattern`, no stack trace."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    # transformers' own "Loading weights" progress bars may precede the line; nothing else may.
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    errors = [line for line in lines if line.startswith(f"mirage-trl {command}: error: ")]
    assert len(errors) == 1 and len(lines) == 1, err
    assert re.search(pattern, errors[0]), (pattern, errors[0])


def nothing_written(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


# ---------------------------------------------------------------------------------------------- bad data files
def _malformed(env, folder):
    return write_rows(
        folder / "bad.jsonl", env["objs"], {1: '{"text_input": "half a row'}
    ), r"bad\.jsonl:2: malformed JSON"


def _missing_field(env, folder):
    objs = copy_objs(env)
    del objs[0]["text_input"]
    return write_rows(folder / "bad.jsonl", objs), r"bad\.jsonl:1:text_input: missing required field"


def _empty(env, folder):
    (folder / "bad.jsonl").write_text("\n\n")
    return folder / "bad.jsonl", r"bad\.jsonl: no rows \(the file is empty\)"


def _missing_image(env, folder):
    objs = copy_objs(env)
    objs[2]["image_input"] = str(folder / "nowhere.png")
    return write_rows(
        folder / "bad.jsonl", objs
    ), r"bad\.jsonl:3:image_input: image not found: .*nowhere\.png"


def _image_count(env, folder):
    objs = copy_objs(env)
    objs[0]["text_input"] += " <image>"
    return write_rows(
        folder / "bad.jsonl", objs
    ), r"bad\.jsonl:1:image_input: 2 <image> marker\(s\) in text_input but 1 input image"


def _output_image_count(env, folder):
    objs = copy_objs(env)
    objs[1]["text_output"] += " <output_image>"
    return write_rows(folder / "bad.jsonl", objs), (
        r"bad\.jsonl:2:image_output: 2 <output_image> marker\(s\) in text_output but 1 helper image"
    )


DATA_CASES = {
    "malformed_json": _malformed,
    "missing_field": _missing_field,
    "empty_file": _empty,
    "missing_image": _missing_image,
    "image_marker_count": _image_count,
    "output_image_marker_count": _output_image_count,
}


def _recipe_args(argv):
    from trl import ModelConfig, TrlParser

    from mirage_trl.configs import MirageScriptArguments, MirageSFTConfig

    return TrlParser((MirageScriptArguments, MirageSFTConfig, ModelConfig)).parse_args_and_config(
        args=[str(a) for a in argv]
    )


def _recipe_argv(env, data, out, *extra):
    return [
        "--model_name_or_path",
        env["mirage"],
        "--dataset_name",
        data,
        "--output_dir",
        out,
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--max_steps",
        "1",
        "--latent_size",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--activation_checkpointing",
        "false",
        "--disable_tqdm",
        "true",
        *extra,
    ]


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


# ---------------------------------------------------------------------------------------------- broken images
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
        from mirage_trl.data.collator import MirageDataCollator
        from mirage_trl.data.reference import load_reference_jsonl
        from mirage_trl.latent.tokens import LatentTokens

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


# ---------------------------------------------------------------------------------------------- trainer-level cases
def sft_args(out, **kw):
    from mirage_trl.configs import MirageSFTConfig

    base = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        activation_checkpointing=False,
        per_device_train_batch_size=2,
        logging_steps=1,
        max_steps=1,
        learning_rate=1e-3,
        disable_tqdm=True,
        bf16=False,
        seed=0,
        latent_size=2,
    )
    base.update(kw)
    return MirageSFTConfig(**base)


def sft_trainer(out, dataset, model=None, processor=None, **kw):
    from mirage_trl.models.tiny import build_tiny_model
    from mirage_trl.trainers.sft import MirageSFTTrainer

    if model is None:
        model, processor = build_tiny_model(seed=0)
    return MirageSFTTrainer(
        model=model, args=sft_args(out, **kw), train_dataset=dataset, processing_class=processor
    )


def no_checkpoint(out: Path) -> bool:
    return not out.exists() or not [
        p for p in out.iterdir() if p.name.startswith("checkpoint-") or p.suffix == ".safetensors"
    ]


def test_stage1_on_rows_without_helper_images(env, tmp_path):
    from mirage_trl.data.reference import load_reference_jsonl

    objs = copy_objs(env)
    for o in objs:
        o["text_output"] = o["text_output"].replace("<output_image>", " ")
        o.pop("image_output")
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
        re.escape(str(text_only)) + r": model type 'qwen2' is not a supported vision-language",
    )
    rc, _, err = run_cli(["export", "--model", text_only, "--out", tmp_path / "x"], capsys)
    assert_cli_error(
        rc,
        err,
        "export",
        re.escape(str(text_only)) + r": model type 'qwen2' is not a supported vision-language",
    )
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()
    # The trainer: tests/test_stage1.py::test_model_without_vision_tower_is_a_clear_error


# ---------------------------------------------------------------------------------------------- unknown names
def test_unknown_benchmark(env, tmp_path, capsys):
    from mirage_trl.data.reference import load_reference_jsonl
    from mirage_trl.grading import grade

    valid = "vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt"
    with pytest.raises(MirageError, match=f"unknown benchmark 'maze'; valid: {valid}"):
        load_reference_jsonl(env["data"], benchmark="maze")
    with pytest.raises(MirageError, match="unknown benchmark 'maze'"):
        grade("maze", "\\boxed{A}", {"answer": "A"})
    rc, _, err = run_cli(["data", "check", "--data", env["data"], "--benchmark", "maze"], capsys)
    assert_cli_error(rc, err, "data", f"--benchmark: unknown benchmark 'maze'; valid: {valid}")
    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            env["mirage"],
            "--benchmark",
            "maze",
            "--data",
            env["data"],
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert_cli_error(rc, err, "eval", f"unknown benchmark 'maze'; valid: {valid}")
    from helpers import recipe_main

    args = _recipe_args(_recipe_argv(env, env["data"], tmp_path / "r", "--benchmark", "maze"))
    with pytest.raises(MirageError, match="unknown benchmark 'maze'"):
        recipe_main("stage1_vsp")(*args)
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("flag", "value", "pattern"),
    [
        ("--latent_pooling", "mean", r"--latent_pooling 'mean': choose one of drop_remainder, even"),
        ("--latent_truncation", "cut", r"--latent_truncation 'cut': choose 'error' or 'drop'"),
        ("--stage2_method", "fast", r"--stage2_method 'fast': choose one of auto, rounds"),
        ("--latent_size", "0", r"--latent_size 0: must be an integer from 1 to 64"),
    ],
)
def test_unknown_training_setting_names_the_flag(env, tmp_path, flag, value, pattern):
    with pytest.raises(MirageError, match=pattern):
        _recipe_args(_recipe_argv(env, env["data"], tmp_path / "r", flag, value))
    assert not (tmp_path / "r").exists()


def test_unknown_reward_name(tmp_path):
    from trl import ModelConfig, TrlParser

    from mirage_trl.configs import MirageGRPOConfig, MirageScriptArguments
    from mirage_trl.rewards import get_reward_funcs

    parser = TrlParser((MirageScriptArguments, MirageGRPOConfig, ModelConfig))
    with pytest.raises(MirageError, match=r"unknown reward 'accurcy'; valid: accuracy"):
        parser.parse_args_and_config(
            args=[
                "--output_dir",
                str(tmp_path / "g"),
                "--use_cpu",
                "true",
                "--reward_names",
                "accurcy",
                "format",
            ]
        )
    with pytest.raises(MirageError, match="unknown reward 'x'"):
        get_reward_funcs(["x"])


def test_unknown_latent_ablation(env, tmp_path, capsys):
    from mirage_trl.generation import generate_with_latents

    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            env["mirage"],
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--latents",
            "model",
            "blur",
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert_cli_error(
        rc, err, "eval", r"unknown latent mode 'blur'; valid modes: model, zero, noise, mean, shuffle, remove"
    )
    with pytest.raises(MirageError, match="unknown latent mode 'blur'"):
        generate_with_latents(None, env["processor"], {}, latent_mode="blur")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------- folders
def test_non_mirage_folder_to_eval_and_export(env, tmp_path, capsys):
    from mirage_trl.models.load import load_model

    data_dir = env["data"].parent  # a folder, but not a model
    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            data_dir,
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert_cli_error(rc, err, "eval", re.escape(str(data_dir)) + " is neither a model folder")
    rc, _, err = run_cli(["export", "--model", env["base"], "--out", tmp_path / "x"], capsys)
    assert_cli_error(rc, err, "export", re.escape(str(env["base"])) + " is not a Mirage model")
    rc, _, err = run_cli(["export", "--model", data_dir, "--out", tmp_path / "x"], capsys)
    assert_cli_error(rc, err, "export", re.escape(str(data_dir)) + " is neither a model folder")
    with pytest.raises(MirageError, match="is not a Mirage model"):
        load_model(env["base"])
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()


def _existing(tmp_path) -> Path:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return out


@pytest.mark.parametrize("command", ["data vsp", "data jigsaw", "eval", "export"])
def test_existing_output_folder_is_refused(env, tmp_path, capsys, command):
    out = _existing(tmp_path)
    argv = {
        "data vsp": ["data", "vsp", "--task", "planning", "--levels", "3", "--num-samples", "2"],
        "data jigsaw": ["data", "jigsaw", "--images", env["data"].parent / "images", "--num-samples", "2"],
        "eval": ["eval", "--model", env["mirage"], "--benchmark", "vsp_planning", "--data", env["data"]],
        "export": ["export", "--model", env["mirage"]],
    }[command]
    rc, _, err = run_cli([*argv, "--out", out], capsys)
    assert_cli_error(
        rc,
        err,
        command.split()[0],
        re.escape(f"--out: {out} already exists and is not empty (pass --overwrite"),
    )
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temp folder either


# ---------------------------------------------------------------------------------------------- --debug, recipes
def test_cli_subprocess_one_line_and_debug_shows_trace(env, tmp_path):
    bad, pattern = _malformed(env, tmp_path)
    cmd = [sys.executable, "-m", "mirage_trl"]
    run = dict(capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    p = subprocess.run([*cmd, "data", "check", "--data", str(bad)], **run)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and re.search(pattern, p.stderr), p.stderr
    p = subprocess.run([*cmd, "--debug", "data", "check", "--data", str(bad)], **run)
    assert p.returncode != 0 and "Traceback" in p.stderr and "MirageError" in p.stderr


def test_recipe_subprocess_one_line_through_run_recipe(env, tmp_path):
    """What a recipe user sees, with the recipe file run as `python recipes/stage1_vsp.py` does, under
    `mirage_trl.run.run_recipe` (every recipe's __main__)."""
    bad, pattern = _missing_field(env, tmp_path)
    out = tmp_path / "run"
    argv = [
        "stage1_vsp.py",
        "--config",
        str(REPO / "recipes/tiny/stage1/config_vsp_smoke.yaml"),
        "--dataset_name",
        str(bad),
        "--model_name_or_path",
        str(env["mirage"]),
        "--output_dir",
        str(out),
        "--latent_size",
        "2",
    ]
    code = (
        "import runpy, sys\n"
        "from mirage_trl.run import run_recipe\n"
        f"sys.argv = {argv!r}\n"
        f"run_recipe(lambda: runpy.run_path({str(REPO / 'recipes/stage1_vsp.py')!r}, run_name='__main__'))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO), HF_TOKEN=SECRET),
    )
    lines = [line for line in p.stderr.splitlines() if line.startswith("stage1_vsp.py: error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert re.search(pattern, lines[0]) and SECRET not in p.stderr + p.stdout
    assert not out.exists()


def test_run_recipe_debug_env_shows_trace(monkeypatch, capsys):
    from mirage_trl.run import run_recipe

    def boom():
        raise MirageError("x.jsonl:3:text_input: missing required field")

    with pytest.raises(SystemExit) as e:
        run_recipe(boom, prog="stage1_vsp.py")
    assert e.value.code == 2
    assert capsys.readouterr().err == "stage1_vsp.py: error: x.jsonl:3:text_input: missing required field\n"
    monkeypatch.setenv("MIRAGE_TRL_DEBUG", "1")
    with pytest.raises(MirageError):
        run_recipe(boom)
    assert run_recipe(lambda: 7) == 7


def test_every_recipe_runs_under_run_recipe():
    recipes = sorted((REPO / "recipes").glob("*.py"))
    assert recipes and all("run_recipe(" in p.read_text() for p in recipes)


# ---------------------------------------------------------------------------------------------- numerical guards
@pytest.fixture(scope="module")
def guard_rows(rows):
    return rows.select(range(2))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _nan_final_norm(trainer):
    from mirage_trl.latent.model_utils import unwrap

    norm = unwrap(trainer.model).model.language_model.norm
    return norm.register_forward_hook(lambda m, i, o: o * float("nan"))


def _skipped(trainer):
    return [h["skipped_steps"] for h in trainer.state.log_history if "skipped_steps" in h]


def test_nan_loss_stops_stage1_naming_step_and_term(guard_rows, tmp_path):
    trainer = sft_trainer(tmp_path / "out", guard_rows, max_steps=2)
    handle = _nan_final_norm(trainer)
    with pytest.raises(
        MirageError, match=r"^step 0: non-finite loss \(NaN or inf\).*skip_nonfinite_steps=True"
    ):
        trainer.train()
    handle.remove()
    assert no_checkpoint(tmp_path / "out")


def test_nan_helper_target_names_the_latents(guard_rows, tmp_path, monkeypatch):
    import mirage_trl.trainers.sft as sft

    real = sft.helper_latent_targets
    monkeypatch.setattr(sft, "helper_latent_targets", lambda *a, **k: real(*a, **k) * float("nan"))
    trainer = sft_trainer(tmp_path / "out", guard_rows)
    with pytest.raises(MirageError, match=r"^step 0: non-finite loss, latents"):
        trainer.train()


def test_skip_nonfinite_step_is_counted_and_changes_no_weight(guard_rows, tmp_path):
    trainer = sft_trainer(tmp_path / "out", guard_rows, skip_nonfinite_steps=True, max_steps=1)
    handle = _nan_final_norm(trainer)
    before = _params(trainer.model)
    trainer.train()
    handle.remove()
    after = _params(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert _skipped(trainer) == [1.0] and trainer.num_skipped_steps == 1


def test_stage2_latent_norm_bound_stops_or_skips(guard_rows, tmp_path):
    trainer = sft_trainer(tmp_path / "a", guard_rows, stage=2, max_latent_norm=1e-3)
    with pytest.raises(
        MirageError, match=r"^step 0: latent norm \S+ exceeds max_latent_norm=0\.001 \(raise max_latent_norm"
    ):
        trainer.train()
    trainer = sft_trainer(
        tmp_path / "b", guard_rows, stage=2, max_latent_norm=1e-3, skip_nonfinite_steps=True
    )
    before = _params(trainer.model)
    trainer.train()
    after = _params(trainer.model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert _skipped(trainer) == [1.0]
    # (The default bound, 1e4, lets healthy steps through: every stage-2 test in tests/test_resume.py.)


# ---------------------------------------------------------------------------------------------- atomic writers
def test_killed_data_generation_leaves_no_output(tmp_path):
    """SIGKILL `mirage-trl data vsp` once its temporary folder holds images: no `out` appears."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "mirage_trl",
        "data",
        "vsp",
        "--task",
        "planning",
        "--levels",
        "3",
        "4",
        "5",
        "6",
        "--num-samples",
        "2000",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO))
    )
    try:
        deadline = time.monotonic() + 60
        temp = None
        while time.monotonic() < deadline and proc.poll() is None:
            temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
            if temps and any(temps[0].rglob("*.png")):
                temp = temps[0]
                break
            time.sleep(0.02)
        assert temp is not None, "the generator never wrote its temporary folder"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    assert not list(temp.glob("*.jsonl"))  # the JSONL, written last, is not there either


def test_interrupted_latent_target_cache_leaves_no_cache_file(env, rows, tmp_path, monkeypatch):
    import mirage_trl.data.images as images
    from mirage_trl.latent.targets import precompute_latent_targets
    from mirage_trl.latent.tokens import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, 2)
    real, calls = images.load_image, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) > 2:  # the second batch of two rows
            raise KeyboardInterrupt
        return real(*a, **k)

    cache = tmp_path / "cache"
    monkeypatch.setattr(images, "load_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        precompute_latent_targets(rows, model, processor, 2, batch_size=2, cache_dir=cache)
    assert not [p.name for p in cache.iterdir() if p.name.startswith("latent_targets")], list(cache.iterdir())
    monkeypatch.setattr(images, "load_image", real)
    done = precompute_latent_targets(rows, model, processor, 2, batch_size=2, cache_dir=cache)
    assert len(done["latent_targets"]) == len(rows) and all(len(t) == 1 for t in done["latent_targets"])


def test_interrupted_eval_leaves_no_results(env, tmp_path, capsys, monkeypatch):
    import mirage_trl.io as io

    real = io.write_jsonl

    def half_then_interrupt(path, rows):
        real(path, list(rows)[:1])
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_jsonl", half_then_interrupt)
    out = tmp_path / "eval"
    rc, _, err = run_cli(
        [
            "eval",
            "--model",
            env["mirage"],
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--num-samples",
            "2",
            "--max-new-tokens",
            "2",
            "--greedy",
            "--no-progress",
            "--out",
            out,
        ],
        capsys,
    )
    assert rc == 130 and "interrupted" in err
    # Neither `eval` nor its temporary folder; the decoded rows are kept beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["eval.partial.jsonl"]


# ---------------------------------------------------------------------------------------------- security defaults
def test_no_trust_remote_code_in_the_source():
    hits = []
    for path in sorted((REPO / "mirage_trl").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"trust_remote_code\s*[=:]\s*True|trust_remote_code\s*=\s*(1|\"|')", line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
            if re.search(r"\btorch\.load\(|\bpickle\.loads?\(", line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        if re.search(r"^\s*trust_remote_code:\s*true", path.read_text(), re.M | re.I):
            hits.append(str(path.relative_to(REPO)))
    assert not hits, hits


def test_loaders_pass_trust_remote_code_false(env, monkeypatch):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    from mirage_trl.models.load import load_for_training, load_model

    seen = []
    for cls in (AutoConfig, AutoTokenizer, AutoModelForImageTextToText):
        orig = cls.from_pretrained

        def spy(*a, _orig=orig, **k):
            seen.append(k.get("trust_remote_code", False))
            return _orig(*a, **k)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_model(env["mirage"])
    load_for_training(str(env["mirage"]))
    assert seen and not any(seen), seen


def test_export_holds_safetensors_only(env, tmp_path, capsys):
    rc, _, _ = run_cli(["export", "--model", env["mirage"], "--out", tmp_path / "x"], capsys)
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))], names
    # Adapters and merged exports: tests/test_export.py::_no_pickles in every round-trip test.


def test_hub_token_never_printed(env, tmp_path):
    """A hub name that cannot be reached (offline) with HF_TOKEN set: one line, exit 2, no token anywhere."""
    out = tmp_path / "e"
    cmd = [
        sys.executable,
        "-m",
        "mirage_trl",
        "eval",
        "--model",
        "someorg/not-here",
        "--benchmark",
        "vsp_planning",
        "--data",
        str(env["data"]),
        "--out",
        str(out),
        "--no-progress",
    ]
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(
            os.environ,
            PYTHONPATH=str(REPO),
            HF_TOKEN=SECRET,
            HUGGING_FACE_HUB_TOKEN=SECRET,
            HF_HUB_OFFLINE="1",
        ),
    )
    errors = [line for line in p.stderr.splitlines() if line.startswith("mirage-trl eval: error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert "someorg/not-here" in errors[0]
    assert SECRET not in p.stderr and SECRET not in p.stdout
    assert not out.exists()
