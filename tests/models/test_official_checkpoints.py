"""Checkpoints saved by the official Mirage code: the tokenizer holds `<|latent_pad|>`, `<|latent_start|>`,
`<|latent_end|>` (added in that order), config.json holds `latent_start_id` / `latent_end_id`, and no file
records the latent size. With `--latent-size` they load, evaluate and export; without, one line asks for it."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from mirage_trl.errors import MirageError
from mirage_trl.models.load import load_model
from mirage_trl.models.resolve import resolve_model_dir

OFFICIAL_ORDER = ["<|latent_pad|>", "<|latent_start|>", "<|latent_end|>"]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    from mirage_trl.data.vsp import generate_vsp
    from mirage_trl.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("official")
    model, processor = build_tiny_model(seed=0)
    tok = processor.tokenizer
    tok.add_special_tokens({"additional_special_tokens": OFFICIAL_ORDER}, replace_extra_special_tokens=False)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    ids = {t: tok.convert_tokens_to_ids(t) for t in OFFICIAL_ORDER}
    model.config.latent_start_id = ids["<|latent_start|>"]
    model.config.latent_end_id = ids["<|latent_end|>"]
    folder = root / "official-ckpt"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    data = generate_vsp(
        "planning", [3], 2, split="test", style="direct", seed=0, out_dir=root / "d", progress=False
    )
    return folder, data, ids


def test_needs_the_latent_size_and_then_loads_with_the_ids_by_name(official):
    folder, _, ids = official
    assert not (folder / "mirage_config.json").exists() and "mirage" not in json.loads(
        (folder / "config.json").read_text()
    )
    with pytest.raises(
        MirageError, match=r"no latent size is saved with the model .*pass the trained latent size"
    ):
        resolve_model_dir(folder)
    assert resolve_model_dir(folder, latent_size=4).latent_size == 4
    model, processor = load_model(folder, latent_size=4)
    assert model.config.mirage["latent_size"] == 4
    from mirage_trl.models.tokens import LatentTokens

    tokens = LatentTokens.from_tokenizer(
        processor, 4
    )  # looked up by name, whatever the order they were added in
    assert (tokens.pad_id, tokens.start_id, tokens.end_id) == tuple(ids[t] for t in OFFICIAL_ORDER)


def test_ids_in_config_must_match_the_tokenizer(official, tmp_path):
    import shutil

    folder, _, ids = official
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(config, latent_start_id=ids["<|latent_end|>"])))
    with pytest.raises(
        MirageError, match=r"config.json: latent_start_id=\d+ but the tokenizer has <\|latent_start\|> at id"
    ):
        resolve_model_dir(bad, latent_size=4)


def test_eval_and_export_with_latent_size(official, tmp_path, capsys):
    folder, data, _ = official
    rc, _, err = run_cli(
        ["eval", "--model", folder, "--benchmark", "vsp_planning", "--data", data, "--latent-size", 4,
         "--max-new-tokens", 6, "--greedy", "--no-progress", "--out", tmp_path / "eval"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["num_rows"] == 2
    rc, _, err = run_cli(["eval", "--model", folder, "--benchmark", "vsp_planning", "--data", data], capsys)
    assert rc == 2 and "pass the trained latent size (--latent-size)" in err
    rc, _, err = run_cli(["export", "--model", folder, "--out", tmp_path / "x", "--latent-size", 4], capsys)
    assert rc == 0, err
    saved = json.loads((tmp_path / "x" / "mirage_config.json").read_text())
    assert (
        saved["latent_size"] == 4
        and json.loads((tmp_path / "x" / "config.json").read_text())["mirage"]["latent_size"] == 4
    )
