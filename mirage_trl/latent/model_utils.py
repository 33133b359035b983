"""Plumbing shared by the trainers and generation: find the parts of a (PEFT-wrapped) Qwen-VL model,
capture the final-norm hidden states, and compute 3-D rope positions."""

from __future__ import annotations

import contextlib

import torch

from ..errors import MirageError


def unwrap(model):
    """The bare transformers model under accelerate/DeepSpeed/PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def text_model(model) -> torch.nn.Module:
    """The language model (the module with `embed_tokens`, `layers` and the final `norm`)."""
    for module in unwrap(model).modules():
        if hasattr(module, "layers") and hasattr(module, "norm") and hasattr(module, "embed_tokens"):
            return module
    raise MirageError(f"{type(unwrap(model)).__name__} has no language model with layers and a final norm")


def multimodal_model(model) -> torch.nn.Module:
    """The inner VL model (holds `visual`, `language_model`, `get_rope_index`)."""
    inner = unwrap(model)
    for module in inner.modules():
        if hasattr(module, "get_rope_index") and hasattr(module, "language_model"):
            return module
    raise MirageError(
        f"{type(inner).__name__} is not a vision-language model with a vision tower "
        "(Mirage needs Qwen2-VL, Qwen2.5-VL or Qwen3-VL)"
    )


def vision_tower(model) -> torch.nn.Module:
    mm = multimodal_model(model)
    visual = getattr(mm, "visual", None)
    if visual is None:
        raise MirageError(f"{type(unwrap(model)).__name__} has no vision tower (`visual`); Mirage needs one")
    return visual


@contextlib.contextmanager
def capture_final_hidden(model):
    """Capture the language model's last hidden states (after the final norm) of every forward.

    Yields a list that receives one (B, L, D) tensor per forward, with its autograd graph.
    """
    captured: list[torch.Tensor] = []
    handle = text_model(model).norm.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        yield captured
    finally:
        handle.remove()


def mm_token_types(model, input_ids: torch.Tensor) -> torch.Tensor:
    """`mm_token_type_ids` (1 at image placeholders, 2 at video ones) derived from the ids themselves.

    Types built by a processor follow the tokenizer's padding side; ids padded elsewhere (TRL's
    GRPO left-pads prompts whatever the tokenizer does) would be misaligned with them, and the 3-D
    rope positions computed from them would be shifted. The ids are the one source of truth.
    """
    config = unwrap(model).config
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    for value, name in ((1, "image_token_id"), (2, "video_token_id")):
        token = getattr(config, name, None)
        if token is not None:
            types[input_ids == token] = value
    return types


def rope_positions(
    model, input_ids, attention_mask, mm_token_type_ids=None, image_grid_thw=None
) -> torch.Tensor:
    """3-D rope positions (3, B, L) of the unpadded sequences, as the model computes them itself."""
    mm = multimodal_model(model)
    if mm_token_type_ids is None:
        mm_token_type_ids = torch.zeros_like(input_ids, dtype=torch.int32)
    position_ids, _ = mm.get_rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return position_ids
