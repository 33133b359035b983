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


def _has_avx512bf16() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


@pytest.mark.skipif(
    not _has_avx512bf16(),
    reason="bitsandbytes' CPU inference repacking needs bitsandbytes on an AVX512-BF16 CPU",
)
def test_a_4bit_model_being_trained_keeps_its_training_layout_after_an_evaluation(tmp_path, caplog):
    """bitsandbytes repacks a 4-bit layer for its CPU inference kernel at the first forward without gradients and
    never packs it back: the next training forward failed (an in-place bias add under autograd) or computed other
    numbers. A model loaded for training never repacks (`keep_4bit_layers_trainable` in `load_for_training` and the
    trainers' set-up); one repacked before is packed back, with a warning (bitsandbytes' inverse rounds its scales)."""
    import torch
    from trl import ModelConfig

    from mirage_trl.models.load import keep_4bit_layers_trainable, load_for_training
    from mirage_trl.models.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", seed=0)
    model, _ = load_for_training(
        str(folder),
        model_args=ModelConfig(model_name_or_path=str(folder), load_in_4bit=True, dtype="float32"),
    )
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit" and m.bias is not None)
    layer.bias.requires_grad_(
        True
    )  # as a trained bias would be: what the inference kernel's in-place add breaks
    x = torch.randn(3, layer.in_features)

    def training_forward():
        layer.train()
        out = layer(x.clone().requires_grad_(True))
        out.sum().backward()
        return out.detach()

    def evaluation():
        layer.eval()
        with torch.no_grad():
            layer(x)
        return getattr(layer.weight.quant_state, "packing_format_for_cpu", False)

    before = training_forward()
    assert not evaluation()  # loaded for training: no repacking
    torch.testing.assert_close(training_forward(), before, rtol=0, atol=0)

    layer.support_avx512bf16_for_cpu = True  # a model loaded elsewhere, then evaluated
    assert evaluation()
    with pytest.raises(RuntimeError, match="in-place operation"):
        training_forward()
    keep_4bit_layers_trainable(model)
    assert "1 4-bit layers had been repacked" in caplog.text
    assert not evaluation()
    torch.testing.assert_close(training_forward(), before, rtol=0, atol=1e-2 * float(before.abs().max()))
