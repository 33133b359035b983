"""Loading Qwen-VL models and processors by name or path, offline-friendly.

The processors are built without a video processor: stock Qwen-VL processors fail on their
video processor without torchvision, and Mirage needs images only.
"""

from __future__ import annotations

_PROCESSORS = {
    "qwen2_vl": ("transformers.models.qwen2_vl.processing_qwen2_vl", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.processing_qwen2_5_vl", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("transformers.models.qwen3_vl.processing_qwen3_vl", "Qwen3VLProcessor"),
}

# The vision-language model types Mirage trains.
SUPPORTED_MODEL_TYPES = tuple(_PROCESSORS)

_IMAGE_ONLY: dict[str, type] = {}


def processor_class(model_type: str):
    """The Qwen-VL processor class of `model_type`, in an image-only variant (no video processor)."""
    import importlib

    from ..errors import MirageError

    if model_type not in _PROCESSORS:
        raise MirageError(
            f"model type {model_type!r} is not a supported vision-language model; "
            f"supported: {', '.join(_PROCESSORS)}"
        )
    if model_type not in _IMAGE_ONLY:
        module, name = _PROCESSORS[model_type]
        base = getattr(importlib.import_module(module), name)

        @classmethod
        def get_attributes(cls):
            return [a for a in base.get_attributes() if a != "video_processor"]

        # Same class name, so a saved processor_config.json names the stock class and loads anywhere.
        _IMAGE_ONLY[model_type] = type(
            name, (base,), {"get_attributes": get_attributes, "__module__": base.__module__}
        )
    return _IMAGE_ONLY[model_type]


def load_processor(name_or_path: str, model_type: str | None = None, trust_remote_code: bool = False, **kw):
    """Load a Qwen-VL processor (tokenizer + PIL image processor, no video processor)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if model_type is None:
        model_type = AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, **kw
        ).model_type
    cls = processor_class(model_type)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kw)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **kw)
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def _base_vocab(base, trust_remote_code: bool = False) -> dict[str, int] | None:
    """The base model's own tokenizer vocabulary, from local files only; None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            str(base), local_files_only=True, trust_remote_code=trust_remote_code
        ).get_vocab()
    except (OSError, ValueError, TypeError):
        return None


def restore_latent_rows(model, tokenizer, base, trust_remote_code: bool = False) -> list[int]:
    """Give the latent-token rows of an adapter's base the values training started from.

    Stage 1 (`add_latent_tokens`) sets the embedding and LM-head rows of latent tokens the base
    tokenizer lacked to the mean of the rows below them, after resizing the vocabulary when the
    base had no spare rows. PEFT saves only the trained values of those rows (trainable tokens),
    not the rows they replaced, so a reload would otherwise keep whatever the base has there
    (a resize's random rows, or the checkpoint's spare rows): the same outputs with the adapter
    on, others with it off (`disable_adapter`, unmerge) and other `trainable_tokens_original`.
    Which tokens were new: those missing from the base tokenizer (from `base`'s local files), or,
    without one, all of them unless the base config already records Mirage settings.
    Call it before the Mirage settings are copied onto `model.config`. Returns the rows set.
    """
    from ..latent.tokens import LATENT_TOKEN_NAMES, _make_room, get_mirage_config

    vocab = tokenizer.get_vocab()
    if any(t not in vocab for t in LATENT_TOKEN_NAMES):
        return []
    base_vocab = _base_vocab(base, trust_remote_code)
    if base_vocab is None:
        new_ids = [] if get_mirage_config(model) else [vocab[t] for t in LATENT_TOKEN_NAMES]
    else:
        new_ids = [vocab[t] for t in LATENT_TOKEN_NAMES if t not in base_vocab]
    new_ids = sorted(set(new_ids))
    _make_room(model, tokenizer, new_ids)  # resizes when needed; mean init of the new rows
    return new_ids
