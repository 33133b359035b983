"""Tiny offline models: the benchmark tokenizer makes prompts short and the tile processor gives one
vision token per map tile, on purpose (what the learning experiment is built on)."""

from __future__ import annotations

import random

import pytest

from mirage_trl.data import vsp
from mirage_trl.models.tiny import build_tiny_processor, build_tiny_tokenizer


@pytest.fixture(scope="module")
def bench_tok():
    return build_tiny_tokenizer(1000, corpus="benchmarks")


def test_benchmark_tokenizer_makes_vsp_text_short_and_round_trips(bench_tok):
    demo = build_tiny_tokenizer()
    desc = vsp.random_map(4, random.Random(3), 0.3)
    cot = vsp.planning_row(desc, "0", "m.png", "cot", "p.png")["text_output"]
    grounding = vsp.grounding_row(desc, "0", "m.png", "direct")
    for text in (vsp.PLANNING_PROMPT, cot, grounding["text_input"], grounding["text_output"]):
        ids = bench_tok(text, add_special_tokens=False)["input_ids"]
        assert bench_tok.decode(ids) == text  # lossless
        assert len(ids) < len(demo(text, add_special_tokens=False)["input_ids"])
    prompt_ids = bench_tok(vsp.PLANNING_PROMPT.replace("<image>", ""), add_special_tokens=False)["input_ids"]
    assert len(prompt_ids) <= 12  # the 2,000-character planning prompt: a few tokens
    assert len(bench_tok(grounding["text_input"], add_special_tokens=False)["input_ids"]) <= 40
    # the special tokens the collator and the chat template need are single tokens in both tokenizers
    for tok in (demo, bench_tok):
        for special in ("<|image_pad|>", "<|vision_start|>", "<|im_start|>", "<|endoftext|>"):
            assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("side", [3, 4, 5])
def test_tile_processor_gives_one_vision_token_per_tile(bench_tok, side):
    processor = build_tiny_processor(tokenizer=bench_tok, image_pixels="tiles")
    image = vsp.render_map(vsp.random_map(side, random.Random(side)), tile_px=28)
    assert image.size == (28 * side, 28 * side)
    batch = processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[image], return_tensors="pt"
    )
    pad = bench_tok.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad).sum()) == side * side
    assert batch["image_grid_thw"].tolist() == [[1, 2 * side, 2 * side]]  # 14 px patches, merged 2 x 2
