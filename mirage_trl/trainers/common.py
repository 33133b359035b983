"""Pieces both Mirage trainers share: model preparation (latent tokens, frozen vision tower, PEFT
settings) and the numerical guard."""

from __future__ import annotations

import logging
import re

import torch

from ..errors import MirageError
from ..latent.model_utils import unwrap, vision_tower
from ..latent.tokens import LATENT_TOKEN_NAMES, LatentTokens, add_latent_tokens, check_latent_size

logger = logging.getLogger(__name__)

# Linear layers of the Qwen-VL language model: what "all-linear" means for Mirage (the vision tower stays frozen).
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def prepare_model(model, processing_class, latent_size: int, stage: int | None = None) -> LatentTokens:
    """Add the latent tokens, check the latent size against the checkpoint, freeze the vision tower."""
    vision = vision_tower(model)  # a clear error for a model without one
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    had_tokens = all(t in tokenizer.get_vocab() for t in LATENT_TOKEN_NAMES)
    check_latent_size(unwrap(model), latent_size)
    tokens = add_latent_tokens(processing_class, None if had_tokens else unwrap(model), latent_size)
    if had_tokens:
        from ..latent.tokens import set_mirage_config

        set_mirage_config(unwrap(model), latent_size)
    if stage == 2 and not had_tokens:
        logger.warning(
            "stage 2 starts from a model without latent tokens: they are new and untrained "
            "(this is the paper's no-stage-1 ablation)"
        )
    vision.requires_grad_(False)
    return tokens


def setup_model(model, processing_class, peft_config, args, stage: int | None = None):
    """What both Mirage trainers do before TRL's `__init__`: load a model given by name, find its
    processor, add the latent tokens, freeze the vision tower, adapt the PEFT config.

    Returns (model, processing_class, peft_config, latent_tokens)."""
    if isinstance(model, str):
        from ..models.training import load_for_training

        model, processing_class = load_for_training(model, args)
    if processing_class is None:
        from ..models.loading import load_processor

        processing_class = load_processor(unwrap(model).config._name_or_path)
    tokens = prepare_model(model, processing_class, args.latent_size, stage=stage)
    return model, processing_class, adapt_peft_config(peft_config, tokens), tokens


def adapt_peft_config(peft_config, tokens: LatentTokens):
    """Mirage defaults for a PEFT config: LoRA on the language model only, new token rows trainable."""
    peft_config = restrict_to_language_model(peft_config)
    if peft_config is None:
        return None
    ids = [tokens.start_id, tokens.pad_id, tokens.end_id]
    if hasattr(peft_config, "trainable_token_indices"):
        indices = dict(peft_config.trainable_token_indices or {})
        for layer in ("embed_tokens", "lm_head"):
            indices[layer] = sorted(set(indices.get(layer, [])) | set(ids))
        peft_config.trainable_token_indices = indices
    return peft_config


def restrict_to_language_model(peft_config):
    """LoRA targets of the language model only ("all-linear" or plain names would hit the vision tower)."""
    if peft_config is None:
        return None
    target = getattr(peft_config, "target_modules", None)
    if (
        target is None
        or target == "all-linear"
        or (not isinstance(target, str) and set(target) == {"all-linear"})
    ):
        peft_config.target_modules = LANGUAGE_MODEL_LINEAR
    elif not isinstance(target, str):
        # Plain names like ["q_proj", "v_proj"] would also hit the vision tower's layers: restrict them.
        names = "|".join(re.escape(t) for t in sorted(target))
        peft_config.target_modules = rf".*language_model.*\.({names})"
    return peft_config


def check_step(
    step: int, skip: bool, terms: dict, latents: torch.Tensor | None = None, bound: float | None = None
) -> bool:
    """True when every term is finite and no latent's norm exceeds `bound` (None: no bound).

    Otherwise stop naming the step and the term (or the norm), or with `skip` return False so the
    caller skips the step. All checks of a step share one host sync.
    """
    checks = [torch.isfinite(t.detach()).all() for t in terms.values()]
    peak = None
    if latents is not None and latents.shape[0] and bound is not None:
        peak = latents.detach().float().norm(dim=-1).max()
        checks.append(peak <= bound)  # a NaN peak fails here too, but is reported as non-finite first
    flags = torch.stack(checks).tolist()
    bad = [name for name, ok in zip(terms, flags) if not ok]
    if bad:
        if skip:
            logger.warning("step %d: non-finite %s; step skipped", step, ", ".join(bad))
            return False
        raise MirageError(
            f"step {step}: non-finite {', '.join(bad)} (NaN or inf); lower the learning rate, check the data, "
            "or set skip_nonfinite_steps=True to skip such steps"
        )
    if peak is not None and not flags[-1]:
        msg = f"step {step}: latent norm {float(peak):.3g} exceeds max_latent_norm={bound:g}"
        if skip:
            logger.warning("%s; step skipped", msg)
            return False
        raise MirageError(msg + " (raise max_latent_norm, or set skip_nonfinite_steps=True)")
    return True


def check_distributed_support(accelerator, what: str) -> None:
    """Self-generated latents run the model in several dependent passes per step, inside the
    trainer rather than through the wrapper's `forward`. Plain DDP only syncs gradients of a
    backward that follows its own `forward`, so it would silently train each rank alone; DeepSpeed
    reduces gradients per parameter and is fine. Refuse DDP with the fix in the message."""
    from accelerate.utils import DistributedType

    ddp = {DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU}
    for name in ("MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU"):
        if hasattr(DistributedType, name):
            ddp.add(getattr(DistributedType, name))
    if accelerator.distributed_type in ddp and accelerator.num_processes > 1:
        raise MirageError(
            f"{what} on several processes needs DeepSpeed: plain DDP would not sync the gradients of the "
            "latent passes; launch with `accelerate launch --config_file zero_configs/zero2.yaml ...`"
        )


def load_from_checkpoint(trainer, resume_from_checkpoint, model, fallback) -> None:
    """Resume: refuse a latent size that disagrees with the checkpoint, then load its weights.

    transformers 5 saves Qwen-VL checkpoints under the hub's key names, which
    `Trainer._load_from_checkpoint` loads with strict=False: every weight would silently stay as
    initialised. Full-model checkpoints are read the way `from_pretrained` reads them; adapters go
    through the Trainer's own loader (`fallback`).
    """
    from ..latent.tokens import check_checkpoint_latent_size
    from ..models.load import load_checkpoint_weights

    check_checkpoint_latent_size(resume_from_checkpoint, trainer.args.latent_size)
    if not load_checkpoint_weights(model if model is not None else trainer.model, resume_from_checkpoint):
        fallback(resume_from_checkpoint, model)
