"""LLaVA-OneVision and its tiny random model."""

from __future__ import annotations

import torch

from .base import TINY_VIT, TinyModel, register
from .projector import ProjectorFamily
from .qwen_vl import CHAT_TEMPLATE as QWEN_CHAT_TEMPLATE
from .qwen_vl import SPECIAL_TOKENS as QWEN_SPECIAL_TOKENS

SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + ("<image>", "<video>")
CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<image>\n"
).replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>\n")
TINY_IMAGE_PX = 56  # a 56 px base view of 4 x 4 patches; crops on a grid of up to 2 x 2 views
TINY_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


class LlavaOnevisionFamily(ProjectorFamily):
    """LLaVA-OneVision: a SigLIP tower and an MLP projector over any-resolution crops (a base view plus the
    crops of a grid chosen for the image size; one newline feature per row), a Qwen2 language model with 1-D
    positions. `pixel_values` are (images, crops, 3, H, W) padded to the most crops, with `image_sizes` and
    `batch_num_images` (a sample with several images gets no crops)."""

    name, model_type = "LLaVA-OneVision", "llava_onevision"
    processor = ("transformers.models.llava_onevision.processing_llava_onevision", "LlavaOnevisionProcessor")
    image_processor = (
        "transformers.models.llava_onevision.image_processing_pil_llava_onevision",
        "LlavaOnevisionImageProcessorPil",
    )
    video_processor = "LlavaOnevisionVideoProcessor"
    vision_keys = ("pixel_values", "image_sizes", "batch_num_images")
    end_of_turn = "<|im_end|>"

    def image_features(self, model, vision):
        out = self.inner(model).get_image_features(
            vision["pixel_values"],
            vision["image_sizes"],
            batch_num_images=vision.get("batch_num_images"),
            return_dict=True,
        )
        return list(out.pooler_output)  # one (tokens, D) per image, its size's own token count

    def collate_images(self, samples):
        with_images = [s for s in samples if s.get("pixel_values") is not None]
        if not with_images:
            return {}
        crops = max(s["pixel_values"].shape[1] for s in with_images)
        pixels = [
            torch.nn.functional.pad(
                s["pixel_values"], (0, 0, 0, 0, 0, 0, 0, crops - s["pixel_values"].shape[1])
            )
            for s in with_images
        ]
        return {
            "pixel_values": torch.cat(pixels),
            "image_sizes": torch.cat([s["image_sizes"] for s in with_images]),
            "batch_num_images": torch.cat(
                [torch.as_tensor(s["batch_num_images"]).reshape(-1) for s in with_images]
            ),
        }

    def select_images(self, vision, images_per_row, start, end):
        img = torch.tensor([0, *images_per_row]).cumsum(0)
        if vision.get("pixel_values") is None or img[end] == img[start]:
            return {}
        counts = [n for n in images_per_row[start:end] if n]
        return {
            "pixel_values": vision["pixel_values"][img[start] : img[end]],
            "image_sizes": vision["image_sizes"][img[start] : img[end]],
            "batch_num_images": torch.tensor(counts, device=vision["pixel_values"].device),
        }

    # -------------------------------------------------------------- tiny random models
    tiny = TinyModel(
        SPECIAL_TOKENS,
        CHAT_TEMPLATE,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        image_processor={
            "size": {"height": TINY_IMAGE_PX, "width": TINY_IMAGE_PX},
            "image_grid_pinpoints": TINY_PINPOINTS,
        },
        processor={"num_image_tokens": (TINY_IMAGE_PX // 14) ** 2, "vision_feature_select_strategy": "full"},
    )

    def tiny_config(self, tokenizer, spare_rows, **text_overrides):
        """A 2-layer SigLIP tower on 56 px views, any-resolution crops on a grid of up to 2 x 2 views, a Qwen2 text
        model."""
        from transformers import AutoConfig

        text = self.tiny.text_config(
            tokenizer,
            spare_rows,
            text_overrides,
            bos="<|endoftext|>",
            model_type="qwen2",
            tie_word_embeddings=False,
        )
        ids = self.tiny.ids(tokenizer)
        return AutoConfig.for_model(
            "llava_onevision",
            text_config=text,
            vision_config=dict(
                TINY_VIT, model_type="siglip_vision_model", image_size=TINY_IMAGE_PX, vision_use_head=False
            ),
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            image_grid_pinpoints=TINY_PINPOINTS,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )


register(LlavaOnevisionFamily())
