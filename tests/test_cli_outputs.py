"""Outputs of the CLI, through `python -m mirage_trl` subprocesses:

* every `--out` is checked creatable and writable before any work (a file, under a file, a name too long);
* an export never deletes what it reads (`--out` equal to, inside or a parent of `--model` or of the base),
  and an `--overwrite` killed between its two renames leaves the old export, which the next run restores;
* a long `eval` keeps its decoded rows when it fails;
* a generator request too large to finish soon is refused at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*argv, timeout=300, **kw):
    p = subprocess.run(
        [sys.executable, "-m", "mirage_trl", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        **kw,
    )
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from mirage_trl.data.vsp import generate_vsp
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("cli_outputs")
    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, latent_size=2)
    model.save_pretrained(root / "mirage")
    processor.save_pretrained(root / "mirage")
    data = generate_vsp(
        "planning", [3], 2, split="test", style="cot", seed=0, out_dir=root / "data", progress=False
    )
    (root / "pics").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(root / "pics" / "a.png")
    return dict(root=root, model=root / "mirage", data=data, pics=root / "pics")


def _commands(env, out):
    return {
        "data vsp": [
            "data",
            "vsp",
            "--task",
            "planning",
            "--levels",
            "3",
            "--num-samples",
            "1",
            "--out",
            out,
        ],
        "data jigsaw": ["data", "jigsaw", "--images", env["pics"], "--num-samples", "1", "--out", out],
        "eval": [
            "eval",
            "--model",
            env["model"],
            "--benchmark",
            "vsp_planning",
            "--data",
            env["data"],
            "--out",
            out,
        ],
        "export": ["export", "--model", env["model"], "--out", out],
        "tiny-model": ["tiny-model", "--out", out],
        "analyze-latents": ["analyze-latents", "--model", env["model"], "--data", env["data"], "--out", out],
    }


@pytest.mark.parametrize(
    "command", ["data vsp", "data jigsaw", "eval", "export", "tiny-model", "analyze-latents"]
)
@pytest.mark.parametrize("case", ["is_file", "under_file", "name_too_long"])
def test_every_out_is_checked_before_any_work(env, tmp_path, command, case):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file the user keeps")
    out, pattern = {
        "is_file": (blocker, r"--out: \S+blocker is a file, expected a folder"),
        "under_file": (blocker / "sub" / "out", r"--out: \S+ lies under \S+blocker, which is a file"),
        "name_too_long": (
            tmp_path / ("x" * 300),
            r"--out: the name x+\.\.\. is longer than the file system allows",
        ),
    }[case]
    rc, _, err = cli(*_commands(env, out)[command], timeout=120)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert blocker.read_text() == "a file the user keeps"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


@pytest.mark.parametrize("relation", ["same", "inside", "parent"])
def test_export_never_writes_where_it_reads(env, tmp_path, relation):
    import shutil

    parent = tmp_path / "work"
    model = parent / "model"
    shutil.copytree(env["model"], model)
    before = sorted(p.name for p in model.iterdir())
    out = {"same": model, "inside": model / "export", "parent": parent}[relation]
    rc, _, err = cli("export", "--model", model, "--out", out, "--overwrite")
    word = {"same": "is", "inside": "is inside", "parent": "contains"}[relation]
    assert rc == 2 and f": {word} --model " in err and "Traceback" not in err, err
    assert sorted(p.name for p in model.iterdir()) == before


def test_export_refuses_out_that_holds_the_adapters_base(tmp_path):
    """An adapter export whose --out (with --overwrite) is a parent of the base model the adapter names."""
    from peft import LoraConfig, get_peft_model

    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    holder, adapter = tmp_path / "holder", tmp_path / "adapter"
    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, latent_size=2)
    model.save_pretrained(holder / "base")
    processor.save_pretrained(holder / "base")
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft.peft_config["default"].base_model_name_or_path = str(holder / "base")
    peft.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    before = sorted(p.name for p in (holder / "base").iterdir())
    rc, _, err = cli("export", "--model", adapter, "--out", holder, "--overwrite")
    assert rc == 2 and "Traceback" not in err, err
    assert f"--out {holder}: contains the base model its adapter names {holder / 'base'}" in err, err
    assert sorted(p.name for p in (holder / "base").iterdir()) == before


def test_overwrite_killed_between_renames_leaves_the_old_export(env, tmp_path):
    out = tmp_path / "export"
    assert cli("export", "--model", env["model"], "--out", out)[0] == 0
    old_files = sorted(p.name for p in out.iterdir())
    # Kill the second export right after it moved the old folder aside, before the new one is renamed in.
    code = (
        "import os, signal, sys\n"
        "import mirage_trl.io as io\n"
        "real = io.os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        f"    if str(src) == {str(out)!r}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "io.os.replace = replace\n"
        "from mirage_trl.cli import main\n"
        f"sys.exit(main(['export', '--model', {str(env['model'])!r}, '--out', {str(out)!r}, '--overwrite']))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert not out.exists() and any(p.name.startswith(".export.old-") for p in tmp_path.iterdir())
    # The next run restores the old export first (and refuses to replace it without --overwrite).
    rc, _, err = cli("export", "--model", env["model"], "--out", out)
    assert rc == 2 and "restored" in err and "already exists" in err.strip().splitlines()[-1], err
    assert sorted(p.name for p in out.iterdir()) == old_files
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no hidden copy left behind
    from mirage_trl.models.load import load_model

    load_model(out)


def test_failed_eval_keeps_its_decoded_rows(env, tmp_path):
    """Decoding finishes, then writing the results fails: every decoded row is kept beside --out."""
    out = tmp_path / "eval"
    code = (
        "import sys\n"
        "import mirage_trl.io as io\n"
        "def fail(*a, **k):\n"
        "    raise KeyboardInterrupt\n"
        "io.write_jsonl = fail\n"
        "from mirage_trl.cli import main\n"
        f"sys.exit(main(['eval', '--model', {str(env['model'])!r}, '--benchmark', 'vsp_planning', '--data', "
        f"{str(env['data'])!r}, '--max-new-tokens', '3', '--greedy', '--no-progress', '--batch-size', '1', "
        f"'--out', {str(out)!r}]))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert p.returncode == 130 and "kept in" in p.stderr, p.stderr
    kept = [json.loads(line) for line in Path(f"{out}.partial.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in kept) == [0, 1] and all(r["mode"] == "model" for r in kept)
    assert not out.exists()


def test_generator_request_too_large_is_refused_at_once(tmp_path):
    rc, _, err = cli(
        "data",
        "vsp",
        "--task",
        "planning",
        "--levels",
        "6",
        "--num-samples",
        "5000000",
        "--out",
        tmp_path / "o",
        timeout=30,
    )
    assert rc == 2 and "--num-samples: 5000000 rows would take hours" in err, err
    assert not (tmp_path / "o").exists()
