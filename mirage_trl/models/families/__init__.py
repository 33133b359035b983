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
  `image_processor_settings`);
- how the tests and the demo build a tiny random model of it (`tiny`, `tiny_config`, `tiny_image_processor`).

Everything else (collator, slots, stage 1, stage 2, decoding, GRPO, eval, export, the tiny factories) asks the
family; no library code outside this package tests a model type. One module per family (`qwen_vl`, `gemma3`,
`internvl`, `smolvlm`, `llava_onevision`) registers it; this package imports every module it holds, so a new
family is one new module (and its recipe YAMLs). The interface and the registry are in `base`, the parts every
model has alike (`unwrap`, `text_model`, `output_logits`, `capture_final_hidden`) in `parts`.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

from .base import (
    FAMILIES,
    LANGUAGE_MODEL_MODULES,
    RECURRENT_LAYER_TYPES,
    ModelFamily,
    TinyModel,
    family,
    import_class,
    multimodal_model,
    processor_family,
    unsupported,
    vision_tower,
)
from .parts import (
    cache_kwargs,
    capture_final_hidden,
    full_shape,
    gathered,
    is_partitioned,
    output_logits,
    text_model,
    unwrap,
)


def import_family_modules(path=None) -> None:
    """Import every module of this package (or of the folders `path`), each registering its families; the Qwen
    families (the paper's) come first."""
    for module in sorted(pkgutil.iter_modules(path or __path__), key=lambda m: (m.name != "qwen_vl", m.name)):
        if path is None:
            importlib.import_module(f"{__name__}.{module.name}")
        else:
            spec = module.module_finder.find_spec(module.name)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))


import_family_modules()

# The vision-language model types Mirage trains, in the registry's order.
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

__all__ = [
    "FAMILIES",
    "LANGUAGE_MODEL_MODULES",
    "RECURRENT_LAYER_TYPES",
    "SUPPORTED_MODEL_TYPES",
    "ModelFamily",
    "TinyModel",
    "capture_final_hidden",
    "cache_kwargs",
    "family",
    "full_shape",
    "gathered",
    "import_class",
    "multimodal_model",
    "output_logits",
    "processor_family",
    "text_model",
    "unsupported",
    "unwrap",
    "is_partitioned",
    "vision_tower",
]
