"""Model loading: where a name is looked for (a local folder is never tried on the Hub)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


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


def _family_types():
    from mirage_trl.models.families import FAMILIES

    return sorted(FAMILIES)


@pytest.mark.parametrize("model_type", _family_types())
def test_qlora_keeps_the_vision_tower_and_projector_in_full_precision(tmp_path, model_type):
    """With `--load_in_4bit`, transformers' own matcher (`should_convert_module`) converts every linear layer of
    the language model and none of the vision tower, the merger / projector or the LM head: stage-1 targets
    come from the tower, and a 4-bit tower would give other ones."""
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module
    from trl import ModelConfig

    from mirage_trl.models.families import family
    from mirage_trl.models.load import _keep_vision_unquantized, _training_kwargs
    from mirage_trl.models.tiny import build_tiny_model, save_tiny_model

    folder = save_tiny_model(tmp_path / "m", model_type, seed=0)
    kwargs, _ = _training_kwargs(ModelConfig(model_name_or_path=str(folder), load_in_4bit=True))
    _keep_vision_unquantized(kwargs, str(folder), False)
    patterns = kwargs["quantization_config"].llm_int8_skip_modules
    model, _ = build_tiny_model(model_type, seed=0)
    fam = family(model)
    language = {id(m) for m in fam.language_model(model).modules()}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for name, module in linears:
        in_language_model = id(module) in language
        assert should_convert_module(name, patterns) == in_language_model, (name, patterns)
