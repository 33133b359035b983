"""Resolve and load a trained Mirage model for latent decoding: one loader for every caller
(`mirage_trl.load_model`, `mirage-trl eval`, export, analysis).

`resolve_model_dir` says what a folder is: a full model, a LoRA adapter (with its base), a
stage-1/2 training output or a `checkpoint-N` folder of one, and checks that its latent settings
agree with its tokenizer. Where the Mirage settings of a folder come from, first found wins (all
found must agree): config.json "mirage" (full models), mirage_config.json in the folder,
mirage_config.json of the training output a `checkpoint-N` folder sits in, the base model's
config.json "mirage" (adapters), the `latent_size` saved in training_args.bin (read without
unpickling), an explicit `latent_size`. A hub name is loaded as it is; a tokenizer without the
latent tokens then decodes as a plain model, with a warning.
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MirageError
from ..latent.tokens import CONFIG_KEY, LATENT_TOKEN_NAMES, check_latent_size, set_mirage_config

MIRAGE_FILE = "mirage_config.json"
_INT_OPS = {"BININT", "BININT1", "BININT2", "INT", "LONG1", "LONG"}
_MEMO_OPS = {"BINPUT", "LONG_BINPUT", "MEMOIZE", "PUT"}


# ---------------------------------------------------------------------------------------- resolving
@dataclass
class ModelSource:
    """What a folder holds, as far as loading and exporting it is concerned."""

    path: Path
    kind: str  # "full" or "adapter"
    base: str | None  # the base model of an adapter
    latent_size: int | None  # None: not a Mirage model (only with require_mirage=False)
    mirage: dict = field(
        default_factory=dict
    )  # merged settings: latent_size, latent_tokens, stages, base_model, ...
    checkpoint: bool = False  # a Trainer `checkpoint-N` folder
    tokenizer_dir: Path | None = None

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MirageError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MirageError(f"{path}: expected a JSON object")
    return value


def _is_checkpoint(path: Path) -> bool:
    return re.fullmatch(r"checkpoint-\d+", path.name) is not None


def _latent_size_from_training_args(path: Path) -> tuple[int | None, int | None]:
    """(latent_size, stage) saved by the Trainer in training_args.bin, read from the pickle's opcodes.

    Nothing is unpickled (no code runs): the args dataclass is pickled as a dict of field names
    followed by their values, so the int after the string 'latent_size' is the latent size.
    """
    found: dict[str, int] = {}
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not names:
                return None, None
            ops = list(pickletools.genops(z.read(names[0])))
    except (OSError, zipfile.BadZipFile, ValueError):
        return None, None
    for i, (_op, arg, _pos) in enumerate(ops):
        if arg in ("latent_size", "stage") and arg not in found:
            for op, value, _ in ops[i + 1 : i + 4]:
                if op.name in _MEMO_OPS:
                    continue
                if op.name in _INT_OPS and isinstance(value, int):
                    found[arg] = value
                break
    return found.get("latent_size"), found.get("stage")


def _tokenizer_vocab(folder: str | Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    except (OSError, ValueError) as exc:
        raise MirageError(f"{folder}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def _text_vocab_size(config: dict) -> int | None:
    text = config.get("text_config") or {}
    return text.get("vocab_size") or config.get("vocab_size")


def resolve_model_dir(path, latent_size: int | None = None, require_mirage: bool = True) -> ModelSource:
    """Describe a local model / adapter / checkpoint folder and check its Mirage settings (see module doc).

    Raises `MirageError` naming the path for: no such folder; neither config.json nor
    adapter_config.json; an adapter whose base is unknown; settings that disagree between files
    or with an explicit `latent_size`; settings without latent tokens in the tokenizer; latent
    tokens without a latent size; latent token ids beyond the model's embedding; and, when
    `require_mirage`, a folder with neither latent tokens nor Mirage settings.
    """
    p = Path(path)
    if not p.is_dir():
        raise MirageError(f"{p}: no such model folder")
    adapter_cfg = p / "adapter_config.json"
    config_file = p / "config.json"
    if adapter_cfg.is_file():
        kind = "adapter"
    elif config_file.is_file():
        kind = "full"
    else:
        raise MirageError(
            f"{p} is neither a model folder (no config.json) nor a PEFT adapter folder (no adapter_config.json)"
        )
    checkpoint = _is_checkpoint(p)
    if checkpoint and not (p / "trainer_state.json").is_file():
        from ..checkpoints import check_resume_checkpoint

        check_resume_checkpoint(str(p), flag="--model")  # a partial checkpoint: names the newest complete one

    # Every place that may state the latent size, with a name for the error messages.
    sources: list[tuple[str, dict]] = []
    config = _read_json(config_file) if kind == "full" else {}
    if isinstance(config.get(CONFIG_KEY), dict):
        sources.append((f"{config_file} '{CONFIG_KEY}'", config[CONFIG_KEY]))
    own_file = p / MIRAGE_FILE
    mirage_files = [own_file] + ([p.parent / MIRAGE_FILE] if checkpoint else [])
    extra: dict = {}
    for f in mirage_files:
        if f.is_file():
            value = _read_json(f)
            sources.append((str(f), value))
            for key, v in value.items():
                extra.setdefault(key, v)

    base = None
    base_config: dict = {}
    if kind == "adapter":
        base = _read_json(adapter_cfg).get("base_model_name_or_path") or extra.get("base_model")
        if not base:
            raise MirageError(
                f"{p}: adapter_config.json names no base model (base_model_name_or_path) and no {MIRAGE_FILE} "
                "gives one; cannot load the adapter"
            )
        if Path(base, "config.json").is_file():
            base_config = _read_json(Path(base, "config.json"))
            if isinstance(base_config.get(CONFIG_KEY), dict):
                sources.append(
                    (f"{Path(base, 'config.json')} '{CONFIG_KEY}' (the base model)", base_config[CONFIG_KEY])
                )
        elif not _looks_like_hub_name(str(base)):
            raise MirageError(f"{p}: its base model {base!r} is not a folder or a hub model name")

    sizes = [(name, int(v["latent_size"])) for name, v in sources if v.get("latent_size") is not None]
    if not sizes and (p / "training_args.bin").is_file():
        saved, _stage = _latent_size_from_training_args(p / "training_args.bin")
        if saved is not None:
            sizes.append((f"{p / 'training_args.bin'} (latent_size)", saved))
    # The folder's own settings must agree; a base model's stage-1 size must agree as well (same tokens).
    for name, size in sizes[1:]:
        if size != sizes[0][1]:
            raise MirageError(
                f"{p}: latent size disagrees between {sizes[0][0]} (k={sizes[0][1]}) and {name} (k={size})"
            )
    if latent_size is not None and sizes and int(latent_size) != sizes[0][1]:
        raise MirageError(
            f"{p}: latent_size={latent_size} disagrees with {sizes[0][0]} (k={sizes[0][1]}); use the trained latent size"
        )
    k = sizes[0][1] if sizes else (int(latent_size) if latent_size is not None else None)
    for name, value in sources:
        names = value.get("latent_tokens")
        if names is not None and list(names) != list(LATENT_TOKEN_NAMES):
            raise MirageError(f"{p}: {name} names latent tokens {names}, expected {list(LATENT_TOKEN_NAMES)}")

    tokenizer_dir = (
        p if (p / "tokenizer_config.json").is_file() else (Path(base) if base and Path(base).is_dir() else p)
    )
    vocab = _tokenizer_vocab(tokenizer_dir)
    missing = [t for t in LATENT_TOKEN_NAMES if t not in vocab]
    if missing and k is None:
        if require_mirage:
            raise MirageError(
                f"{p} is not a Mirage model: its tokenizer has no latent tokens {list(LATENT_TOKEN_NAMES)} "
                f"and no latent size is saved with it (config.json '{CONFIG_KEY}' or {MIRAGE_FILE})"
            )
        return ModelSource(p, kind, base, None, dict(extra), checkpoint, tokenizer_dir)
    if missing:
        raise MirageError(
            f"{p}: {sizes[0][0] if sizes else 'latent_size'} says latent size k={k}, but the tokenizer in {tokenizer_dir} "
            f"lacks the latent tokens {missing}"
        )
    if k is None:
        raise MirageError(
            f"{p}: the tokenizer has the latent tokens but no latent size is saved with the model "
            f"(no config.json '{CONFIG_KEY}', no {MIRAGE_FILE}); pass the trained latent size (--latent-size)"
        )
    if k < 1:
        raise MirageError(f"{p}: latent size must be >= 1, got {k}")
    rows = _text_vocab_size(config if kind == "full" else base_config)
    top = max(vocab[t] for t in LATENT_TOKEN_NAMES)
    if kind == "full" and rows is not None and top >= rows:
        raise MirageError(
            f"{p}: the latent token id {top} is beyond the model's embedding ({rows} rows): tokenizer and weights disagree"
        )
    mirage = dict(extra)
    mirage.update(latent_size=k, latent_tokens=list(LATENT_TOKEN_NAMES))
    return ModelSource(p, kind, base, k, mirage, checkpoint, tokenizer_dir)


def portable_model_ref(name) -> str:
    """How a saved file names another model: an absolute path for a local folder (valid from any working
    directory), a Hub id as it is."""
    return str(Path(name).resolve()) if Path(str(name)).exists() else str(name)


def _looks_like_hub_name(name: str) -> bool:
    """`org/name` that is not a path: never absolute, never `./...`, and its first part is not a local
    folder, so `outputs/exprot` (a typo under an existing `outputs/`) fails at once instead of waiting on
    the Hub."""
    return (
        not os.path.isabs(name)
        and not name.startswith(".")
        and name.count("/") == 1
        and not name.endswith("/")
        and not Path(name).exists()
        and not Path(name.split("/", 1)[0]).is_dir()
    )


# ---------------------------------------------------------------------------------------- loading
def _dtype(dtype):
    import torch

    if dtype in (None, "auto"):
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise MirageError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return value


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


def _load_source(src: ModelSource, dtype=None, trust_remote_code: bool = False):
    """(model, processor, resized): a full model, or an adapter (PeftModel) over its base; eval mode."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..latent.feedback import slot_settings
    from ..latent.tokens import set_mirage_config
    from .loading import load_processor

    torch_dtype = _dtype(dtype)
    name = str(src.base if src.is_adapter else src.path)
    model_type = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type
    from .loading import processor_class

    try:  # a text-only model (no vision tower): say which folder, before anything loads
        processor_class(model_type)
    except MirageError as exc:
        raise MirageError(f"{src.path}: {exc}") from None
    processor = load_processor(
        str(src.tokenizer_dir or src.path), model_type=model_type, trust_remote_code=trust_remote_code
    )
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        raise MirageError(f"{src.path}: cannot load the model {name} ({str(exc).splitlines()[0]})") from None
    resized = False
    if src.is_adapter:
        from peft import PeftModel

        rows = model.get_input_embeddings().weight.shape[0]
        want = _adapter_embedding_rows(src.path) or max(rows, len(processor.tokenizer))
        if want != rows:
            model.resize_token_embeddings(want, mean_resizing=False)
            resized = True
        from .loading import restore_latent_rows

        restore_latent_rows(model, processor.tokenizer, src.base, trust_remote_code)  # rows as training began
        if src.latent_size is not None:
            set_mirage_config(model, src.latent_size, **slot_settings(src.mirage))
        model = PeftModel.from_pretrained(model, str(src.path), is_trainable=False)
        resized = resized or _adapter_embedding_rows(src.path) is not None
    elif src.latent_size is not None:
        if len(processor.tokenizer) > model.get_input_embeddings().weight.shape[0]:
            raise MirageError(
                f"{src.path}: the tokenizer has more tokens than the model's embedding has rows"
            )
        set_mirage_config(model, src.latent_size, **slot_settings(src.mirage))
    return model.eval(), processor, resized


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
    as a `PeftModel`), a training output or a `checkpoint-N` folder; a hub name goes through
    `_load_hub`. A folder that is not a Mirage model (when
    `require_mirage`) or whose latent size disagrees with its tokenizer or another saved setting
    raises `MirageError`.
    """
    name = str(path_or_name)
    if not Path(name).is_dir():
        if Path(name).exists() or not _looks_like_hub_name(name):
            raise MirageError(f"{name}: not a model folder, an adapter folder or a hub model name (org/name)")
        return _load_hub(
            name, dtype=dtype, device=device, latent_size=latent_size, trust_remote_code=trust_remote_code
        )
    src = resolve_model_dir(name, latent_size=latent_size, require_mirage=require_mirage)
    if src.latent_size is None:  # only reachable with require_mirage=False (baselines, plain models)
        warnings.warn(
            f"{name}: the tokenizer has no latent tokens; it decodes as a plain model", stacklevel=2
        )
    model, processor, _ = _load_source(src, dtype=dtype, trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    return model, processor


def _load_hub(name, *, dtype=None, device=None, latent_size=None, trust_remote_code=False):
    """A model by hub name: loaded as it is, its Mirage settings checked when it has them."""
    from transformers import AutoModelForImageTextToText

    from .loading import load_processor

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=_dtype(dtype), trust_remote_code=trust_remote_code
        )
        processor = load_processor(name, trust_remote_code=trust_remote_code)
    except OSError as e:  # offline, no such repo, gated without a token: one line, no token in it
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MirageError(f"{name}: cannot load it from the Hub ({reason})") from None
    vocab = processor.tokenizer.get_vocab()
    if any(t not in vocab for t in LATENT_TOKEN_NAMES):
        warnings.warn(
            f"{name}: the tokenizer has no latent tokens; it decodes as a plain model", stacklevel=3
        )
    elif latent_size is not None:
        check_latent_size(model, latent_size)
        set_mirage_config(model, latent_size)
    if device is not None:
        model.to(device)
    return model.eval(), processor


def load_checkpoint_weights(model, checkpoint_dir) -> bool:
    """Load a full-model `checkpoint-N` into `model` in place, reading it the way `from_pretrained` does.

    transformers 5 saves Qwen-VL weights under the hub's key names (`model.layers...`, `visual...`) and
    only `from_pretrained` maps them back; `Trainer._load_from_checkpoint` loads the raw state dict with
    strict=False, so on resume every weight is silently left as initialised. Returns False (nothing done)
    for adapter checkpoints and folders without full weights, which the Trainer's own loader handles.
    """
    from ..latent.model_utils import unwrap

    folder = Path(checkpoint_dir)
    if (folder / "adapter_config.json").is_file() or not (
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
