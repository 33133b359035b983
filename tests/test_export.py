"""Export, merge, upload and loading: round trips on the tiny model.

A tiny Qwen2.5-VL is trained for 3 LoRA steps (lr 1e-2, so the LoRA weights and the latent-token
rows really move) and saved the way the recipes save it (`run.save_outputs`, plus a
`checkpoint-3` folder from the Trainer). The adapter export, the merged export and the
checkpoint must decode (greedy, with latents) exactly like the in-memory trained model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import four_rows, make_images

from mirage_trl.cli import main as cli_main
from mirage_trl.errors import MirageError
from mirage_trl.export import export_model
from mirage_trl.generation import generate_with_latents
from mirage_trl.models.families import unwrap
from mirage_trl.models.load import load_model, resolve_model_dir
from mirage_trl.models.tokens import LATENT_START, LATENT_TOKEN_NAMES

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _token_layers(peft_model):
    """The PEFT trainable-token layers of the input embedding and of the LM head."""
    net = unwrap(peft_model)
    return net.get_input_embeddings().token_adapter, net.get_output_embeddings().token_adapter


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trainer, run folder, base folder, rows, initial latent rows) after 3 LoRA steps."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText

    from mirage_trl.configs import MirageSFTConfig
    from mirage_trl.data.reference import _features
    from mirage_trl.models.processors import load_processor
    from mirage_trl.models.tiny import save_tiny_model
    from mirage_trl.run import save_outputs
    from mirage_trl.trainers.sft import MirageSFTTrainer

    root = tmp_path_factory.mktemp("export")
    base = save_tiny_model(root / "base")
    rows = four_rows(make_images(root / "images"))
    model = AutoModelForImageTextToText.from_pretrained(str(base))
    processor = load_processor(str(base))
    args = MirageSFTConfig(
        output_dir=str(root / "run"),
        use_cpu=True,
        report_to=[],
        save_strategy="steps",
        save_steps=3,
        max_steps=3,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = MirageSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows, features=_features()),
        processing_class=processor,
        peft_config=peft_config,
    )
    embed, head = _token_layers(trainer.model)
    initial = embed.trainable_tokens_original["default"].detach().clone()
    trainer.train()
    # Make latent spans appear in greedy decoding: the start row copies (scaled) the row of the
    # token the model picks most, so wherever that token would win, <|latent_start|> wins instead.
    with torch.no_grad():
        tok = processor.tokenizer
        start = tok.convert_tokens_to_ids(LATENT_START)
        idx = head.token_indices["default"].index(start)
        out = _decode(trainer.model.eval(), processor, trainer.latent_tokens, rows)
        seq = out.sequences.flatten()
        seq = seq[~torch.isin(seq, torch.tensor(head.token_indices["default"]))]
        common = torch.mode(seq).values.item()
        head.trainable_tokens_delta["default"][idx] = 3.0 * head.get_merged_weights(["default"])[common]
    save_outputs(trainer, str(root / "run"), stage=1, base_model=str(base))
    return dict(trainer=trainer, run=root / "run", base=base, rows=rows, initial=initial, root=root)


def _decode(model, processor, latent_tokens, rows):
    from mirage_trl.latent.collator import MirageDataCollator

    batch = MirageDataCollator(processor, latent_tokens).prompt_batch(rows)
    return generate_with_latents(
        model, processor, batch, max_new_tokens=MAX_NEW, do_sample=False, return_latents=True
    )


@pytest.fixture(scope="module")
def reference(trained):
    trainer = trained["trainer"]
    out = _decode(trainer.model.eval(), trainer.processing_class, trainer.latent_tokens, trained["rows"])
    assert int(out.num_latent_spans.sum()) > 0, "the test needs latent spans in the reference decoding"
    return out


@pytest.fixture(scope="module")
def adapter_export(trained):
    return export_model(trained["run"], trained["root"] / "export-adapter")


@pytest.fixture(scope="module")
def merged_export(trained):
    eval_json = trained["root"] / "results.json"
    eval_json.write_text(
        json.dumps({"metrics": {"accuracy": 0.75, "latent_spans": 3}, "benchmark": "vsp_planning"})
    )
    return export_model(
        trained["run"],
        trained["root"] / "export-merged",
        merge=True,
        eval_json=eval_json,
        datasets=["vsp_planning_train.jsonl"],
        launch_lines=["mirage-trl export --merge ..."],
    )


def _same_decoding(out, ref):
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.latent_mask, ref.latent_mask)
    assert out.texts == ref.texts
    for a, b in zip(out.latents, ref.latents):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _no_pickles(folder: Path):
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))], names
    assert not any(n.startswith("checkpoint-") for n in names)
    return names


def _check_tokens(processor):
    vocab = processor.tokenizer.get_vocab()
    assert all(t in vocab for t in LATENT_TOKEN_NAMES)


# ---------------------------------------------------------------------------------------- adapter
def test_adapter_export_files_and_round_trip(trained, reference, adapter_export):
    names = _no_pickles(adapter_export)
    for f in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "mirage_config.json",
        "README.md",
        "tokenizer.json",
    ):
        assert f in names
    assert "config.json" not in names  # an adapter folder, not a model folder
    adapter_config = json.loads((adapter_export / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(trained["base"])
    mirage = json.loads((adapter_export / "mirage_config.json").read_text())
    assert mirage["latent_size"] == 4 and mirage["stages"] == [1] and mirage["format"] == "adapter"
    # The trained latent-token rows travel as PEFT trainable tokens.
    from safetensors import safe_open

    with safe_open(str(adapter_export / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("embed_tokens" in k and "trainable_tokens" in k for k in keys), keys
    assert any("lm_head" in k and "trainable_tokens" in k for k in keys), keys

    model, processor = load_model(adapter_export)
    _check_tokens(processor)
    _same_decoding(_decode(model, processor, trained["trainer"].latent_tokens, trained["rows"]), reference)


# ---------------------------------------------------------------------------------------- merged
def test_merged_export_round_trip_and_rows(trained, reference, merged_export):
    names = _no_pickles(merged_export)
    assert "model.safetensors" in names and "adapter_config.json" not in names
    config = json.loads((merged_export / "config.json").read_text())
    mirage = config["mirage"]
    assert mirage["latent_size"] == 4 and mirage["latent_tokens"] == list(LATENT_TOKEN_NAMES)
    # config.json holds the model's part of the settings (latent.settings): plain latents, no rescaling here
    slot_keys = {"latent_slot_input", "latent_feedback_norm", "latent_target_norm", "latent_bottleneck"}
    objective = {
        "latent_loss",
        "latent_temperature",
        "latent_variance_weight",
        "latent_target",
        "latent_target_scale",
        "latent_aux_text",
        "latent_only_backprop",
    }  # how stage 1 taught the latents
    assert set(mirage) == {"latent_size", "latent_tokens", *slot_keys, *objective}
    assert (mirage["latent_bottleneck"], mirage["latent_loss"]) == ("none", "cosine")
    assert (
        mirage.get("latent_slot_input", "latent") == "latent" and mirage.get("latent_feedback_norm") is None
    )
    card = (merged_export / "README.md").read_text()
    for needle in (
        "2506.17218",
        "stage 1",
        "accuracy",
        "0.75",
        "vsp_planning_train.jsonl",
        "mirage-trl export --merge",
        str(trained["base"]),
        "yang2025mirage",
    ):
        assert needle in card, needle

    model, processor = load_model(merged_export)
    _check_tokens(processor)
    _same_decoding(_decode(model, processor, trained["trainer"].latent_tokens, trained["rows"]), reference)

    # The new rows survived the merge, and training moved them.
    embed, head = _token_layers(trained["trainer"].model)
    ids = embed.token_indices["default"]
    rows_in = model.get_input_embeddings().weight[ids]
    torch.testing.assert_close(rows_in, embed.trainable_tokens_delta["default"].detach(), rtol=0, atol=0)
    torch.testing.assert_close(
        model.get_output_embeddings().weight[head.token_indices["default"]],
        head.trainable_tokens_delta["default"].detach(),
        rtol=0,
        atol=0,
    )
    assert (rows_in - trained["initial"]).abs().max() > 1e-4

    # Merged logits equal base + adapter (the adapter export loaded over its base).
    adapter_model, _ = load_model(trained["root"] / "export-adapter")
    from mirage_trl.latent.collator import MirageDataCollator

    batch = MirageDataCollator(processor, trained["trainer"].latent_tokens).prompt_batch(trained["rows"])
    kw = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    with torch.no_grad():
        merged_logits = model(**kw).logits
        adapter_logits = adapter_model(**kw).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)


def test_full_model_reexport(trained, merged_export):
    out = export_model(merged_export, trained["root"] / "reexport", dtype="bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["mirage"]["latent_size"] == 4
    model, _ = load_model(out)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "mirage_config.json").read_text())["stages"] == [1]
    # the plain transformers class loads the same weights
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.bfloat16)
    ours = dict(model.named_parameters())
    assert all(torch.equal(p, ours[n]) for n, p in plain.named_parameters())


# ---------------------------------------------------------------------------------------- resized base
def test_resized_base_adapter_round_trip(tmp_path):
    """A base without spare rows (the latent tokens resize the vocabulary): the adapter, its export
    and the merged export reload to the in-memory model, with the adapter on and off.

    The run is fp32 (bf16=False): with bf16 the Trainer leaves accelerate's autocast wrapped around
    the in-memory model's forward, which a reloaded fp32 model rightly does not reproduce."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText

    from mirage_trl.configs import MirageSFTConfig
    from mirage_trl.data.reference import _features
    from mirage_trl.latent.collator import MirageDataCollator
    from mirage_trl.models.processors import load_processor
    from mirage_trl.models.tiny import save_tiny_model
    from mirage_trl.run import save_outputs
    from mirage_trl.trainers.sft import MirageSFTTrainer

    base = save_tiny_model(tmp_path / "base", spare_rows=0)
    rows = four_rows(make_images(tmp_path / "images"))
    model = AutoModelForImageTextToText.from_pretrained(str(base))
    base_rows = model.get_input_embeddings().weight.shape[0]
    processor = load_processor(str(base))
    args = MirageSFTConfig(
        output_dir=str(tmp_path / "run"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        max_steps=2,
        gradient_checkpointing=False,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        disable_tqdm=True,
        seed=0,
    )
    trainer = MirageSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows, features=_features()),
        processing_class=processor,
        peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trained = trainer.model
    assert unwrap(trained).get_input_embeddings().weight.shape[0] > base_rows  # resized
    trainer.train()
    save_outputs(trainer, str(tmp_path / "run"), stage=1, base_model=str(base))

    batch = MirageDataCollator(processor, trainer.latent_tokens).prompt_batch(rows)
    kw = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    }
    trained.eval()
    with torch.no_grad():
        ref = trained(**kw).logits
        with trained.disable_adapter():
            ref_off = trained(**kw).logits
    originals = [layer.trainable_tokens_original["default"] for layer in _token_layers(trained)]

    adapter = export_model(tmp_path / "run", tmp_path / "export-adapter")
    merged = export_model(tmp_path / "run", tmp_path / "export-merged", merge=True)
    for folder in (tmp_path / "run", adapter, merged):
        loaded, _ = load_model(folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**kw).logits, ref, rtol=0, atol=1e-5, msg=str(folder))
            if folder == merged:
                continue
            # The rows the trained ones replaced are the ones training started from (mean init).
            for layer, want in zip(_token_layers(loaded), originals):
                torch.testing.assert_close(layer.trainable_tokens_original["default"], want, rtol=0, atol=0)
            with loaded.disable_adapter():
                torch.testing.assert_close(loaded(**kw).logits, ref_off, rtol=0, atol=1e-5, msg=str(folder))


# ---------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_loads_and_exports(trained, reference, tmp_path):
    ckpt = trained["run"] / "checkpoint-3"
    src = resolve_model_dir(ckpt)
    assert src.checkpoint and src.is_adapter and src.latent_size == 4
    model, processor = load_model(ckpt)
    out = _decode(model, processor, trained["trainer"].latent_tokens, trained["rows"])
    # The checkpoint was saved before the start row was biased: compare with a fresh load of it.
    assert out.sequences.shape[0] == len(trained["rows"])
    exported = export_model(ckpt, tmp_path / "ckpt-export")
    names = _no_pickles(exported)
    assert "adapter_model.safetensors" in names
    # A checkpoint of an interrupted run (no mirage_config.json anywhere): the size comes from training_args.bin.
    lone = tmp_path / "lone" / "checkpoint-3"
    shutil.copytree(ckpt, lone)
    assert resolve_model_dir(lone).latent_size == 4
    with pytest.raises(MirageError, match="latent_size=8 disagrees"):
        resolve_model_dir(lone, latent_size=8)


# ---------------------------------------------------------------------------------------- refusals
def test_non_mirage_folder_is_refused(trained, tmp_path):
    base = trained["base"]
    with pytest.raises(MirageError, match=f"{base} is not a Mirage model"):
        export_model(base, tmp_path / "out")
    with pytest.raises(MirageError, match="not a Mirage model"):
        load_model(base)
    assert not (tmp_path / "out").exists()
    assert resolve_model_dir(base, require_mirage=False).latent_size is None
    with pytest.raises(MirageError, match="neither a model folder"):
        resolve_model_dir(tmp_path)


def test_latent_size_disagreements(trained, merged_export, tmp_path):
    # mirage_config.json disagrees with config.json
    bad = tmp_path / "bad-size"
    shutil.copytree(merged_export, bad)
    mirage = json.loads((bad / "mirage_config.json").read_text())
    (bad / "mirage_config.json").write_text(json.dumps(dict(mirage, latent_size=8)))
    with pytest.raises(MirageError, match=r"latent size disagrees .*k=8.*k=4"):
        load_model(bad)
    # config.json says k=4 but the tokenizer has no latent tokens
    no_tokens = tmp_path / "no-tokens"
    shutil.copytree(merged_export, no_tokens)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(trained["base"] / name, no_tokens / name)
    with pytest.raises(MirageError, match="k=4, but the tokenizer .* lacks the latent tokens"):
        load_model(no_tokens)
    # an explicit latent size that is not the trained one
    with pytest.raises(MirageError, match="latent_size=2 disagrees"):
        load_model(merged_export, latent_size=2)


def test_existing_out_needs_overwrite(trained, adapter_export):
    with pytest.raises(MirageError, match="already exists"):
        export_model(trained["run"], adapter_export)
    before = (adapter_export / "adapter_model.safetensors").stat().st_mtime_ns
    export_model(trained["run"], adapter_export, overwrite=True)
    assert (adapter_export / "adapter_model.safetensors").stat().st_mtime_ns != before
    assert not [p for p in adapter_export.parent.iterdir() if p.name.startswith(".export-adapter.")]


# ---------------------------------------------------------------------------------------- atomicity
def test_failed_export_leaves_nothing(trained, tmp_path, monkeypatch):
    import mirage_trl.export as export

    def boom(folder, text):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_card", boom)
    with pytest.raises(RuntimeError):
        export_model(trained["run"], tmp_path / "out", merge=True)
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_no_complete_folder(trained, tmp_path):
    """SIGKILL while the temporary folder is written: no `out` folder, only a hidden temp one."""
    out = tmp_path / "out"
    code = (
        "import sys, time\n"
        "import mirage_trl.export as e\n"
        "orig = e.write_card\n"
        "def slow(folder, text):\n"
        "    orig(folder, text)\n"
        "    print('READY', flush=True)\n"
        "    time.sleep(120)\n"
        "e.write_card = slow\n"
        "from mirage_trl.cli import main\n"
        f"sys.exit(main(['export', '--model', {str(trained['run'])!r}, '--out', {str(out)!r}, '--merge']))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    try:
        seen = []
        for line in proc.stdout:  # other libraries may print first
            seen.append(line)
            if line.strip() == "READY":
                break
        assert seen and seen[-1].strip() == "READY", seen
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert (
            len(temps) == 1
            and (temps[0] / "model.safetensors").is_file()
            and (temps[0] / "README.md").is_file()
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()
    with pytest.raises(MirageError):  # an unfinished temp folder is never taken for a model
        load_model(out)


# ---------------------------------------------------------------------------------------- hub
def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_push_without_network_fails_cleanly(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_dead_port()}")
    monkeypatch.setenv("HF_TOKEN", "hf_dummysecret123")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    out = tmp_path / "pushed"
    start = time.monotonic()
    rc = cli_main(
        [
            "export",
            "--model",
            str(trained["run"]),
            "--out",
            str(out),
            "--push-to-hub",
            "me/mirage-tiny",
            "--private",
            "--revision",
            "v1",
        ]
    )
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("mirage-trl export: error:")]
    assert len(lines) == 1, err
    assert "me/mirage-tiny" in lines[0] and "upload failed" in lines[0] and f"complete in {out}" in lines[0]
    assert "hf_dummysecret123" not in err
    assert took < 30, took  # loading + export is most of it; the failed upload itself is immediate
    # The local export is complete and loads.
    assert (out / "README.md").is_file() and (out / "adapter_model.safetensors").is_file()
    load_model(out)


def test_cli_refuses_non_mirage_folder(trained, tmp_path, capsys):
    rc = cli_main(["export", "--model", str(trained["base"]), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(trained["base"]) in err[0]


def test_card_from_eval_results_has_the_accuracy_table_and_model_index():
    """A `mirage-trl eval` results.json becomes a per-mode, per-level table and the card's model-index."""
    from huggingface_hub import ModelCard

    from mirage_trl.card import build_model_card

    def groups(a3, a4, invalid=0.0):
        g = {"3": {"accuracy": a3, "invalid_rate": 0.0}, "4": {"accuracy": a4, "invalid_rate": 0.0}}
        return g | {"all": {"accuracy": (a3 + a4) / 2, "invalid_rate": invalid}}

    results = {
        "benchmark": "vsp_planning",
        "num_rows": 200,
        "data": "/x/planning_test_direct.jsonl",
        "modes": {"model": {"groups": groups(0.89, 0.75)}, "zero": {"groups": groups(0.5, 0.25, 0.1)}},
    }
    mirage = {"base_model": "Qwen/Qwen2.5-VL-7B-Instruct", "stages": [1, 2, 3], "latent_size": 4}
    text = build_model_card(mirage, kind="adapter", model_name="m", repo_id="me/m", eval_results=results)
    assert "| model | 89.0 | 75.0 | 82.0 | 0.0 |" in text
    assert "| zero | 50.0 | 25.0 | 37.5 | 10.0 |" in text
    card = ModelCard(text)
    index = {(r.metric_name, r.metric_value) for r in card.data.eval_results}
    assert ("accuracy (level 3, latents: model)", 89.0) in index and len(index) == 6
    assert {r.dataset_type for r in card.data.eval_results} == {"vsp_planning"}
    assert (
        card.data.pipeline_tag == "image-text-to-text"
        and card.data.base_model == "Qwen/Qwen2.5-VL-7B-Instruct"
    )
    assert "grpo" in card.data.tags and "sft" not in card.data.tags  # the last stage is GRPO
    sft = ModelCard(build_model_card(mirage | {"stages": [1, 2]}, kind="merged", model_name="m"))
    assert "sft" in sft.data.tags and "grpo" not in sft.data.tags and not sft.data.eval_results


def test_eval_results_of_another_model_or_latent_size_are_refused(trained, tmp_path):
    """An accuracy table goes into the card only for the model exported (or the export, evaluated first)."""
    all_rows = {"all": {"accuracy": 0.5, "invalid_rate": 0.0}}
    results = {"benchmark": "vsp_planning", "modes": {"model": {"groups": all_rows}}}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(results | {"model": str(trained["base"]), "latent_size": 4}))
    with pytest.raises(MirageError, match=rf"--eval-json {other}: evaluates {trained['base']}, not "):
        export_model(trained["run"], tmp_path / "x", eval_json=other)
    size = tmp_path / "size.json"
    size.write_text(json.dumps(results | {"model": str(trained["run"]), "latent_size": 8}))
    with pytest.raises(MirageError, match=r"latent_size=8 disagrees with .* \(latent_size=4\)"):
        export_model(trained["run"], tmp_path / "x", eval_json=size)
    assert not (tmp_path / "x").exists()
    same = tmp_path / "same.json"
    out = tmp_path / "ok"
    same.write_text(
        json.dumps(results | {"model": str(out), "latent_size": 4})
    )  # the export, evaluated before
    card = (export_model(trained["run"], out, eval_json=same) / "README.md").read_text()
    assert "### Evaluation" in card


def test_training_output_card_is_mirage_trls(trained):
    """The run folder's README is mirage-trl's card (stages, latent size, latent decoding), not PEFT's
    placeholder or TRL's text-generation quick start."""
    from huggingface_hub import ModelCard

    trained["trainer"].create_model_card(dataset_name="vsp_planning_train.jsonl")
    text = (trained["run"] / "README.md").read_text()
    assert "generate_with_latents" in text and "Stages run: stage 1" in text and "Latent size k: 4" in text
    assert "Model Card for Model ID" not in text and "pipeline(" not in text
    card = ModelCard(text)
    assert card.data.pipeline_tag == "image-text-to-text" and "lora" in card.data.tags


def test_latent_options_travel_into_the_export_its_card_and_the_loaded_model(trained, tmp_path):
    """The stage-1 objective and the visual bottleneck saved with a run reach its export, its card, and the model
    `load_model` gives back (whose decoding then applies the bottleneck by default)."""
    import shutil

    from mirage_trl.models.settings import MirageSettings

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    saved = json.loads((run / "mirage_config.json").read_text())
    options = dict(
        latent_loss="contrastive",
        latent_temperature=0.2,
        latent_variance_weight=1.0,
        latent_bottleneck="strict",
        latent_target="centred",
        latent_target_scale=True,
        latent_aux_text=0.5,
        latent_only_backprop=True,
    )
    (run / "mirage_config.json").write_text(json.dumps({**saved, **options}))
    out = export_model(run, tmp_path / "export")
    exported = json.loads((out / "mirage_config.json").read_text())
    assert {k: exported[k] for k in options} == options
    card = (out / "README.md").read_text()
    assert (
        "Stage-1 latent loss: `contrastive` (temperature 0.2) + variance-covariance regulariser x 1.0" in card
    )
    assert "Visual bottleneck: `strict`" in card
    assert (
        "Stage-1 latent targets: `centred` (pooled helper-image features minus their running mean and scaled by "
        "the running standard deviation)" in card
    )
    assert "helper image's text, weight 0.5 (gradient through the latents only)" in card
    model, _ = load_model(out)
    loaded = MirageSettings.of_model(model)
    assert (loaded.latent_bottleneck, loaded.latent_loss, loaded.latent_variance_weight) == (
        "strict",
        "contrastive",
        1.0,
    )
    assert (loaded.latent_target, loaded.latent_target_scale, loaded.latent_aux_text) == (
        "centred",
        True,
        0.5,
    )
    assert loaded.latent_only_backprop is True


def test_exports_load_with_the_plain_auto_classes(merged_export, adapter_export):
    """A merged export loads with AutoModelForImageTextToText / AutoTokenizer / AutoImageProcessor, carries
    the latent tokens and the Mirage settings, and its processor config is complete (a video processor
    entry, so AutoProcessor builds the stock processor where torchvision is installed)."""
    import importlib.util

    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(str(merged_export))
    assert model.config.mirage["latent_size"] == 4
    tok = AutoTokenizer.from_pretrained(str(merged_export))
    assert all(t in tok.get_vocab() for t in LATENT_TOKEN_NAMES)
    assert (
        max(tok.convert_tokens_to_ids(list(LATENT_TOKEN_NAMES)))
        < model.get_input_embeddings().weight.shape[0]
    )
    image = AutoImageProcessor.from_pretrained(str(merged_export))
    for folder in (merged_export, adapter_export):
        config = json.loads((folder / "processor_config.json").read_text())
        video = config["video_processor"]
        assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
        assert (video["patch_size"], video["merge_size"]) == (image.patch_size, image.merge_size)
    if importlib.util.find_spec("torchvision") is None:  # here: the stock video processor needs torchvision
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(str(merged_export))
    else:
        assert type(AutoProcessor.from_pretrained(str(merged_export))).__name__ == "Qwen2_5_VLProcessor"


def test_adapter_loads_with_plain_peft_over_its_base(trained, adapter_export):
    """The PEFT way: the base with its embeddings resized to the adapter's tokenizer, then
    `PeftModel.from_pretrained`, gives the same logits as `load_model` (latent-token rows included), and the
    folder holds the latent tokens and the Mirage settings."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from mirage_trl.models.settings import MirageSettings

    tok = AutoTokenizer.from_pretrained(str(adapter_export))
    _check_tokens(type("P", (), {"tokenizer": tok}))
    base = AutoModelForImageTextToText.from_pretrained(str(trained["base"]))
    base.resize_token_embeddings(len(tok))
    plain = PeftModel.from_pretrained(base, str(adapter_export)).eval()
    ours, _ = load_model(adapter_export)
    ids = tok("Go left. ", return_tensors="pt").input_ids
    latent = torch.tensor([tok.convert_tokens_to_ids(list(LATENT_TOKEN_NAMES))])
    ids = torch.cat([ids, latent], dim=1)
    with torch.no_grad():
        got, want = plain(input_ids=ids).logits, ours(input_ids=ids).logits
    # load_model keeps the training run's spare rows (past the tokenizer, never a real token); the rest agree
    assert got.shape[-1] == len(tok) <= want.shape[-1]
    torch.testing.assert_close(got, want[..., : len(tok)], rtol=1e-5, atol=1e-5)
    assert MirageSettings.read(adapter_export).latent_size == 4
    card = (adapter_export / "README.md").read_text()
    assert (
        "base.resize_token_embeddings(len(tokenizer))" in card and "PeftModel.from_pretrained(base, " in card
    )


def test_launch_lines_name_what_the_user_ran(monkeypatch):
    """Cards and settings show `accelerate launch recipes/<script> ...` for a recipe and `mirage-trl ...` for
    the command, credentials redacted."""
    from mirage_trl.card import launch_line
    from mirage_trl.shipped import shipped

    recipe = [str(shipped("recipes") / "stage2_vsp.py"), "--config", "x.yaml", "--hub_token", "hf_secret"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # as accelerate launch sets it for its workers
    line = launch_line(recipe)
    assert line.startswith("accelerate launch recipes/stage2_vsp.py --config x.yaml --hub_token ")
    assert "hf_secret" not in line
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert launch_line(recipe).startswith("recipes/stage2_vsp.py --config x.yaml")
    assert launch_line(["/env/bin/mirage-trl", "export", "--model", "run"]) == "mirage-trl export --model run"
    main = str(Path(shipped("recipes")).parent / "mirage_trl" / "__main__.py")
    assert launch_line([main, "export", "--merge"]) == "mirage-trl export --merge"


def test_card_command_puts_eval_results_into_any_model_folder(trained, tmp_path, capsys):
    """`mirage-trl card FOLDER --eval-json F`: a text-only baseline's TRL card gets the table and the
    model-index (run twice: one section, the newest); another model's or latent size's results are refused."""
    from helpers import assert_cli_error, run_cli
    from huggingface_hub import ModelCard
    from trl.trainer.utils import generate_model_card

    baseline = tmp_path / "baseline"
    baseline.mkdir()
    (baseline / "config.json").write_text(
        "{}"
    )  # a model folder: its weights and config, here only the config
    trl_card = generate_model_card(
        base_model=None, model_name="baseline", hub_model_id="baseline", dataset_name=None, tags=["sft"],
        wandb_url=None, trackio_url=None, trainer_name="SFT", trainer_citation=None, paper_title=None, paper_id=None,
    )  # fmt: skip
    (baseline / "README.md").write_text(str(trl_card))

    def results(accuracy, model=baseline, k=None):
        groups = {
            "3": {"accuracy": accuracy, "invalid_rate": 0.0},
            "all": {"accuracy": accuracy, "invalid_rate": 0.0},
        }
        return {"benchmark": "vsp_planning", "num_rows": 10, "model": str(model), "latent_size": k,
                "modes": {"model": {"groups": groups}}}  # fmt: skip

    for accuracy in (0.3, 0.4):
        (tmp_path / "r.json").write_text(json.dumps(results(accuracy)))
        rc, out, err = run_cli(["card", baseline, "--eval-json", tmp_path / "r.json"], capsys)
        assert rc == 0, err
    text = (baseline / "README.md").read_text()
    assert (
        text.count("### Evaluation") == 1 and "| model | 40.0 | 40.0 | 0.0 |" in text and "30.0" not in text
    )
    assert "SFT" in text  # TRL's card is kept around it
    assert text.index("### Evaluation") < text.index("## Training procedure")  # in its usual place
    card = ModelCard(text)
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} == {
        ("accuracy (level 3, latents: model)", 40.0),
        ("accuracy (all levels, latents: model)", 40.0),
    }
    (tmp_path / "o.json").write_text(json.dumps(results(0.5, model=trained["base"])))
    rc, _, err = run_cli(["card", baseline, "--eval-json", tmp_path / "o.json"], capsys)
    assert_cli_error(rc, err, "card", rf"evaluates {trained['base']}, not {baseline}; evaluate this model$")
    (tmp_path / "k.json").write_text(json.dumps(results(0.5, model=trained["run"], k=8)))
    rc, _, err = run_cli(["card", trained["run"], "--eval-json", tmp_path / "k.json"], capsys)
    assert_cli_error(
        rc,
        err,
        "card",
        rf"latent_size=8 disagrees with {trained['run'] / 'mirage_config.json'} \(latent_size=4\)$",
    )


def test_a_latent_size_disagreement_names_the_adapter_and_its_file(trained):
    """Continuing a LoRA adapter with another latent size names the adapter's folder and its settings file,
    not the base model the weights were loaded from."""
    from mirage_trl.models.load import load_for_training
    from mirage_trl.models.settings import MirageSettings

    model, _ = load_for_training(trained["run"])
    run = trained["run"]
    with pytest.raises(
        MirageError,
        match=rf"^latent_size=3 disagrees with {run}, which was trained with latent_size=4 \({run / 'mirage_config.json'}\)",
    ):
        MirageSettings.adopt(model, 3)
    assert MirageSettings.adopt(model, 4).latent_size == 4  # the trained size passes
