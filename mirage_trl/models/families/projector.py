"""LLaVA-style families (a vision tower, a `multi_modal_projector`, a language model with 1-D positions): what
Gemma 3, InternVL and LLaVA-OneVision share."""

from __future__ import annotations

import torch

from ...errors import MirageError
from .base import ModelFamily


class ProjectorFamily(ModelFamily):
    """LLaVA-style models: a vision tower, a `multi_modal_projector` and a language model with 1-D positions;
    `pixel_values` hold one entry per image (or per tile) and the projected features replace the
    `image_token_id` placeholders."""

    vision_keys = ("pixel_values",)

    inner_attributes = ("multi_modal_projector", "language_model")

    def vision_tower(self, model):
        return self.inner(model).vision_tower

    def image_token_ids(self, config):
        return [config.image_token_id]

    def image_features(self, model, vision):
        out = self.inner(model).get_image_features(vision["pixel_values"], return_dict=True).pooler_output
        return list(out)  # (images, tokens, D)

    def select_images(self, vision, images_per_row, start, end):
        pixels = vision.get("pixel_values")
        img = torch.tensor([0, *images_per_row]).cumsum(0)
        if pixels is None or img[end] == img[start]:
            return {}
        if pixels.shape[0] != int(img[-1]):
            raise MirageError(
                f"{self.name}: {pixels.shape[0]} image tiles for {int(img[-1])} images; Mirage takes one tile per "
                "image here (set the image processor's crop_to_patches to false)"
            )
        return {"pixel_values": pixels[img[start] : img[end]]}
