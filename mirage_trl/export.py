"""Export, merge, upload and load a trained Mirage model.

A Mirage model is more than weights: the tokenizer carries the latent tokens, the embedding (and
LM head) hold their trained rows, and the latent size k must travel with it. This module

* resolves what a folder is (`resolve_model_dir`): a full model, a LoRA adapter (with its base),
  a stage-1/2 training output or a `checkpoint-N` folder of one, and checks that its latent
  settings agree with its tokenizer (a folder that is not a Mirage model is refused);
* loads it ready for `generate_with_latents` (`load_model`, also `mirage_trl.load_model`);
* exports it (`export_model`): the adapter as such (LoRA weights + PEFT trainable-token rows of
  the latent tokens), or merged into a full model (`merge_and_unload`), or a full model re-saved;
  always with the processor, the Mirage settings (config.json "mirage" and mirage_config.json),
  safetensors only, and a model card. The folder is written under a temporary name and renamed
  at the end (`io.atomic_dir`), so an interrupted export never leaves a folder that looks complete;
* uploads the exported folder through `huggingface_hub` (`push_folder`); a failure leaves the
  local export complete and says so in one line.

Where the Mirage settings of a folder come from, first found wins (all found must agree):
config.json "mirage" (full models), mirage_config.json in the folder, mirage_config.json of the
training output a `checkpoint-N` folder sits in, the base model's config.json "mirage" (adapters),
the `latent_size` saved in training_args.bin (read without unpickling), an explicit `latent_size`.
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import shlex
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MirageError
from .latent.tokens import CONFIG_KEY, LATENT_TOKEN_NAMES

MIRAGE_FILE = "mirage_config.json"
PAPER_ID = "2506.17218"
PAPER_TITLE = "Machine Mental Imagery: Empower Multimodal Reasoning with Latent Visual Tokens"
PAPER_CITATION = """@article{yang2025mirage,
  title={Machine Mental Imagery: Empower Multimodal Reasoning with Latent Visual Tokens},
  author={Yang, Zeyuan and Yu, Xueyang and Chen, Delin and Shen, Maohao and Gan, Chuang},
  journal={arXiv preprint arXiv:2506.17218},
  year={2025}
}"""
# Files a training output may hold that an export must not carry (pickles, optimizer state).
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
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
    except (OSError, json.JSONDecodeError) as exc:
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


def _looks_like_hub_name(name: str) -> bool:
    return (
        not os.path.isabs(name)
        and not name.startswith(".")
        and name.count("/") == 1
        and not Path(name).exists()
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

    from .latent.tokens import set_mirage_config
    from .models.loading import load_processor

    torch_dtype = _dtype(dtype)
    name = str(src.base if src.is_adapter else src.path)
    model_type = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).model_type
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
        if src.latent_size is not None:
            set_mirage_config(model, src.latent_size)
        model = PeftModel.from_pretrained(model, str(src.path), is_trainable=False)
        resized = resized or _adapter_embedding_rows(src.path) is not None
    elif src.latent_size is not None:
        if len(processor.tokenizer) > model.get_input_embeddings().weight.shape[0]:
            raise MirageError(
                f"{src.path}: the tokenizer has more tokens than the model's embedding has rows"
            )
        set_mirage_config(model, src.latent_size)
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
    `mirage_trl.models.load.load_model`. A folder that is not a Mirage model (when
    `require_mirage`) or whose latent size disagrees with its tokenizer or another saved setting
    raises `MirageError`.
    """
    name = str(path_or_name)
    if not Path(name).is_dir():
        if Path(name).exists() or not _looks_like_hub_name(name):
            raise MirageError(f"{name}: not a model folder, an adapter folder or a hub model name (org/name)")
        from .models.load import load_model as load_hub

        return load_hub(
            name, dtype=dtype, device=device, latent_size=latent_size, trust_remote_code=trust_remote_code
        )
    src = resolve_model_dir(name, latent_size=latent_size, require_mirage=require_mirage)
    model, processor, _ = _load_source(src, dtype=dtype, trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    return model, processor


# ---------------------------------------------------------------------------------------- model card
def _load_eval(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MirageError(f"--eval-json: {p} does not exist")
    return _read_json(p)


def _flat_metrics(results: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(name, value) for numbers in an eval results JSON ('metrics' if present, else the whole object)."""
    if not prefix and isinstance(results.get("metrics"), dict):
        results = results["metrics"]
    out: list[tuple[str, object]] = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out.append((name, value))
        elif isinstance(value, dict) and prefix.count("/") < 2:
            out.extend(_flat_metrics(value, prefix=f"{name}/"))
    return out


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def build_model_card(
    mirage: dict,
    *,
    kind: str,
    model_name: str,
    repo_id: str | None = None,
    eval_results: dict | None = None,
    launch_lines: list[str] | None = None,
    datasets: list[str] | None = None,
) -> str:
    """The README.md text: TRL's model card with the Mirage details (stages, latent size, metrics, launch lines)."""
    from trl.trainer.utils import generate_model_card

    base_model = mirage.get("base_model")
    datasets = _as_list(datasets) + [
        d for d in _as_list(mirage.get("datasets")) if d not in _as_list(datasets)
    ]
    hub_datasets = [d for d in datasets if _looks_like_hub_name(d)]
    card = generate_model_card(
        base_model=str(base_model) if base_model else None,
        model_name=model_name,
        hub_model_id=repo_id or model_name,
        dataset_name=hub_datasets or None,
        tags=["mirage", "latent-visual-reasoning", "trl", "sft"]
        + (["peft", "lora"] if kind == "adapter" else []),
        wandb_url=None,
        trackio_url=None,
        trainer_name="Mirage (mirage-trl)",
        trainer_citation=PAPER_CITATION,
        paper_title=PAPER_TITLE,
        paper_id=PAPER_ID,
    )
    if kind == "adapter":
        card.data.library_name = "peft"
    if base_model and not _looks_like_hub_name(str(base_model)):
        card.data.base_model = None  # a local path is no Hub model id
    stages = mirage.get("stages") or []
    what = {
        "adapter": "a LoRA adapter (load it over its base model)",
        "merged": "the LoRA adapter merged into the base model",
        "full": "a fully fine-tuned model",
    }[kind]
    target = repo_id or model_name
    lines = [
        "## Mirage",
        "",
        f"Trained with [Mirage](https://arxiv.org/abs/{PAPER_ID}) latent visual tokens: while reasoning the model "
        f"emits `<|latent_start|>`, then k latent vectors (its own hidden states), then `<|latent_end|>`.",
        "",
        f"- Weights: {what}",
        f"- Base model: `{base_model or 'unknown'}`",
        f"- Stages run: {', '.join(f'stage {s}' for s in stages) if stages else 'unknown'}",
        f"- Latent size k: {mirage.get('latent_size')}; latent tokens: {', '.join(f'`{t}`' for t in LATENT_TOKEN_NAMES)}",
        f"- Datasets: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}",
        "",
        "Plain `generate` does not imagine: decode with the latent loop.",
        "",
        "```python",
        "from mirage_trl import load_model, generate_with_latents",
        "",
        f'model, processor = load_model("{target}")',
        "out = generate_with_latents(model, processor, inputs, max_new_tokens=1024)  # inputs: a left-padded processor batch",
        "```",
        "",
    ]
    metrics = _flat_metrics(eval_results) if eval_results else []
    if metrics:
        lines += ["### Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {n} | {v:.4g} |" if isinstance(v, float) else f"| {n} | {v} |" for n, v in metrics]
        lines.append("")
    launch = _as_list(mirage.get("launch")) + _as_list(mirage.get("command")) + _as_list(launch_lines)
    if launch:
        lines += ["### Launch lines", "", "```bash", *launch, "```", ""]
    section = "\n".join(lines)
    text = card.content
    if base_model and not _looks_like_hub_name(str(base_model)):
        text = text.replace(f"[{base_model}](https://huggingface.co/{base_model})", f"`{base_model}`")
    # TRL's quick start uses a text-generation pipeline, which would decode without latents: replace it.
    replaced, n = re.subn(r"## Quick start\n.*?\n```\n", lambda _m: section, text, count=1, flags=re.S)
    if n == 0:
        replaced = text.rstrip() + "\n\n" + section
    return replaced


# ---------------------------------------------------------------------------------------- export
def _write_card(folder: Path, text: str) -> None:
    (folder / "README.md").write_text(text, encoding="utf-8")


def _check_safetensors_only(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and f.name.endswith(_UNSAFE_SUFFIXES):
            f.unlink()  # e.g. a pickle a saver added; the export carries safetensors only


def export_model(
    model_path,
    out,
    *,
    merge: bool = False,
    overwrite: bool = False,
    eval_json=None,
    dtype=None,
    latent_size: int | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    launch_lines: list[str] | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Export a Mirage training output (see the module doc); returns the output folder.

    Adapter input: without `merge` the adapter (+ latent token rows), with `merge` a full model.
    Full input: re-saved. Then, with `push_to_hub`, the folder is uploaded; a failed upload raises
    `MirageError` after the local export is complete.
    """
    from .io import atomic_dir, write_json
    from .latent.tokens import set_mirage_config

    src = resolve_model_dir(model_path, latent_size=latent_size)
    out = Path(out)
    if out.resolve() == src.path.resolve() or src.path.resolve() in out.resolve().parents:
        raise MirageError(f"--out {out}: must not be the model folder {src.path} or inside it")
    eval_results = _load_eval(eval_json) if eval_json else None
    kind = "merged" if (src.is_adapter and merge) else ("adapter" if src.is_adapter else "full")

    with atomic_dir(out, overwrite=overwrite, flag="--out") as tmp:
        # Merging is done in the saved precision; `dtype` casts the result.
        model, processor, resized = _load_source(src, dtype=None if (merge or dtype is None) else dtype)
        mirage = dict(src.mirage)
        if kind == "adapter":
            config = model.peft_config[model.active_adapter]
            config.base_model_name_or_path = str(src.base)
            config.inference_mode = True
            if dtype is not None:
                model.to(_dtype(dtype))
            # "auto" misses a resized embedding on composite VL configs (STACK_NOTES): decide here.
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=bool(resized))
        else:
            if kind == "merged":
                model = model.merge_and_unload()
            if dtype is not None and _dtype(dtype) != "auto":
                model.to(_dtype(dtype))
            set_mirage_config(model, src.latent_size)
            model.config._name_or_path = str(out)
            model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        mirage.update(format=kind, exported_from=str(src.path))
        mirage.setdefault("base_model", str(src.base) if src.is_adapter else None)
        if src.is_adapter:
            mirage["base_model"] = str(src.base)  # the model the adapter loads over
        write_json(tmp / MIRAGE_FILE, mirage)
        _check_safetensors_only(tmp)
        card = build_model_card(
            mirage,
            kind=kind,
            model_name=out.name,
            repo_id=push_to_hub,
            eval_results=eval_results,
            launch_lines=launch_lines,
            datasets=datasets,
        )
        _write_card(tmp, card)

    if push_to_hub:
        push_folder(out, push_to_hub, private=private, revision=revision)
    return out


# ---------------------------------------------------------------------------------------- hub
def push_folder(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload `folder` to the model repo `repo_id` (created if needed); returns the commit URL.

    The token comes from the environment (HF_TOKEN) or `hf auth login`, and the endpoint from
    HF_ENDPOINT (read at call time); the token is never printed. Any failure raises `MirageError`
    in one line that says the local folder is complete.
    """
    from huggingface_hub import HfApi, get_token

    folder = Path(folder)
    where = f"the export is complete in {folder}"
    token = get_token()
    if not token:
        raise MirageError(
            f"--push-to-hub {repo_id}: no Hub token (set HF_TOKEN or run `hf auth login`); {where}"
        )
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            repo_type="model",
            commit_message=commit_message or f"Upload Mirage model ({folder.name}) with mirage-trl",
        )
    except Exception as exc:  # network, auth, permissions: the local export stays as it is
        first = (str(exc).splitlines() or [""])[0].replace(token, "***")
        raise MirageError(
            f"--push-to-hub {repo_id}: upload failed ({type(exc).__name__}: {first}); {where}"
        ) from None
    return str(getattr(info, "commit_url", info))


def launch_line(argv: list[str] | None = None) -> str:
    """The command line that ran this export, for the model card."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = Path(argv[0]).name
    return shlex.join(argv)
