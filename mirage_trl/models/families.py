"""Model families: the one place that knows how a vision-language architecture takes its images and positions.

Mirage itself is architecture-free: latent slots are input-embedding positions (`latent.slots`), stage 2
runs the language model's layers (`latent.stage2`), decoding feeds hidden states back (`generation`). What
differs between families is small and lives here, one `ModelFamily` per architecture, found from the
config's `model_type` (`family`):

- which processor and image processor load a checkpoint, and which video processor its saved
  `processor_config.json` names (`processor`, `video_processor`);
- where the parts are: the inner vision-language module and its vision tower (`inner`, `vision_tower`);
- which inputs carry images (`vision_keys`: what the processor returns and the model's forward takes),
  which of them are per-token (`token_keys`), and how a batch's image inputs are cut by row
  (`select_images`);
- which tokens are image placeholders (`image_mask`, `token_types`);
- how positions work (`position_ids`: the full-sequence positions the model computes itself, with
  `position_rows` rows: 3 for the Qwen families' M-RoPE, 1 for 1-D positions; `model_positions` gives
  the model the layout its forward takes);
- the helper images' features in the language model's embedding space, one tensor per image, for the
  stage-1 targets (`image_features`), and how samples' image inputs make a batch (`collate_images`);
- what the stage-2 rounds must reproduce: the language model they run (`language_model`), token blocks
  that attend both ways (`attention_blocks`: Gemma 3's images), and whether per-sample recurrent states
  forbid packing samples in one row (`recurrent_layers`: Qwen3.5);
- the chat turn's closing token and the processor settings Mirage needs (`end_of_turn`,
  `image_processor_settings`).

Everything else (collator, slots, stage 1, stage 2, decoding, GRPO, eval, export) asks the family; no
library code outside this module tests a model type (the tiny factories of `models.tiny` build one of each).
"""

from __future__ import annotations

import torch

from ..errors import MirageError

RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "conv")
# What the families call their language model's module (`language_model`; SmolVLM: `text_model`): LoRA's
# "all-linear" targets layers under these names only, never the vision tower's.
LANGUAGE_MODEL_MODULES = ("language_model", "text_model")


class ModelFamily:
    """What Mirage needs to know about one vision-language architecture (see the module doc)."""

    name: str = ""  # as users know it, e.g. "Qwen2.5-VL"
    model_type: str = ""  # the config's model_type
    processor: tuple[str, str] = ("", "")  # (module, class) of the stock processor
    image_processor: tuple[str, str] = ("", "")  # (module, class) of its PIL image processor (no torchvision)
    image_processor_settings: dict = {}  # what Mirage sets on a loaded image processor (see InternVL)
    # the stock processor's own apply_chat_template reads its video processor (which Mirage leaves out):
    # the image-only variant renders with transformers' generic one (SmolVLM)
    generic_chat_template: bool = False
    video_processor: str | None = None  # the video processor class a stock processor_config.json names
    vision_keys: tuple[str, ...] = ("pixel_values",)  # image inputs of the processor and the forward
    token_keys: tuple[str, ...] = ()  # per-token inputs (B, L) that go with the images
    position_rows: int = 1
    end_of_turn: str | None = None  # the token that closes a chat turn (trained after each answer)

    # -------------------------------------------------------------- parts
    inner_attributes: tuple[str, ...] = ()  # what the inner vision-language module has (how it is found)

    def inner(self, model) -> torch.nn.Module:
        """The inner vision-language module (vision tower + language model, no LM head)."""
        from ..latent.model_utils import unwrap

        top = unwrap(model)
        for module in top.modules():
            if all(hasattr(module, a) for a in self.inner_attributes):
                return module
        raise MirageError(f"{type(top).__name__} is not a {self.name} model with a vision tower")

    def vision_tower(self, model) -> torch.nn.Module:
        raise NotImplementedError

    # -------------------------------------------------------------- tokens and positions
    def image_token_ids(self, config) -> list[int]:
        """Ids of the placeholder tokens that the vision features replace."""
        raise NotImplementedError

    def image_mask(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the image placeholder positions, from the ids themselves."""
        from ..latent.model_utils import unwrap

        ids = self.image_token_ids(unwrap(model).config)
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def token_types(self, model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-token image inputs (`token_keys`) derived from the ids (the one source of truth:
        a processor builds them on the tokenizer's padding side, which TRL's left-padded prompts break)."""
        return {}

    def position_ids(self, model, input_ids, attention_mask, vision: dict | None = None) -> torch.Tensor:
        """(position_rows, B, L) positions of the unpadded sequences, as the model computes them itself."""
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None]

    def attention_blocks(self, model, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, L) ids of the token blocks that attend to each other both ways (an image's tokens, for
        families whose images attend bidirectionally), -1 elsewhere; None where attention is causal."""
        return None

    def language_model(self, model) -> torch.nn.Module:
        """The inner language model (decoder layers and final norm), whose attention the stage-2 rounds replace."""
        return self.inner(model).language_model

    def collate_images(self, samples: list[dict]) -> dict:
        """The image inputs of a batch from its samples' (processed one sample at a time): here every image's
        entries, concatenated in batch order (the model finds each sample's placeholders)."""
        with_images = [s for s in samples if self.vision_keys[0] in s]
        if not with_images:
            return {}
        return {k: torch.cat([s[k] for s in with_images]) for k in self.vision_keys}

    def recurrent_layers(self, model) -> bool:
        """Whether the language model has layers with a recurrent state per sample (linear attention, as in
        Qwen3.5's gated-delta layers): packing samples in one row would mix their states."""
        from ..latent.model_utils import unwrap

        config = unwrap(model).config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return any(t in RECURRENT_LAYER_TYPES for t in getattr(text, "layer_types", None) or ())

    def model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """`positions` (position_rows, B, L) in the layout the model's forward takes."""
        return positions if self.position_rows > 1 else positions[0]

    def image_inputs(self, model, batch: dict) -> dict:
        """What goes to the model's forward with the ids of `batch`: its image inputs (those present) and,
        with them, their per-token companions derived from the ids (`token_types`)."""
        images = {k: batch[k] for k in self.vision_keys if batch.get(k) is not None}
        if images:
            images.update(self.token_types(model, batch["input_ids"]))
        return images

    # -------------------------------------------------------------- images
    def image_features(self, model, vision: dict) -> list[torch.Tensor]:
        """The features of a batch of images in the language model's embedding space: one (n_i, D) per image."""
        raise NotImplementedError

    def select_images(self, vision: dict, images_per_row: list[int], start: int, end: int) -> dict:
        """The image inputs of rows [start, end) of a batch whose rows hold `images_per_row` images."""
        raise NotImplementedError


class QwenVLFamily(ModelFamily):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: dynamic-resolution images (`pixel_values` as patches, one
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
        from ..latent.model_utils import unwrap

        config = unwrap(model).config
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        for value, name in ((1, "image_token_id"), (2, "video_token_id")):
            token = getattr(config, name, None)
            if token is not None:
                types[input_ids == token] = value
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
        img = torch.tensor([0, *images_per_row]).cumsum(0)
        patches = torch.split(grid.prod(-1), list(images_per_row))
        patch = torch.tensor([0, *(int(p.sum()) for p in patches)]).cumsum(0)
        if img[end] == img[start]:
            return {}
        return {
            "pixel_values": pixels[patch[start] : patch[end]],
            "image_grid_thw": grid[img[start] : img[end]],
        }


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


_QWEN = "transformers.models.{0}.processing_{0}"
FAMILIES: dict[str, ModelFamily] = {
    f.model_type: f
    for f in (
        QwenVLFamily(
            "Qwen2-VL", "qwen2_vl", (_QWEN.format("qwen2_vl"), "Qwen2VLProcessor"), "Qwen2VLVideoProcessor"
        ),
        QwenVLFamily(
            "Qwen2.5-VL",
            "qwen2_5_vl",
            (_QWEN.format("qwen2_5_vl"), "Qwen2_5_VLProcessor"),
            "Qwen2VLVideoProcessor",
        ),
        QwenVLFamily(
            "Qwen3-VL", "qwen3_vl", (_QWEN.format("qwen3_vl"), "Qwen3VLProcessor"), "Qwen3VLVideoProcessor"
        ),
        QwenVLFamily(
            "Qwen3.5", "qwen3_5", (_QWEN.format("qwen3_vl"), "Qwen3VLProcessor"), "Qwen3VLVideoProcessor"
        ),
        Gemma3Family(),
        InternVLFamily(),
        SmolVLMFamily(),
        LlavaOnevisionFamily(),
    )
}

# The vision-language model types Mirage trains.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def unsupported(model_type) -> MirageError:
    return MirageError(
        f"model type {model_type!r} is not a supported vision-language model; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def family(what) -> ModelFamily:
    """The family of a model (any wrapper), a config or a `model_type` string."""
    if isinstance(what, str):
        model_type = what
    else:
        from ..latent.model_utils import unwrap

        config = unwrap(what).config if isinstance(what, torch.nn.Module) else what
        model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if isinstance(what, torch.nn.Module):
        raise MirageError(
            f"{type(unwrap(what)).__name__} is not a vision-language model with a vision tower that mirage-trl "
            f"supports (model type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    raise unsupported(model_type)


def processor_family(processor) -> ModelFamily:
    """The family of a processor (the stock class or its image-only variant; a bare tokenizer: text only,
    as the Qwen families take it)."""
    names = {c.__name__ for c in type(processor).__mro__}
    for fam in FAMILIES.values():
        if fam.processor[1] in names:
            return fam
    if not hasattr(processor, "image_processor"):  # a tokenizer alone: text-only rows
        return FAMILIES["qwen2_5_vl"]
    raise MirageError(
        f"{type(processor).__name__} is not the processor of a supported vision-language model; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
