"""Loading a model for training: a base checkpoint (by name or path), a stage-1 output (full model),
or a stage-1 LoRA adapter that stage 2 continues (the same adapter, still trainable)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import MirageError

logger = logging.getLogger(__name__)


def is_adapter_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _dtype(name):
    if name in (None, "auto"):
        return "auto" if name == "auto" else None
    if isinstance(name, torch.dtype):
        return name
    if not hasattr(torch, str(name)):
        raise MirageError(f"--dtype {name!r} is not a torch dtype (use bfloat16, float16, float32 or auto)")
    return getattr(torch, name)


def load_for_training(name_or_path: str, args=None, model_args=None):
    """Return (model, processor). `model_args` is TRL's `ModelConfig` (dtype, revision, attention, quantization)."""
    from transformers import AutoModelForImageTextToText

    from .loading import load_processor

    kwargs = {}
    trust = False
    if model_args is not None:
        from trl import get_quantization_config

        kwargs["revision"] = model_args.model_revision
        kwargs["attn_implementation"] = model_args.attn_implementation
        dtype = _dtype(getattr(model_args, "dtype", None) or getattr(model_args, "torch_dtype", None))
        if dtype is not None:
            kwargs["dtype"] = dtype
        quantization = get_quantization_config(model_args)
        if quantization is not None:
            kwargs["quantization_config"] = quantization
            kwargs["device_map"] = _kbit_device_map()
        trust = bool(
            getattr(model_args, "trust_remote_code", False) or getattr(args, "trust_remote_code", False)
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    if is_adapter_dir(name_or_path):
        from peft import PeftModel

        base = json.loads((Path(name_or_path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        processor = load_processor(name_or_path, model_type=_model_type(base, trust), trust_remote_code=trust)
        model = AutoModelForImageTextToText.from_pretrained(base, trust_remote_code=trust, **kwargs)
        if len(processor.tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
        from .loading import restore_latent_rows

        restore_latent_rows(model, processor.tokenizer, base, trust)  # the rows stage 1 started from
        _copy_mirage_config(name_or_path, model)
        model = PeftModel.from_pretrained(model, name_or_path, is_trainable=True)
        logger.info("continuing the LoRA adapter of %s over %s", name_or_path, base)
        return model, processor
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, trust_remote_code=trust, **kwargs)
    except OSError as e:
        raise MirageError(f"cannot load a model from {name_or_path}: {str(e).splitlines()[0]}") from None
    processor = load_processor(name_or_path, model_type=model.config.model_type, trust_remote_code=trust)
    return model, processor


def _kbit_device_map():
    """Quantized weights are placed at load time: each process takes its own GPU."""
    from accelerate import PartialState

    return {"": PartialState().local_process_index} if torch.cuda.is_available() else None


def _model_type(name_or_path, trust):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust).model_type


def _copy_mirage_config(adapter_dir, model):
    """An adapter folder keeps the Mirage settings in mirage_config.json (its base config has none)."""
    from ..latent.tokens import CONFIG_KEY

    path = Path(adapter_dir) / "mirage_config.json"
    if path.is_file():
        setattr(model.config, CONFIG_KEY, json.loads(path.read_text()))
