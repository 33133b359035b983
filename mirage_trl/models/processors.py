"""Processors of the supported vision-language models, by name or path, offline-friendly.

The processors are built without a video processor: stock Qwen-VL processors fail on their
video processor without torchvision, and Mirage needs images only.
"""

from __future__ import annotations

from pathlib import Path

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


# The video processor a stock processor of each model type expects (images and videos share these settings).
_VIDEO_PROCESSORS = {
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
}
_SHARED_WITH_VIDEO = (
    "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
    "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size",
)  # fmt: skip


def save_processor(processor, folder, model_type: str) -> None:
    """`save_pretrained`, plus the video processor entry the image-only processor leaves out, so that
    `AutoProcessor.from_pretrained(folder)` builds the stock processor where torchvision is installed
    (without torchvision transformers cannot build any Qwen-VL video processor; `load_processor` still
    loads the folder)."""
    from ..io import read_json, write_json

    processor.save_pretrained(str(folder))
    path = Path(folder) / "processor_config.json"
    if model_type not in _VIDEO_PROCESSORS or not path.is_file():
        return
    config = read_json(path)
    if "video_processor" not in config:
        image = config.get("image_processor") or {}
        video = {k: image[k] for k in _SHARED_WITH_VIDEO if k in image}
        config["video_processor"] = {**video, "video_processor_type": _VIDEO_PROCESSORS[model_type]}
        write_json(path, config)
