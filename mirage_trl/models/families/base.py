"""What a model family is (`ModelFamily`), how the tests build a tiny random one (`TinyModel`), and the registry
that finds a family from a model, a config, a model type or a processor (`family`, `processor_family`).

Each family module of this package defines its `ModelFamily` (and its `TinyModel`) and registers it; the package
imports them all, so a new family is one module here (plus its recipe YAMLs).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from ...errors import MirageError
from .parts import unwrap

RECURRENT_LAYER_TYPES = ("linear_attention", "mamba", "conv")
# What the families call their language model's module (`language_model`; SmolVLM: `text_model`): LoRA's
# "all-linear" targets layers under these names only, never the vision tower's.
LANGUAGE_MODEL_MODULES = ("language_model", "text_model")


def import_class(spec: tuple[str, str]):
    """The class named by a (module, class name) pair, imported when first needed."""
    module, name = spec
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------- tiny random models
# The architecture every tiny model shares: hidden 64, 2 layers, head_dim 16 (so Qwen's mrope sums to 8).
TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
TINY_VIT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14
)


@dataclass(frozen=True)
class TinyModel:
    """How `models.tiny` builds a random tiny model of a family for the tests and the demo: the tokenizer's
    special tokens and chat template, and the settings of its image processor and processor. The config
    itself is the family's `tiny_config`."""

    special_tokens: tuple[str, ...]
    chat_template: str
    eos: str
    pad: str
    bos: str | None = None
    named_tokens: dict = field(default_factory=dict)  # the tokenizer's extra special-token attributes
    image_processor: dict = field(default_factory=dict)  # the family's PIL image processor's settings
    processor: dict = field(default_factory=dict)  # what the processor is told beyond its parts
    # the demo corpus' tokenizer class (Qwen's rebuilds its own pre-tokenizer); None: the generic fast one
    demo_tokenizer_class: str | None = None

    def ids(self, tokenizer) -> dict[str, int]:
        """The special tokens' ids in `tokenizer`."""
        return {t: tokenizer.convert_tokens_to_ids(t) for t in self.special_tokens}

    def text_config(self, tokenizer, spare_rows: int, text_overrides: dict, bos: str | None = None, **extra):
        """`TINY_TEXT` with `text_overrides`, this tokenizer's ids (`bos` names the config's bos token when it is
        not the tokenizer's), `spare_rows` beyond its vocabulary (as real checkpoints have, so new tokens need
        no resize), and `extra` fields."""
        ids = self.ids(tokenizer)
        text = dict(TINY_TEXT, **text_overrides)
        text.update(
            vocab_size=len(tokenizer) + spare_rows,
            bos_token_id=ids[bos or self.bos or self.pad],
            eos_token_id=ids[self.eos],
            pad_token_id=ids[self.pad],
            **extra,
        )
        return text


# ---------------------------------------------------------------------- the family interface
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

    # -------------------------------------------------------------- tiny random models (`models.tiny`)
    tiny: TinyModel | None = None

    def tiny_config(self, tokenizer, spare_rows: int, **text_overrides):
        """The config of a random tiny model of this family whose token ids agree with `tokenizer`."""
        raise NotImplementedError

    def tiny_image_processor(self, image_pixels: str):
        """The tiny model's image processor: the family's own PIL class with `tiny.image_processor` (every image
        resized to one size; only a dynamic-resolution family keeps 28 px tiles as drawn)."""
        if image_pixels == "tiles":
            raise ValueError(
                f"image_pixels='tiles' needs a dynamic-resolution family (Qwen); {self.name} resizes images"
            )
        return import_class(self.image_processor)(**self.tiny.image_processor)

    def tiny_init(self, model) -> None:
        """Weights a random init leaves unusable (see Gemma 3's projector)."""

    def adopt_tokenizer(self, config: dict, tokenizer) -> None:
        """Move a real config's (dict) special-token ids to `tokenizer`'s (random weights of a real architecture
        driven by the tiny tokenizer, for throughput runs)."""
        raise MirageError(f"a {self.name} config file cannot be given a tiny tokenizer yet")


# ---------------------------------------------------------------------- the registry
FAMILIES: dict[str, ModelFamily] = {}  # model_type -> family, filled by the family modules (`register`)


def register(*families: ModelFamily) -> None:
    for fam in families:
        FAMILIES[fam.model_type] = fam


def unsupported(model_type) -> MirageError:
    return MirageError(
        f"model type {model_type!r} is not a supported vision-language model; supported: {', '.join(FAMILIES)}"
    )


def family(what) -> ModelFamily:
    """The family of a model (any wrapper), a config or a `model_type` string."""
    if isinstance(what, str):
        model_type = what
    else:
        config = unwrap(what).config if isinstance(what, torch.nn.Module) else what
        model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if isinstance(what, torch.nn.Module):
        raise MirageError(
            f"{type(unwrap(what)).__name__} is not a vision-language model with a vision tower that mirage-trl "
            f"supports (model type {model_type!r}; supported: {', '.join(FAMILIES)})"
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
        f"supported: {', '.join(FAMILIES)}"
    )


def vision_tower(model) -> torch.nn.Module:
    """The vision tower of any supported model (a clear error for a model without one)."""
    return family(model).vision_tower(model)


def multimodal_model(model) -> torch.nn.Module:
    """The inner vision-language module (vision tower + language model), as its family finds it."""
    return family(model).inner(model)
