"""The auxiliary decoding of latents into text (`latent_aux_text`), after SIM-CoT's auxiliary decoder.

Each latent span's k vectors are read as a prefix by the model's own language model and LM head, which must
then write what the span's helper image shows (the row's `image_output_text`; VSP: the cells of the drawn
path). A latent that decodes into its path carries that path, and k latents that must spell out a path
cannot all collapse into one vector. The decoder is the model itself, so nothing is added to the model and
nothing has to be dropped from an export.

`latent_only_backprop` (after Monet's latent-only backpropagation): the decoding pass runs on detached
copies of the weights (`torch.func.functional_call`), so its gradient reaches the model only through the
latent vectors; the auxiliary task cannot then help the answer by reshaping shared weights alone.

The decoding pass is short (k + the text's tokens) and runs without gradient checkpointing: a checkpointed
layer would recompute during the backward pass with the real weights, which `latent_only_backprop` must not.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..models.families import output_logits, text_model, unwrap


class _Decoder(torch.nn.Module):
    """The model under a module of its own (the model's modules, not copies), so that one `functional_call` can
    swap all its weights, the language model's and the LM head's, for detached ones."""

    def __init__(self, model):
        super().__init__()
        self.net = unwrap(model)

    def forward(self, prefix, ids, attention_mask):
        """The logits of each text token, from the latents (k, D) and the tokens before it."""
        lm = text_model(self.net)
        embeds = torch.cat([prefix.to(lm.embed_tokens.weight.dtype), lm.embed_tokens(ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        k = prefix.shape[1]
        return output_logits(self.net, hidden[:, k - 1 : -1][attention_mask.bool()])


@contextlib.contextmanager
def _without_checkpointing(module):
    layers = [m for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def aux_text_loss(
    model,
    latents: torch.Tensor,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    latent_size: int,
    latent_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the cross-entropy of each span's text given its latents, and the number of text tokens.

    `latents`: (spans * k, D) in slot order (`latent_mask.nonzero()` order); `ids` / `attention_mask`:
    (spans, T), one right-padded text per span in the same order. Token j of a text is predicted from the
    latents and tokens 0..j-1 (the first from the latents alone)."""
    prefix = latents.reshape(-1, latent_size, latents.shape[-1])
    decoder = _Decoder(model)
    with _without_checkpointing(decoder.net):
        if latent_only:
            frozen = {name: p.detach() for name, p in decoder.named_parameters()}
            logits = torch.func.functional_call(decoder, frozen, (prefix, ids, attention_mask))
        else:
            logits = decoder(prefix, ids, attention_mask)
    target = ids[attention_mask.bool()]
    return F.cross_entropy(logits.float(), target, reduction="sum"), attention_mask.sum()
