"""What a saved folder is: a full model, a PEFT adapter (with its base), a training output or a
`checkpoint-N` folder of one, and the Mirage settings it was trained with.

The settings come from `latent.settings.MirageSettings`, read from the folder's own
`mirage_config.json` (every folder mirage-trl writes has one, checkpoints included), its
config.json "mirage" (full models), or the base model's config.json "mirage" (adapters); all that
are found must agree on the latent size, and so must an explicit `latent_size` (the one source for
checkpoints saved without settings, e.g. by other code). A hub name is not resolved here: it loads
as it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import check_resume_checkpoint
from ..errors import MirageError
from ..io import looks_like_hub_name, read_json
from .families import SUPPORTED_MODEL_TYPES
from .settings import CONFIG_KEY, SETTINGS_FILE, MirageSettings
from .tokens import LATENT_TOKEN_NAMES


@dataclass
class ModelSource:
    """What a folder holds, as far as loading and exporting it is concerned."""

    path: Path
    kind: str  # "full" or "adapter"
    base: str | None  # the base model of an adapter
    settings: MirageSettings | None  # None: not a Mirage model (only with require_mirage=False)
    checkpoint: bool = False  # a Trainer `checkpoint-N` folder
    tokenizer_dir: Path | None = None
    settings_file: str | None = None  # where the settings were read (a file, or config.json 'mirage')

    @property
    def is_adapter(self) -> bool:
        return self.kind == "adapter"

    @property
    def latent_size(self) -> int | None:
        return self.settings.latent_size if self.settings else None


def is_adapter_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _is_checkpoint(path: Path) -> bool:
    return re.fullmatch(r"checkpoint-\d+", path.name) is not None


def _config_settings(config_file: Path, what: str = "") -> list[tuple[str, MirageSettings]]:
    value = read_json(config_file).get(CONFIG_KEY) if config_file.is_file() else None
    if not isinstance(value, dict):
        return []
    where = f"{config_file} '{CONFIG_KEY}'{what}"
    return [(where, MirageSettings.from_dict(value, where))]


def _adapter_base(p: Path, own: MirageSettings | None) -> str:
    base = read_json(p / "adapter_config.json").get("base_model_name_or_path")
    base = base or (own.provenance.get("base_model") if own else None)
    if not base:
        raise MirageError(
            f"{p}: adapter_config.json names no base model (base_model_name_or_path) and no {SETTINGS_FILE} "
            "gives one; cannot load the adapter"
        )
    if not Path(base, "config.json").is_file() and not looks_like_hub_name(str(base)):
        raise MirageError(f"{p}: its base model {base!r} is not a folder or a hub model name")
    return str(base)


def _tokenizer_vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    except (OSError, ValueError) as exc:
        raise MirageError(f"{folder}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None


def check_model_source(name, flag: str = "--model_name_or_path") -> None:
    """A local model folder: a readable config.json of a supported vision-language model with well-typed Mirage
    settings and readable safetensors, or a PEFT adapter whose files are readable and whose base exists."""
    path = Path(str(name))
    if not path.exists():
        if looks_like_hub_name(str(name)):
            return  # loaded from the Hub by name
        raise MirageError(f"{flag} {name}: no such model folder")
    if not path.is_dir():
        raise MirageError(f"{flag} {name}: is a file, expected a model folder")
    if (path / "adapter_config.json").is_file():
        adapter = read_json(path / "adapter_config.json")
        base = adapter.get("base_model_name_or_path")
        if not base:
            raise MirageError(
                f"{path / 'adapter_config.json'}: names no base model (base_model_name_or_path)"
            )
        check_model_source(base, flag=f"{path / 'adapter_config.json'}: base model")
        _check_safetensors(path)
        return
    if not (path / "config.json").is_file():
        raise MirageError(f"{flag} {path}: no config.json (not a model folder, nor an adapter)")
    config = read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MirageError(
            f"{path / 'config.json'}: model type {model_type!r} is not a supported vision-language model; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    mirage = config.get(CONFIG_KEY)
    if mirage is not None:  # read as the loader will read it: a bad value fails here, before anything loads
        where = f"{path / 'config.json'}:{CONFIG_KEY}"
        if not isinstance(mirage, dict):
            raise MirageError(
                f"{where}: expected the Mirage settings (an object), got {json.dumps(mirage)[:60]}"
            )
        MirageSettings.from_dict(mirage, where)
    _check_safetensors(path)


def _check_safetensors(folder: Path) -> None:
    """Every safetensors file's header parses and covers the file (a truncated copy fails here, not mid-load)."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MirageError(
                f"{f}: not a readable safetensors file, corrupt or truncated ({reason})"
            ) from None


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
    kind = "adapter" if is_adapter_dir(p) else "full" if (p / "config.json").is_file() else None
    if kind is None:
        raise MirageError(
            f"{p} is neither a model folder (no config.json) nor a PEFT adapter folder (no adapter_config.json)"
        )
    check_model_source(p, flag="--model")  # its model type, settings and weight files, before anything loads
    checkpoint = _is_checkpoint(p)
    if checkpoint and not (p / "trainer_state.json").is_file():
        check_resume_checkpoint(str(p), flag="--model")  # a partial checkpoint: names the newest complete one

    own = MirageSettings.read(p)
    found = [(str(p / SETTINGS_FILE), own)] if own else []
    base = None
    if kind == "full":
        found += _config_settings(p / "config.json")
    else:
        base = _adapter_base(p, own)
        found += _config_settings(Path(base, "config.json"), " (the base model)")
    for where, s in found[1:]:
        if s.latent_size != found[0][1].latent_size:
            raise MirageError(
                f"{p}: latent size disagrees between {found[0][0]} (k={found[0][1].latent_size}) and {where} "
                f"(k={s.latent_size})"
            )
    settings = found[0][1] if found else None
    if settings is not None and latent_size is not None and int(latent_size) != settings.latent_size:
        raise MirageError(
            f"{p}: latent_size={latent_size} disagrees with {found[0][0]} (k={settings.latent_size}); "
            "use the trained latent size"
        )
    elif settings is None and latent_size is not None:
        settings = MirageSettings(latent_size=int(latent_size))

    tokenizer_dir = (
        p if (p / "tokenizer_config.json").is_file() or not base or not Path(base).is_dir() else Path(base)
    )
    vocab = _tokenizer_vocab(tokenizer_dir)
    missing = [t for t in LATENT_TOKEN_NAMES if t not in vocab]
    if missing and settings is None:
        if require_mirage:
            raise MirageError(
                f"{p} is not a Mirage model: its tokenizer has no latent tokens {list(LATENT_TOKEN_NAMES)} "
                f"and no latent size is saved with it (config.json '{CONFIG_KEY}' or {SETTINGS_FILE})"
            )
        return ModelSource(p, kind, base, None, checkpoint, tokenizer_dir)
    if missing:
        raise MirageError(
            f"{p}: {found[0][0] if found else 'latent_size'} says latent size k={settings.latent_size}, but the "
            f"tokenizer in {tokenizer_dir} lacks the latent tokens {missing}"
        )
    if settings is None:
        raise MirageError(
            f"{p}: the tokenizer has the latent tokens but no latent size is saved with the model "
            f"(no config.json '{CONFIG_KEY}', no {SETTINGS_FILE}); pass the trained latent size (--latent-size)"
        )
    if kind == "full":
        config = read_json(p / "config.json")
        # Checkpoints of the official Mirage code record the ids of their start/end tokens in config.json.
        for key, name in (
            ("latent_start_id", LATENT_TOKEN_NAMES[0]),
            ("latent_end_id", LATENT_TOKEN_NAMES[2]),
        ):
            if config.get(key) is not None and config[key] != vocab[name]:
                raise MirageError(
                    f"{p / 'config.json'}: {key}={config[key]} but the tokenizer has {name} at id {vocab[name]}"
                )
        rows = (config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size")
        top = max(vocab[t] for t in LATENT_TOKEN_NAMES)
        if rows is not None and top >= rows:
            raise MirageError(
                f"{p}: the latent token id {top} is beyond the model's embedding ({rows} rows): tokenizer and "
                "weights disagree"
            )
    return ModelSource(p, kind, base, settings, checkpoint, tokenizer_dir, found[0][0] if found else None)


def portable_model_ref(name) -> str:
    """How a saved file names another model: an absolute path for a local folder (valid from any working
    directory), a Hub id as it is."""
    return str(Path(name).resolve()) if Path(str(name)).exists() else str(name)
