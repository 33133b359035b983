"""Model loading: where a name is looked for (a local folder is never tried on the Hub)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_mistyped_local_path_is_never_tried_on_the_hub(tmp_path):
    import time

    (tmp_path / "outputs").mkdir()
    from mirage_trl.data.vsp import generate_vsp

    data = generate_vsp("planning", [3], 2, "test", "direct", 0, tmp_path / "data", progress=False)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mirage_trl", "eval", "--model", "outputs/exprot", "--benchmark", "vsp_planning",
         "--data", str(data), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "0"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "mirage-trl eval: error: outputs/exprot: not a model folder, an adapter folder or a hub model name (org/name)"
    )
    assert time.perf_counter() - start < 60  # no Hub round trip (it waited 59 s before)


def test_hub_names_and_paths_are_told_apart(tmp_path, monkeypatch):
    from mirage_trl.io import looks_like_hub_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    assert looks_like_hub_name("Qwen/Qwen2.5-VL-7B-Instruct")
    for path in ("outputs/exprot", "./org/name", "/abs/name", "a/b/c", "org/name/", "plain"):
        assert not looks_like_hub_name(path), path
