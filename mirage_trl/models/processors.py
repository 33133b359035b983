"""Processors of the supported vision-language models, by name or path, offline-friendly.

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
