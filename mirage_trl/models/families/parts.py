"""Parts of a model that every family has alike: the bare model under its wrappers, its language model, LM-head
logits and the final-norm hidden states of a forward. Family-specific parts (the inner vision-language module,
the vision tower) are `ModelFamily` methods."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from ...errors import MirageError


def unwrap(model):
    """The bare transformers model under accelerate/DeepSpeed/PEFT wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            return model


def cache_kwargs(module, cache) -> dict:
    """`{name: cache}` under the name `module.forward` takes its KV cache by in the installed transformers:
    `cache` from 5.2x (where `past_key_values` is a deprecated alias, gone in 5.40), `past_key_values` before.
    The other name would be swallowed by the forward's `**kwargs` without a word: no cache, wrong answers."""
    return {_cache_name(type(module)): cache}


@functools.cache
def _cache_name(cls) -> str:
    params = inspect.signature(cls.forward).parameters  # follows transformers' deprecation wrappers
    return "cache" if "cache" in params else "past_key_values"


def full_shape(param) -> torch.Size:
    """A parameter's shape, also when DeepSpeed ZeRO-3 has partitioned it: each process then holds an empty
    local tensor (shape (0,)) and the full shape is `ds_shape`."""
    return getattr(param, "ds_shape", None) or param.shape


def is_partitioned(model) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the model's weights (each rank holds a slice; a module gathers its
    weights when it runs). Read off a parameter, not off an embedding's `weight`: under a PEFT trainable-token
    wrapper that attribute merges the rows, which fails on a partitioned tensor."""
    first = next(unwrap(model).parameters(), None)
    return first is not None and hasattr(first, "ds_id")


def gathered(*params):
    """A context in which ZeRO-3-partitioned `params` are whole on every process and what rank 0 writes into
    them is kept (DeepSpeed's `GatheredParameters`); a no-op for ordinary parameters."""
    params = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only reachable when DeepSpeed partitioned them

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def text_model(model) -> torch.nn.Module:
    """The language model (the module with `embed_tokens`, `layers` and the final `norm`)."""
    for module in unwrap(model).modules():
        if hasattr(module, "layers") and hasattr(module, "norm") and hasattr(module, "embed_tokens"):
            return module
    raise MirageError(f"{type(unwrap(model)).__name__} has no language model with layers and a final norm")


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits of final-norm hidden states, soft-capped as the model's own forward does where its
    config asks for it (`final_logit_softcapping`)."""
    net = unwrap(model)
    logits = net.get_output_embeddings()(hidden)
    config = net.config.get_text_config() if hasattr(net.config, "get_text_config") else net.config
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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
