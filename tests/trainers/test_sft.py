"""Stage 1 (MirageSFTTrainer): the joint text + cosine latent loss, checked against hand computations.

The reference computation here (`manual_stage1`) shares no code with the trainer: it encodes each
helper image alone through `get_image_features`, pools by explicit slicing, writes the targets into
`inputs_embeds`, runs the bare VL model with the model's own `get_rope_index` positions, builds the
full logits, and loops over the slots.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import IGNORE, four_rows, make_images, reference_mask, sft_args

from mirage_trl.errors import MirageError
from mirage_trl.latent.targets import helper_latent_targets, pool_helper_features
from mirage_trl.models.load import load_for_training
from mirage_trl.models.tiny import build_tiny_model
from mirage_trl.trainers.sft import MirageSFTTrainer, text_cross_entropy

TOL = dict(rtol=2e-5, atol=2e-6)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def rows(images):
    return four_rows(images)


def make_args(tmp_path, **kw):
    defaults = dict(per_device_train_batch_size=4, max_grad_norm=0.0, max_steps=-1, latent_size=4, seed=42)
    return sft_args(tmp_path / "out", **{**defaults, **kw})


def make_trainer(
    tmp_path, model_type="qwen2_5_vl", model=None, processor=None, dataset=None, peft_config=None, **kw
):
    if model is None:
        model, processor = build_tiny_model(model_type)
    if dataset is None:  # TRL wants a train dataset even when only compute_loss is called
        dataset = as_dataset([four_rows(make_images(tmp_path / "images"))[1]])
    return MirageSFTTrainer(
        model=model,
        args=make_args(tmp_path, **kw),
        train_dataset=dataset,
        processing_class=processor,
        peft_config=peft_config,
    )


def as_dataset(rows):
    from datasets import Dataset

    from mirage_trl.data.reference import _features

    return Dataset.from_list(rows, features=_features())


# ---------------------------------------------------------------------- independent reference
def manual_pool(f: torch.Tensor, k: int, pooling: str) -> torch.Tensor:
    n = f.shape[0]
    if pooling == "drop_remainder":
        g = n // k
        bounds = [(i * g, (i + 1) * g) for i in range(k)]
    else:  # even: the first n % k groups get one extra patch
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
        starts = [sum(sizes[:i]) for i in range(k)]
        bounds = [(s, s + z) for s, z in zip(starts, sizes)]
    return torch.stack([f[a:b].mean(0) for a, b in bounds])


def image_features_one_by_one(model, pixel_values, grid_thw) -> list[torch.Tensor]:
    """Each image encoded alone through the model's own vision tower + merger."""
    mm = model.model
    out, offset = [], 0
    for thw in grid_thw:
        n = int(thw.prod())
        feats = mm.get_image_features(
            pixel_values[offset : offset + n], thw[None], return_dict=True
        ).pooler_output
        out.append(feats[0] if isinstance(feats, (tuple, list)) else feats)
        offset += n
    return out


def manual_stage1(
    model, batch, k, gamma, pooling="drop_remainder", zeros_at_slots=False, bottleneck=None, targets=None
):
    """(loss, ce_mean, ce_sum, n_tokens, per-slot 1-cos, targets, predictions h[t-1]) by hand, with autograd.

    `zeros_at_slots`: the markers-only control (zeros at the slots, the targets still computed).
    `bottleneck`: the latent tokens, to run under the visual bottleneck's mask written out pair by pair.
    `targets`: the slots' targets given (other `latent_target` kinds); default: pooled by hand here."""
    mm = model.model
    mask = batch["latent_mask"]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    if mask.any() and targets is None:
        with torch.no_grad():
            feats = image_features_one_by_one(
                model, batch["helper_pixel_values"], batch["helper_image_grid_thw"]
            )
            targets = torch.cat([manual_pool(f, k, pooling) for f in feats])
    if mask.any():
        slots = mask.nonzero().tolist()
        assert len(slots) == targets.shape[0]
        embeds = embeds.clone()
        for (b, t), e in zip(slots, targets):
            embeds[b, t] = e * 0.0 if zeros_at_slots else e
    position_ids, _ = mm.get_rope_index(
        batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch["attention_mask"],
    )
    attention_mask = batch["attention_mask"]
    if bottleneck is not None:  # each row's written-out mask, padding keys hidden
        attention_mask = torch.cat(
            [reference_mask(model, row.tolist(), bottleneck) for row in batch["input_ids"]]
        )
        attention_mask = attention_mask.masked_fill(
            batch["attention_mask"][:, None, None, :] == 0, torch.finfo(torch.float32).min
        )
    out = mm(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=batch.get("image_grid_thw"),
        use_cache=False,
    )
    h = out.last_hidden_state
    logits = model.lm_head(h).float()
    labels = batch["labels"]
    ce_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )
    n_tokens = int(labels[:, 1:].ne(IGNORE).sum())
    ce = ce_sum / n_tokens
    one_minus_cos = (
        torch.stack(
            [
                1 - F.cosine_similarity(h[b, t - 1], e, dim=0)
                for (b, t), e in zip(mask.nonzero().tolist(), targets)
            ]
        )
        if mask.any()
        else torch.zeros(0)
    )
    loss = gamma * ce + (one_minus_cos.mean() if mask.any() else 0.0)
    predictions = torch.stack([h[b, t - 1] for b, t in mask.nonzero().tolist()]) if mask.any() else None
    return dict(
        loss=loss,
        logits=logits,
        ce=ce,
        ce_sum=ce_sum,
        n_tokens=n_tokens,
        one_minus_cos=one_minus_cos,
        targets=targets,
        predictions=predictions,
    )


def trainer_pieces(trainer, batch):
    """Per-sample (ce_sum, n_tokens, 1-cos per slot) from the trainer's own functions on a batch."""
    model = trainer.model
    targets = trainer._helper_targets(model, batch)
    hidden = trainer.stage1_forward(model, batch, targets)
    mask = batch["latent_mask"]
    out, offset = [], 0
    for i in range(hidden.shape[0]):
        ce_sum, n = text_cross_entropy(model, hidden[i : i + 1], batch["labels"][i : i + 1])
        pred = hidden[i, :-1][mask[i, 1:]]
        m = int(mask[i].sum())
        cos = F.cosine_similarity(pred, targets[offset : offset + m], dim=-1) if m else torch.zeros(0)
        offset += m
        out.append((ce_sum.detach(), int(n), (1 - cos).detach()))
    return out


# ---------------------------------------------------------------------- batch == per-sample
@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_of_four_matches_each_sample_alone(tmp_path, rows, side):
    trainer = make_trainer(tmp_path, padding_side=side)
    collate = trainer.data_collator
    batch = collate(rows)
    assert (batch["latent_mask"].sum(1) // 4).tolist() == [0, 1, 3, 2]
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 4
    with torch.no_grad():
        batched = trainer_pieces(trainer, batch)
        alone = [trainer_pieces(trainer, collate([row]))[0] for row in rows]
        loss = trainer.compute_loss(trainer.model, batch)
    for (ce_b, n_b, cos_b), (ce_a, n_a, cos_a) in zip(batched, alone):
        assert n_b == n_a
        torch.testing.assert_close(ce_b, ce_a, **TOL)
        assert cos_b.shape == cos_a.shape
        torch.testing.assert_close(cos_b, cos_a, **TOL)
    # the batch loss is the token-weighted CE and the slot-weighted cosine term of the samples alone
    ce = sum(c for c, _, _ in alone) / sum(n for _, n, _ in alone)
    latent = torch.cat([c for _, _, c in alone]).mean()
    torch.testing.assert_close(loss, 0.1 * ce + latent, **TOL)


def test_trainer_loss_matches_manual_computation(tmp_path, rows):
    trainer = make_trainer(tmp_path)
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        ref = manual_stage1(trainer.model, batch, k=4, gamma=0.1)
        targets = trainer._helper_targets(trainer.model, batch)
    torch.testing.assert_close(targets, ref["targets"], **TOL)  # batched helper encoding == one by one
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    # the targets really sit at the slots of the embedded input (row-major order)
    from mirage_trl.latent.slots import latent_inputs

    seen = []
    with torch.no_grad(), latent_inputs(trainer.model, batch["latent_mask"], targets):
        # registered after the slot hook, so it sees the filled embeddings
        handle = trainer.model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(o))
        try:
            trainer.model.get_input_embeddings()(batch["input_ids"])
        finally:
            handle.remove()
    assert torch.equal(seen[-1][batch["latent_mask"]], targets)


# ---------------------------------------------------------------------- gradients
def test_cosine_gradient_reaches_language_model_not_vision(tmp_path, rows):
    trainer = make_trainer(tmp_path, text_loss_weight=0.0)  # loss = the cosine term only
    model = trainer.model
    visual = model.model.visual
    assert all(not p.requires_grad for p in visual.parameters())
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(model, batch)
    with torch.no_grad():
        ref = manual_stage1(model, batch, k=4, gamma=0.0)
    torch.testing.assert_close(loss.detach(), ref["one_minus_cos"].mean(), **TOL)
    loss.backward()
    lm = model.model.language_model
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight", "embed_tokens.weight"):
        grad = lm.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the final norm feeds the cosine term; the LM head does not
    assert lm.norm.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None or model.lm_head.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in visual.parameters())


def test_targets_carry_no_gradient_even_with_an_unfrozen_vision_tower(tmp_path, rows):
    trainer = make_trainer(tmp_path, text_loss_weight=0.0)
    model = trainer.model
    model.model.visual.requires_grad_(True)
    batch = trainer.data_collator([rows[3]])  # no input image: the vision tower only sees helpers
    targets = trainer._helper_targets(model, batch)
    assert not targets.requires_grad
    trainer.compute_loss(model, batch).backward()
    assert all(p.grad is None for p in model.model.visual.parameters())
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- LoRA
def test_lora_changes_only_adapters_and_latent_token_rows(tmp_path, rows):
    from trl import ModelConfig, get_peft_config

    peft_config = get_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    model, processor = build_tiny_model()
    trainer = make_trainer(
        tmp_path,
        model=model,
        processor=processor,
        dataset=as_dataset(rows),
        peft_config=peft_config,
        max_steps=3,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
    )
    peft_model = trainer.model
    tokens = trainer.latent_tokens
    latent_ids = [tokens.start_id, tokens.pad_id, tokens.end_id]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "trainable_tokens" in n) for n in trainable)
    assert not any("visual" in n for n in trainable)

    vocab = model.get_input_embeddings().weight.shape[0]
    all_ids = torch.arange(vocab)[None]
    probe = torch.randn(3, model.config.text_config.hidden_size)
    with torch.no_grad():
        emb_before = peft_model.get_input_embeddings()(all_ids)[0].clone()
        head_before = trainer.model.base_model.model.lm_head(probe).clone()
    before = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
    trainer.train()
    after = peft_model.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapter_keys = {k for k in before if "lora_" in k or "trainable_tokens" in k}
    assert changed <= adapter_keys
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    assert any("embed_tokens" in k and "trainable_tokens" in k for k in changed)
    assert sum(1 for k in changed if "lora_B" in k) == sum(1 for k in adapter_keys if "lora_B" in k)

    with torch.no_grad():
        emb_after = peft_model.get_input_embeddings()(all_ids)[0]
        head_after = trainer.model.base_model.model.lm_head(probe)
    other = torch.ones(vocab, dtype=torch.bool)
    other[latent_ids] = False
    assert torch.equal(emb_after[other], emb_before[other])
    assert not torch.equal(
        emb_after[[tokens.start_id, tokens.end_id]], emb_before[[tokens.start_id, tokens.end_id]]
    )
    assert torch.equal(head_after[:, other], head_before[:, other])
    assert not torch.equal(head_after[:, latent_ids], head_before[:, latent_ids])


# ---------------------------------------------------------------------- gamma, k, pooling
@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'mirage-trl[quantization]')",
)
def test_qlora_stage1_step_matches_the_manual_computation(tmp_path, rows):
    """QLoRA, as a recipe loads it (`--load_in_4bit`: the language model's linear layers in 4 bits through
    `from_pretrained`, run here by bitsandbytes' CPU backend): the trainer's stage-1 loss and LoRA gradients equal
    a by-hand computation through the same quantized model's own modules (`manual_stage1`), and one optimizer
    step moves the adapters only."""
    from trl import ModelConfig, get_peft_config

    from mirage_trl.models.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", seed=0)
    model_args = ModelConfig(model_name_or_path=str(folder), load_in_4bit=True, dtype="float32")
    model, processor = load_for_training(str(folder), model_args=model_args)
    assert any(type(m).__name__ == "Linear4bit" for m in model.model.language_model.modules())
    peft_config = get_peft_config(ModelConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    trainer = make_trainer(
        tmp_path, model=model, processor=processor, dataset=as_dataset(rows), peft_config=peft_config
    )
    trainer.model.train()
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    assert got and all("lora_" in n or "trainable_tokens" in n for n in got)
    ref = manual_stage1(trainer.model.get_base_model(), batch, k=4, gamma=0.1)
    ref["loss"].backward()
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    for name, grad in got.items():
        want = dict(trainer.model.named_parameters())[name].grad
        # On a CPU with AVX512-BF16, bitsandbytes' 4-bit backward rounds through bfloat16, so the two orders of
        # the same sums can differ by one bfloat16 rounding of the largest entry (3e-5 of 0.013 measured); a wrong
        # gradient differs by far more. Elsewhere the two agree to float32 precision.
        torch.testing.assert_close(
            grad, want, rtol=TOL["rtol"], atol=max(TOL["atol"], 2**-8 * float(want.abs().max()))
        )


def test_text_loss_weight_changes_loss_exactly(tmp_path, rows):
    trainer = make_trainer(tmp_path)
    batch = trainer.data_collator(rows)
    losses = {}
    with torch.no_grad():
        for gamma in (0.0, 0.1, 0.3, 1.0):
            trainer.args.text_loss_weight = gamma
            losses[gamma] = trainer.compute_loss(trainer.model, batch)
        ref = manual_stage1(trainer.model, batch, k=4, gamma=0.0)
    torch.testing.assert_close(losses[0.3] - losses[0.1], 0.2 * ref["ce"], **TOL)
    torch.testing.assert_close(losses[1.0] - losses[0.0], ref["ce"], **TOL)
    torch.testing.assert_close(losses[0.0], ref["one_minus_cos"].mean(), **TOL)
    # metrics logged through TRL's metrics: CE, cosine similarity, latent loss
    metrics = trainer._metrics["eval" if not trainer.model.training else "train"]
    assert metrics["ce"][-1] == pytest.approx(float(ref["ce"]), rel=1e-5)
    assert metrics["latent_loss"][-1] == pytest.approx(float(ref["one_minus_cos"].mean()), rel=1e-5)
    assert metrics["latent_cos"][-1] == pytest.approx(float(1 - ref["one_minus_cos"].mean()), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_latent_size_changes_loss_as_defined(tmp_path, rows, k):
    trainer = make_trainer(tmp_path, latent_size=k)
    batch = trainer.data_collator(rows)
    assert batch["latent_mask"].sum(1).tolist() == [0, k, 3 * k, 2 * k]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        ref = manual_stage1(trainer.model, batch, k=k, gamma=0.1)
    assert ref["one_minus_cos"].shape == (6 * k,)
    torch.testing.assert_close(loss, ref["loss"], **TOL)


def test_pooling_by_hand():
    f = torch.arange(10.0)[:, None] * torch.tensor([[1.0, -2.0]])  # n = 10 patches, D = 2
    drop = pool_helper_features(f, 4, "drop_remainder")  # groups of 2, patches 8 and 9 dropped
    even = pool_helper_features(f, 4, "even")  # groups of 3, 3, 2, 2
    torch.testing.assert_close(drop[:, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    torch.testing.assert_close(even[:, 0], torch.tensor([1.0, 4.0, 6.5, 8.5]))
    torch.testing.assert_close(drop[:, 1], -2 * drop[:, 0])
    torch.testing.assert_close(even[:, 1], -2 * even[:, 0])
    # n divisible by k: both poolings agree
    g = torch.randn(12, 5)
    torch.testing.assert_close(
        pool_helper_features(g, 4, "drop_remainder"), pool_helper_features(g, 4, "even")
    )
    with pytest.raises(MirageError, match="fewer than latent_size=4"):
        pool_helper_features(torch.randn(3, 2), 4)


@pytest.mark.parametrize("pooling", ["drop_remainder", "even"])
def test_pooling_of_real_helper_features(tmp_path, rows, pooling):
    # helpers with 6, 16, 4, 12 visual tokens; k = 4 leaves a remainder for the 6-token ones
    trainer = make_trainer(tmp_path, latent_pooling=pooling)
    batch = trainer.data_collator(rows)
    model = trainer.model
    with torch.no_grad():
        helpers = {
            "pixel_values": batch["helper_pixel_values"],
            "image_grid_thw": batch["helper_image_grid_thw"],
        }
        got = helper_latent_targets(model, helpers, 4, pooling)
        feats = image_features_one_by_one(model, batch["helper_pixel_values"], batch["helper_image_grid_thw"])
        loss = trainer.compute_loss(model, batch)
        ref = manual_stage1(model, batch, k=4, gamma=0.1, pooling=pooling)
    assert [f.shape[0] for f in feats] == [6, 16, 4, 12, 6, 6]
    torch.testing.assert_close(got, torch.cat([manual_pool(f, 4, pooling) for f in feats]), **TOL)
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    # the 6-token helper (first) really differs between the poolings
    other = "even" if pooling == "drop_remainder" else "drop_remainder"
    assert not torch.allclose(got[:4], manual_pool(feats[0], 4, other))


def test_unknown_pooling_name_is_a_clear_error(tmp_path):
    with pytest.raises(MirageError, match=r"--latent_pooling 'mean': choose one of drop_remainder, even"):
        make_args(tmp_path, latent_pooling="mean")
    with pytest.raises(MirageError, match=r"unknown latent pooling 'mean'"):
        pool_helper_features(torch.randn(8, 2), 4, "mean")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- training lowers the latent loss
def test_stage1_loop_lowers_latent_loss(tmp_path, rows):
    trainer = make_trainer(tmp_path, text_loss_weight=0.1)
    model = trainer.model
    model.train()
    batch = trainer.data_collator(rows)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def latent_loss():
        with torch.no_grad():
            return float(manual_stage1(model, batch, k=4, gamma=0.0)["one_minus_cos"].mean())

    start = latent_loss()
    for _ in range(15):
        opt.zero_grad()
        trainer.compute_loss(model, batch).backward()
        opt.step()
    end = latent_loss()
    assert end < 0.5 * start, (start, end)
    assert all(p.grad is None for p in model.model.visual.parameters())


# ---------------------------------------------------------------------- other model families
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_one_step_on_other_model_families(tmp_path, rows, model_type):
    model, processor = build_tiny_model(model_type)
    trainer = make_trainer(tmp_path, model=model, processor=processor, dataset=as_dataset(rows), max_steps=1)
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        ref = manual_stage1(model, batch, k=4, gamma=0.1)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    before = copy.deepcopy(model.model.language_model.state_dict())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1 and torch.isfinite(torch.tensor(logged[0]["loss"]))
    assert 0 < logged[0]["latent_loss"] < 2
    after = model.model.language_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------- bad input
def test_model_without_vision_tower_is_a_clear_error(tmp_path):
    from helpers import text_only_model

    model, tok = text_only_model()
    with pytest.raises(
        MirageError, match=r"Qwen2ForCausalLM is not a vision-language model with a vision tower"
    ):
        make_trainer(tmp_path, model=model, processor=tok)
    assert "<|latent_pad|>" not in tok.get_vocab()  # nothing touched
    assert not (tmp_path / "out").exists()


def test_latent_size_disagreeing_with_saved_checkpoint(tmp_path):
    from transformers import AutoModelForImageTextToText

    from mirage_trl.models.prepare import add_latent_tokens

    model, processor = build_tiny_model()
    add_latent_tokens(processor, model, 4)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.mirage["latent_size"] == 4
    with pytest.raises(MirageError, match=r"latent_size=2 disagrees with .*latent_size=4"):
        make_trainer(tmp_path, model=loaded, processor=processor, latent_size=2)
    assert not (tmp_path / "out").exists()
    # the matching size is accepted
    assert (
        make_trainer(tmp_path, model=loaded, processor=processor, latent_size=4).latent_tokens.latent_size
        == 4
    )


# ---------------------------------------------------------------------- gradient accumulation
def _train_and_capture_grads(tmp_path, rows, batch_size, ga):
    from transformers import TrainerCallback

    model, processor = build_tiny_model()
    captured = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            captured.update(
                {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            )

    trainer = make_trainer(
        tmp_path,
        model=model,
        processor=processor,
        dataset=as_dataset(rows),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=ga,
        train_sampling_strategy="sequential",
    )
    trainer.add_callback(Capture())
    trainer.train()
    return captured, trainer


def _expected_grads(tmp_path, rows, micro_batches, steps):
    """Gradients of sum_mb [gamma * CE_sum_mb / N_all + mean_mb(1 - cos) / steps] (the trainer's convention)."""
    model, processor = build_tiny_model()
    trainer = make_trainer(tmp_path, model=model, processor=processor)
    model.train()
    batches = [trainer.data_collator([rows[i] for i in mb]) for mb in micro_batches]
    n_all = sum(int(b["labels"][:, 1:].ne(IGNORE).sum()) for b in batches)
    total = 0.0
    for b in batches:
        ref = manual_stage1(model, b, k=4, gamma=0.1)
        total = total + 0.1 * ref["ce_sum"] / n_all + ref["one_minus_cos"].mean() / steps
    total.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(a, b):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_accumulation_matches_one_batch(tmp_path, rows):
    """GA normalises CE by the tokens of the whole accumulated batch (as TRL) and averages the per-micro-batch
    latent means over the steps. So 2 x 2 with GA=2 equals one batch of 4 exactly when both micro-batches
    hold the same number of latent slots, and otherwise equals the mean of the two micro-batch means."""
    # equal slot counts: spans (0, 3) and (1, 2) -> 12 slots in each micro-batch
    balanced = [rows[0], rows[2], rows[1], rows[3]]
    full, _ = _train_and_capture_grads(tmp_path / "a", balanced, 4, 1)
    accum, trainer = _train_and_capture_grads(tmp_path / "b", balanced, 2, 2)
    assert not any("visual" in n for n in full)
    _assert_grads_close(accum, full)
    _assert_grads_close(full, _expected_grads(tmp_path / "c", balanced, [[0, 1, 2, 3]], 1))

    # unequal slot counts: spans (0, 1) and (3, 2) -> 4 and 20 slots
    accum, _ = _train_and_capture_grads(tmp_path / "d", rows, 2, 2)
    _assert_grads_close(accum, _expected_grads(tmp_path / "e", rows, [[0, 1], [2, 3]], 2))
    full, _ = _train_and_capture_grads(tmp_path / "f", rows, 4, 1)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(
        accum[q], full[q], rtol=1e-3, atol=0
    )  # the documented convention, not a global mean


@pytest.mark.parametrize("stage", [1, 2])
def test_mixed_precision_reaches_the_stage2_rounds_and_the_logits(tmp_path, rows, stage):
    """accelerate autocasts only the top-level forward; stage 2 calls the inner model per round and the
    logits are computed in compute_loss, so both must still run under the configured bf16 autocast."""
    from mirage_trl.models.families import text_model

    seen = {}
    for bf16 in (False, True):
        trainer = make_trainer(tmp_path / str(bf16), stage=stage, bf16=bf16)
        model = trainer.model
        dtypes = []
        layer = text_model(model).layers[0].mlp.down_proj
        head = model.get_output_embeddings()
        hooks = [
            m.register_forward_hook(lambda m, a, out, seen_=dtypes: seen_.append(out.dtype))
            for m in (layer, head)
        ]
        try:
            loss = trainer.compute_loss(model, trainer.data_collator(rows))
        finally:
            for h in hooks:
                h.remove()
        assert torch.isfinite(loss)
        seen[bf16] = set(dtypes)
    assert seen[False] == {torch.float32}
    assert seen[True] == {torch.bfloat16}


# bf16 autocast against float32: the stated tolerance of the docs (docs/reliability.md, mixed precision). bf16 keeps
# 8 bits of mantissa (relative rounding 2^-9 per operation): the tiny model's losses agree to 2 %, and its
# gradients point the same way (cosine >= 0.99 over all trained weights).
BF16_LOSS_RTOL = 2e-2
BF16_GRAD_COSINE = 0.99


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_autocast_matches_float32_within_the_stated_tolerance(
    tmp_path, rows, stage, side, checkpointing
):
    """Stages 1 and 2 under bf16 autocast against the same step in float32 (both paddings, with and without
    activation checkpointing), and the latent loss computed in float32 under autocast."""
    from mirage_trl.latent import losses
    from mirage_trl.latent.stage2 import is_checkpointing

    results, latent_dtypes = {}, []
    cosine_loss = losses.LATENT_LOSSES["cosine"]

    def spy(*a, **kw):
        loss, cos = cosine_loss(*a, **kw)
        latent_dtypes.append((loss.dtype, cos.dtype))
        return loss, cos

    for bf16 in (False, True):
        trainer = make_trainer(
            tmp_path / str(bf16),
            stage=stage,
            bf16=bf16,
            padding_side=side,
            gradient_checkpointing=checkpointing,
        )
        if checkpointing and not is_checkpointing(trainer.model):  # what Trainer.train() would switch on
            trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
        assert is_checkpointing(trainer.model) == checkpointing
        trainer.model.train()
        losses.LATENT_LOSSES["cosine"] = spy
        try:
            results[bf16] = _loss_and_grads(trainer, trainer.data_collator(rows))
        finally:
            losses.LATENT_LOSSES["cosine"] = cosine_loss
    (loss32, grads32), (loss16, grads16) = results[False], results[True]
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=BF16_LOSS_RTOL)
    assert grads16.keys() == grads32.keys()
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    flat16 = torch.cat([grads16[n].float().flatten() for n in grads32])
    assert F.cosine_similarity(flat16, flat32, dim=0) >= BF16_GRAD_COSINE
    if stage == 1:
        assert set(latent_dtypes) == {(torch.float32, torch.float32)}


@pytest.mark.parametrize("stage", [1, 2])
def test_chunked_logits_give_the_loss_and_gradients_of_one_chunk(tmp_path, rows, stage):
    """`--logits_chunk_size` through the trainer: chunks of 3 trained positions against all at once."""
    results = {}
    for chunk in (0, 3):
        trainer = make_trainer(tmp_path / str(chunk), stage=stage, logits_chunk_size=chunk)
        trainer.model.train()
        results[chunk] = _loss_and_grads(trainer, trainer.data_collator(rows))
    torch.testing.assert_close(results[3][0], results[0][0], **TOL)
    assert results[3][1].keys() == results[0][1].keys()
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[3][1][name], grad, **TOL)


def test_max_round_tokens_reaches_stage2_and_keeps_its_loss(tmp_path, rows, monkeypatch):
    """`--max_round_tokens` is the config's way to the round planner: smaller rounds, the same loss."""
    from mirage_trl.trainers import sft

    seen, real = [], sft.self_latent_forward
    monkeypatch.setattr(
        sft, "self_latent_forward", lambda *a, **kw: seen.append(kw["max_round_tokens"]) or real(*a, **kw)
    )
    losses = {}
    for cap in (None, 5):
        trainer = make_trainer(
            tmp_path / str(cap), stage=2, max_round_tokens=cap, stage2_method="rounds_checkpointed"
        )
        with torch.no_grad():
            losses[cap] = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    assert seen == [None, 5]
    torch.testing.assert_close(losses[5], losses[None], **TOL)


@pytest.mark.parametrize("metric", [False, True])
def test_stage2_encodes_helper_images_only_for_the_drift_metric(tmp_path, rows, metric):
    trainer = make_trainer(tmp_path, stage=2, stage2_target_metric=metric)
    batch = trainer.data_collator(rows)
    assert ("helper_pixel_values" in batch) == metric
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    assert ("latent/target_cos" in logged) == metric
    assert "latent/norm" in logged and "ce" in logged
    if metric:
        assert -1.0 <= logged["latent/target_cos"][-1] <= 1.0


# ---------------------------------------------------------------------- latent health, markers-only
def _pairwise_cross_cos(latents, k):
    """Mean cosine over pairs of different spans at the same span position, by a plain double loop."""
    spans = latents.reshape(-1, k, latents.shape[-1])
    values = [
        F.cosine_similarity(spans[a, j], spans[b, j], dim=0)
        for j in range(k)
        for a in range(len(spans))
        for b in range(len(spans))
        if a != b
    ]
    return float(torch.stack(values).mean())


def test_stage1_health_describes_the_predictions_and_records_the_target_norm(tmp_path, rows):
    trainer = make_trainer(tmp_path)
    batch = trainer.data_collator(rows)
    trainer.model.train()
    trainer._metrics["train"].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        ref = manual_stage1(trainer.model, batch, k=4, gamma=0.1)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    pred, targets = ref["predictions"], ref["targets"]
    assert logged["latent/norm"] == pytest.approx(float(pred.norm(dim=-1).mean()), rel=1e-5)
    assert logged["latent/cross_sample_cos"] == pytest.approx(_pairwise_cross_cos(pred, 4), abs=1e-5)
    assert logged["latent/target_norm"] == pytest.approx(float(targets.norm(dim=-1).mean()), rel=1e-5)
    assert logged["latent/target_cross_sample_cos"] == pytest.approx(
        _pairwise_cross_cos(targets, 4), abs=1e-5
    )
    assert logged["latent/norm_ratio"] == pytest.approx(
        float(pred.norm(dim=-1).mean() / targets.norm(dim=-1).mean()), rel=1e-5
    )
    # the running mean of the target norm is in the Mirage settings (and so in every checkpoint)
    saved = trainer.model.config.mirage
    assert saved["latent_target_norm"] == pytest.approx(logged["latent/target_norm"], rel=1e-6)
    assert saved.get("latent_feedback_norm") is None


def test_effective_rank_is_measured_on_logging_steps_only(tmp_path, rows):
    """The effective rank needs an SVD of the step's latents: it is computed for the steps the Trainer logs (every
    `logging_steps`-th, the first with `logging_first_step`) and for evaluation, and equals numpy's there."""
    import numpy as np

    trainer = make_trainer(tmp_path, logging_steps=3, logging_first_step=False)
    trainer.state.logging_steps = 3
    batch = trainer.data_collator(rows)
    trainer.model.train()
    seen = {}
    for global_step in range(6):  # optimizer steps 1..6: logged at 3 and 6
        trainer.state.global_step = global_step
        trainer._metrics["train"].clear()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
        seen[global_step + 1] = trainer._metrics["train"].get("latent/effective_rank")
        assert "latent/norm" in trainer._metrics["train"]  # the cheap statistics: every step
    assert [s for s, v in seen.items() if v] == [3, 6]
    with torch.no_grad():
        pred = manual_stage1(trainer.model, batch, k=4, gamma=0.1)["predictions"]
    s = np.linalg.svd(pred.double().numpy(), compute_uv=False)
    p = s / s.sum()
    assert seen[6][-1] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
    trainer.model.eval()
    trainer.state.global_step = 0
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    assert trainer._metrics["eval"]["latent/effective_rank"]


@pytest.mark.parametrize("stage", [1, 2])
def test_trl_sft_metrics_are_kept(tmp_path, rows, stage):
    """mean_token_accuracy, entropy and num_tokens, as TRL's SFTTrainer logs them, from a hand computation."""
    trainer = make_trainer(tmp_path, stage=stage)
    batch = trainer.data_collator(rows)
    trainer.model.train()
    trainer._metrics["train"].clear()
    before = trainer._total_train_tokens
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
        trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"]
    assert logged["num_tokens"] == [before + 2 * int(batch["attention_mask"].sum())]
    if (
        stage == 1
    ):  # the stage-1 logits by hand (stage 2's are the rounds' own, checked in tests/latent/test_stage2.py)
        ref = manual_stage1(trainer.model, batch, k=4, gamma=0.1)
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        logits = ref["logits"][:, :-1][keep]
        logp = logits.log_softmax(-1)
        accuracy = float((logits.argmax(-1) == labels[keep]).float().mean())
        entropy = float(-(logp.exp() * logp).sum(-1).mean())
        assert logged["mean_token_accuracy"][-1] == pytest.approx(accuracy, abs=1e-6)
        assert logged["entropy"][-1] == pytest.approx(entropy, rel=1e-4)
    assert 0.0 <= logged["mean_token_accuracy"][-1] <= 1.0 and logged["entropy"][-1] > 0


def test_feedback_norm_target_in_stage1_saves_the_measured_norm(tmp_path, rows):
    trainer = make_trainer(tmp_path, latent_feedback_norm="target")
    batch = trainer.data_collator(rows)
    trainer.model.train()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    saved = trainer.model.config.mirage
    assert saved["latent_feedback_norm"] == saved["latent_target_norm"] > 0


def test_markers_only_stage1_feeds_zeros_and_learns_text_only(tmp_path, rows):
    trainer = make_trainer(tmp_path, markers_only=True)
    assert trainer.model.config.mirage["latent_slot_input"] == "zeros"
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        ref = manual_stage1(trainer.model, batch, k=4, gamma=1.0, zeros_at_slots=True)
        informed = manual_stage1(trainer.model, batch, k=4, gamma=1.0)
    torch.testing.assert_close(loss, ref["ce"], **TOL)  # CE alone, with zeros at the slots
    assert not torch.allclose(ref["ce"], informed["ce"])  # the slot content did matter


def test_stage2_feedback_norm_target_needs_a_measured_norm(tmp_path):
    with pytest.raises(MirageError, match="no measured stage-1 target norm"):
        make_trainer(tmp_path, stage=2, latent_feedback_norm="target")


def _loss_and_grads(trainer, batch):
    """The trainer's loss on `batch` and the gradients it leaves (then cleared)."""
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss, grads


def test_stage1_visual_bottleneck_matches_the_manual_computation(tmp_path, rows):
    """--latent_bottleneck image: the trainer's stage-1 loss and gradients equal a forward under the mask written
    out pair by pair; the setting is saved with the model, with stage 1's latent objective."""
    trainer = make_trainer(
        tmp_path, latent_bottleneck="image", latent_loss="contrastive", latent_temperature=0.2
    )
    saved = trainer.model.config.mirage
    assert (saved["latent_bottleneck"], saved["latent_loss"], saved["latent_temperature"]) == (
        "image",
        "contrastive",
        0.2,
    )
    trainer.args.latent_loss = (
        "cosine"  # the reference below is the paper's loss; the mask is what is checked
    )
    batch, model = trainer.data_collator(rows), trainer.model
    loss, grads = _loss_and_grads(trainer, batch)
    ref = manual_stage1(model, batch, k=4, gamma=0.1, bottleneck=trainer.latent_tokens)
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    ref["loss"].backward()
    assert grads and all(
        torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6)
        for n, p in model.named_parameters()
        if n in grads
    )
    with torch.no_grad():
        open_loss = manual_stage1(model, batch, k=4, gamma=0.1)["loss"]
    assert not torch.allclose(open_loss, loss)  # the mask hid something


def test_bottleneck_is_carried_into_stage2_and_its_schedule_turns_it_off(tmp_path, rows):
    trainer = make_trainer(tmp_path, latent_bottleneck="image", latent_variance_weight=0.5, max_steps=2)
    trainer.save_model(str(tmp_path / "s1"))
    saved = json.loads((tmp_path / "s1" / "config.json").read_text())["mirage"]
    assert (saved["latent_bottleneck"], saved["latent_variance_weight"]) == ("image", 0.5)
    model, processor = load_for_training(str(tmp_path / "s1"))
    second = make_trainer(tmp_path / "b", model=model, processor=processor, stage=2, dataset=as_dataset(rows),
                          latent_bottleneck_steps=1, latent_bottleneck="image", max_steps=2)  # fmt: skip
    assert (
        second.bottleneck and second.model.config.mirage["latent_variance_weight"] == 0.5
    )  # stage 1's, kept
    second.train()
    assert second.bottleneck == "none" and second.model.config.mirage["latent_bottleneck"] == "none"
    model, processor = load_for_training(str(tmp_path / "s1"))
    inherited = make_trainer(tmp_path / "c", model=model, processor=processor, stage=2)
    assert (
        inherited.bottleneck == "image"
    )  # stage 2 of a bottlenecked stage 1, no flag: as the model was trained
    with pytest.raises(
        MirageError,
        match=r"^--latent_bottleneck_steps schedules the bottleneck: give --latent_bottleneck image \(or strict\) too$",
    ):
        make_args(tmp_path, latent_bottleneck_steps=3)
    with pytest.raises(MirageError, match=r"^--latent_bottleneck 'text': choose one of none, image, strict$"):
        make_args(tmp_path, latent_bottleneck="text")


def _contrastive_by_hand(predictions, targets, rows, temperature):
    """Per slot: -log softmax of its own target among its own and the other rows' targets (cos / T)."""
    terms = []
    for i in range(len(rows)):
        p = predictions[i] / predictions[i].norm()
        pool = [j for j in range(len(rows)) if j == i or rows[j] != rows[i]]
        scores = torch.stack([(p * targets[j]).sum() / targets[j].norm() / temperature for j in pool])
        terms.append(torch.logsumexp(scores, 0) - scores[pool.index(i)])
    return torch.stack(terms).mean()


def test_contrastive_latent_loss_and_regulariser_match_the_manual_computation(tmp_path, rows):
    """--latent_loss contrastive and --latent_variance_weight: the stage-1 loss and its gradient equal
    gamma x CE + InfoNCE (by hand, slot by slot) + weight x the variance-covariance term."""
    from mirage_trl.latent.losses import variance_covariance

    trainer = make_trainer(
        tmp_path, latent_loss="contrastive", latent_temperature=0.5, latent_variance_weight=0.3
    )
    batch, model = trainer.data_collator(rows), trainer.model
    loss, grads = _loss_and_grads(trainer, batch)
    ref = manual_stage1(model, batch, k=4, gamma=0.1)
    slot_rows = batch["latent_mask"].nonzero()[:, 0].tolist()
    assert len(set(slot_rows)) == 3  # three rows with spans: negatives exist
    expected = (
        0.1 * ref["ce"]
        + _contrastive_by_hand(ref["predictions"], ref["targets"], slot_rows, 0.5)
        + 0.3 * variance_covariance(ref["predictions"])
    )
    torch.testing.assert_close(loss, expected, **TOL)
    expected.backward()
    assert grads and all(
        torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6)
        for n, p in model.named_parameters()
        if n in grads
    )
    with pytest.raises(MirageError, match=r"^--latent_loss 'l2': choose one of cosine, contrastive$"):
        make_args(tmp_path, latent_loss="l2")
    with pytest.raises(MirageError, match=r"^--latent_temperature 0\.0: must be a finite number > 0$"):
        make_args(tmp_path, latent_temperature=0.0)
