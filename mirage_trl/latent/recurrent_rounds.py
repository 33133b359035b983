"""Linear-attention (gated-delta) layers inside the stage-2 rounds: per-sample states carried from round to round.

A hybrid model such as Qwen3.5 interleaves attention layers with gated-delta layers, whose output at a token
depends on a recurrent state (heads x key dim x value dim) and a short causal convolution over the last few
inputs, both per sample. The rounds run a batch's tokens packed in one row (`latent.rounds`): through such a layer
that would run one sample's tokens on another's state. `recurrent_round` swaps each gated-delta layer's forward,
for one round, for one that

1. lays the round's packed tokens out per sample, right-padded to the round's widest chunk (the round layout's
   `out_index`), so every row is one sample's next tokens;
2. runs the convolution over [the sample's last `kernel - 1` inputs of earlier rounds, this round's inputs] and
   keeps the new last `kernel - 1` real inputs (gathered at each sample's own length);
3. runs the gated delta rule from the sample's recurrent state, the padding made an exact no-op (gate 0: no decay;
   beta 0: no write), so the final state is the state after the sample's last real token;
4. packs the outputs back.

The states are tensors with their autograd graph, so gradients flow across rounds exactly as through one full pass
(tests/latent/test_stage2.py compares every method with a per-sample reference). `RecurrentStates` holds them
between rounds; the checkpointed rounds pass them in and out of each checkpointed round as plain tensors.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from ..models.families import RECURRENT_LAYER_TYPES


class RecurrentStates:
    """Per gated-delta layer (by its index): the convolution state (B, channels, kernel - 1) and the recurrent
    state (B, heads, key dim, value dim) the rounds so far left; absent before a layer's first round."""

    def __init__(self):
        self.conv: dict[int, torch.Tensor] = {}
        self.recurrent: dict[int, torch.Tensor] = {}

    def flat(self) -> list[torch.Tensor]:
        """The states as one list (layer order, convolution then recurrent): a checkpointed round's inputs."""
        return [t for i in sorted(self.conv) for t in (self.conv[i], self.recurrent[i])]

    @classmethod
    def from_flat(cls, layers: list[int], tensors) -> RecurrentStates:
        states = cls()
        for n, i in enumerate(layers):
            states.conv[i], states.recurrent[i] = tensors[2 * n], tensors[2 * n + 1]
        return states


def recurrent_layers(language_model) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, gated-delta module) of every linear-attention layer of a language model."""
    types = getattr(language_model.config, "layer_types", None) or ()
    return [
        (i, layer.linear_attn)
        for i, layer in enumerate(language_model.layers)
        if i < len(types) and types[i] in RECURRENT_LAYER_TYPES and hasattr(layer, "linear_attn")
    ]


@contextlib.contextmanager
def recurrent_round(language_model, layout, width: int, batch_size: int, states: RecurrentStates):
    """For one round: every gated-delta layer runs the round's tokens per sample from `states` and leaves its new
    states there (`width`: the round's widest chunk; `layout`: the round's `RoundLayout`)."""
    layers = recurrent_layers(language_model)
    if not layers:
        yield
        return
    valid = torch.zeros(batch_size * width, dtype=torch.bool, device=layout.out_index.device)
    valid[layout.out_index] = True
    valid = valid.view(batch_size, width)
    # an instance-level forward already there (a hook library's wrapper) is put back as it was
    previous = [module.__dict__.get("forward") for _, module in layers]
    for i, module in layers:
        module.forward = _round_forward(module, i, layout.out_index, valid, states)
    try:
        yield
    finally:
        for (_, module), before in zip(layers, previous):
            if before is None:
                del module.forward  # back to the class's own forward
            else:
                module.forward = before


def _round_forward(module, index: int, out_index: torch.Tensor, valid: torch.Tensor, states: RecurrentStates):
    kernels = sys.modules[type(module).__module__]  # the family's own delta-rule kernel (hub kernel or torch)
    B, W = valid.shape

    def forward(hidden_states, *args, **kwargs):
        h = hidden_states[0]  # (T, D): the round's tokens, packed
        x = h.new_zeros(B * W, h.shape[-1]).index_copy(0, out_index, h).view(B, W, -1)
        mixed = module.in_proj_qkv(x).transpose(1, 2)  # (B, channels, W)
        z = module.in_proj_z(x).reshape(B, W, -1, module.head_v_dim)
        b, a = module.in_proj_b(x), module.in_proj_a(x)

        # the convolution, continued from the sample's last kernel - 1 inputs (zeros before its first round)
        k = module.conv_kernel_size
        weight = module.conv1d.weight
        past = states.conv.get(index)
        if past is None:
            past = mixed.new_zeros(B, mixed.shape[1], k - 1)
        full = torch.cat([past, mixed], dim=-1)
        conv = F.conv1d(full.to(weight.dtype), weight, module.conv1d.bias, groups=full.shape[1])
        conv = _activation(module.activation)(conv).to(mixed.dtype).transpose(1, 2)  # (B, W, channels)
        lengths = valid.sum(1)
        keep = (lengths[:, None] + torch.arange(k - 1, device=full.device)[None]).unsqueeze(1)
        states.conv[index] = full.gather(-1, keep.expand(-1, full.shape[1], -1))

        query, key, value = torch.split(conv, [module.key_dim, module.key_dim, module.value_dim], dim=-1)
        query = query.reshape(B, W, -1, module.head_k_dim)
        key = key.reshape(B, W, -1, module.head_k_dim)
        value = value.reshape(B, W, -1, module.head_v_dim)
        heads_per_key = module.num_v_heads // module.num_k_heads
        if heads_per_key > 1:
            # grouped heads: newer kernels expand the query and key heads themselves, transformers 5.18's does not,
            # and the family's own forward expands them before the call; expanded, both give the same output
            query = query.repeat_interleave(heads_per_key, dim=2)
            key = key.repeat_interleave(heads_per_key, dim=2)
        # padding: gate 0 (no decay) and beta 0 (no write) leave the state as the last real token left it
        mask = valid[..., None]
        beta = b.sigmoid() * mask
        g = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias) * mask
        out, last = kernels.torch_chunk_gated_delta_rule(
            query,
            key,
            value,
            g=g,
            beta=beta,
            initial_state=states.recurrent.get(index),
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        states.recurrent[index] = last
        out = module.norm(out.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))
        out = module.out_proj(out.reshape(B, W, -1))
        return out.reshape(B * W, -1)[out_index][None]

    return forward


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name] if name else (lambda t: t)
