"""Every shipped recipe YAML parses with its recipe's arguments, as users launch it: the YAML check of
`preflight` accepts it and `TrlParser` gives back each of its values."""

import importlib
import sys

import pytest
from helpers import REPO

from mirage_trl.errors import MirageError
from mirage_trl.preflight import check_recipe_yaml, parse_recipe_args

# the recipe module whose ARGS parse a YAML of each method folder
RECIPE_MODULES = {
    "stage1": "mirage_sft",
    "stage2": "mirage_sft",
    "grpo": "mirage_grpo",
    "text_sft": "text_sft",
}
YAMLS = sorted((REPO / "recipes").glob("*/*/config_*.yaml"))


def _args(method):
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        return importlib.import_module(RECIPE_MODULES[method]).ARGS
    finally:
        sys.path.remove(str(REPO / "recipes"))


def test_every_method_folder_has_yamls():
    assert {p.parent.name for p in YAMLS} == set(RECIPE_MODULES)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_shipped_yaml_parses_to_its_values(path):
    args = _args(path.parent.name)
    values = check_recipe_yaml(path, args)
    # the GPU YAMLs ask for bf16, which TrainingArguments refuses on a CPU: parsed as a CPU user would launch them
    cpu = ["--use_cpu", "true", "--bf16", "false"]
    parsed = parse_recipe_args(args, ["--config", str(path), *cpu])
    for key, value in values.items():
        if key in ("use_cpu", "bf16"):
            continue
        got = [getattr(p, key) for p in parsed if hasattr(p, key)]
        assert got, key
        if key in ("output_dir", "model_name_or_path", "dataset_name", "lr_scheduler_type", "report_to"):
            continue  # normalised by TrainingArguments (enum, list) or a path: checked by the recipe tests
        assert all(g == value for g in got), (key, value, got)


def test_yaml_list_of_strings_is_checked_element_by_element(tmp_path):
    args = _args("grpo")
    good = tmp_path / "good.yaml"
    good.write_text("reward_names: [accuracy, format]\n")
    assert check_recipe_yaml(good, args) == {"reward_names": ["accuracy", "format"]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("reward_names: [accuracy, 3]\n")
    with pytest.raises(MirageError) as e:
        check_recipe_yaml(bad, args)
    assert str(e.value) == f"{bad}:reward_names: expected a list of str, got list ['accuracy', 3]"
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("reward_weights: 0.5\n")
    with pytest.raises(MirageError) as e:
        check_recipe_yaml(scalar, args)
    assert str(e.value) == f"{scalar}:reward_weights: expected a list of float, got float 0.5"


def test_a_variant_names_the_paper_models_yaml_and_other_models_go_by_folder():
    from mirage_trl.shipped import recipe_config

    root = REPO / "recipes"
    assert recipe_config("lora", "stage1", "vsp") == str(
        root / "Qwen2.5-VL-7B-Instruct/stage1/config_vsp_lora.yaml"
    )
    for model in (
        "gemma-3-4b-it",
        "Qwen3.5-9B",
        "InternVL3-8B-hf",
        "SmolVLM2-2.2B-Instruct",
        "llava-onevision-qwen2-7b-ov-hf",
    ):
        name = f"{model}/stage2/config_vsp_lora"
        assert recipe_config(name, "stage2", "vsp") == str(root / f"{name}.yaml")
    assert recipe_config("smoke", "stage1", "vsp") == str(root / "tiny/stage1/config_vsp_smoke.yaml")


def test_every_yaml_is_laid_out_in_sections():
    """open-r1's layout: `# Model arguments`, `# Data`, `# Mirage`, `# Training` headers, in that order (a section
    a YAML has no keys for is left out)."""
    order = ["# Model arguments", "# Data", "# Mirage", "# Training"]
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        headers = [line for line in path.read_text().splitlines() if line in order]
        assert headers == [h for h in order if h in headers], path
        assert headers[0] == "# Model arguments" and headers[-1] == "# Training", path
