"""SmolVLM (Idefics3's architecture) and its tiny random model."""

from __future__ import annotations

import torch

from .base import TINY_VIT, ModelFamily, TinyModel, register

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                  "<global-img>", "<image>", "<video>")  # fmt: skip
# SmolVLM's template: "User:" / "Assistant:" turns closed by <end_of_utterance>, an image as <image> (the
# processor expands it to <fake_token_around_image><global-img>, its image tokens, <fake_token_around_image>).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}{% if message['content'][0]['type'] == 'image' %}:"
    "{% else %}: {% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
TINY_IMAGE_PX = 56  # 4 x 4 patches of 14 px, pixel-shuffled (scale 2) to 4 tokens per image


class SmolVLMFamily(ModelFamily):
    """SmolVLM (Idefics3's architecture): a SigLIP tower, a pixel-shuffle connector, a Llama language model with
    1-D positions; `pixel_values` are (batch, images, 3, H, W), padded with all-zero images, with a
    `pixel_attention_mask`. Mirage takes each image whole (no splitting into crops)."""

    name, model_type = "SmolVLM", "smolvlm"
    processor = ("transformers.models.smolvlm.processing_smolvlm", "SmolVLMProcessor")
    image_processor = ("transformers.models.smolvlm.image_processing_pil_smolvlm", "SmolVLMImageProcessorPil")
    video_processor = "SmolVLMVideoProcessor"
    vision_keys = ("pixel_values", "pixel_attention_mask")
    end_of_turn = "<end_of_utterance>"
    # one global image each (no crops): a helper image has one feature set
    image_processor_settings = {"do_image_splitting": False}
    generic_chat_template = True

    inner_attributes = ("connector", "text_model")

    def vision_tower(self, model):
        return self.inner(model).vision_model

    def language_model(self, model):
        return self.inner(model).text_model

    def image_token_ids(self, config):
        return [config.image_token_id]

    def image_features(self, model, vision):
        inner = self.inner(model)
        per_sample = inner.get_image_features(
            vision["pixel_values"], vision.get("pixel_attention_mask"), return_dict=True
        )
        feats = torch.cat(list(per_sample.pooler_output))
        cfg = inner.config
        per_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor**2
        return list(feats.split(per_image))

    def collate_images(self, samples):
        pixels = [s.get("pixel_values") for s in samples]
        if all(p is None for p in pixels):
            return {}
        shape = next(p for p in pixels if p is not None).shape[2:]
        n = max(p.shape[1] for p in pixels if p is not None)
        out = torch.zeros(len(samples), n, *shape)  # a sample without images gets all-zero (padding) images
        mask = torch.zeros(len(samples), n, *shape[1:], dtype=torch.long)
        for b, s in enumerate(samples):
            if s.get("pixel_values") is not None:
                out[b, : s["pixel_values"].shape[1]] = s["pixel_values"][0]
                mask[b, : s["pixel_values"].shape[1]] = s["pixel_attention_mask"][0]
        return {"pixel_values": out, "pixel_attention_mask": mask}

    def select_images(self, vision, images_per_row, start, end):
        if vision.get("pixel_values") is None or sum(images_per_row[start:end]) == 0:
            return {}
        return {k: vision[k][start:end] for k in self.vision_keys if vision.get(k) is not None}

    # -------------------------------------------------------------- tiny random models
    tiny = TinyModel(
        SPECIAL_TOKENS,
        CHAT_TEMPLATE,
        eos="<end_of_utterance>",
        pad="<|endoftext|>",
        image_processor={
            "size": {"longest_edge": TINY_IMAGE_PX},
            "max_image_size": {"longest_edge": TINY_IMAGE_PX},
            "do_image_splitting": False,
        },
        processor={"image_seq_len": 4},
    )

    def tiny_config(self, tokenizer, spare_rows, **text_overrides):
        """A 2-layer SigLIP tower on 56 px images, pixel shuffle to 4 tokens, a Llama text model."""
        from transformers import AutoConfig

        text = self.tiny.text_config(
            tokenizer,
            spare_rows,
            text_overrides,
            bos="<|im_start|>",
            model_type="llama",
            tie_word_embeddings=False,
        )
        ids = self.tiny.ids(tokenizer)
        return AutoConfig.for_model(
            "smolvlm",
            text_config=text,
            vision_config=dict(TINY_VIT, image_size=TINY_IMAGE_PX),
            image_token_id=ids["<image>"],
            scale_factor=2,
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        )


register(SmolVLMFamily())
