"""Tiny random vision-language models of every supported family, for tests and the offline demo.

No hub is reachable here, so `build_tiny_model` makes everything from scratch: a byte-level
BPE tokenizer trained on a few kilobytes of VSP-like text, with the family's special tokens and
chat template (Qwen's, or Gemma 3's turn and image tokens); a PIL-backed image processor with small
pixel bounds; a Qwen2.5-VL (or Qwen2-VL, Qwen3-VL, Qwen3.5, Gemma 3) config of a few hundred thousand
parameters with random weights.
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

GEMMA3_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# Gemma 3's chat template, in short: a system turn opens the first user turn, the assistant is "model",
# an image is <start_of_image> (which the processor expands to the image's soft tokens).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set prefix = namespace(text='') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set prefix.text = (message['content'] if message['content'] is string "
    "else message['content'][0]['text']) + '\n\n' %}{% else %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['role'] == 'user' %}{{ prefix.text }}{% set prefix.text = '' %}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

INTERNVL_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# InternVL's template is Qwen's, with an image written as <IMG_CONTEXT> (the processor expands it to
# <img>, the context tokens of each tile, </img>).
INTERNVL_CHAT_TEMPLATE = QWEN_VL_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n"
).replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")
INTERNVL_TINY_IMAGE_PX = 56  # 4 x 4 patches of 14 px, pixel-shuffled to 2 x 2 = 4 tokens per image

SMOLVLM_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                          "<global-img>", "<image>", "<video>"]  # fmt: skip
# SmolVLM's template: "User:" / "Assistant:" turns closed by <end_of_utterance>, an image as <image> (the
# processor expands it to <fake_token_around_image><global-img>, its image tokens, <fake_token_around_image>).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}{% if message['content'][0]['type'] == 'image' %}:"
    "{% else %}: {% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
SMOLVLM_TINY_IMAGE_PX = 56  # 4 x 4 patches of 14 px, pixel-shuffled (scale 2) to 4 tokens per image

LLAVA_OV_SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ["<image>", "<video>"]
LLAVA_OV_CHAT_TEMPLATE = QWEN_VL_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<image>\n"
).replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")
LLAVA_OV_TINY_IMAGE_PX = 56  # a 56 px base view of 4 x 4 patches; crops on a grid of up to 2 x 2 views
LLAVA_OV_TINY_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]

# Per family of tiny model: (special tokens, chat template, eos, pad, bos, extra special token attributes)
_TINY_CHAT = {
    "qwen": (QWEN_SPECIAL_TOKENS, QWEN_VL_CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>", None, {}),
    "internvl": (
        INTERNVL_SPECIAL_TOKENS,
        INTERNVL_CHAT_TEMPLATE,
        "<|im_end|>",
        "<|endoftext|>",
        None,
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    ),
    "smolvlm": (
        SMOLVLM_SPECIAL_TOKENS,
        SMOLVLM_CHAT_TEMPLATE,
        "<end_of_utterance>",
        "<|endoftext|>",
        None,
        {},
    ),
    "llava_onevision": (
        LLAVA_OV_SPECIAL_TOKENS,
        LLAVA_OV_CHAT_TEMPLATE,
        "<|im_end|>",
        "<|endoftext|>",
        None,
        {"image_token": "<image>", "video_token": "<video>"},
    ),  # fmt: skip
    "gemma3": (
        GEMMA3_SPECIAL_TOKENS,
        GEMMA3_CHAT_TEMPLATE,
        "<eos>",
        "<pad>",
        "<bos>",
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    ),
}
GEMMA3_TINY_IMAGE_PX = 56  # 4 x 4 patches of 14 px, pooled to 2 x 2 = 4 tokens per image
GEMMA3_TINY_TOKENS_PER_IMAGE = 4


def _chat_family(model_type: str) -> str:
    return model_type if model_type in ("gemma3", "internvl", "smolvlm", "llava_onevision") else "qwen"


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
MODEL_TYPES = (
    "qwen2_5_vl",
    "qwen2_vl",
    "qwen3_vl",
    "qwen3_5",
    "gemma3",
    "internvl",
    "smolvlm",
    "llava_onevision",
)


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


def build_tiny_tokenizer(vocab_size: int = 600, corpus: str = "demo", model_type: str = "qwen2_5_vl"):
    """A byte-level BPE tokenizer with the special tokens and chat template of `model_type`'s family
    (Qwen's `Qwen2Tokenizer` for the Qwen families; Gemma 3's turn and image tokens).

    corpus="demo": word-level pieces learnt from a few lines (what the tests use); "benchmarks": learnt
    from real VSP prompts and answers with `BENCHMARK_SPLIT`, so a planning prompt is a few tokens and a
    CoT answer about sixty (small models train ten times faster on such rows).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    if corpus not in TOKENIZER_CORPORA:
        raise ValueError(f"unknown tokenizer corpus {corpus!r}; choose one of {TOKENIZER_CORPORA}")
    family = _chat_family(model_type)
    specials, template, eos, pad, bos, extra = _TINY_CHAT[family]
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
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Qwen2Tokenizer rebuilds its own word-level pre-tokenizer when loaded; the generic fast tokenizer
    # keeps tokenizer.json as trained, so a saved benchmark tokenizer loads exactly as built.
    cls = Qwen2TokenizerFast if corpus == "demo" and family == "qwen" else PreTrainedTokenizerFast
    named = {eos, pad, bos, *extra.values()}
    tokenizer = cls(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        additional_special_tokens=[t for t in specials if t not in named],
        extra_special_tokens=extra,
        model_max_length=4096,
    )
    tokenizer.chat_template = template
    return tokenizer


IMAGE_PIXELS = ("demo", "tiles")


def build_tiny_image_processor(image_pixels: str = "demo", model_type: str = "qwen2_5_vl"):
    """image_pixels="demo": small bounds (few tokens per image); "tiles": keep 28 px-tile maps as drawn
    (the Qwen families; the others resize every image to one size)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if image_pixels not in IMAGE_PIXELS:
        raise ValueError(f"unknown image_pixels {image_pixels!r}; choose one of {IMAGE_PIXELS}")
    if model_type in _TINY_IMAGE_SETTINGS:  # fixed-size families: the family's own PIL image processor
        from .families import family
        from .processors import import_class

        fam = family(model_type)
        if image_pixels == "tiles":
            raise ValueError(
                f"image_pixels='tiles' needs a dynamic-resolution family (Qwen); {fam.name} resizes images"
            )
        return import_class(fam.image_processor)(**_TINY_IMAGE_SETTINGS[model_type])
    if image_pixels == "tiles":
        return Qwen2VLImageProcessorPil(min_pixels=TILE_MIN_PIXELS, max_pixels=TILE_MAX_PIXELS)
    return Qwen2VLImageProcessorPil(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)


# The tiny image processors of the families that resize every image to one size (Qwen's keep the size).
_TINY_IMAGE_SETTINGS = {
    "llava_onevision": {
        "size": {"height": LLAVA_OV_TINY_IMAGE_PX, "width": LLAVA_OV_TINY_IMAGE_PX},
        "image_grid_pinpoints": LLAVA_OV_TINY_PINPOINTS,
    },
    "smolvlm": {
        "size": {"longest_edge": SMOLVLM_TINY_IMAGE_PX},
        "max_image_size": {"longest_edge": SMOLVLM_TINY_IMAGE_PX},
        "do_image_splitting": False,
    },
    "internvl": {
        "size": {"height": INTERNVL_TINY_IMAGE_PX, "width": INTERNVL_TINY_IMAGE_PX},
        "crop_to_patches": False,
    },
    "gemma3": {"size": {"height": GEMMA3_TINY_IMAGE_PX, "width": GEMMA3_TINY_IMAGE_PX}},
}
# What each family's tiny processor is told beyond its parts: how many tokens an image becomes.
_TINY_PROCESSOR_SETTINGS = {
    "llava_onevision": {
        "num_image_tokens": (LLAVA_OV_TINY_IMAGE_PX // 14) ** 2,
        "vision_feature_select_strategy": "full",
    },
    "smolvlm": {"image_seq_len": 4},
    "internvl": {"image_seq_length": 4},
    "gemma3": {"image_seq_length": GEMMA3_TINY_TOKENS_PER_IMAGE},
}


def build_tiny_processor(model_type: str = "qwen2_5_vl", tokenizer=None, image_pixels: str = "demo"):
    """A processor without a video processor (torchvision is not installed here)."""
    from .families import family
    from .processors import processor_class

    tokenizer = tokenizer or build_tiny_tokenizer(model_type=model_type)
    cls = processor_class(model_type)
    image_processor = build_tiny_image_processor(image_pixels, model_type)
    kw = dict(_TINY_PROCESSOR_SETTINGS.get(model_type, {}))
    if family(model_type).video_processor:  # the image-only processor still takes the argument
        kw["video_processor"] = None
    chat_template = _TINY_CHAT[_chat_family(model_type)][1]
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kw)


def tiny_config(model_type: str = "qwen2_5_vl", tokenizer=None, spare_rows: int = 16, **text_overrides):
    """Config of a random tiny model of `model_type` whose token ids agree with `tokenizer`."""
    from transformers import AutoConfig

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown tiny model type {model_type!r}; choose one of {MODEL_TYPES}")
    tokenizer = tokenizer or build_tiny_tokenizer(model_type=model_type)
    if model_type == "gemma3":
        return _tiny_gemma3_config(tokenizer, spare_rows, **text_overrides)
    if model_type == "internvl":
        return _tiny_internvl_config(tokenizer, spare_rows, **text_overrides)
    if model_type == "smolvlm":
        return _tiny_smolvlm_config(tokenizer, spare_rows, **text_overrides)
    if model_type == "llava_onevision":
        return _tiny_llava_onevision_config(tokenizer, spare_rows, **text_overrides)
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
    if model_type == "qwen3_5":  # hybrid: a gated-delta (linear attention) layer, then a full-attention one
        rotary = head_dim // 2  # partial rotary factor 0.5
        text.update(
            head_dim=head_dim,
            layer_types=[
                "linear_attention" if i % 2 == 0 else "full_attention"
                for i in range(text["num_hidden_layers"])
            ],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [rotary // 2 - 2 * (rotary // 6), rotary // 6, rotary // 6],
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        )
    if model_type in ("qwen3_vl", "qwen3_5"):
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


def _tiny_gemma3_config(tokenizer, spare_rows: int = 16, **text_overrides):
    """A random tiny Gemma 3: a 2-layer SigLIP tower, 4 tokens per image, a text model with one sliding-window
    layer (window 8, so the window matters on every row) and one full-attention layer."""
    from transformers import AutoConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_SPECIAL_TOKENS}
    text = dict(TINY_TEXT, **text_overrides)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    layers = text["num_hidden_layers"]
    text.update(
        vocab_size=len(tokenizer) + spare_rows,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=8,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        bos_token_id=ids["<bos>"],
        eos_token_id=ids["<eos>"],
        pad_token_id=ids["<pad>"],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=GEMMA3_TINY_IMAGE_PX,
        patch_size=14,
    )
    return AutoConfig.for_model(
        "gemma3",
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=GEMMA3_TINY_TOKENS_PER_IMAGE,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


TINY_VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14
)


def _tiny_text(tokenizer, specials, model_type, bos, eos, pad, spare_rows, text_overrides):
    """(special-token ids, text config) of a tiny LLaVA-style model: `TINY_TEXT` with the tokenizer's ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    text = dict(TINY_TEXT, **text_overrides)
    text.update(
        model_type=model_type,
        vocab_size=len(tokenizer) + spare_rows,
        bos_token_id=ids[bos],
        eos_token_id=ids[eos],
        pad_token_id=ids[pad],
        tie_word_embeddings=False,
    )
    return ids, text


def _tiny_internvl_config(tokenizer, spare_rows: int = 16, **text_overrides):
    """A random tiny InternVL: a 2-layer InternViT on 56 px images, pixel shuffle to 4 tokens, a Qwen2 text model."""
    from transformers import AutoConfig

    ids, text = _tiny_text(
        tokenizer, INTERNVL_SPECIAL_TOKENS, "qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>", spare_rows,
        text_overrides,
    )  # fmt: skip
    px = INTERNVL_TINY_IMAGE_PX
    vision = dict(TINY_VIT, image_size=[px, px], patch_size=[14, 14])
    return AutoConfig.for_model(
        "internvl",
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def _tiny_smolvlm_config(tokenizer, spare_rows: int = 16, **text_overrides):
    """A random tiny SmolVLM: a 2-layer SigLIP tower on 56 px images, pixel shuffle to 4 tokens, a Llama text model."""
    from transformers import AutoConfig

    ids, text = _tiny_text(
        tokenizer, SMOLVLM_SPECIAL_TOKENS, "llama", "<|im_start|>", "<end_of_utterance>", "<|endoftext|>",
        spare_rows, text_overrides,
    )  # fmt: skip
    vision = dict(TINY_VIT, image_size=SMOLVLM_TINY_IMAGE_PX)
    return AutoConfig.for_model(
        "smolvlm",
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<image>"],
        scale_factor=2,
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def _tiny_llava_onevision_config(tokenizer, spare_rows: int = 16, **text_overrides):
    """A random tiny LLaVA-OneVision: a 2-layer SigLIP tower on 56 px views, any-resolution crops on a grid of up
    to 2 x 2 views, a Qwen2 text model."""
    from transformers import AutoConfig

    ids, text = _tiny_text(
        tokenizer, LLAVA_OV_SPECIAL_TOKENS, "qwen2", "<|endoftext|>", "<|im_end|>", "<|endoftext|>", spare_rows,
        text_overrides,
    )  # fmt: skip
    vision = dict(
        TINY_VIT, model_type="siglip_vision_model", image_size=LLAVA_OV_TINY_IMAGE_PX, vision_use_head=False
    )
    return AutoConfig.for_model(
        "llava_onevision",
        text_config=text,
        vision_config=vision,
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=LLAVA_OV_TINY_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
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
    """Return (model, processor): a random tiny model of `model_type` and a matching processor.

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
        tokenizer = build_tiny_tokenizer(vocab_size, corpus=tokenizer_corpus, model_type=model_type)
        processor = build_tiny_processor(model_type, tokenizer, image_pixels)
        config = tiny_config(model_type, processor.tokenizer, **text_overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.float32)
    if (
        config.model_type == "gemma3"
    ):  # its projector starts at zero (a checkpoint fills it): image features 0
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
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
