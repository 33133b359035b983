"""Processors of the supported vision-language models, by name or path, offline-friendly.

The processors are built without a video processor: stock Qwen-VL processors fail on their
video processor without torchvision, and Mirage needs images only.
"""

from __future__ import annotations

from pathlib import Path

from ..io import read_json, write_json
from .families import SUPPORTED_MODEL_TYPES, family, import_class

__all__ = ["SUPPORTED_MODEL_TYPES", "load_processor", "processor_class", "save_processor"]

_IMAGE_ONLY: dict[str, type] = {}


def processor_class(model_type: str):
    """The stock processor class of `model_type`'s family, in an image-only variant (no video processor)."""
    fam = family(model_type)
    if model_type not in _IMAGE_ONLY:
        base = import_class(fam.processor)

        @classmethod
        def get_attributes(cls):
            return [a for a in base.get_attributes() if a != "video_processor"]

        attributes = {"get_attributes": get_attributes, "__module__": base.__module__}
        if fam.generic_chat_template:
            from transformers.processing_utils import ProcessorMixin

            attributes["apply_chat_template"] = ProcessorMixin.apply_chat_template
        if fam.image_processor_settings:  # the processor's own call defaults too (InternVL's crop_to_patches)
            attributes["images_kwargs"] = {
                **getattr(base, "images_kwargs", {}),
                **fam.image_processor_settings,
            }
        # Same class name, so a saved processor_config.json names the stock class and loads anywhere.
        _IMAGE_ONLY[model_type] = type(base.__name__, (base,), attributes)
    return _IMAGE_ONLY[model_type]


def load_processor(name_or_path: str, model_type: str | None = None, trust_remote_code: bool = False, **kw):
    """Load a processor of a supported family (tokenizer + PIL image processor, no video processor)."""
    from transformers import AutoConfig, AutoTokenizer

    if model_type is None:
        model_type = AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, **kw
        ).model_type
    cls = processor_class(model_type)
    fam = family(model_type)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kw)
    image_processor = import_class(fam.image_processor).from_pretrained(name_or_path, **kw)
    for key, value in fam.image_processor_settings.items():
        setattr(image_processor, key, value)
    extra = {"video_processor": None} if fam.video_processor else {}
    return cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        **extra,
        **_processor_settings(name_or_path, cls, kw),
    )


def _processor_settings(name_or_path, cls, kw) -> dict:
    """The processor's own settings saved in its processor_config.json (e.g. Gemma 3's image_seq_length)."""
    import inspect

    from transformers.utils import cached_file

    path = cached_file(
        name_or_path, "processor_config.json", _raise_exceptions_for_missing_entries=False, **kw
    )
    if path is None:
        return {}
    params = set(inspect.signature(cls.__init__).parameters) - {
        "self",
        "image_processor",
        "tokenizer",
        "video_processor",
        "chat_template",
        "kwargs",
    }
    return {k: v for k, v in read_json(path).items() if k in params}


# Settings an image processor shares with its family's video processor.
_SHARED_WITH_VIDEO = (
    "do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std", "merge_size",
    "patch_size", "resample", "rescale_factor", "size", "temporal_patch_size",
)  # fmt: skip


def save_processor(processor, folder, model_type: str) -> None:
    """`save_pretrained`, plus the video processor entry the image-only processor leaves out, so that
    `AutoProcessor.from_pretrained(folder)` builds the stock processor where torchvision is installed
    (without torchvision transformers cannot build any Qwen-VL video processor; `load_processor` still
    loads the folder)."""
    processor.save_pretrained(str(folder))
    path = Path(folder) / "processor_config.json"
    video_processor = family(model_type).video_processor
    if video_processor is None or not path.is_file():
        return
    config = read_json(path)
    if "video_processor" not in config:
        image = config.get("image_processor") or {}
        video = {k: image[k] for k in _SHARED_WITH_VIDEO if k in image}
        config["video_processor"] = {**video, "video_processor_type": video_processor}
        write_json(path, config)
