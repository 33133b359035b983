"""One loader for every model mirage-trl reads: a base checkpoint (by name or path), a full Mirage
model, a LoRA adapter over its base, a training output or a `checkpoint-N` folder, for training
(`load_for_training`: an adapter stays trainable) and for decoding (`load_model`, used by
`mirage_trl.load_model`, `mirage-trl eval`, export and analysis).

What a folder is and which Mirage settings it has is `models.resolve`'s answer; the processor is
`models.processors`'. Loading an adapter restores the latent-token rows its base had when training
began (see `restore_latent_rows`) and puts the adapter's Mirage settings on the model.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from ..errors import MirageError
from ..io import looks_like_hub_name
from .families import family, full_shape, unwrap
from .processors import load_processor, processor_class
from .resolve import ModelSource, is_adapter_dir, resolve_model_dir
from .settings import MirageSettings
from .tokens import LATENT_TOKEN_NAMES, make_room

logger = logging.getLogger(__name__)


def torch_dtype(value, flag: str = "--dtype"):
    """A torch dtype from a name ("bfloat16", ...), a dtype, or "auto"; None stays None."""
    import torch

    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise MirageError(f"{flag} {value!r} is not a torch dtype (use bfloat16, float16, float32 or auto)")
    return dtype


def _from_pretrained(name: str, trust_remote_code: bool = False, where: str | None = None, **kwargs):
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(
            name, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as exc:  # offline, no such repo, gated without a token: one line, no token in it
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MirageError(f"{where or name}: cannot load the model {name} ({reason})") from None


def _model_type(name: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type


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
    Call it before the adapter's Mirage settings are put on `model`. Returns the rows set.
    """
    vocab = tokenizer.get_vocab()
    if any(t not in vocab for t in LATENT_TOKEN_NAMES):
        return []
    base_vocab = _base_vocab(base, trust_remote_code)
    if base_vocab is None:
        new_ids = [] if MirageSettings.of_model(model) else [vocab[t] for t in LATENT_TOKEN_NAMES]
    else:
        new_ids = [vocab[t] for t in LATENT_TOKEN_NAMES if t not in base_vocab]
    new_ids = sorted(set(new_ids))
    make_room(model, tokenizer, new_ids)  # resizes when needed; mean init of the new rows
    return new_ids


def _adapter_embedding_rows(adapter_dir: Path) -> int | None:
    """Rows of a full embedding saved inside the adapter (save_embedding_layers=True), if any."""
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if re.search(r"embed_tokens(\.token_adapter)?(\.base_layer)?\.weight$", key):
                return f.get_slice(key).get_shape()[0]
    return None


def load_source(src: ModelSource, *, trainable: bool = False, trust_remote_code: bool = False, **kwargs):
    """(model, processor, resized) of a resolved folder: a full model, or an adapter (PeftModel) over
    its base; `trainable` keeps an adapter trainable (stage 2 and GRPO continue it), otherwise eval mode.
    `kwargs` go to `from_pretrained` (dtype, quantization, attention, revision)."""
    name = str(src.base if src.is_adapter else src.path)
    try:  # a text-only model (no vision tower): say which folder, before anything loads
        model_type = _model_type(name, trust_remote_code)
        processor_class(model_type)
    except MirageError as exc:
        raise MirageError(f"{src.path}: {exc}") from None
    processor = load_processor(
        str(src.tokenizer_dir or src.path), model_type=model_type, trust_remote_code=trust_remote_code
    )
    model = _from_pretrained(name, trust_remote_code, where=str(src.path), **kwargs)
    resized = False
    if src.is_adapter:
        from peft import PeftModel

        saved_rows = _adapter_embedding_rows(src.path)
        rows = full_shape(model.get_input_embeddings().weight)[0]  # ZeRO-3: the local tensor is empty
        want = saved_rows or max(rows, len(processor.tokenizer))
        if want != rows:
            model.resize_token_embeddings(want, mean_resizing=False)
        restore_latent_rows(model, processor.tokenizer, src.base, trust_remote_code)  # rows as training began
        if src.settings is not None:
            src.settings.save_to(model)
            _remember_settings_source(model, src)
        model = PeftModel.from_pretrained(model, str(src.path), is_trainable=trainable)
        resized = want != rows or saved_rows is not None
        if trainable:
            logger.info("continuing the LoRA adapter of %s over %s", src.path, src.base)
    elif src.settings is not None:
        if len(processor.tokenizer) > full_shape(model.get_input_embeddings().weight)[0]:
            raise MirageError(
                f"{src.path}: the tokenizer has more tokens than the model's embedding has rows"
            )
        src.settings.save_to(model)
        _remember_settings_source(model, src)
    return (model if trainable else model.eval()), processor, resized


def _remember_settings_source(model, src) -> None:
    """Which folder and file the model's Mirage settings came from, so that a disagreement names them (an
    adapter's own mirage_config.json, not its base model)."""
    model.mirage_settings_source = (str(src.path), src.settings_file or str(src.path))


def _training_kwargs(model_args) -> tuple[dict, bool]:
    """`from_pretrained` arguments from TRL's `ModelConfig` (dtype, revision, attention, quantization)."""
    if model_args is None:
        return {}, False
    from trl import get_quantization_config

    kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": torch_dtype(getattr(model_args, "dtype", None), flag="--dtype"),
    }
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        import torch
        from accelerate import PartialState

        kwargs["quantization_config"] = quantization
        # Quantized weights are placed at load time: each process takes its own GPU.
        kwargs["device_map"] = {"": PartialState().local_process_index} if torch.cuda.is_available() else None
    return {k: v for k, v in kwargs.items() if v is not None}, bool(
        getattr(model_args, "trust_remote_code", False)
    )


def unquantized_modules(model) -> list[str]:
    """What bitsandbytes must leave in full precision: every part of the vision-language module but its language
    model (the vision tower, the merger or projector: stage-1 targets come from the tower, and a 4-bit tower
    would give other targets) and the LM head. Qualified names, as transformers matches them."""
    fam = family(model)
    inner, lm = fam.inner(model), fam.language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is inner)
    parts = [
        f"{prefix}.{name}" if prefix else name for name, child in inner.named_children() if child is not lm
    ]
    return parts + ["lm_head"]


def keep_4bit_layers_trainable(model) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit layer's weight for its inference kernel the first time the layer
    runs without gradients on a CPU with AVX512-BF16, and never packs it back (0.50): every training forward after
    an evaluation or a generation then runs the inference kernel, whose in-place bias add fails under autograd and
    whose numbers differ from the training path's. A model being trained keeps the training layout
    (`load_for_training` and the trainers' set-up call this before any forward). A layer a forward already
    repacked is packed back with a warning: bitsandbytes' inverse rounds the block scales (a ~1e-3 change of the
    layer's output). No effect on GPUs or on models without 4-bit layers."""
    repacked = 0
    for module in unwrap(model).modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state
            )
            repacked += 1
    if repacked:
        logger.warning(
            "%d 4-bit layers had been repacked by bitsandbytes for CPU inference (a forward without gradients ran "
            "before training); packed back for training, with their block scales rounded by bitsandbytes",
            repacked,
        )


def _keep_vision_unquantized(kwargs: dict, name: str, trust: bool) -> None:
    """Add `unquantized_modules` of the model `name` to a bitsandbytes config's `llm_int8_skip_modules` (read
    off a skeleton of the model on the meta device: nothing is loaded)."""
    quantization = kwargs.get("quantization_config")
    if quantization is None or not hasattr(quantization, "llm_int8_skip_modules"):
        return
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust)
    given = list(quantization.llm_int8_skip_modules or [])
    quantization.llm_int8_skip_modules = given + [m for m in unquantized_modules(skeleton) if m not in given]


def load_for_training(name_or_path: str, args=None, model_args=None):
    """(model, processor) to train: a base model by name or path, a full stage-1 output, or the LoRA
    adapter of a previous stage (continued, still trainable)."""
    kwargs, trust = _training_kwargs(model_args)
    trust = trust or bool(getattr(args, "trust_remote_code", False))
    name = str(name_or_path)
    src = resolve_model_dir(name, require_mirage=False) if is_adapter_dir(name) else None
    _keep_vision_unquantized(kwargs, src.base if src else name, trust)  # an adapter: its base is quantized
    if src is not None:
        model, processor, _ = load_source(src, trainable=True, trust_remote_code=trust, **kwargs)
    else:
        model = _from_pretrained(name, trust, **kwargs)
        processor = load_processor(name, model_type=model.config.model_type, trust_remote_code=trust)
    keep_4bit_layers_trainable(model)  # before any forward can repack a 4-bit layer for inference
    return model, processor


def load_model(
    path_or_name,
    *,
    dtype=None,
    device=None,
    latent_size: int | None = None,
    require_mirage: bool = True,
    trust_remote_code: bool = False,
):
    """(model, processor) ready for `generate_with_latents`.

    `path_or_name`: a merged/full Mirage model folder, an adapter folder (loaded over its base,
    as a `PeftModel`), a training output or a `checkpoint-N` folder, or a hub name (loaded as it is).
    A folder that is not a Mirage model (when `require_mirage`) or whose latent size disagrees with
    its tokenizer or another saved setting raises `MirageError`.
    """
    name = str(path_or_name)
    dtype = torch_dtype(dtype, flag="dtype") or "auto"
    if not Path(name).is_dir():
        if Path(name).exists() or not looks_like_hub_name(name):
            raise MirageError(f"{name}: not a model folder, an adapter folder or a hub model name (org/name)")
        model, processor = _load_hub(
            name, dtype=dtype, latent_size=latent_size, trust_remote_code=trust_remote_code
        )
    else:
        src = resolve_model_dir(name, latent_size=latent_size, require_mirage=require_mirage)
        if src.settings is None:  # only reachable with require_mirage=False (baselines, plain models)
            warnings.warn(
                f"{name}: the tokenizer has no latent tokens; it decodes as a plain model", stacklevel=2
            )
        model, processor, _ = load_source(src, dtype=dtype, trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    return model, processor


def _load_hub(name, *, dtype, latent_size=None, trust_remote_code=False):
    """A model by hub name: loaded as it is, its Mirage settings checked when it has them."""
    model = _from_pretrained(name, trust_remote_code, where=name, dtype=dtype)
    try:
        processor = load_processor(name, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise MirageError(f"{name}: cannot load its processor ({str(exc).splitlines()[0]})") from None
    vocab = processor.tokenizer.get_vocab()
    if any(t not in vocab for t in LATENT_TOKEN_NAMES):
        warnings.warn(
            f"{name}: the tokenizer has no latent tokens; it decodes as a plain model", stacklevel=3
        )
    elif latent_size is not None:
        MirageSettings.adopt(model, latent_size)
    return model.eval(), processor


def load_checkpoint_weights(model, checkpoint_dir) -> bool:
    """Load a full-model `checkpoint-N` into `model` in place, reading it the way `from_pretrained` does.

    transformers 5 saves Qwen-VL weights under the hub's key names (`model.layers...`, `visual...`) and
    only `from_pretrained` maps them back; `Trainer._load_from_checkpoint` loads the raw state dict with
    strict=False, so on resume every weight is silently left as initialised. Returns False (nothing done)
    for adapter checkpoints and folders without full weights, which the Trainer's own loader handles.
    """
    folder = Path(checkpoint_dir)
    if is_adapter_dir(folder) or not (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    ):
        return False
    inner = unwrap(model)
    if getattr(inner, "peft_config", None):
        return False
    param = next(inner.parameters())
    saved = type(inner).from_pretrained(str(folder), config=inner.config, dtype=param.dtype)
    missing, unexpected = inner.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise MirageError(
            f"{folder}: checkpoint weights do not fit the model ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, e.g. {(missing or unexpected)[0]})"
        )
    return True
