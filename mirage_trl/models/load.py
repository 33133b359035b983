"""Load a Mirage model for latent decoding: a full model folder / hub name, or a PEFT adapter folder.

`load_model` returns `(model, processor)` in eval mode with the Mirage settings checked:

* a tokenizer without the latent tokens -> a warning, and the model decodes as a plain model;
* a latent size saved with the model (config.json "mirage") that disagrees with an explicit
  `latent_size` -> `MirageError`; an explicit size on a model without one is recorded;
* a folder that is neither a model (config.json) nor an adapter (adapter_config.json) ->
  `MirageError` naming the path.

For an adapter folder the base model named in `adapter_config.json` is loaded, the tokenizer
(and image processor) come from the adapter folder when saved there, else from the base, the
embedding is resized when the tokenizer grew beyond it, then `PeftModel.from_pretrained`. The
Mirage settings of an adapter are read from a `config.json` in the adapter folder when there is
one, else from the base.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..errors import MirageError
from ..latent.tokens import CONFIG_KEY, LATENT_TOKEN_NAMES, check_latent_size, set_mirage_config
from .loading import load_processor


def _torch_dtype(dtype):
    import torch

    if dtype is None:
        return "auto"
    if isinstance(dtype, str):
        if dtype == "auto":
            return dtype
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise MirageError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16, float16 or auto")
        return value
    return dtype


def _looks_like_hub_name(name: str) -> bool:
    return not os.path.isabs(name) and not name.startswith(".") and name.count("/") == 1


def load_model(path_or_name, *, dtype=None, device=None, latent_size: int | None = None, trust_remote_code: bool = False):
    """(model, processor) ready for `generate_with_latents`; see the module doc."""
    from transformers import AutoModelForImageTextToText

    name = str(path_or_name)
    path = Path(name)
    torch_dtype = _torch_dtype(dtype)
    mirage_saved = None
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            model, processor, mirage_saved = _load_adapter(path, torch_dtype, trust_remote_code)
        elif (path / "config.json").is_file():
            model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
            processor = load_processor(name, trust_remote_code=trust_remote_code)
        else:
            raise MirageError(
                f"{path} is neither a model folder (no config.json) nor a PEFT adapter folder (no adapter_config.json)"
            )
    elif path.exists() or not _looks_like_hub_name(name):
        raise MirageError(f"{path} is not a model folder, an adapter folder or a hub model name (org/name)")
    else:
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        processor = load_processor(name, trust_remote_code=trust_remote_code)

    _check_mirage(model, processor, latent_size, name, mirage_saved)
    if device is not None:
        model.to(device)
    return model.eval(), processor


def _check_mirage(model, processor, latent_size, name, mirage_saved=None) -> None:
    target = getattr(model, "get_base_model", lambda: model)()
    if mirage_saved is not None:  # the adapter's own settings win over the base's
        set_mirage_config(target, int(mirage_saved["latent_size"]))
    tok = getattr(processor, "tokenizer", processor)
    vocab = tok.get_vocab()
    if any(t not in vocab for t in LATENT_TOKEN_NAMES):
        warnings.warn(
            f"{name}: the tokenizer has no latent tokens {list(LATENT_TOKEN_NAMES)}; it decodes as a plain model",
            stacklevel=3,
        )
        return
    if latent_size is not None:
        check_latent_size(target, latent_size)  # MirageError when the saved size differs
        set_mirage_config(target, latent_size)


def _load_adapter(path: Path, torch_dtype, trust_remote_code: bool):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MirageError(f"{path / 'adapter_config.json'}: cannot read the adapter config ({exc})") from exc
    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise MirageError(f"{path / 'adapter_config.json'}: no base_model_name_or_path; cannot find the base model")
    if not Path(base).is_dir() and not _looks_like_hub_name(base):
        raise MirageError(f"{path}: the base model {base!r} named in adapter_config.json is not a folder or hub name")

    has_tokenizer = (path / "tokenizer_config.json").is_file()
    has_image_processor = (path / "preprocessor_config.json").is_file()
    if has_tokenizer and has_image_processor:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code).model_type
        processor = load_processor(str(path), model_type=model_type, trust_remote_code=trust_remote_code)
    else:
        processor = load_processor(base, trust_remote_code=trust_remote_code)
        if has_tokenizer:
            processor.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if len(processor.tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)

    mirage_saved = None
    local_config = path / "config.json"
    if local_config.is_file():
        try:
            value = json.loads(local_config.read_text(encoding="utf-8")).get(CONFIG_KEY)
        except (OSError, json.JSONDecodeError):
            value = None
        if isinstance(value, dict) and value.get("latent_size") is not None:
            mirage_saved = value
    return model, processor, mirage_saved
