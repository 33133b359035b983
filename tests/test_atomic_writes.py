"""Interrupted writers leave nothing half-written: data generation, the latent-target cache, eval results. (docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    run_cli,
)

REPO = Path(__file__).resolve().parents[1]


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
    import mirage_trl.latent.targets as targets  # the module whose image loads fail
    from mirage_trl.latent.targets import precompute_latent_targets
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    model, processor = build_tiny_model(seed=0)
    add_latent_tokens(processor, model, 2)
    real, calls = targets.load_image, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) > 2:  # the second batch of two rows
            raise KeyboardInterrupt
        return real(*a, **k)

    cache = tmp_path / "cache"
    monkeypatch.setattr(targets, "load_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        precompute_latent_targets(rows, model, processor, 2, batch_size=2, cache_dir=cache)
    assert not [p.name for p in cache.iterdir() if p.name.startswith("latent_targets")], list(cache.iterdir())
    monkeypatch.setattr(targets, "load_image", real)
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
