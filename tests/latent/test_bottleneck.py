"""The visual bottleneck against a plain reference: every sample alone, with an attention mask written out
pair by pair (query i may see key j when j <= i, or when both lie in one image for families whose images
attend both ways, unless i is a text position after the sample's first `<|latent_start|>` and j an image
token). Through stage 1's full forward, stage 2's every method and cached decoding, gradients included."""

from __future__ import annotations

import pytest
import torch
from helpers import TOKEN_KEYS, layer_masks, reference_inputs, reference_stage1
from test_stage2 import (
    PACKED_ROUND_FAMILIES,
    _ce_sum,
    _grads,
    _images,
    _labels,
    assert_close_grads,
    fresh,
    make_batch,
)

from mirage_trl.errors import MirageError
from mirage_trl.latent.bottleneck import blind_queries, visual_bottleneck
from mirage_trl.latent.slots import latent_inputs
from mirage_trl.latent.stage2 import self_latent_forward
from mirage_trl.models.families import family, multimodal_model, unwrap

pytestmark = pytest.mark.usefixtures("one_thread")
REL = 1e-5


def reference_stage2(model, single, tokens, mode):
    """One sample: prefix passes fill the slots one by one, then one full pass, all under the written-out mask."""
    inner = multimodal_model(model)
    ids = single["input_ids"]
    mask = layer_masks(model, ids[0].tolist(), tokens, mode)
    x = model.get_input_embeddings()(ids)
    for t in (ids[0] == tokens.pad_id).nonzero().flatten().tolist():
        prefix = inner(**reference_inputs(model, single, x, mask, t)).last_hidden_state
        x = torch.cat([x[:, :t], prefix[:, t - 1 : t], x[:, t + 1 :]], dim=1)
    return inner(**reference_inputs(model, single, x, mask)).last_hidden_state


def test_blind_queries_follow_the_rule():
    # a row: text, start, 2 slots, end, text, start, 2 slots, end, text
    slots = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    expected = [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1]  # position 2 and 7 are starts
    assert blind_queries(slots).int()[0].tolist() == expected
    assert not blind_queries(torch.zeros(2, 5, dtype=torch.bool)).any()  # no span: nothing blind


@pytest.mark.parametrize("mode", ["image", "strict"])
@pytest.mark.parametrize("model_type", PACKED_ROUND_FAMILIES)
def test_stage1_forward_matches_reference(model_type, mode):
    model, processor, tokens = fresh(model_type)
    batch, singles = make_batch(processor, tokens, "right")
    n = int(batch["slot_mask"].sum())
    torch.manual_seed(0)
    values = torch.randn(n, unwrap(model).get_input_embeddings().weight.shape[1], requires_grad=True)
    inner = multimodal_model(model)
    kw = {k: v for k, v in _images(batch).items()}
    fam = family(model)  # the positions the trainer passes (its stage-1 forward gives them explicitly)
    positions = fam.position_ids(
        model, batch["input_ids"], batch["attention_mask"], fam.image_inputs(model, batch)
    )
    kw["position_ids"] = fam.model_positions(positions)

    def batched(on: bool):
        with (
            latent_inputs(model, batch["slot_mask"], values),
            visual_bottleneck(model, batch["input_ids"], batch["slot_mask"], mode if on else "none"),
        ):
            return inner(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw
            ).last_hidden_state

    model.zero_grad(set_to_none=True)
    hidden = batched(True)
    labels = _labels(batch["input_ids"], batch["attention_mask"], tokens.pad_id)
    _ce_sum(model, hidden, labels).backward()
    grads, value_grad = _grads(model), values.grad.clone()
    plain = batched(False).detach()

    model.zero_grad(set_to_none=True)
    values.grad = None
    offset = 0
    changed = False
    for b, single in enumerate(singles):
        k = int(batch["slot_mask"][b].sum())
        ref = reference_stage1(model, single, values[offset : offset + k], tokens, mode)
        real = batch["attention_mask"][b].bool()
        torch.testing.assert_close(hidden[b, real].detach(), ref[0].detach(), rtol=1e-5, atol=1e-5)
        changed |= not torch.allclose(plain[b, real], ref[0].detach(), atol=1e-4)
        _ce_sum(model, ref, _labels(single["input_ids"], single["attention_mask"], tokens.pad_id)).backward()
        offset += k
    assert changed  # the mask really removes something (samples with an image and a span)
    assert_close_grads(grads, _grads(model))
    torch.testing.assert_close(value_grad, values.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["image", "strict"])
@pytest.mark.parametrize("method", ["rounds", "rounds_checkpointed", "recompute"])
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "gemma3", "llava_onevision"])
def test_stage2_methods_match_reference(model_type, method, mode):
    model, processor, tokens = fresh(model_type)
    if method == "rounds_checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, singles = make_batch(processor, tokens, "left")
    labels = _labels(batch["input_ids"], batch["attention_mask"], tokens.pad_id)
    n_targets = int((labels != -100).sum())
    model.zero_grad(set_to_none=True)
    out = self_latent_forward(
        model, batch["input_ids"], batch["attention_mask"], batch["slot_mask"], method=method,
        bottleneck=mode, **_images(batch),
    )  # fmt: skip
    loss = _ce_sum(model, out.hidden_states, labels) / n_targets
    loss.backward()
    grads = _grads(model)

    model.zero_grad(set_to_none=True)
    ref_loss = 0.0
    for b, single in enumerate(singles):
        hidden = reference_stage2(model, single, tokens, mode)
        real = batch["attention_mask"][b].bool()
        torch.testing.assert_close(
            out.hidden_states[b, real].detach(), hidden[0].detach(), rtol=1e-5, atol=1e-5
        )
        part = _ce_sum(model, hidden, _labels(single["input_ids"], single["attention_mask"], tokens.pad_id))
        (part / n_targets).backward()
        ref_loss += part.item() / n_targets
    assert loss.item() == pytest.approx(ref_loss, rel=REL)
    assert_close_grads(grads, _grads(model))


def test_recurrent_families_are_refused_in_one_line():
    model, processor, tokens = fresh("qwen3_5")
    batch, _ = make_batch(processor, tokens, "right")
    with pytest.raises(
        MirageError, match=r"^--latent_bottleneck: .*recurrent .*use --latent_bottleneck none$"
    ):
        self_latent_forward(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["slot_mask"],
            bottleneck="image",
            **_images(batch),
        )
    with (
        pytest.raises(MirageError, match="recurrent"),
        visual_bottleneck(model, batch["input_ids"], batch["slot_mask"]),
    ):
        pass


# --------------------------------------------------------------------------- cached decoding

STEPS = 16


def reference_decode(model, processor, tokens, prompt, mode):
    """One sample alone, no cache: the whole sequence re-run at every step under the written-out mask."""
    from test_generation import make_batch as prompt_batch

    single = dict(prompt_batch(processor, [prompt]))
    inner, head = multimodal_model(model), model.get_output_embeddings()
    ids, fed = single["input_ids"][0].tolist(), {}
    remaining, force_end = 0, False
    for _ in range(STEPS):
        seq = torch.tensor(ids)[None]
        grown = {
            k: torch.cat([v, v.new_zeros(1, len(ids) - v.shape[1])], 1)
            for k, v in single.items()
            if k in TOKEN_KEYS
        }
        x = model.get_input_embeddings()(seq)
        for pos, vec in fed.items():
            x[0, pos] = vec
        sample = dict(single, input_ids=seq, **grown)
        hidden = inner(
            **reference_inputs(model, sample, x, layer_masks(model, ids, tokens, mode))
        ).last_hidden_state[0, -1]
        if remaining:
            token, remaining = tokens.pad_id, remaining - 1
            fed[len(ids)] = hidden
            force_end = remaining == 0
        elif force_end:
            token, force_end = tokens.end_id, False
        else:
            token = int(head(hidden).argmax())
            remaining = tokens.latent_size if token == tokens.start_id else 0
        ids.append(token)
    return ids[single["input_ids"].shape[1] :], list(fed.values())


@pytest.mark.parametrize("mode", ["image", "strict"])
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "internvl", "llava_onevision"])
def test_cached_decoding_matches_reference(model_type, mode):
    from test_generation import PROMPTS, install_trigger, new_model
    from test_generation import make_batch as prompt_batch

    from mirage_trl.generation import generate_with_latents

    model, processor, lt = new_model(model_type)
    model.eval()
    batch = prompt_batch(processor, PROMPTS)
    install_trigger(model, processor, lt, batch)
    kw = dict(max_new_tokens=STEPS, eos_token_ids=[], return_latents=True)
    out = generate_with_latents(model, processor, batch, bottleneck=mode, **kw)
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            generated, fed = reference_decode(model, processor, lt, prompt, mode)
            assert out.sequences[i].tolist() == generated, i
            if fed:
                torch.testing.assert_close(out.latents[i], torch.stack(fed), rtol=1e-4, atol=1e-5)
    # the mask had something to hide: an image prompt wrote text after its span's start
    blind = blind_queries(out.sequences == lt.pad_id)
    assert any(blind[i].any() for i, (_, seed) in enumerate(PROMPTS) if seed is not None)
