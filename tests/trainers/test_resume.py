"""Resume: a stage-1 and a stage-2 run stopped after N steps and resumed with
`trainer.train(resume_from_checkpoint=...)` give the same loss at every later step as the run that
was never stopped (tiny model, CPU, float32, same seed, save_strategy="steps").

The Mirage state travels with the checkpoint: `mirage_config.json` (latent size, token names),
the tokenizer with the latent tokens (same ids), TRL/Trainer's RNG and data-order state
(`rng_state.pth`, `trainer_state.json`); stage-1 cached targets are keyed by the frozen vision
tower and the helper images, so the resumed run reads the same cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerCallback

from mirage_trl.configs import MirageSFTConfig
from mirage_trl.errors import MirageError
from mirage_trl.models.prepare import add_latent_tokens
from mirage_trl.models.tiny import build_tiny_model
from mirage_trl.models.tokens import LATENT_TOKEN_NAMES
from mirage_trl.trainers.sft import MirageSFTTrainer

K = 2
STEPS, STOP = 3, 2


class StopAt(TrainerCallback):
    """Interrupt training after `step` (the Trainer saves checkpoint-`step` first: save_steps divides it)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mirage_trl.data.reference import load_reference_jsonl
    from mirage_trl.data.vsp import generate_vsp

    out = generate_vsp(
        "planning",
        [3],
        8,
        split="train",
        style="cot",
        seed=0,
        out_dir=tmp_path_factory.mktemp("resume") / "data",
        progress=False,
    )
    return load_reference_jsonl(out)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "hf-datasets"


def make_trainer(out: Path, dataset, stage: int, stop_at=None, latent_size=K, save=True, **kw):
    model, processor = build_tiny_model(seed=0)
    if stage == 2:  # as after stage 1: the latent tokens exist
        add_latent_tokens(processor, model, K)
    args = MirageSFTConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        max_steps=STEPS,
        save_strategy="steps" if save else "no",
        save_steps=STOP,
        logging_steps=1,
        learning_rate=5e-3,
        stage=stage,
        latent_size=latent_size,
        dataloader_num_workers=0,
        **kw,
    )
    return MirageSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[StopAt(stop_at)] if stop_at else None,
    )


def losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize(
    ("stage", "extra"), [(1, {"cache_latent_targets": True}), (2, {})], ids=["stage1", "stage2"]
)
def test_resumed_run_matches_uninterrupted_run(dataset, tmp_path, datasets_cache, stage, extra):
    full = make_trainer(tmp_path / "full", dataset, stage, save=False, **extra)
    full.train()
    expected = losses(full)
    assert sorted(expected) == list(range(1, STEPS + 1))

    first = make_trainer(tmp_path / "run", dataset, stage, stop_at=STOP, **extra)
    first.train()
    assert first.state.global_step == STOP
    ckpt = tmp_path / "run" / f"checkpoint-{STOP}"
    # The Mirage state is in the checkpoint: settings, tokenizer with the latent tokens, RNG + data state.
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "mirage_config.json",
        "tokenizer.json",
        "trainer_state.json",
        "rng_state.pth",
        "optimizer.pt",
        "scheduler.pt",
        "model.safetensors",
    } <= names, names
    mirage = json.loads((ckpt / "mirage_config.json").read_text())
    assert mirage["latent_size"] == K and mirage["latent_tokens"] == list(LATENT_TOKEN_NAMES)
    assert mirage["stage"] == stage
    saved_vocab = json.loads((ckpt / "tokenizer.json").read_text())["added_tokens"]
    saved_ids = {t["content"]: t["id"] for t in saved_vocab if t["content"] in LATENT_TOKEN_NAMES}
    tokens = first.latent_tokens
    assert saved_ids == {
        LATENT_TOKEN_NAMES[0]: tokens.start_id,
        LATENT_TOKEN_NAMES[1]: tokens.pad_id,
        LATENT_TOKEN_NAMES[2]: tokens.end_id,
    }
    if extra.get("cache_latent_targets"):
        caches = sorted((datasets_cache / "mirage_latent_targets").glob("latent_targets-*.arrow"))
        assert len(caches) == 1  # three runs, one cache file: the resumed run reads the same targets

    resumed = make_trainer(tmp_path / "run", dataset, stage, **extra)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = {**losses(first), **losses(resumed)}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
    # Not a vacuous comparison: the loss moves over the run.
    assert len({round(v, 6) for v in expected.values()}) > 1


def test_trainer_restores_weights_on_resume(dataset, tmp_path):
    """transformers 5 saves Qwen-VL checkpoints under hub key names that Trainer's own loader misses
    (strict=False, silently); MirageSFTTrainer._load_from_checkpoint restores every weight."""
    import torch

    first = make_trainer(tmp_path / "run", dataset, 1, stop_at=STOP)
    first.train()
    other = make_trainer(tmp_path / "other", dataset, 1)
    other._load_from_checkpoint(str(tmp_path / "run" / f"checkpoint-{STOP}"))
    trained = dict(first.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in other.model.named_parameters())


def test_resume_with_another_latent_size_is_refused(dataset, tmp_path):
    first = make_trainer(tmp_path / "run", dataset, 1, stop_at=STOP)
    first.train()
    other = make_trainer(tmp_path / "run", dataset, 1, latent_size=K + 1)
    with pytest.raises(
        MirageError, match=rf"--latent_size {K + 1} disagrees with .*mirage_config\.json \(latent_size={K}\)"
    ):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{STOP}"))


def test_checkpoint_latent_size_check(dataset, tmp_path):
    """The check the trainer should call on resume (mirage_trl.models.settings.check_checkpoint_latent_size)."""
    from mirage_trl.models.settings import check_checkpoint_latent_size

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "mirage_config.json").write_text(
        json.dumps({"latent_size": 2, "latent_tokens": list(LATENT_TOKEN_NAMES)})
    )
    check_checkpoint_latent_size(ckpt, 2)
    with pytest.raises(
        MirageError,
        match=r"--latent_size 3 disagrees with .*checkpoint-2/mirage_config\.json "
        r"\(latent_size=2\)",
    ):
        check_checkpoint_latent_size(ckpt, 3)
    check_checkpoint_latent_size(
        tmp_path, 3
    )  # no mirage_config.json (an older checkpoint): nothing to compare
