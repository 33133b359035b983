"""MirageDataCollator: labels, latent slots, padding, image tokens, helper images, truncation and bad input.

Expected values are computed independently from the token ids (tests/helpers.expected_layout):
the prompt is everything through the last `<|im_start|>assistant\\n`, latent pads are -100, latent
start/end and the answer text are trained, padding is -100.
"""

from __future__ import annotations

import pytest
import torch
from helpers import IGNORE, expected_layout, four_rows, make_images, make_row

from mirage_trl.errors import MirageError
from mirage_trl.latent.collator import MirageDataCollator
from mirage_trl.models.prepare import add_latent_tokens

K = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mirage_trl.models.tiny import build_tiny_model

    model, processor = build_tiny_model()
    tokens = add_latent_tokens(processor, model, K)
    images = make_images(tmp_path_factory.mktemp("images"))
    return processor, tokens, images


def _check_sample(batch, i, processor, tokens, n_spans):
    ids, mask = batch["input_ids"][i], batch["attention_mask"][i]
    labels, slots, starts = expected_layout(ids, processor.tokenizer, K, mask)
    assert len(starts) == n_spans
    assert torch.equal(batch["labels"][i], labels)
    assert batch["latent_mask"][i].nonzero().flatten().tolist() == slots
    assert (ids == tokens.pad_id).nonzero().flatten().tolist() == slots
    # start/end tokens are trained, pads are not
    for s in starts:
        assert batch["labels"][i, s] == tokens.start_id
        assert batch["labels"][i, s + K + 1] == tokens.end_id
    assert (batch["labels"][i][batch["latent_mask"][i]] == IGNORE).all()
    # padding: pad id, ignored, not attended, no slots
    assert (ids[mask == 0] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][i][mask == 0] == IGNORE).all()
    assert not batch["latent_mask"][i][mask == 0].any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_and_slots_0_1_3_spans(setup, side):
    processor, tokens, images = setup
    rows = four_rows(images)[:3]  # 0, 1 and 3 spans, different lengths
    collator = MirageDataCollator(processor, tokens, padding_side=side)
    batch = collator(rows)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # really different lengths, so padding is exercised
    for i, n in enumerate([0, 1, 3]):
        _check_sample(batch, i, processor, tokens, n)
        mask = batch["attention_mask"][i]
        n_pad = int((mask == 0).sum())
        # padding sits on the requested side
        if side == "right":
            assert mask.tolist() == [1] * int(lengths[i]) + [0] * n_pad
        else:
            assert mask.tolist() == [0] * n_pad + [1] * int(lengths[i])
    assert int(batch["latent_mask"].sum()) == 4 * K


def test_left_and_right_padding_hold_the_same_tokens(setup):
    processor, tokens, images = setup
    rows = four_rows(images)
    right = MirageDataCollator(processor, tokens, padding_side="right")(rows)
    left = MirageDataCollator(processor, tokens, padding_side="left")(rows)
    for i in range(len(rows)):
        r, lf = right["attention_mask"][i].bool(), left["attention_mask"][i].bool()
        for key in ("input_ids", "labels", "latent_mask", "mm_token_type_ids"):
            assert torch.equal(right[key][i][r], left[key][i][lf]), key
    for key in ("pixel_values", "image_grid_thw", "helper_pixel_values", "helper_image_grid_thw"):
        assert torch.equal(right[key], left[key]), key


def test_single_row_matches_its_row_in_a_batch(setup):
    processor, tokens, images = setup
    rows = four_rows(images)
    collator = MirageDataCollator(processor, tokens)
    batch = collator(rows)
    for i, row in enumerate(rows):
        alone = collator([row])
        n = int(alone["attention_mask"].sum())
        for key in ("input_ids", "labels", "latent_mask", "mm_token_type_ids"):
            assert torch.equal(batch[key][i, :n], alone[key][0]), key


def test_mm_token_type_ids_mark_image_tokens(setup):
    processor, tokens, images = setup
    batch = MirageDataCollator(processor, tokens)(four_rows(images))
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"] == 1, batch["input_ids"] == image_id)
    assert set(batch["mm_token_type_ids"].unique().tolist()) == {0, 1}
    # as many image tokens as merged patches of the input images (merge 2x2)
    merged = int((batch["image_grid_thw"].prod(-1) // 4).sum())
    assert int((batch["input_ids"] == image_id).sum()) == merged
    # the sample without an input image has no image tokens
    assert not (batch["mm_token_type_ids"][3] == 1).any()
    assert batch["image_grid_thw"].shape[0] == 1 + 1 + 2 + 0


def test_helper_pixel_values_one_image_per_span_in_row_major_order(setup):
    from PIL import Image

    processor, tokens, images = setup
    rows = four_rows(images)
    batch = MirageDataCollator(processor, tokens)(rows)
    order = [h for row in rows for h in row["helper_images"]]  # row-major: sample, then span
    assert len(order) == 6
    one_by_one = [
        processor.image_processor(images=[Image.open(p).convert("RGB")], return_tensors="pt") for p in order
    ]
    assert torch.equal(batch["helper_pixel_values"], torch.cat([e["pixel_values"] for e in one_by_one]))
    assert torch.equal(batch["helper_image_grid_thw"], torch.cat([e["image_grid_thw"] for e in one_by_one]))
    # one helper per span: spans counted from the latent mask, in the order latent_mask.nonzero() visits them
    spans = batch["latent_mask"].sum(1) // K
    assert spans.tolist() == [0, 1, 3, 2]
    assert batch["helper_image_grid_thw"].shape[0] == int(spans.sum())


def test_no_helpers_when_disabled(setup):
    processor, tokens, images = setup
    batch = MirageDataCollator(processor, tokens, with_helpers=False)(four_rows(images))
    assert "helper_pixel_values" not in batch and "helper_image_grid_thw" not in batch
    assert int(batch["latent_mask"].sum()) == 6 * K


def test_marker_helper_count_mismatch_names_the_row(setup):
    processor, tokens, images = setup
    row = make_row(
        "Plan.", "a <output_image> b <output_image> c", [images["in0"]], [images["h0"]], "maze.jsonl:17"
    )
    with pytest.raises(MirageError, match=r"maze\.jsonl:17.*2 <output_image> marker\(s\) but 1 helper"):
        MirageDataCollator(processor, tokens)([row])
    # stage 1 (require_helpers): a row with markers and no helper at all is an error too
    bare = make_row("Plan.", "a <output_image> b", [images["in0"]], [], "maze.jsonl:18")
    with pytest.raises(MirageError, match=r"maze\.jsonl:18.*1 <output_image> marker\(s\) but 0 helper"):
        MirageDataCollator(processor, tokens, require_helpers=True)([bare])
    # without require_helpers such a row trains its text, with its slots still laid out
    batch = MirageDataCollator(processor, tokens)([bare])
    assert int(batch["latent_mask"].sum()) == K and "helper_pixel_values" not in batch


def test_missing_helper_image_names_the_row(setup, tmp_path):
    processor, tokens, images = setup
    row = make_row(
        "Plan.", "a <output_image> b", [images["in0"]], [str(tmp_path / "nope.png")], "maze.jsonl:3"
    )
    with pytest.raises(MirageError, match=r"maze\.jsonl:3:helper_images: image not found"):
        MirageDataCollator(processor, tokens)([row])


def _full(collator, row):
    b = collator([row])
    return b["input_ids"][0], b["labels"][0], b["latent_mask"][0]


def test_max_length_through_a_latent_span(setup):
    processor, tokens, images = setup
    rows = four_rows(images)
    row = rows[2]  # 3 spans
    ids, labels, slots = _full(MirageDataCollator(processor, tokens), row)
    last_end = int((ids == tokens.end_id).nonzero().max())
    first_start = int((ids == tokens.start_id).nonzero().min())
    # a cut through the last span's end token, through its pads, and through the first span: errors naming the row
    for cut in (last_end, last_end - 2, first_start + 1):
        with pytest.raises(MirageError, match=r"test:3: max_length=\d+ would cut through a latent span"):
            MirageDataCollator(processor, tokens, max_length=cut)([row])
    # a cut through the prompt
    with pytest.raises(MirageError, match=r"test:3: .*the prompt"):
        MirageDataCollator(processor, tokens, max_length=10)([row])

    # truncation="drop": the row is dropped and counted, the rest of the batch is kept
    collator = MirageDataCollator(processor, tokens, max_length=last_end, truncation="drop")
    batch = collator(rows)
    assert collator.num_dropped == 1
    assert batch["input_ids"].shape[0] == 3
    assert (batch["latent_mask"].sum(1) // K).tolist() == [0, 1, 2]
    assert batch["helper_image_grid_thw"].shape[0] == 3  # the dropped row's helpers are gone too
    collator([rows[2]] + rows[:1])
    assert collator.num_dropped == 2
    with pytest.raises(MirageError, match="every row of the batch was dropped"):
        collator([rows[2]])


def test_cut_after_the_last_span_follows_the_truncation_policy(setup):
    """A cut after the last span loses the answer (boxed answer, end of turn): error or drop, never silent."""
    processor, tokens, images = setup
    rows = four_rows(images)
    row = rows[2]
    ids, labels, slots = _full(MirageDataCollator(processor, tokens), row)
    last_end = int((ids == tokens.end_id).nonzero().max())
    for cut in (last_end + 1, ids.shape[0] - 1):  # right after the span's end token; only end-of-turn lost
        with pytest.raises(
            MirageError,
            match=rf"test:3: max_length={cut} would cut through the answer after its last latent span",
        ):
            MirageDataCollator(processor, tokens, max_length=cut)([row])
        collator = MirageDataCollator(processor, tokens, max_length=cut, truncation="drop")
        batch = collator([row, rows[0]])
        assert collator.num_dropped == 1 and batch["input_ids"].shape[0] == 1
    # exactly long enough: kept whole
    batch = MirageDataCollator(processor, tokens, max_length=ids.shape[0])([row])
    assert torch.equal(batch["input_ids"][0], ids) and torch.equal(batch["labels"][0], labels)


def test_prompt_batch_is_left_padded_prompts(setup):
    processor, tokens, images = setup
    rows = four_rows(images)[:3]
    collator = MirageDataCollator(processor, tokens)
    prompts = collator.prompt_batch(rows)
    full = collator(rows)
    header = processor.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert "labels" not in prompts and "latent_mask" not in prompts
    for i in range(3):
        mask = prompts["attention_mask"][i].bool()
        assert mask[-1]  # left padded: every prompt ends at the last column
        prompt_ids = prompts["input_ids"][i][mask]
        assert prompt_ids[-len(header) :].tolist() == header
        assert torch.equal(full["input_ids"][i][: prompt_ids.shape[0]], prompt_ids)
        assert int(full["labels"][i][: prompt_ids.shape[0]].ne(IGNORE).sum()) == 0


def test_bad_settings(setup):
    processor, tokens, _ = setup
    with pytest.raises(MirageError, match="truncation='cut'"):
        MirageDataCollator(processor, tokens, truncation="cut")
    with pytest.raises(MirageError, match="padding_side='middle'"):
        MirageDataCollator(processor, tokens, padding_side="middle")


def test_helper_images_without_an_image_processor_are_one_clear_line(setup):
    """A tokenizer passed where the processor belongs cannot encode the helper images: one line naming the row."""
    processor, tokens, images = setup
    row = four_rows(images)[3]  # no input image, two helper images
    with pytest.raises(MirageError) as e:
        MirageDataCollator(processor.tokenizer, tokens)([row])
    assert str(e.value) == (
        f"{row['source']}:helper_images: {type(processor.tokenizer).__name__} has no image processor, so the helper "
        "images cannot be encoded into stage-1 targets; pass the model's processor (AutoProcessor), not its tokenizer"
    )
