"""Stage-1 targets other than the paper's (`latent_target`) and the auxiliary decoding of the latents into text
(`latent_aux_text`, `latent_only_backprop`), checked against computations written out here.

The references share no code with the trainer: helper and input images are encoded one at a time through the
model's own `get_image_features`; differences, norms and the top-k patches are taken by plain loops; centring
uses the mean and standard deviation of every target seen, stacked; the auxiliary decoding runs each span alone
through the bare language model on [its latents; its text's embeddings], with a frozen deep copy of the model
standing for the detached weights of `latent_only_backprop`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_images, make_row
from test_sft import (
    TOL,
    _loss_and_grads,
    as_dataset,
    image_features_one_by_one,
    make_args,
    make_trainer,
    manual_pool,
    manual_stage1,
)

from mirage_trl.errors import MirageError
from mirage_trl.latent.targets import STATS_FILE, TargetCentring, precompute_latent_targets
from mirage_trl.models.families import SUPPORTED_MODEL_TYPES

K = 4
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def rows(images):
    """Three rows whose helper images have their input image's size (so "delta" and "selected" can compare them
    patch by patch), with a text per helper image: 2, 1 and 1 spans."""
    two = make_row(
        "Which way leads to the goal?",
        "<think> RIGHT <output_image> then DOWN <output_image> </think> \\boxed{RD}",
        [images["in1"]],
        [images["h0"], images["h4"]],
        "test:1",
    )
    one = make_row("Plan the moves.", "<output_image> \\boxed{L}", [images["in0"]], [images["h2"]], "test:2")
    three = make_row("Solve it.", "<output_image> so \\boxed{U}", [images["in2"]], [images["h3"]], "test:3")
    two["helper_texts"] = ["(0,0) (0,1)", "(0,1) (1,1) (2,1)"]
    one["helper_texts"] = ["(1,1) (1,0)"]
    three["helper_texts"] = ["(2,2) (1,2) (0,2) (0,1)"]
    return [two, one, three]


def encoded(model, batch, prefix):
    return image_features_one_by_one(model, batch[f"{prefix}pixel_values"], batch[f"{prefix}image_grid_thw"])


def manual_targets(model, batch, kind, rows):
    """Each helper image against its row's input image, by hand (the batch carries each row's input image once)."""
    with torch.no_grad():
        helpers = encoded(model, batch, "helper_")
        inputs = encoded(model, batch, "reference_")
    assert len(inputs) == len(rows)
    row_of_helper = [i for i, row in enumerate(rows) for _ in row["helper_images"]]
    out = []
    for h, r in zip(helpers, [inputs[i] for i in row_of_helper], strict=True):
        assert h.shape == r.shape
        if kind == "delta":
            out.append(manual_pool(h - r, K, "drop_remainder"))
        else:  # the k patches whose features change most, in patch order
            change = [float((h[i] - r[i]).norm()) for i in range(h.shape[0])]
            top = sorted(sorted(range(len(change)), key=lambda i: -change[i])[:K])
            out.append(torch.stack([h[i] for i in top]))
    return torch.cat(out)


def assert_grads_equal(model, grads, reference_loss):
    model.zero_grad()
    reference_loss.backward()
    assert grads
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, **GRAD_TOL, msg=name)


# ---------------------------------------------------------------------- latent_target
@pytest.mark.parametrize("kind", ["delta", "selected"])
def test_delta_and_selected_targets_match_the_manual_computation(tmp_path, rows, kind):
    trainer = make_trainer(tmp_path, latent_size=K, latent_target=kind)
    batch, model = trainer.data_collator(rows), trainer.model
    # one input image per row, the first row's two helper images sharing its own
    assert batch["reference_index"].tolist() == [0, 0, 1, 2]
    expected = manual_targets(model, batch, kind, rows)
    with torch.no_grad():
        torch.testing.assert_close(trainer._helper_targets(model, batch), expected, **TOL)
        pooled = manual_stage1(model, batch, k=K, gamma=0.1)["targets"]
    assert not torch.allclose(expected, pooled)  # not the paper's targets
    loss, grads = _loss_and_grads(trainer, batch)
    ref = manual_stage1(model, batch, k=K, gamma=0.1, targets=expected)
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    assert_grads_equal(model, grads, ref["loss"])
    assert model.config.mirage["latent_target"] == kind  # saved with the model


def test_a_batch_decodes_each_image_file_once(tmp_path, rows, monkeypatch):
    """The prompt and the delta/selected targets share each row's decoded input image: 3 input images and 4
    helper images are 7 decodes (the input image used to be decoded again for each of its row's helpers)."""
    import mirage_trl.latent.collator as collator_module

    opened = []
    real = collator_module.load_image

    def counting(path, source=None):
        opened.append(str(path))
        return real(path, source)

    monkeypatch.setattr(collator_module, "load_image", counting)
    trainer = make_trainer(tmp_path, latent_size=K, latent_target="delta")
    batch = trainer.data_collator(rows)
    assert sorted(opened) == sorted(str(p) for row in rows for p in row["images"] + row["helper_images"])
    assert batch["reference_image_grid_thw"].shape[0] == len(rows)


def test_delta_targets_are_cached_like_the_computed_ones(tmp_path, rows):
    trainer = make_trainer(tmp_path, latent_size=K, latent_target="delta")
    batch, model = trainer.data_collator(rows), trainer.model
    cached = precompute_latent_targets(
        as_dataset(rows), model, trainer.processing_class, K, target="delta", cache_dir=tmp_path / "cache"
    )
    got = torch.cat([torch.tensor(r).flatten(0, 1) for r in cached["latent_targets"]])
    torch.testing.assert_close(got, manual_targets(model, batch, "delta", rows), **TOL)


def test_delta_needs_an_input_image_of_the_helper_size(tmp_path, images):
    row = make_row("Plan.", "<output_image> \\boxed{L}", [images["in0"]], [images["h1"]], "bad:7")
    trainer = make_trainer(tmp_path, latent_size=K, latent_target="delta")
    with pytest.raises(MirageError, match=r"^latent_target 'delta' compares each helper image .* 16 visual tokens and the input 4 visual tokens; give both the same size$"):  # fmt: skip
        trainer.compute_loss(trainer.model, trainer.data_collator([row]))
    blind = make_row("Plan.", "<output_image> \\boxed{L}", [], [images["h1"]], "bad:8")
    with pytest.raises(MirageError, match=r"^bad:8:images: latent_target 'delta' and 'selected' compare"):
        trainer.data_collator([blind])


@pytest.mark.parametrize("scale", [False, True])
def test_centred_targets_subtract_the_running_statistics_of_every_target_seen(tmp_path, rows, scale):
    trainer = make_trainer(tmp_path, latent_size=K, latent_target="centred", latent_target_scale=scale)
    model = trainer.model
    first, second = trainer.data_collator(rows[:2]), trainer.data_collator(rows[2:] + rows[:1])
    with torch.no_grad():
        raw = [manual_stage1(model, b, k=K, gamma=0.1)["targets"] for b in (first, second)]
    model.train()
    trainer.compute_loss(model, first)
    loss, grads = _loss_and_grads(trainer, second)
    seen = torch.cat(raw).double()
    expected = raw[1].double() - seen.mean(0)
    if scale:
        expected = expected / (seen.std(0) + 1e-6)
    ref = manual_stage1(model, second, k=K, gamma=0.1, targets=expected.float())
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    assert_grads_equal(model, grads, ref["loss"])
    # saved beside the settings and continued from there on resume
    trainer.save_model(str(tmp_path / "out1"))
    assert json.loads((tmp_path / "out1" / "config.json").read_text())["mirage"]["latent_target"] == "centred"
    again = TargetCentring(scale=scale)
    assert again.load(tmp_path / "out1") and again.count.item() == seen.shape[0]
    torch.testing.assert_close(again.mean, seen.mean(0))


def test_centred_statistics_survive_a_resume(tmp_path, rows):
    args = dict(
        latent_size=K, latent_target="centred", dataset=as_dataset(rows), per_device_train_batch_size=1
    )
    trainer = make_trainer(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=1, **args)
    trainer.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-1"
    assert (checkpoint / STATS_FILE).is_file()
    resumed = make_trainer(tmp_path / "a", max_steps=2, **args)
    resumed._load_from_checkpoint(str(checkpoint))
    saved = TargetCentring()
    saved.load(checkpoint)
    # one row's slots (k per span): the step the checkpoint was written after
    assert resumed.target_centring.count.item() == saved.count.item() and saved.count.item() in (K, 2 * K)
    torch.testing.assert_close(resumed.target_centring.sum, saved.sum)
    with pytest.raises(MirageError, match=r"cannot read the centred targets' statistics"):
        (checkpoint / STATS_FILE).write_bytes(b"garbage")
        resumed.target_centring.load(checkpoint)


def test_target_options_are_refused_in_one_line(tmp_path):
    with pytest.raises(
        MirageError, match=r"^--latent_target 'mean': choose one of pooled, centred, delta, selected$"
    ):
        make_args(tmp_path, latent_target="mean")
    with pytest.raises(MirageError, match=r"^--latent_target_scale scales centred targets: give --latent_target centred too$"):  # fmt: skip
        make_args(tmp_path, latent_target_scale=True)
    with pytest.raises(MirageError, match=r"^--latent_only_backprop concerns the auxiliary text decoding"):
        make_args(tmp_path, latent_only_backprop=True, latent_aux_text=0.0)
    with pytest.raises(MirageError, match=r"^--latent_aux_text -1\.0: must be a finite number >= 0$"):
        make_args(tmp_path, latent_aux_text=-1.0)
    with pytest.raises(MirageError, match=r"markers-only slots carry nothing$"):
        make_args(tmp_path, latent_aux_text=1.0, markers_only=True)


# ---------------------------------------------------------------------- latent_aux_text
def manual_aux(decoder, embedder, latents, texts, tokenizer):
    """Mean CE of each span's text given its k latents, one span at a time through the bare language model."""
    total, count = 0.0, 0
    lm = decoder.model.language_model
    for i, text in enumerate(texts):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        embeds = torch.cat([latents[i * K : (i + 1) * K], embedder(ids)])[None]
        hidden = lm(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
        logits = decoder.lm_head(hidden[K - 1 : -1]).float()
        total = total + F.cross_entropy(logits, ids, reduction="sum")
        count += len(ids)
    return total / count


@pytest.mark.parametrize("latent_only,checkpointing", [(False, False), (True, False), (True, True)])
def test_stage1_aux_text_matches_the_manual_computation(tmp_path, rows, latent_only, checkpointing):
    """With gradient checkpointing too: a checkpointed decoding would recompute on the real weights."""
    trainer = make_trainer(tmp_path, latent_size=K, latent_aux_text=0.7, latent_only_backprop=latent_only,
                           gradient_checkpointing=checkpointing)  # fmt: skip
    batch, model = trainer.data_collator(rows), trainer.model
    model.train()
    assert batch["aux_input_ids"].shape[0] == 4  # one text per span, slot order
    loss, grads = _loss_and_grads(trainer, batch)
    ref = manual_stage1(model, batch, k=K, gamma=0.1)
    texts = [t for r in rows for t in r["helper_texts"]]
    tokenizer = trainer.processing_class.tokenizer
    decoder = copy.deepcopy(model).requires_grad_(False) if latent_only else model
    aux = manual_aux(decoder, decoder.get_input_embeddings(), ref["predictions"], texts, tokenizer)
    expected = ref["loss"] + 0.7 * aux
    torch.testing.assert_close(loss, expected, **TOL)
    assert_grads_equal(model, grads, expected)
    # the LM head does not make the latents: latent-only, the decoding leaves it the main loss's gradient alone
    model.zero_grad()
    ref = manual_stage1(model, batch, k=K, gamma=0.1)
    ref["loss"].backward()
    same = torch.allclose(grads["lm_head.weight"], model.lm_head.weight.grad, **GRAD_TOL)
    assert same == latent_only
    mirage = model.config.mirage
    assert (mirage["latent_aux_text"], mirage["latent_only_backprop"]) == (0.7, latent_only)


def test_stage2_aux_text_adds_the_decoding_of_the_fed_latents(tmp_path, rows):
    """Stage 2: the loss with the auxiliary term is the loss without it plus the weighted decoding of the latents
    the model fed itself (stage 2's latents are checked against their own reference in test_stage2)."""
    plain = make_trainer(tmp_path / "a", latent_size=K, stage=2)
    aux = make_trainer(tmp_path / "b", latent_size=K, stage=2, model=plain.model,
                       processor=plain.processing_class, latent_aux_text=0.5)  # fmt: skip
    batch, model = aux.data_collator(rows), aux.model
    loss_plain, grads_plain = _loss_and_grads(plain, plain.data_collator(rows))
    loss_aux, grads_aux = _loss_and_grads(aux, batch)
    latents = aux.stage2_forward(model, batch).latents
    texts = [t for r in rows for t in r["helper_texts"]]
    term = 0.5 * manual_aux(
        model, model.get_input_embeddings(), latents, texts, aux.processing_class.tokenizer
    )
    torch.testing.assert_close(loss_aux, loss_plain + term.detach(), **TOL)
    model.zero_grad()
    term.backward()
    for name, p in model.named_parameters():
        if name in grads_aux:
            extra = p.grad if p.grad is not None else torch.zeros_like(grads_aux[name])
            torch.testing.assert_close(
                grads_aux[name], grads_plain.get(name, 0) + extra, **GRAD_TOL, msg=name
            )


def test_aux_text_needs_one_text_per_span(tmp_path, rows):
    trainer = make_trainer(tmp_path, latent_size=K, latent_aux_text=1.0)
    short = {**rows[0], "helper_texts": ["(0,0)"]}
    with pytest.raises(MirageError, match=r"^test:1:image_output_text: latent_aux_text needs one text per <output_image> marker \(2\), this row has 1$"):  # fmt: skip
        trainer.data_collator([short])


def test_aux_text_is_carried_into_stage2_unless_the_run_says_otherwise(tmp_path, rows):
    from mirage_trl.models.load import load_for_training

    first = make_trainer(tmp_path, latent_size=K, latent_aux_text=0.4, latent_only_backprop=True,
                         latent_target="selected")  # fmt: skip
    first.save_model(str(tmp_path / "s1"))
    model, processor = load_for_training(str(tmp_path / "s1"))
    second = make_trainer(tmp_path / "b", model=model, processor=processor, stage=2, latent_size=K)
    assert (second.aux_text_weight, second.latent_only_backprop) == (0.4, True)
    assert second.data_collator.with_aux_text and second.data_collator.with_references is False
    assert second.model.config.mirage["latent_target"] == "selected"  # stage 1's, kept
    model, processor = load_for_training(str(tmp_path / "s1"))
    off = make_trainer(
        tmp_path / "c", model=model, processor=processor, stage=2, latent_size=K, latent_aux_text=0.0
    )
    assert (off.aux_text_weight, off.latent_only_backprop) == (0.0, False)


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_aux_decoding_of_padded_spans_equals_each_span_alone_in_every_family(model_type):
    """Spans of different text lengths decoded in one right-padded batch give each span's CE alone (the prefix's
    positions, the padding, Qwen3.5's recurrent layers), with the latents' gradient."""
    from mirage_trl.latent.aux_text import aux_text_loss
    from mirage_trl.models.families import output_logits, text_model
    from mirage_trl.models.tiny import build_tiny_model

    torch.manual_seed(0)
    model, processor = build_tiny_model(model_type)
    model.eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    k, dim = 2, model.get_input_embeddings().weight.shape[1]
    latents = torch.randn(2 * k, dim, requires_grad=True)
    ids = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in ("(0,0) (0,1)", "(1,1) (2,1) (2,2)")]  # fmt: skip
    assert len(ids[0]) != len(ids[1])
    length = max(len(t) for t in ids)
    batch = torch.stack([torch.cat([t, t.new_zeros(length - len(t))]) for t in ids])
    mask = torch.stack([torch.arange(length) < len(t) for t in ids]).long()
    total, count = aux_text_loss(model, latents, batch, mask, k)
    (grad,) = torch.autograd.grad(total, latents)
    expected = 0.0
    for i, t in enumerate(ids):
        embeds = torch.cat([latents[i * k : (i + 1) * k], model.get_input_embeddings()(t)])[None]
        hidden = text_model(model)(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
        expected = expected + F.cross_entropy(
            output_logits(model, hidden[k - 1 : -1]).float(), t, reduction="sum"
        )
    (expected_grad,) = torch.autograd.grad(expected, latents)
    assert int(count) == sum(len(t) for t in ids)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
