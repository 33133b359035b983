"""Tiny random Qwen-VL models for tests and the offline demo.

No hub is reachable here, so `build_tiny_model` makes everything from scratch: a byte-level
BPE tokenizer trained on a few kilobytes of VSP-like text, with the Qwen special tokens and
chat template; a PIL-backed image processor with small pixel bounds; a Qwen2.5-VL (or
Qwen2-VL / Qwen3-VL) config of a few hundred thousand parameters with random weights.
`save_tiny_model` writes a folder that `from_pretrained` loads offline, exactly like a real
checkpoint, so the same loading code serves `Qwen/Qwen2.5-VL-7B-Instruct` and the demo.
"""

from __future__ import annotations

import os
from pathlib import Path

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen2-VL / Qwen2.5-VL chat template (images become vision_start + image_pad + vision_end).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "As a professional maze solver, your task is to analyze a grid-based map and devise an action plan",
    "that enables a player to reach the goal from the starting point without falling into any holes.",
    "The action plan involves a series of moves: 'L' (left), 'R' (right), 'U' (up), or 'D' (down).",
    "Full Action Plan: RIGHT, UP, LEFT, DOWN. Please provide your answer. The answer is \\boxed{A}.",
    "<think> Moving to [(3,2),Ice] keeps me on the safe path, Next, Moving to [(0,2),Target] ensures",
    "success. Falling into a hole results in defeat. </think> A. Action Success. B. Action Failed.",
    "Which candidate patch fills the hole in the reference image? Answer with the letter, 0123456789.",
    "You FIRST think about the reasoning process as an internal monologue and then provide the final",
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. \\boxed{RRDDLU}",
]

# Architecture of the tiny models: hidden 64, 2 layers, head_dim 16 (so mrope sums to 8).
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112
# One merged vision token covers patch_size x merge_size = 28 px: maps drawn with 28 px tiles
# (`mirage-trl data vsp --tile-px 28`) give exactly one token per tile when the processor keeps
# their size, which these bounds do up to 8 x 8 maps (`image_pixels="tiles"`).
VISION_TOKEN_PX = 28
TILE_MIN_PIXELS = VISION_TOKEN_PX * VISION_TOKEN_PX
TILE_MAX_PIXELS = (8 * VISION_TOKEN_PX) ** 2
MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")


# What a benchmark tokenizer keeps apart (everything else may merge into long pieces): digits, the
# move letters of a plan, the words that name moves, cells and choices, and the span and think markers.
# A model then reads a constant instruction as a few tokens and still spells out every answer.
BENCHMARK_SPLIT = (
    r"<output_image>|</?think>|\d|[LRUD](?=[LRUD}])|(?<=[{LRUD])[LRUD]"
    r"|\b(?:LEFT|RIGHT|UP|DOWN|Ice|Hole|Target|Start|A|B|C)\b"
)
TOKENIZER_CORPORA = ("demo", "benchmarks")


def benchmark_corpus(num_maps: int = 300, seed: int = 0) -> list[str]:
    """Prompts and answers of VSP planning (direct, CoT), reasoning and grounding rows on random maps of sides 3-6."""
    import random

    from ..data import vsp

    rng = random.Random(f"mirage-tokenizer:{seed}")
    texts = []
    for _ in range(num_maps):
        desc = vsp.random_map(rng.choice([3, 4, 5, 6]), rng)
        if vsp.shortest_path(desc) is None:
            continue
        row = vsp.grounding_row(desc, "0", "map.png", "direct")
        texts += [row["text_input"], row["text_output"]]
        for style in ("direct", "cot"):
            row = vsp.planning_row(desc, "0", "map.png", style, "path.png")
            texts += [row["text_input"], row["text_output"]]
            plan = vsp.random_plan(desc, rng.choice(["success", "hole", "short"]), rng)
            if plan:
                row = vsp.reasoning_row(desc, "0", plan, "map.png", style, "step.png", 1)
                texts += [row["text_input"], row["text_output"]]
    return texts


def build_tiny_tokenizer(vocab_size: int = 600, corpus: str = "demo"):
    """A byte-level BPE `Qwen2Tokenizer` with Qwen's special tokens and VL chat template.

    corpus="demo": word-level pieces learnt from a few lines (what the tests use); "benchmarks": learnt
    from real VSP prompts and answers with `BENCHMARK_SPLIT`, so a planning prompt is a few tokens and a
    CoT answer about sixty (small models train ten times faster on such rows).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    if corpus not in TOKENIZER_CORPORA:
        raise ValueError(f"unknown tokenizer corpus {corpus!r}; choose one of {TOKENIZER_CORPORA}")
    tok = Tokenizer(models.BPE())
    if corpus == "benchmarks":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(BENCHMARK_SPLIT), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        texts = benchmark_corpus()
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        texts = _CORPUS * 4
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Qwen2Tokenizer rebuilds its own word-level pre-tokenizer when loaded; the generic fast tokenizer
    # keeps tokenizer.json as trained, so a saved benchmark tokenizer loads exactly as built.
    cls = Qwen2TokenizerFast if corpus == "demo" else PreTrainedTokenizerFast
    tokenizer = cls(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
        model_max_length=4096,
    )
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


IMAGE_PIXELS = ("demo", "tiles")


def build_tiny_image_processor(image_pixels: str = "demo"):
    """image_pixels="demo": small bounds (few tokens per image); "tiles": keep 28 px-tile maps as drawn."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if image_pixels not in IMAGE_PIXELS:
        raise ValueError(f"unknown image_pixels {image_pixels!r}; choose one of {IMAGE_PIXELS}")
    if image_pixels == "tiles":
        return Qwen2VLImageProcessorPil(min_pixels=TILE_MIN_PIXELS, max_pixels=TILE_MAX_PIXELS)
    return Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)


def build_tiny_processor(model_type: str = "qwen2_5_vl", tokenizer=None, image_pixels: str = "demo"):
    """A processor without a video processor (torchvision is not installed here)."""
    from .processors import processor_class

    tokenizer = tokenizer or build_tiny_tokenizer()
    cls = processor_class(model_type)
    return cls(
        image_processor=build_tiny_image_processor(image_pixels),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )


def tiny_config(model_type: str = "qwen2_5_vl", tokenizer=None, spare_rows: int = 16, **text_overrides):
    """Config of a random tiny Qwen-VL whose token ids agree with `tokenizer`."""
    from transformers import AutoConfig

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown tiny model type {model_type!r}; choose one of {MODEL_TYPES}")
    tokenizer = tokenizer or build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = dict(TINY_TEXT, **text_overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
    # Spare rows beyond the tokenizer, as real Qwen checkpoints have, so new tokens need no resize.
    text.update(
        vocab_size=len(tokenizer) + spare_rows,
        rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    out_hidden = text["hidden_size"]
    if model_type == "qwen3_vl":
        text.update(head_dim=head_dim)
        vision = dict(
            TINY_VISION,
            out_hidden_size=out_hidden,
            patch_size=14,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1],
        )
    else:
        vision = dict(TINY_VISION, patch_size=14)
        if model_type == "qwen2_5_vl":
            vision.update(out_hidden_size=out_hidden, fullatt_block_indexes=[1], window_size=56)
        else:
            vision = dict(
                depth=2, embed_dim=32, hidden_size=out_hidden, mlp_ratio=2, num_heads=2, patch_size=14
            )
    return AutoConfig.for_model(
        model_type,
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def config_from_file(path: str | os.PathLike, tokenizer):
    """A Qwen-VL config read from a config.json (e.g. bench/configs/qwen2_5_vl_7b_instruct.json) with its
    special-token ids moved to `tokenizer`'s: a real architecture with random weights that the
    local tokenizer can drive (throughput runs where no hub is reachable)."""
    import json

    from transformers import AutoConfig

    from ..errors import MirageError

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MirageError(f"{path}: cannot read a model config: {err}") from None
    d.pop("_comment", None)
    if d.get("model_type") not in MODEL_TYPES:
        raise MirageError(
            f"{path}: model_type {d.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}"
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text = d.setdefault("text_config", {})
    vocab = text.get("vocab_size", d.get("vocab_size", 0))
    if vocab < len(tokenizer):
        raise MirageError(f"{path}: vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    # the ids move before the config is built (it checks them against the vocabulary)
    d.update(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text.update(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]
    )
    return AutoConfig.for_model(**d)


def build_tiny_model(
    model_type: str = "qwen2_5_vl",
    seed: int = 0,
    dtype=None,
    config_file=None,
    tokenizer_corpus: str = "demo",
    vocab_size: int = 600,
    image_pixels: str = "demo",
    **text_overrides,
):
    """Return (model, processor): a random tiny Qwen-VL and a matching processor.

    `config_file`: random weights with that config's architecture instead (see `config_from_file`).
    `tokenizer_corpus`, `vocab_size`: see `build_tiny_tokenizer`; `image_pixels`: see
    `build_tiny_image_processor`; `text_overrides`: text-config fields (hidden_size, num_hidden_layers, ...).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    if config_file is not None:
        processor = build_tiny_processor(_model_type_of(config_file))
        config = config_from_file(config_file, processor.tokenizer)
    else:
        tokenizer = build_tiny_tokenizer(vocab_size, corpus=tokenizer_corpus)
        processor = build_tiny_processor(model_type, tokenizer, image_pixels)
        config = tiny_config(model_type, processor.tokenizer, **text_overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.float32)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval(), processor


def _model_type_of(config_file) -> str:
    import json

    from ..errors import MirageError

    try:
        return json.loads(Path(config_file).read_text()).get("model_type", "")
    except (OSError, ValueError) as err:
        raise MirageError(f"{config_file}: cannot read a model config: {err}") from None


def save_tiny_model(
    out_dir: str | os.PathLike, model_type: str = "qwen2_5_vl", seed: int = 0, overwrite: bool = True, **kw
) -> Path:
    """Write a tiny model + processor folder that `from_pretrained` loads offline."""
    from ..io import atomic_dir, check_output_dir

    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    model, processor = build_tiny_model(model_type, seed=seed, **kw)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out_dir
