"""Gemma 3 and its tiny random model."""

from __future__ import annotations

import torch

from .base import TINY_TEXT, TinyModel, register
from .projector import ProjectorFamily

SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

# Gemma 3's chat template, in short: a system turn opens the first user turn, the assistant is "model",
# an image is <start_of_image> (which the processor expands to the image's soft tokens).
CHAT_TEMPLATE = (
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
TINY_IMAGE_PX = 56  # 4 x 4 patches of 14 px, pooled to 2 x 2 = 4 tokens per image
TINY_TOKENS_PER_IMAGE = 4


class Gemma3Family(ProjectorFamily):
    """Gemma 3: a SigLIP tower whose features are pooled to a fixed `mm_tokens_per_image` per image
    (every image the same size), 1-D positions, and bidirectional attention among an image's tokens
    (`token_type_ids`, 1 at the image soft tokens), with sliding-window layers."""

    name, model_type = "Gemma 3", "gemma3"
    processor = ("transformers.models.gemma3.processing_gemma3", "Gemma3Processor")
    image_processor = ("transformers.models.gemma3.image_processing_pil_gemma3", "Gemma3ImageProcessorPil")
    token_keys = ("token_type_ids",)
    end_of_turn = "<end_of_turn>"

    def token_types(self, model, input_ids):
        # The model's own rule (image soft tokens are type 1); the processor marks only <start_of_image>.
        return {"token_type_ids": self.image_mask(model, input_ids).long()}

    def attention_blocks(self, model, input_ids):
        image = self.image_mask(model, input_ids)
        before = torch.nn.functional.pad(image, (1, 0))[:, :-1]
        starts = (image & ~before).long().cumsum(1) - 1  # one id per run of image tokens
        return torch.where(image, starts, -1)

    # -------------------------------------------------------------- tiny random models
    tiny = TinyModel(
        SPECIAL_TOKENS,
        CHAT_TEMPLATE,
        eos="<eos>",
        pad="<pad>",
        bos="<bos>",
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        image_processor={"size": {"height": TINY_IMAGE_PX, "width": TINY_IMAGE_PX}},
        processor={"image_seq_length": TINY_TOKENS_PER_IMAGE},
    )

    def tiny_config(self, tokenizer, spare_rows, **text_overrides):
        """A 2-layer SigLIP tower, 4 tokens per image, a text model with one sliding-window layer (window 8, so the
        window matters on every row) and one full-attention layer."""
        from transformers import AutoConfig

        ids = self.tiny.ids(tokenizer)
        size = dict(TINY_TEXT, **text_overrides)
        head_dim = size["hidden_size"] // size["num_attention_heads"]
        layers = size["num_hidden_layers"]
        text = self.tiny.text_config(
            tokenizer,
            spare_rows,
            text_overrides,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=8,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=TINY_IMAGE_PX,
            patch_size=14,
        )
        return AutoConfig.for_model(
            "gemma3",
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=TINY_TOKENS_PER_IMAGE,
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
        )

    def tiny_init(self, model):
        # its projector starts at zero (a checkpoint fills it): image features would be 0
        with torch.no_grad():
            self.inner(model).multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)


register(Gemma3Family())
