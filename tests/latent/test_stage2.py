"""Stage 2 forward with self-generated latents: every batched method equals a plain per-sample reference.

The reference runs each sample alone (no padding, no cache, no slot hook): for every latent slot
t in order it runs the whole prefix [0, t) through the model and writes the final-norm hidden
state at t-1 into the input embeddings at t; then one full pass gives the hidden states. The
model computes its own rope positions there, so positions are checked too.
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import numpy as np
import pytest
import torch
from helpers import reference_inputs

from mirage_trl.errors import MirageError
from mirage_trl.latent.layout import span_text
from mirage_trl.latent.rounds import plan_rounds
from mirage_trl.latent.stage2 import (
    METHODS,
    is_checkpointing,
    self_latent_forward,
)
from mirage_trl.models.families import RECURRENT_LAYER_TYPES, SUPPORTED_MODEL_TYPES, multimodal_model, unwrap
from mirage_trl.models.prepare import add_latent_tokens
from mirage_trl.models.tiny import build_tiny_model, tiny_config

K = 4
REL = 1e-5
BATCHED = ("rounds", "rounds_checkpointed", "recompute")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@functools.cache
def _base(model_type: str = "qwen2_5_vl"):
    model, processor = build_tiny_model(model_type, seed=0)
    tokens = add_latent_tokens(processor, model, K)
    return model, processor, tokens


def fresh(model_type="qwen2_5_vl", attn=None):
    model, processor, tokens = _base(model_type)
    model = copy.deepcopy(model)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model.train(), processor, tokens


def _image(seed, w=84, h=56):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


# Four samples: 0, 1, 3, 2 spans; different lengths; images in the prompt of two of them.
WORDS = "Moving to Ice keeps me on the safe path Next the goal falling into a hole results in defeat".split()


def _messages(i, n_spans, n_words, image, tokens):
    parts = []
    for s in range(n_spans):
        parts.append(" ".join(WORDS[(i + s) % 7 : (i + s) % 7 + 2 + s]))
        parts.append(span_text(tokens.latent_size))
    parts.append(" ".join(WORDS[:n_words]) + " \\boxed{A}")
    user = [{"type": "text", "text": "Plan the path " * (1 + i % 2)}]
    if image:
        user = [{"type": "image"}] + user
    return [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(parts)}]


SPEC = [(0, 6, True), (1, 3, False), (3, 9, True), (2, 1, False)]


def make_batch(processor, tokens, padding_side="right", spec=SPEC, images=True):
    texts, imgs, singles = [], [], []
    for i, (n_spans, n_words, has_image) in enumerate(spec):
        has_image = has_image and images
        text = processor.apply_chat_template(
            _messages(i, n_spans, n_words, has_image, tokens), tokenize=False
        )
        texts.append(text)
        img = [_image(i)] if has_image else None
        if img:
            imgs += img
        singles.append(dict(processor(text=[text], images=img, return_tensors="pt")))
    processor.tokenizer.padding_side = padding_side
    if type(processor).__name__ in ("Gemma3Processor", "SmolVLMProcessor"):  # they take the images per sample
        imgs = [[_image(i)] if has and images else [] for i, (_, _, has) in enumerate(spec)] if imgs else []
    batch = dict(
        processor(
            text=texts, images=imgs or None, padding=True, padding_side=padding_side, return_tensors="pt"
        )
    )
    batch["slot_mask"] = batch["input_ids"] == tokens.pad_id
    for i, (n_spans, _, _) in enumerate(spec):
        assert int(batch["slot_mask"][i].sum()) == n_spans * K
    return batch, singles


def _labels(ids, real, pad_id):
    """Next-token targets at every real position whose next token is real text (not a latent pad)."""
    labels = torch.full_like(ids, -100)
    nxt = ids[..., 1:]
    ok = real[..., 1:].bool() & real[..., :-1].bool() & (nxt != pad_id)
    labels[..., :-1] = torch.where(ok, nxt, labels[..., :-1])
    return labels


def _ce_sum(model, hidden, labels):
    logits = unwrap(model).lm_head(hidden).float()
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )


def _grads(model):
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


# --------------------------------------------------------------------------- the reference


def reference_sample(model, single, pad_id, embed_grad=False, feed=None):
    """One sample alone: prefix passes fill the slots one by one, then one full pass. Returns (hidden, embeds).

    `feed`: what a slot receives given the hidden state before it (default: the hidden state itself)."""
    inner = multimodal_model(model)
    ids = single["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if embed_grad:
        embeds.retain_grad()
    x = embeds
    for t in (ids[0] == pad_id).nonzero().flatten().tolist():
        prefix = inner(**reference_inputs(model, single, x, t=t)).last_hidden_state
        fed = prefix[:, t - 1 : t] if feed is None else feed(prefix[:, t - 1 : t])
        x = torch.cat([x[:, :t], fed, x[:, t + 1 :]], dim=1)
    hidden = inner(**reference_inputs(model, single, x)).last_hidden_state
    return hidden, embeds


def reference_loss_and_grads(model, singles, pad_id, n_targets, feed=None):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for single in singles:
        hidden, _ = reference_sample(model, single, pad_id, feed=feed)
        loss = (
            _ce_sum(model, hidden, _labels(single["input_ids"], single["attention_mask"], pad_id)) / n_targets
        )
        loss.backward()
        total += loss.item()
    return total, _grads(model)


def _images(batch):
    """The processor's image inputs of a batch (and their per-token companions)."""
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "slot_mask")}


def batched_loss_and_grads(model, batch, pad_id, method, **kw):
    model.zero_grad(set_to_none=True)
    out = self_latent_forward(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["slot_mask"],
        method=method,
        **_images(batch),
        **kw,
    )
    labels = _labels(batch["input_ids"], batch["attention_mask"], pad_id)
    n_targets = int((labels != -100).sum())
    loss = _ce_sum(model, out.hidden_states, labels) / n_targets
    loss.backward()
    return loss.item(), _grads(model), out, n_targets


def assert_close_grads(got, ref, rel=REL):
    """Every gradient within `rel` of the reference, relative to its own norm; a gradient that is zero in
    exact arithmetic (an attention key bias: softmax ignores a shift of every score) is rounding noise, so
    norms are floored at 1e-4 of the largest one (every real gradient here is larger)."""
    assert got.keys() == ref.keys()
    assert len(ref) > 0
    floor = 1e-4 * max(float(g.norm()) for g in ref.values())
    for name in ref:
        err = (got[name] - ref[name]).norm() / max(float(ref[name].norm()), floor, 1e-20)
        assert float(err) <= rel, f"{name}: relative error {float(err):.2e}"


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return model.train()


# --------------------------------------------------------------------------- tests

# Every family whose language model has no recurrent layers (those run the exact recompute, tested below).
PACKED_ROUND_FAMILIES = [
    t
    for t in SUPPORTED_MODEL_TYPES
    if not set(getattr(tiny_config(t).get_text_config(), "layer_types", None) or ())
    & set(RECURRENT_LAYER_TYPES)
]


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("model_type", PACKED_ROUND_FAMILIES)
def test_methods_match_reference(model_type, padding, ckpt, finetune):
    model, processor, tokens = fresh(model_type)
    if finetune == "lora":
        model = _lora(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert is_checkpointing(model) == ckpt
    batch, singles = make_batch(processor, tokens, padding)
    assert batch["attention_mask"].min() == 0  # really padded
    pad_side_col = 0 if padding == "left" else -1
    assert batch["attention_mask"][:, pad_side_col].min() == 0

    runs = {
        "rounds": ("rounds", {"schedule": "aligned"}),
        "rounds_split": ("rounds", {"schedule": "split", "max_round_tokens": 7}),
        "rounds_checkpointed": ("rounds_checkpointed", {"schedule": "aligned"}),
        "rounds_checkpointed_split": ("rounds_checkpointed", {"schedule": "split", "max_round_tokens": 7}),
        "recompute": ("recompute", {}),
        "auto": ("auto", {}),
    }
    results = {
        name: batched_loss_and_grads(model, batch, tokens.pad_id, m, **kw) for name, (m, kw) in runs.items()
    }
    n_targets = results["rounds"][3]
    ref_loss, ref_grads = reference_loss_and_grads(model, singles, tokens.pad_id, n_targets)
    if finetune == "lora":
        assert all("lora_" in n for n in ref_grads)
    else:
        assert any(
            v in n for v in ("visual", "vision_tower", "vision_model") for n in ref_grads
        )  # images trained too
    for method, (loss, grads, out, _) in results.items():
        assert loss == pytest.approx(ref_loss, rel=REL), method
        assert_close_grads(grads, ref_grads)
        assert out.latents.shape == (int(batch["slot_mask"].sum()), 64)
        assert torch.isfinite(out.hidden_states).all()
    assert results["auto"][2].method == ("rounds_checkpointed" if ckpt else "rounds")
    assert results["rounds"][2].steps == 3 * K + 1
    assert results["rounds_split"][2].schedule == "split"
    assert results["rounds_split"][2].steps > results["rounds"][2].steps
    assert is_checkpointing(model) == ckpt  # the model's own flag is restored


@pytest.mark.parametrize("method", ["rounds", "rounds_checkpointed", "recompute"])
def test_extra_rounds_for_other_ranks_are_exact(method, monkeypatch):
    """Under ZeRO-3 a rank runs as many rounds (recompute: passes) as the rank with the most: the rounds
    cut further, or passes beyond the fixed point, give the reference loss and gradients."""
    from mirage_trl.latent import stage2

    model, processor, tokens = fresh()
    model = _lora(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, singles = make_batch(processor, tokens, "right")
    plain = batched_loss_and_grads(model, batch, tokens.pad_id, method)
    monkeypatch.setattr(stage2, "rounds_across_ranks", lambda model, count, device: count + 4)
    loss, grads, out, n_targets = batched_loss_and_grads(model, batch, tokens.pad_id, method)
    assert out.steps == plain[2].steps + 4
    ref_loss, ref_grads = reference_loss_and_grads(model, singles, tokens.pad_id, n_targets)
    assert loss == pytest.approx(ref_loss, rel=REL)
    assert_close_grads(grads, ref_grads)


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'mirage-trl[quantization]')",
)
def test_qlora_stage2_matches_reference(tmp_path):
    """Stage 2 on a 4-bit base loaded as a recipe loads it (`--load_in_4bit`, bitsandbytes' CPU backend here)
    with LoRA: every method's loss and gradients equal the per-sample reference through the same quantized model."""
    from trl import ModelConfig

    from mirage_trl.models.load import load_for_training

    model, processor, tokens = fresh()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    args = ModelConfig(model_name_or_path=str(tmp_path / "m"), load_in_4bit=True, dtype="float32")
    quantized, _ = load_for_training(str(tmp_path / "m"), model_args=args)
    assert any(type(m).__name__ == "Linear4bit" for m in multimodal_model(quantized).language_model.modules())
    quantized = _lora(quantized)
    batch, singles = make_batch(processor, tokens, "right")
    for method in BATCHED:
        loss, grads, out, n_targets = batched_loss_and_grads(quantized, batch, tokens.pad_id, method)
        ref_loss, ref_grads = reference_loss_and_grads(quantized, singles, tokens.pad_id, n_targets)
        assert loss == pytest.approx(ref_loss, rel=REL), method
        assert_close_grads(grads, ref_grads)


def test_latents_and_hidden_match_reference_values():
    model, processor, tokens = fresh()
    batch, singles = make_batch(processor, tokens, "left")
    with torch.no_grad():
        out = self_latent_forward(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["slot_mask"],
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            method="rounds",
        )
        ref_latents = []
        for b, single in enumerate(singles):
            hidden, _ = reference_sample(model, single, tokens.pad_id)
            real = batch["attention_mask"][b].bool()
            torch.testing.assert_close(out.hidden_states[b, real], hidden[0], rtol=1e-5, atol=1e-5)
            assert (out.hidden_states[b, ~real] == 0).all()
            slots = (single["input_ids"][0] == tokens.pad_id).nonzero().flatten()
            ref_latents.append(hidden[0, slots - 1])
    torch.testing.assert_close(out.latents, torch.cat(ref_latents), rtol=1e-5, atol=1e-5)


def _embed_grads_rounds(model, batch, pad_id, detach):
    """Gradient of the loss w.r.t. the embedding output of every position, for the 'rounds' method."""
    captured = []

    def hook(module, args, output):
        output.retain_grad()
        captured.append(output)

    handle = model.get_input_embeddings().register_forward_hook(hook)  # runs before the slot hook
    try:
        batched_loss_and_grads(model, batch, pad_id, "rounds", detach_latents=detach)
    finally:
        handle.remove()
    plan = plan_rounds(batch["attention_mask"], batch["slot_mask"])
    grads = torch.cat([c.grad[0] for c in captured])  # each round runs packed in one row
    return grads[plan.back]


def test_gradient_flows_through_latents():
    model, processor, tokens = fresh()
    batch, singles = make_batch(processor, tokens, "right", images=False)
    g_live = _embed_grads_rounds(model, batch, tokens.pad_id, detach=False)
    g_cut = _embed_grads_rounds(model, batch, tokens.pad_id, detach=True)
    labels = _labels(batch["input_ids"], batch["attention_mask"], tokens.pad_id)
    n_targets = int((labels != -100).sum())
    for b, single in enumerate(singles):
        first = (batch["input_ids"][b] == tokens.start_id).nonzero().flatten()
        n_real = int(batch["attention_mask"][b].sum())
        model.zero_grad(set_to_none=True)
        hidden, embeds = reference_sample(model, single, tokens.pad_id, embed_grad=True)
        (
            _ce_sum(model, hidden, _labels(single["input_ids"], single["attention_mask"], tokens.pad_id))
            / n_targets
        ).backward()
        non_slot = single["input_ids"][0] != tokens.pad_id
        torch.testing.assert_close(
            g_live[b, :n_real][non_slot], embeds.grad[0][non_slot], rtol=1e-5, atol=1e-7
        )
        if len(first):
            before = slice(0, int(first[0]))  # the prompt and text before the first span
            diff = (g_live[b, before] - g_cut[b, before]).norm() / g_live[b, before].norm()
            assert diff > 1e-3, f"sample {b}: detaching the latents did not change the prompt gradient"
        else:  # no span: nothing to detach
            torch.testing.assert_close(g_live[b], g_cut[b])


def test_auto_is_exact_with_checkpointing_where_a_plain_cache_loop_is_not():
    model, processor, tokens = fresh()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, singles = make_batch(processor, tokens, "left", images=False)
    loss, grads, out, n_targets = batched_loss_and_grads(model, batch, tokens.pad_id, "auto")
    assert out.method == "rounds_checkpointed"
    ref_loss, ref_grads = reference_loss_and_grads(model, singles, tokens.pad_id, n_targets)
    assert loss == pytest.approx(ref_loss, rel=REL)
    assert_close_grads(grads, ref_grads)
    # The reference implementation's bug: under HF checkpointing a cache-based loop silently gets no cache.
    from transformers import DynamicCache

    cache = DynamicCache(config=unwrap(model).config)
    multimodal_model(model)(input_ids=batch["input_ids"][:, :5], cache=cache, use_cache=True)
    assert cache.get_seq_length() == 0
    assert is_checkpointing(model)


def test_forced_rounds_with_checkpointing_switches_it_off_for_the_call(caplog):
    model, processor, tokens = fresh()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, singles = make_batch(processor, tokens, "right", images=False)
    loss, grads, out, n_targets = batched_loss_and_grads(model, batch, tokens.pad_id, "rounds")
    assert out.method == "rounds"
    assert is_checkpointing(model)
    ref_loss, ref_grads = reference_loss_and_grads(model, singles, tokens.pad_id, n_targets)
    assert loss == pytest.approx(ref_loss, rel=REL)
    assert_close_grads(grads, ref_grads)


def test_eager_attention_matches_reference():
    model, processor, tokens = fresh(attn="eager")
    assert unwrap(model).config._attn_implementation == "eager"
    batch, singles = make_batch(processor, tokens, "left")
    for method in BATCHED:
        loss, grads, out, n_targets = batched_loss_and_grads(model, batch, tokens.pad_id, method)
        assert torch.isfinite(out.hidden_states).all()
        if method == "rounds":
            ref_loss, ref_grads = reference_loss_and_grads(model, singles, tokens.pad_id, n_targets)
        assert loss == pytest.approx(ref_loss, rel=REL), method
        assert_close_grads(grads, ref_grads)


@pytest.mark.parametrize("model_type", ["qwen3_vl", "qwen2_vl"])
def test_other_qwen_vl_models_rounds_equal_recompute(model_type):
    model, processor, tokens = fresh(model_type)
    spec = [(0, 4, True), (1, 2, False), (2, 5, False)]
    batch, _ = make_batch(processor, tokens, "left", spec=spec)
    res = {m: batched_loss_and_grads(model, batch, tokens.pad_id, m) for m in BATCHED}
    for method in ("rounds", "rounds_checkpointed"):
        assert res[method][0] == pytest.approx(res["recompute"][0], rel=REL)
        assert_close_grads(res[method][1], res["recompute"][1])
        torch.testing.assert_close(res[method][2].latents, res["recompute"][2].latents, rtol=1e-5, atol=1e-5)


def test_round_layouts_pack_real_tokens_and_split_keeps_slots_first():
    g = torch.Generator().manual_seed(0)
    B, L = 6, 200
    attn = torch.zeros(B, L, dtype=torch.bool)
    slot = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        n = L - int(torch.randint(0, 20, (1,), generator=g))
        attn[b, L - n :] = True  # left padding
        for centre in (0.25, 0.5, 0.75):
            t = L - n + int((centre + float(torch.rand((), generator=g)) * 0.2 - 0.1) * n)
            slot[b, t + 1 : t + 1 + K] = True
    aligned = plan_rounds(attn, slot, "aligned")
    split = plan_rounds(attn, slot, "split", max_round_tokens=60)
    assert len(aligned.rounds) == 3 * K + 1
    assert max(aligned.tokens) > 60 and max(split.tokens) <= 60 and len(split.rounds) > len(aligned.rounds)
    assert plan_rounds(attn, slot, max_round_tokens=60).schedule == "split"  # auto splits only when needed
    assert plan_rounds(attn, slot, max_round_tokens=10**6).schedule == "aligned"
    # image tokens all run in the first round, even when it has to exceed the cap for them
    images = torch.zeros_like(attn)
    first = attn.int().argmax(1)
    for b in range(B):
        images[b, first[b] + 1 : first[b] + 30] = True
    with_images = plan_rounds(attn, slot, "split", max_round_tokens=60, keep_together=images)
    assert with_images.back[images].max() < with_images.tokens[0]
    # images filling the whole first round: no empty round is left behind
    big = torch.zeros_like(attn)
    for b in range(B):
        big[b, first[b] + 1 : int(slot[b].int().argmax())] = True  # every token up to the first slot
    tight = plan_rounds(attn, slot, "split", max_round_tokens=20, keep_together=big)
    assert min(tight.tokens) > 0
    late = images.clone()
    late[1, -1] = True
    with pytest.raises(MirageError, match="sample 1: an image comes after its first latent slot"):
        plan_rounds(attn, slot, keep_together=late)
    # ZeRO-3: as many rounds as another rank runs, by cutting the largest rounds (images kept in the first)
    padded = plan_rounds(attn, slot, "aligned", keep_together=images, min_rounds=len(aligned.rounds) + 5)
    assert len(padded.rounds) == len(aligned.rounds) + 5 and padded.schedule == "split"
    assert padded.back[images].max() < padded.tokens[0]
    with pytest.raises(MirageError, match=r"too few for the 10000 rounds another rank runs"):
        plan_rounds(attn, slot, min_rounds=10_000)
    for plan in (aligned, split, padded):
        assert plan.computed_tokens == int(attn.sum())  # rounds run packed: no padding in the linear layers
        offsets = torch.tensor([0] + plan.tokens[:-1]).cumsum(0)
        src = torch.cat([layout.src for layout in plan.rounds])
        assert (src[plan.back[attn]] == attn.nonzero() @ torch.tensor([L, 1])).all()  # back inverts src
        sb, st = slot.nonzero(as_tuple=True)
        rnd = torch.searchsorted(offsets, plan.back[sb, st], right=True) - 1
        assert (plan.back[sb, st - 1] < offsets[rnd]).all()  # a slot's predecessor ran in an earlier round
        for r, layout in enumerate(plan.rounds):
            b_of = torch.div(layout.src, L, rounding_mode="floor")
            first = torch.ones_like(b_of, dtype=torch.bool)
            first[1:] = b_of[1:] != b_of[:-1]
            in_round = (rnd == r).nonzero().flatten()
            assert first[layout.slot_local].all()  # every slot opens its sample's chunk
            assert (b_of[layout.slot_local] == sb[in_round]).all()
            # the padded attention layout holds exactly the round's tokens, each sample in its own row
            assert (layout.out_index // plan.lengths[r] == b_of).all()
            assert (layout.q_index[layout.out_index] == torch.arange(len(layout.src))).all()


def test_batch_without_slots_is_one_plain_forward():
    model, processor, tokens = fresh()
    batch, _ = make_batch(processor, tokens, "right", spec=[(0, 3, False), (0, 7, False)])
    out = self_latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["slot_mask"])
    assert out.steps == 1 and out.latents.shape == (0, 64)
    plain = multimodal_model(model)(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.hidden_states[real], plain[real], rtol=1e-5, atol=1e-5)


def test_unknown_method_and_bad_masks():
    model, processor, tokens = fresh()
    batch, _ = make_batch(processor, tokens, "right", spec=[(1, 3, False), (0, 2, False)])
    args = (model, batch["input_ids"], batch["attention_mask"], batch["slot_mask"])
    with pytest.raises(MirageError) as err:
        self_latent_forward(*args, method="segments")
    assert "'segments'" in str(err.value)
    for name in METHODS:
        assert name in str(err.value)
    bad = batch["slot_mask"].clone()
    bad[1, -1] = True  # a padding position
    with pytest.raises(MirageError, match="padding"):
        self_latent_forward(model, batch["input_ids"], batch["attention_mask"], bad)


def test_rounds_attention_is_switched_on_only_inside_the_rounds():
    model, processor, tokens = fresh()
    batch, _ = make_batch(processor, tokens, "right", images=False)
    config = multimodal_model(model).language_model.config
    assert config._attn_implementation == "sdpa"
    plain = functools.partial(
        multimodal_model(model), input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    )
    with torch.no_grad():
        before = plain().last_hidden_state
    seen = []
    layer = multimodal_model(model).language_model.layers[0]
    handle = layer.register_forward_hook(lambda m, a, out: seen.append(config._attn_implementation))
    try:
        self_latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["slot_mask"])
        assert seen and set(seen) == {"mirage_rounds"}
        assert config._attn_implementation == "sdpa"

        def boom(m, a, out):
            raise RuntimeError("boom")

        failing = layer.register_forward_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            self_latent_forward(model, batch["input_ids"], batch["attention_mask"], batch["slot_mask"])
        failing.remove()
        assert config._attn_implementation == "sdpa"  # restored after a failure inside a round
    finally:
        handle.remove()
    with torch.no_grad():  # a plain forward of the same model is untouched by the rounds
        torch.testing.assert_close(plain().last_hidden_state, before, rtol=0, atol=0)


@pytest.mark.parametrize("slots", ["feedback_norm", "markers_only"])
@pytest.mark.parametrize("method", BATCHED)
def test_slot_settings_match_reference(method, slots):
    """Feedback-norm matching (every fed hidden state rescaled to norm 3) and the markers-only control
    (zeros at every slot), set in the model's Mirage settings as a trained model carries them: loss,
    gradients and fed latents equal the per-sample reference with the same rule written out here."""
    from mirage_trl.models.settings import MirageSettings

    model, processor, tokens = fresh()
    if slots == "feedback_norm":
        MirageSettings.update(model, K, latent_feedback_norm=3.0, latent_target_norm=3.0)

        def feed(h):
            return h / h.norm(dim=-1, keepdim=True) * 3.0
    else:
        MirageSettings.update(model, K, latent_slot_input="zeros")

        def feed(h):
            return h * 0.0

    batch, singles = make_batch(processor, tokens, "right")
    loss, grads, out, n_targets = batched_loss_and_grads(model, batch, tokens.pad_id, method)
    ref_loss, ref_grads = reference_loss_and_grads(model, singles, tokens.pad_id, n_targets, feed=feed)
    assert loss == pytest.approx(ref_loss, rel=REL)
    assert_close_grads(grads, ref_grads)
    norms = out.latents.norm(dim=-1)
    if slots == "feedback_norm":
        torch.testing.assert_close(norms, torch.full_like(norms, 3.0), rtol=1e-5, atol=1e-5)
    else:
        assert (out.latents == 0).all()


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no_ckpt", "ckpt"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_hybrid_linear_attention_model_is_exact_with_every_method(padding, ckpt, finetune):
    """Qwen3.5 mixes gated-delta (linear attention) layers with full attention: a recurrent and a convolution state
    per sample, which the rounds carry per sample from one round to the next (`latent.recurrent_rounds`). Every
    method equals the per-sample reference, and "auto" runs the rounds (no longer m + 1 full passes)."""
    model, processor, tokens = fresh("qwen3_5")
    assert "linear_attention" in model.config.text_config.layer_types
    if finetune == "lora":
        model = _lora(model)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, singles = make_batch(processor, tokens, padding)
    results = {m: batched_loss_and_grads(model, batch, tokens.pad_id, m) for m in ("auto", *BATCHED)}
    # every gated-delta layer has its own forward back
    assert not any("forward" in m.__dict__ for m in model.modules())
    auto = results["auto"][2]
    assert auto.method == ("rounds_checkpointed" if ckpt else "rounds") and auto.steps >= 3 * K + 1
    n_targets = results["auto"][3]
    ref_loss, ref_grads = reference_loss_and_grads(model, singles, tokens.pad_id, n_targets)
    # The reference PyTorch gated-delta kernel works in chunks of the padded length, so its sums run in
    # another order than over one sample alone: float32 rounding, a few 1e-5 on the smallest gradients.
    for method, (loss, grads, out, _) in results.items():
        assert loss == pytest.approx(ref_loss, rel=REL), method
        assert_close_grads(grads, ref_grads, rel=1e-4)
        assert out.latents.shape == (int(batch["slot_mask"].sum()), 64)
