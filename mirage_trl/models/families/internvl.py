"""InternVL (transformers' format) and its tiny random model."""

from __future__ import annotations

from .base import TINY_VIT, TinyModel, register
from .projector import ProjectorFamily
from .qwen_vl import CHAT_TEMPLATE as QWEN_CHAT_TEMPLATE
from .qwen_vl import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ("<img>", "</img>", "<IMG_CONTEXT>", "<video>")
# InternVL's template is Qwen's, with an image written as <IMG_CONTEXT> (the processor expands it to
# <img>, the context tokens of each tile, </img>).
CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n"
).replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")
TINY_IMAGE_PX = 56  # 4 x 4 patches of 14 px, pixel-shuffled to 2 x 2 = 4 tokens per image


class InternVLFamily(ProjectorFamily):
    """InternVL (transformers' format, e.g. InternVL3-8B-hf): an InternViT tower, pixel shuffle and an MLP
    projector, a Qwen2 language model; each image is `<img>`, `image_seq_length` `<IMG_CONTEXT>` tokens per
    tile, `</img>`. Mirage takes one tile per image (crop_to_patches false)."""

    name, model_type = "InternVL", "internvl"
    processor = ("transformers.models.internvl.processing_internvl", "InternVLProcessor")
    image_processor = (
        "transformers.models.got_ocr2.image_processing_pil_got_ocr2",
        "GotOcr2ImageProcessorPil",
    )
    video_processor = "InternVLVideoProcessor"
    end_of_turn = "<|im_end|>"
    # one tile per image: a helper image's features are then its tiles' (the checkpoints' own processors tile
    # large images, which would give a helper image several feature sets)
    image_processor_settings = {"crop_to_patches": False}

    # -------------------------------------------------------------- tiny random models
    tiny = TinyModel(
        SPECIAL_TOKENS,
        CHAT_TEMPLATE,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        image_processor={"size": {"height": TINY_IMAGE_PX, "width": TINY_IMAGE_PX}, "crop_to_patches": False},
        processor={"image_seq_length": 4},
    )

    def tiny_config(self, tokenizer, spare_rows, **text_overrides):
        """A 2-layer InternViT on 56 px images, pixel shuffle to 4 tokens, a Qwen2 text model."""
        from transformers import AutoConfig

        text = self.tiny.text_config(
            tokenizer,
            spare_rows,
            text_overrides,
            bos="<|endoftext|>",
            model_type="qwen2",
            tie_word_embeddings=False,
        )
        px = TINY_IMAGE_PX
        return AutoConfig.for_model(
            "internvl",
            text_config=text,
            vision_config=dict(TINY_VIT, image_size=[px, px], patch_size=[14, 14]),
            image_token_id=self.tiny.ids(tokenizer)["<IMG_CONTEXT>"],
            image_seq_length=4,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )


register(InternVLFamily())
