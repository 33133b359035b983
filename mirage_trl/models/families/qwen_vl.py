"""The Qwen vision-language families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) and their tiny random models."""

from __future__ import annotations

import torch

from .base import ModelFamily, TinyModel, import_class, register
from .parts import unwrap

SPECIAL_TOKENS = (
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
)

# The Qwen2-VL / Qwen2.5-VL chat template (images become vision_start + image_pad + vision_end).
CHAT_TEMPLATE = (
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

TINY = TinyModel(
    SPECIAL_TOKENS,
    CHAT_TEMPLATE,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    demo_tokenizer_class="Qwen2TokenizerFast",
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


class QwenVLFamily(ModelFamily):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5: dynamic-resolution images (`pixel_values` as patches, one
    `image_grid_thw` row per image), M-RoPE positions in 3 rows from `get_rope_index`, and
    `mm_token_type_ids` (1 at image placeholders, 2 at video ones)."""

    vision_keys = ("pixel_values", "image_grid_thw")
    token_keys = ("mm_token_type_ids",)
    position_rows = 3
    end_of_turn = "<|im_end|>"
    image_processor = (
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
        "Qwen2VLImageProcessorPil",
    )

    def __init__(self, name: str, model_type: str, processor: tuple[str, str], video_processor: str):
        self.name, self.model_type, self.processor, self.video_processor = (
            name,
            model_type,
            processor,
            video_processor,
        )

    inner_attributes = ("get_rope_index", "language_model")

    def vision_tower(self, model):
        return self.inner(model).visual

    def image_token_ids(self, config):
        return [
            t
            for t in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if t is not None
        ]

    def token_types(self, model, input_ids):
        config = unwrap(model).config
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        for value, name in ((1, "image_token_id"), (2, "video_token_id")):
            token = getattr(config, name, None)
            if token is not None:
                types = torch.where(input_ids == token, value, types)  # no boolean indexing: no host sync
        return {"mm_token_type_ids": types}

    def position_ids(self, model, input_ids, attention_mask, vision=None):
        vision = vision or {}
        types = vision.get("mm_token_type_ids")
        if types is None and vision.get("image_grid_thw") is None:  # no images given: text positions
            types = torch.zeros_like(input_ids, dtype=torch.int32)
        elif types is None:
            types = self.token_types(model, input_ids)["mm_token_type_ids"]
        positions, _ = self.inner(model).get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=vision.get("image_grid_thw"),
            attention_mask=attention_mask,
        )
        return positions

    def image_features(self, model, vision):
        inner = self.inner(model)
        grid = vision["image_grid_thw"]
        out = inner.get_image_features(vision["pixel_values"], grid, return_dict=True)
        per_image = out.pooler_output
        if isinstance(per_image, torch.Tensor):  # some versions return one concatenated tensor
            per_image = torch.split(per_image, self._image_sizes(vision, inner))
        return list(per_image)

    def _image_sizes(self, vision, inner):
        merge = inner.visual.spatial_merge_size
        return (vision["image_grid_thw"].prod(-1) // merge**2).tolist()

    def select_images(self, vision, images_per_row, start, end):
        grid, pixels = vision.get("image_grid_thw"), vision.get("pixel_values")
        if grid is None or pixels is None:
            return {}
        img = torch.tensor([0, *images_per_row]).cumsum(0).tolist()  # host ints: TRL's counts are a list
        if img[end] == img[start]:
            return {}
        if start == 0 and end == len(images_per_row):  # the whole batch (TRL's training pass): nothing to cut
            return {"pixel_values": pixels, "image_grid_thw": grid}
        # the rows' first and last patch: one read of the (device) grid for the slice bounds, not one per image
        patch = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)])
        first, last = patch[[img[start], img[end]]].tolist()
        return {"pixel_values": pixels[first:last], "image_grid_thw": grid[img[start] : img[end]]}

    # -------------------------------------------------------------- tiny random models
    tiny = TINY

    def tiny_image_processor(self, image_pixels):
        """Dynamic resolution: "demo" bounds give few tokens per image, "tiles" keep 28 px-tile maps as drawn."""
        if image_pixels == "tiles":
            return import_class(self.image_processor)(min_pixels=TILE_MIN_PIXELS, max_pixels=TILE_MAX_PIXELS)
        return import_class(self.image_processor)(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)

    def tiny_config(self, tokenizer, spare_rows, **text_overrides):
        from transformers import AutoConfig

        text = self.tiny.text_config(tokenizer, spare_rows, text_overrides, tie_word_embeddings=False)
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        half = head_dim // 2
        mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0}
        out_hidden = text["hidden_size"]
        if (
            self.model_type == "qwen3_5"
        ):  # hybrid: a gated-delta (linear attention) layer, then a full-attention one
            rotary = head_dim // 2  # partial rotary factor 0.5
            text.update(
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
        if self.model_type in ("qwen3_vl", "qwen3_5"):
            text.update(head_dim=head_dim)
            vision = dict(
                TINY_VISION,
                out_hidden_size=out_hidden,
                patch_size=14,
                num_position_embeddings=64,
                deepstack_visual_indexes=[1],
            )
        elif self.model_type == "qwen2_5_vl":
            vision = dict(
                TINY_VISION,
                patch_size=14,
                out_hidden_size=out_hidden,
                fullatt_block_indexes=[1],
                window_size=56,
            )
        else:
            vision = dict(
                depth=2, embed_dim=32, hidden_size=out_hidden, mlp_ratio=2, num_heads=2, patch_size=14
            )
        config = dict(text_config=text, vision_config=vision, tie_word_embeddings=False)
        self.adopt_tokenizer(config, tokenizer)
        return AutoConfig.for_model(self.model_type, **config)

    def adopt_tokenizer(self, config, tokenizer):
        ids = self.tiny.ids(tokenizer)
        config.update(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        config.setdefault("text_config", {}).update(
            bos_token_id=ids["<|endoftext|>"],
            pad_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        )


_PROCESSOR = "transformers.models.{0}.processing_{0}"
# Qwen2.5-VL (the paper's model) first; Qwen3-VL before Qwen3.5, which shares its processor class.
register(
    QwenVLFamily(
        "Qwen2.5-VL",
        "qwen2_5_vl",
        (_PROCESSOR.format("qwen2_5_vl"), "Qwen2_5_VLProcessor"),
        "Qwen2VLVideoProcessor",
    ),
    QwenVLFamily(
        "Qwen2-VL", "qwen2_vl", (_PROCESSOR.format("qwen2_vl"), "Qwen2VLProcessor"), "Qwen2VLVideoProcessor"
    ),
    QwenVLFamily(
        "Qwen3-VL", "qwen3_vl", (_PROCESSOR.format("qwen3_vl"), "Qwen3VLProcessor"), "Qwen3VLVideoProcessor"
    ),
    QwenVLFamily(
        "Qwen3.5", "qwen3_5", (_PROCESSOR.format("qwen3_vl"), "Qwen3VLProcessor"), "Qwen3VLVideoProcessor"
    ),
)
