"""The one latent-slot mechanism: put given vectors at the latent positions of the input embeddings.

A forward hook on the model's input embedding layer overwrites the embeddings at `slot_mask`
with `values` (row-major order over the batch). It works for every supported family (`models.families`;
Qwen3-VL refuses `input_ids` and `inputs_embeds` together, so a hook, not embeddings passed in), under PEFT
wrappers and DeepSpeed,
and keeps gradients to both the values and the other embeddings. Stage 1 feeds pooled helper
features, stage 2 and decoding feed the model's own hidden states, GRPO recomputes them.
"""

from __future__ import annotations

import contextlib

import torch

from ..models.families import unwrap


def fill_latent_slots(embeds: torch.Tensor, slot_mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`embeds` (B, L, D) with `values` (n, D) written at the n True positions of `slot_mask` (B, L)."""
    return embeds.masked_scatter(slot_mask.unsqueeze(-1), values.to(embeds.dtype))


@contextlib.contextmanager
def latent_inputs(model, slot_mask: torch.Tensor | None, values: torch.Tensor | None):
    """While active, every forward of `model` sees `values` at the `slot_mask` input positions.

    With `slot_mask=None` (or no slots) the model runs unchanged.
    """
    if slot_mask is None or values is None or values.shape[0] == 0:
        yield
        return

    embedding = unwrap(model).get_input_embeddings()  # DDP wrappers do not forward this method

    def hook(module, args, output):
        if output.shape[:2] != slot_mask.shape:
            raise RuntimeError(
                f"latent slot mask {tuple(slot_mask.shape)} does not match the embedded input {tuple(output.shape[:2])}"
            )
        return fill_latent_slots(output, slot_mask.to(output.device), values.to(output.device))

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
