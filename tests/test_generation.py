"""Latent decoding: batched, cached `generate_with_latents` against a plain per-sample loop without a cache."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mirage_trl.errors import MirageError
from mirage_trl.generation import LATENT_MODES, generate_with_latents
from mirage_trl.latent.slots import latent_inputs
from mirage_trl.models.families import SUPPORTED_MODEL_TYPES, capture_final_hidden
from mirage_trl.models.prepare import add_latent_tokens
from mirage_trl.models.tiny import build_tiny_model

K = 3
STEPS = 20
PROMPTS = [  # (text, seed of its input image or None)
    ("hello maze", 0),
    ("plan a route please", None),
    ("go", None),
    ("Which candidate patch fills the hole?", 3),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and a busy 2-core machine makes them much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(60, 80, 3) * 255).astype("uint8"))


def make_batch(processor, prompts):
    texts, images = [], []
    nested = type(processor).__name__ in ("Gemma3Processor", "SmolVLMProcessor")  # images per prompt
    for text, image_seed in prompts:
        content = ([{"type": "image"}] if image_seed is not None else []) + [{"type": "text", "text": text}]
        texts.append(
            processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        )
        if image_seed is not None:
            images.append([_image(image_seed)] if nested else _image(image_seed))
        elif nested:
            images.append([])
    if nested and not any(images):
        images = []
    return processor(
        text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt"
    )


def set_trigger(model, lt, token_id: int):
    """Make `<|latent_start|>` win exactly where `token_id` would be the greedy pick (its LM-head row, scaled)."""
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[lt.start_id] = head[token_id] * 1.01


def new_model(model_type="qwen2_5_vl"):
    model, processor = build_tiny_model(model_type, seed=0)
    lt = add_latent_tokens(processor, model, latent_size=K)
    return model, processor, lt


def first_steps(seqs, token):
    return [(row == token).nonzero()[0, 0].item() if (row == token).any() else None for row in seqs]


def install_trigger(model, processor, lt, batch):
    """Make `<|latent_start|>` the greedy pick where some token X would be, choosing X so that in `batch`
    samples enter latent mode at different steps and at least one sample never does (checked)."""
    plain = generate_with_latents(
        model, processor, batch, latent_tokens=lt, max_new_tokens=STEPS, eos_token_ids=[]
    )
    head = model.get_output_embeddings().weight
    original = head[lt.start_id].clone()
    for token in torch.unique(plain.sequences).tolist():
        set_trigger(model, lt, token)
        out = generate_with_latents(
            model, processor, batch, latent_tokens=lt, max_new_tokens=STEPS, eos_token_ids=[]
        )
        starts = first_steps(out.sequences, lt.start_id)
        if None in starts and len({s for s in starts if s is not None and s < STEPS - K - 1}) >= 2:
            return token
        with torch.no_grad():
            head[lt.start_id] = original
    raise AssertionError("no trigger token found for this model")


def _token_marks(single, n_generated):
    """The processor's per-token image marks (`mm_token_type_ids`: Qwen-VL, `token_type_ids`: Gemma 3; InternVL
    has none) extended over `n_generated` new tokens, as model keyword arguments."""
    out = {}
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in single:
            marks = single[key][0]
            out[key] = torch.cat([marks, torch.zeros(n_generated, dtype=marks.dtype)])[None]
    return out


def reference_decode(model, processor, lt, prompt, max_new_tokens, eos=()):
    """Obviously correct: one sample alone, no cache, the full sequence re-run at every step."""
    single = make_batch(processor, [prompt])
    ids = single["input_ids"][0]
    extra = {
        k: single[k]
        for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "batch_num_images")
        if k in single
    }
    generated, latents, slots = [], [], []
    remaining, force_end = 0, False
    for _ in range(max_new_tokens):
        seq = torch.cat([ids, torch.tensor(generated, dtype=torch.long)])
        slot_mask = torch.zeros(1, len(seq), dtype=torch.bool)
        slot_mask[0, [len(ids) + s for s in slots]] = True
        values = torch.stack(latents) if latents else None
        with torch.no_grad(), capture_final_hidden(model) as cap, latent_inputs(model, slot_mask, values):
            out = model(
                input_ids=seq[None],
                attention_mask=torch.ones_like(seq)[None],
                **_token_marks(single, len(generated)),
                use_cache=False,
                **extra,
            )
        hidden = cap[-1][0, -1]
        if remaining > 0:
            token = lt.pad_id
            slots.append(len(generated))
            latents.append(hidden)
            remaining -= 1
            force_end = remaining == 0
        elif force_end:
            token, force_end = lt.end_id, False
        else:
            token = int(out.logits[0, -1].argmax())
            if token == lt.start_id:
                remaining = lt.latent_size
        generated.append(token)
        if token in eos and token not in (lt.pad_id, lt.end_id):
            break
    return (
        generated,
        (torch.stack(latents) if latents else torch.zeros(0, model.config.text_config.hidden_size)),
        slots,
    )


def full_forward_hidden(model, processor, lt, prompt, generated, latents):
    """Final-norm hidden states of the prompt + generated tokens, latents at their slots, in one forward."""
    single = make_batch(processor, [prompt])
    ids = single["input_ids"][0]
    seq = torch.cat([ids, torch.as_tensor(generated, dtype=torch.long)])
    slot_mask = torch.zeros(1, len(seq), dtype=torch.bool)
    slot_mask[0, len(ids) :] = torch.as_tensor(generated) == lt.pad_id
    extra = {
        k: single[k]
        for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "batch_num_images")
        if k in single
    }
    with torch.no_grad(), capture_final_hidden(model) as cap, latent_inputs(model, slot_mask, latents):
        model(input_ids=seq[None], use_cache=False, **_token_marks(single, len(generated)), **extra)
    return cap[-1][0], len(ids)


@pytest.fixture(scope="module")
def setup():
    model, processor, lt = new_model()
    batch = make_batch(processor, PROMPTS)
    install_trigger(model, processor, lt, batch)
    return model, processor, lt, batch


def _check_batch_has_ragged_spans(out, lt):
    starts = first_steps(out.sequences, lt.start_id)
    entered = [s for s in starts if s is not None]
    assert None in starts, f"every sample entered latent mode: {starts}"
    assert len(set(entered)) >= 2, f"samples should enter latent mode at different steps: {starts}"


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_batched_greedy_equals_plain_loop(model_type):
    model, processor, lt = new_model(model_type)
    batch = make_batch(processor, PROMPTS)
    install_trigger(model, processor, lt, batch)
    out = generate_with_latents(
        model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[], return_latents=True
    )
    _check_batch_has_ragged_spans(out, lt)
    for i, prompt in enumerate(PROMPTS):
        tokens, latents, slots = reference_decode(model, processor, lt, prompt, STEPS)
        assert out.sequences[i].tolist() == tokens
        assert out.latent_mask[i].nonzero()[:, 0].tolist() == slots
        assert out.latents[i].shape == latents.shape
        torch.testing.assert_close(out.latents[i], latents, atol=1e-5, rtol=0)
        assert out.num_latent_spans[i].item() == tokens.count(lt.start_id)
        assert out.num_generated_tokens[i].item() == STEPS


def test_fed_latents_are_the_hidden_states_before_each_slot(setup):
    model, processor, lt, batch = setup
    out = generate_with_latents(
        model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[], return_latents=True
    )
    assert sum(len(x) for x in out.latents) > 0
    for i, prompt in enumerate(PROMPTS):
        hidden, plen = full_forward_hidden(model, processor, lt, prompt, out.sequences[i], out.latents[i])
        slots = out.latent_mask[i].nonzero()[:, 0]
        assert len(slots) == len(out.latents[i])
        for j, s in enumerate(slots.tolist()):
            torch.testing.assert_close(out.latents[i][j], hidden[plen + s - 1], atol=1e-5, rtol=0)
        # each span: start, k pads, end
        seq = out.sequences[i].tolist()
        for s, tok in enumerate(seq):
            if tok == lt.start_id and s + K + 1 < len(seq):
                assert seq[s + 1 : s + K + 1] == [lt.pad_id] * K and seq[s + K + 1] == lt.end_id


def test_batched_equals_one_at_a_time(setup):
    model, processor, lt, batch = setup
    assert batch["attention_mask"][:, 0].tolist().count(0) >= 2  # left padding, different prompt lengths
    assert "pixel_values" in batch
    out = generate_with_latents(model, processor, batch, max_new_tokens=STEPS, return_latents=True)
    assert out.num_latent_spans.sum() > 0
    for i, prompt in enumerate(PROMPTS):
        one = generate_with_latents(
            model, processor, make_batch(processor, [prompt]), max_new_tokens=STEPS, return_latents=True
        )
        n = one.num_generated_tokens[0].item()
        assert out.num_generated_tokens[i].item() == n
        assert out.sequences[i, :n].tolist() == one.sequences[0, :n].tolist()
        torch.testing.assert_close(out.latents[i], one.latents[0], atol=1e-5, rtol=0)
        assert out.texts[i] == one.texts[0] and out.raw_texts[i] == one.raw_texts[0]


def test_texts_show_latent_spans_as_output_image(setup):
    model, processor, lt, batch = setup
    out = generate_with_latents(model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[])
    tok = processor.tokenizer
    for i in range(len(PROMPTS)):
        spans = out.num_latent_spans[i].item()
        assert out.texts[i].count("<output_image>") == spans
        assert out.raw_texts[i].count("<|latent_start|>") == spans
        assert "<|latent_pad|>" not in out.texts[i]
        assert out.raw_texts[i] == tok.decode(out.sequences[i].tolist(), skip_special_tokens=False)


def test_without_processor_decodes_the_same_ids(setup):
    model, processor, lt, batch = setup
    pad = processor.tokenizer.pad_token_id
    out = generate_with_latents(model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[])
    bare = generate_with_latents(
        model, None, batch, latent_tokens=lt, max_new_tokens=STEPS, eos_token_ids=[], pad_token_id=pad
    )
    assert torch.equal(bare.sequences, out.sequences) and torch.equal(bare.latent_mask, out.latent_mask)
    assert bare.texts == [""] * len(PROMPTS)
    with pytest.raises(
        MirageError, match="without a processor needs latent_tokens, eos_token_ids and pad_token_id"
    ):
        generate_with_latents(model, None, batch, latent_tokens=lt, max_new_tokens=STEPS)


def test_no_latent_tokens_decodes_like_model_generate():
    model, processor = build_tiny_model(seed=1)
    batch = make_batch(processor, PROMPTS)
    with pytest.warns(UserWarning, match="no latent tokens"):
        out = generate_with_latents(model, processor, batch, max_new_tokens=12, eos_token_ids=[])
    ref = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out.sequences.tolist() == ref[:, batch["input_ids"].shape[1] :].tolist()
    assert not out.latent_mask.any() and out.num_latent_spans.sum() == 0


def test_sampling_seeded_and_tiny_top_p_is_greedy(setup):
    model, processor, lt, batch = setup
    kw = dict(max_new_tokens=STEPS, do_sample=True, temperature=1.5, eos_token_ids=[])
    a = generate_with_latents(model, processor, batch, generator=torch.Generator().manual_seed(3), **kw)
    b = generate_with_latents(model, processor, batch, generator=torch.Generator().manual_seed(3), **kw)
    c = generate_with_latents(model, processor, batch, generator=torch.Generator().manual_seed(4), **kw)
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.sequences.tolist() != c.sequences.tolist()
    greedy = generate_with_latents(model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[])
    assert a.sequences.tolist() != greedy.sequences.tolist()
    tiny_p = generate_with_latents(
        model, processor, batch, generator=torch.Generator().manual_seed(3), top_p=1e-6, **kw
    )
    assert tiny_p.sequences.tolist() == greedy.sequences.tolist()


def _prefix_until_first_start(out, i, lt):
    seq = out.sequences[i].tolist()
    return seq[: seq.index(lt.start_id) + 1] if lt.start_id in seq else seq


def _ablation(setup, mode, **kw):
    model, processor, lt, batch = setup
    base = generate_with_latents(
        model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[], return_latents=True
    )
    out = generate_with_latents(
        model,
        processor,
        batch,
        max_new_tokens=STEPS,
        eos_token_ids=[],
        return_latents=True,
        latent_mode=mode,
        **kw,
    )
    for i in range(len(PROMPTS)):  # nothing changes before the first latent span
        before = _prefix_until_first_start(base, i, lt)
        if mode == "remove":  # the same text up to where the span would have opened
            before = before[:-1] if lt.start_id in before else before
        assert _prefix_until_first_start(out, i, lt)[: len(before)] == before
    return base, out


def test_ablation_zero(setup):
    base, out = _ablation(setup, "zero")
    assert sum(len(x) for x in out.latents) > 0
    for x in out.latents:
        assert torch.equal(x, torch.zeros_like(x))
    assert any(x.abs().sum() > 0 for x in base.latents)


def test_ablation_mean(setup):
    mean = torch.linspace(-1, 1, 64)
    _, out = _ablation(setup, "mean", latent_mean=mean)
    assert sum(len(x) for x in out.latents) > 0
    for x in out.latents:
        assert torch.equal(x, mean.expand_as(x))
    model, processor, _, batch = setup
    with pytest.raises(MirageError, match="latent_mean"):
        generate_with_latents(model, processor, batch, latent_mode="mean", max_new_tokens=2)


def test_ablation_noise_has_the_models_latent_norm(setup):
    model, processor, lt, batch = setup
    _, out = _ablation(setup, "noise", generator=torch.Generator().manual_seed(0))
    assert sum(len(x) for x in out.latents) > 0
    for i, prompt in enumerate(PROMPTS):
        hidden, plen = full_forward_hidden(model, processor, lt, prompt, out.sequences[i], out.latents[i])
        for j, s in enumerate(out.latent_mask[i].nonzero()[:, 0].tolist()):
            own = hidden[plen + s - 1]  # what the model itself would have fed at this slot
            torch.testing.assert_close(out.latents[i][j].norm(), own.norm(), atol=1e-4, rtol=1e-5)
            assert torch.nn.functional.cosine_similarity(out.latents[i][j], own, dim=0).abs() < 0.5


def test_ablation_shuffle_feeds_another_samples_latent(setup):
    model, processor, lt, _ = setup
    # Two prompts that enter latent mode together (same steps) plus two more: exercises the roll
    # (several samples in latent mode) and the single-sample fallback (next sample in the batch).
    prompts = PROMPTS + [("plan a route please!", None)]
    batch = make_batch(processor, prompts)
    out = generate_with_latents(
        model,
        processor,
        batch,
        max_new_tokens=STEPS,
        eos_token_ids=[],
        return_latents=True,
        latent_mode="shuffle",
    )
    B = len(prompts)
    hiddens = [
        full_forward_hidden(model, processor, lt, p, out.sequences[i], out.latents[i])
        for i, p in enumerate(prompts)
    ]
    seen_roll = seen_single = False
    counters = [0] * B
    for t in range(out.sequences.shape[1]):
        in_latent = out.latent_mask[:, t].nonzero()[:, 0].tolist()
        for r, i in enumerate(in_latent):
            src = in_latent[(r + 1) % len(in_latent)] if len(in_latent) > 1 else (i + 1) % B
            hidden, plen = hiddens[src]
            torch.testing.assert_close(out.latents[i][counters[i]], hidden[plen + t - 1], atol=1e-5, rtol=0)
            assert src != i
            counters[i] += 1
        seen_roll |= len(in_latent) > 1
        seen_single |= len(in_latent) == 1
    assert seen_roll and seen_single


def test_ablation_remove_writes_no_span_and_equals_generate_without_the_start_token(setup):
    """`remove`: no span, no latent step, no marker, no span counted; the answer is what plain greedy
    decoding writes when `<|latent_start|>` may not be picked (transformers' `bad_words_ids`)."""
    model, processor, lt, batch = setup
    base, out = _ablation(setup, "remove")
    assert base.num_latent_spans.sum() > 0  # the model does open spans in "model" mode
    assert not out.latent_mask.any()
    assert all(len(x) == 0 for x in out.latents)
    assert out.num_latent_spans.tolist() == [0] * len(PROMPTS)
    flat = out.sequences.flatten().tolist()
    assert lt.start_id not in flat and lt.pad_id not in flat and lt.end_id not in flat
    assert not any("<output_image>" in t for t in out.texts)
    reference = model.generate(
        **batch,
        max_new_tokens=STEPS,
        do_sample=False,
        bad_words_ids=[[lt.start_id]],
        eos_token_id=None,
        min_new_tokens=STEPS,
    )[:, batch["input_ids"].shape[1] :]
    assert out.sequences.tolist() == reference.tolist()


def test_unknown_mode(setup):
    model, processor, _, batch = setup
    assert LATENT_MODES == ("model", "zero", "noise", "mean", "shuffle", "remove")
    with pytest.raises(MirageError, match="model, zero, noise, mean, shuffle, remove"):
        generate_with_latents(model, processor, batch, latent_mode="dropout")


def test_eos_stops_a_sample_and_max_new_tokens_counts_latent_steps(setup):
    model, processor, lt, batch = setup
    free = generate_with_latents(model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[])
    assert (free.sequences.shape[1] == STEPS) and (free.num_generated_tokens == STEPS).all()
    assert free.latent_mask.any()  # latent steps are part of the STEPS tokens
    # A token that sample 1 emits in text mode at step >= 2 becomes the EOS.
    row = free.sequences[1].tolist()
    step = next(s for s in range(2, STEPS) if row[s] not in (lt.start_id, lt.pad_id, lt.end_id))
    eos = row[step]
    out = generate_with_latents(model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[eos])
    pad = processor.tokenizer.pad_token_id
    for i in range(len(PROMPTS)):
        seq = free.sequences[i].tolist()
        text_hits = [s for s, tok in enumerate(seq) if tok == eos and not free.latent_mask[i, s]]
        n = text_hits[0] + 1 if text_hits else STEPS
        assert out.num_generated_tokens[i].item() == n
        assert out.sequences[i, :n].tolist() == seq[:n]
        assert set(out.sequences[i, n:].tolist()) <= {pad}
    assert out.num_generated_tokens[1].item() == step + 1
    # When every sample has stopped, decoding stops.
    one = generate_with_latents(
        model, processor, make_batch(processor, [PROMPTS[1]]), max_new_tokens=STEPS, eos_token_ids=[eos]
    )
    assert one.sequences.shape[1] == step + 1


def _lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def test_peft_model_decodes_like_merged_model(setup):
    model, processor, lt, batch = setup
    plain = generate_with_latents(model, processor, batch, max_new_tokens=STEPS, return_latents=True)
    fresh, _, lt2 = new_model()
    fresh.load_state_dict(model.state_dict())
    peft_model = _lora(fresh)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)  # a visible, not overwhelming change
    install_trigger(peft_model, processor, lt2, batch)  # latent spans under this adapter too
    out = generate_with_latents(peft_model, processor, batch, max_new_tokens=STEPS, return_latents=True)
    assert out.sequences.tolist() != plain.sequences.tolist()  # the adapter is really applied
    merged = peft_model.merge_and_unload()
    ref = generate_with_latents(merged, processor, batch, max_new_tokens=STEPS, return_latents=True)
    assert out.sequences.tolist() == ref.sequences.tolist()
    assert out.num_latent_spans.sum() > 0
    for a, b in zip(out.latents, ref.latents):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_load_model_full_folder_and_adapter_round_trip(setup, tmp_path):
    from mirage_trl.models.load import load_model

    model, processor, lt, batch = setup
    kw = dict(max_new_tokens=STEPS, return_latents=True)
    ref = generate_with_latents(model, processor, batch, **kw)
    full = tmp_path / "full"
    model.save_pretrained(full)
    processor.save_pretrained(full)
    loaded, proc = load_model(full)
    out = generate_with_latents(loaded, proc, make_batch(proc, PROMPTS), **kw)
    assert out.sequences.tolist() == ref.sequences.tolist()
    assert out.num_latent_spans.sum() > 0
    for a, b in zip(out.latents, ref.latents):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(MirageError, match="latent_size=5 disagrees"):
        load_model(full, latent_size=5)
    assert load_model(full, latent_size=K)[0].config.mirage["latent_size"] == K

    # Adapter over the saved full model (as base), with the tokenizer saved beside the adapter.
    base, _ = load_model(full)
    peft_model = _lora(base, seed=1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    processor.save_pretrained(adapter)
    ref_adapter = generate_with_latents(peft_model, processor, batch, **kw)
    loaded_adapter, proc2 = load_model(adapter)
    from peft import PeftModel

    assert isinstance(loaded_adapter, PeftModel)
    out2 = generate_with_latents(loaded_adapter, proc2, make_batch(proc2, PROMPTS), **kw)
    assert out2.sequences.tolist() == ref_adapter.sequences.tolist()
    assert out2.sequences.tolist() != ref.sequences.tolist()
    for a, b in zip(out2.latents, ref_adapter.latents):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_load_model_errors_and_plain_model_warning(tmp_path):
    from mirage_trl.models.load import load_model
    from mirage_trl.models.tiny import save_tiny_model

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    with pytest.raises(MirageError, match="not_a_model"):
        load_model(empty)
    with pytest.raises(MirageError, match="missing_dir"):
        load_model(tmp_path / "missing_dir")
    plain = save_tiny_model(tmp_path / "plain")
    with pytest.raises(MirageError, match="is not a Mirage model"):
        load_model(plain)  # export and inference refuse it by default
    with pytest.warns(UserWarning, match="no latent tokens"):
        model, processor = load_model(plain, require_mirage=False)  # eval of text-only baselines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate_with_latents(model, processor, make_batch(processor, PROMPTS[:2]), max_new_tokens=4)
    assert out.sequences.shape == (2, 4) and out.num_latent_spans.sum() == 0


@pytest.mark.parametrize("slots", ["feedback_norm", "markers_only"])
def test_slot_settings_apply_at_decoding(setup, slots):
    """The model's saved slot settings reach decoding: each fed latent is the hidden state before its
    slot rescaled to the saved norm (feedback-norm matching), or zeros (markers-only control)."""
    from mirage_trl.models.settings import MirageSettings

    model, processor, lt, batch = setup
    saved = model.config.mirage
    try:
        if slots == "feedback_norm":
            MirageSettings.update(model, lt.latent_size, latent_feedback_norm=2.5)
        else:
            MirageSettings.update(model, lt.latent_size, latent_slot_input="zeros")
        out = generate_with_latents(
            model, processor, batch, max_new_tokens=STEPS, eos_token_ids=[], return_latents=True
        )
    finally:
        model.config.mirage = saved
    assert sum(len(x) for x in out.latents) > 0
    for i, prompt in enumerate(PROMPTS):
        hidden, plen = full_forward_hidden(model, processor, lt, prompt, out.sequences[i], out.latents[i])
        for j, s in enumerate(out.latent_mask[i].nonzero()[:, 0].tolist()):
            h = hidden[plen + s - 1]
            want = h / h.norm() * 2.5 if slots == "feedback_norm" else torch.zeros_like(h)
            torch.testing.assert_close(out.latents[i][j], want, atol=1e-5, rtol=0)
