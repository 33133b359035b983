"""Export, merge, upload and load a trained Mirage model.

A Mirage model is more than weights: the tokenizer carries the latent tokens, the embedding (and
LM head) hold their trained rows, and the latent size k must travel with it. This module

* resolves and loads a folder through `mirage_trl.models.load` (`resolve_model_dir`, `load_model`);
* exports it (`export_model`): the adapter as such (LoRA weights + PEFT trainable-token rows of
  the latent tokens), or merged into a full model (`merge_and_unload`), or a full model re-saved;
  always with the processor, the Mirage settings (config.json "mirage" and mirage_config.json),
  safetensors only, and a model card. The folder is written under a temporary name and renamed
  at the end (`io.atomic_dir`), so an interrupted export never leaves a folder that looks complete;
* uploads the exported folder through `huggingface_hub` (`push_folder`); a failure leaves the
  local export complete and says so in one line.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from .errors import MirageError
from .io import read_json
from .latent.tokens import LATENT_TOKEN_NAMES
from .models.load import load_source, torch_dtype
from .models.processors import save_processor
from .models.resolve import looks_like_hub_name, portable_model_ref, resolve_model_dir

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


# ---------------------------------------------------------------------------------------- model card
def _load_eval(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MirageError(f"--eval-json: {p} does not exist")
    return read_json(p)


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


def _eval_table(results: dict) -> list[str]:
    """Markdown table of a `mirage-trl eval` results.json: accuracy % per latent mode (rows) and level."""
    modes = results["modes"]
    groups = list(next(iter(modes.values()))["groups"])
    lines = [
        f"Benchmark `{results.get('benchmark')}`, {results.get('num_rows')} test rows "
        f"(`{Path(str(results.get('data', ''))).name}`), accuracy % per level; `model` = the model's own latents, "
        "the other rows are latent ablations:",
        "",
        "| latents | " + " | ".join(f"level {g}" if g != "all" else "all" for g in groups) + " | invalid % |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    for mode, res in modes.items():
        g = res["groups"]
        cells = [f"{100 * g[k]['accuracy']:.1f}" if k in g else "-" for k in groups]
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {100 * g['all']['invalid_rate']:.1f} |")
    return lines


def _eval_index(results: dict) -> list:
    """huggingface_hub `EvalResult`s (the card's model-index): accuracy per latent mode and level."""
    from huggingface_hub import EvalResult

    benchmark = str(results.get("benchmark"))
    out = []
    for mode, res in results["modes"].items():
        for group, g in res["groups"].items():
            where = "all levels" if group == "all" else f"level {group}"
            out.append(
                EvalResult(
                    task_type="image-text-to-text",
                    dataset_type=benchmark,
                    dataset_name=benchmark,
                    dataset_split="test",
                    metric_type="accuracy",
                    metric_name=f"accuracy ({where}, latents: {mode})",
                    metric_value=round(100 * g["accuracy"], 2),
                )
            )
    return out


def _is_eval_results(results) -> bool:
    """A `mirage-trl eval` results.json (per-mode groups), as opposed to a plain metrics mapping."""
    modes = results.get("modes") if isinstance(results, dict) else None
    return (
        isinstance(modes, dict)
        and bool(modes)
        and all(
            isinstance(m, dict) and isinstance(m.get("groups"), dict) and "all" in m["groups"]
            for m in modes.values()
        )
    )


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
    hub_datasets = [d for d in datasets if looks_like_hub_name(d)]
    card = generate_model_card(
        base_model=str(base_model) if base_model else None,
        model_name=model_name,
        hub_model_id=repo_id or model_name,
        dataset_name=hub_datasets or None,
        # a model whose last stage is GRPO (stage 3) is tagged as such, not as SFT
        tags=["mirage", "latent-visual-reasoning", "trl"]
        + (["grpo"] if 3 in (mirage.get("stages") or []) or mirage.get("stage") == 3 else ["sft"])
        + (["peft", "lora"] if kind == "adapter" else []),
        wandb_url=None,
        trackio_url=None,
        trainer_name="Mirage (mirage-trl)",
        trainer_citation=PAPER_CITATION,
        paper_title=PAPER_TITLE,
        paper_id=PAPER_ID,
    )
    card.data.pipeline_tag = "image-text-to-text"
    if kind == "adapter":
        card.data.library_name = "peft"
    if base_model and not looks_like_hub_name(str(base_model)):
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
    if kind == "adapter":
        lines += [
            "With PEFT alone (the weights, without the latent decoding loop): resize the base model's embeddings to "
            "this adapter's tokenizer, which holds the latent tokens, then load the adapter.",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageTextToText, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{target}")',
            f'base = AutoModelForImageTextToText.from_pretrained("{base_model or "BASE"}")',
            "base.resize_token_embeddings(len(tokenizer))",
            f'model = PeftModel.from_pretrained(base, "{target}")',
            "```",
            "",
        ]
    if eval_results and _is_eval_results(eval_results):
        lines += ["### Evaluation", "", *_eval_table(eval_results), ""]
        card.data.eval_results = _eval_index(eval_results)
        card.data.model_name = target
    metrics = _flat_metrics(eval_results) if eval_results and not _is_eval_results(eval_results) else []
    if metrics:
        lines += ["### Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {n} | {v:.4g} |" if isinstance(v, float) else f"| {n} | {v} |" for n, v in metrics]
        lines.append("")
    runs = _as_list(mirage.get("launch"))
    if len(runs) == len(stages):  # one line per stage, in order: say which
        from .latent.settings import GRPO_STAGE, STAGE1, STAGE2

        names = {STAGE1: "stage 1", STAGE2: "stage 2", GRPO_STAGE: "GRPO"}
        runs = [f"# {names.get(s, f'stage {s}')}\n{line}" for s, line in zip(stages, runs)]
    launch = runs + _as_list(mirage.get("command")) + _as_list(launch_lines)
    if launch:
        lines += ["### Launch lines", "", "```bash", *launch, "```", ""]
    section = "\n".join(lines)
    text = card.content
    if base_model and not looks_like_hub_name(str(base_model)):
        text = text.replace(f"[{base_model}](https://huggingface.co/{base_model})", f"`{base_model}`")
    # TRL's quick start uses a text-generation pipeline, which would decode without latents: replace it.
    replaced, n = re.subn(r"## Quick start\n.*?\n```\n", lambda _m: section, text, count=1, flags=re.S)
    if n == 0:
        replaced = text.rstrip() + "\n\n" + section
    return replaced


def check_eval_results(
    results: dict, path, models: list, latent_size: int | None, settings_file, what: str
) -> None:
    """Results of `mirage-trl eval` go into a card only when they evaluate this model (one of `models`: a
    folder or a Hub id) with its latent size (`settings_file` says where that size was read). `what` names
    the model in the error (the folder exported, the card's folder)."""
    if not _is_eval_results(results):
        return  # a plain metrics mapping: the user's own numbers
    model = results.get("model")
    if model is not None:
        same = {str(Path(m).resolve()) if Path(str(m)).exists() else str(m) for m in models}
        evaluated = str(Path(model).resolve()) if Path(str(model)).exists() else str(model)
        if evaluated not in same:
            raise MirageError(f"--eval-json {path}: evaluates {model}, not {what}; evaluate this model")
    k = results.get("latent_size")
    if k is not None and latent_size is not None and int(k) != latent_size:
        raise MirageError(
            f"--eval-json {path}: latent_size={k} disagrees with {settings_file} (latent_size={latent_size})"
        )


_EVAL_SECTION = re.compile(r"^### Evaluation\n.*?(?=^#{2,3} |\Z)", re.S | re.M)


def add_eval_results(folder, eval_json) -> Path:
    """Put a `mirage-trl eval` results.json into the model card of `folder` (a training output, a checkpoint,
    an export, a text-only baseline or a GRPO run): the accuracy table per latent mode and level in the text,
    and the card's model-index (`EvalResult`s). An Evaluation section already there is replaced; results of
    another model or latent size are refused in one line. Returns the README path."""
    from huggingface_hub import ModelCard

    from .latent.settings import SETTINGS_FILE, MirageSettings

    folder = Path(folder)
    if not folder.is_dir():
        raise MirageError(f"{folder}: no such model folder")
    results = read_json(eval_json)
    if not _is_eval_results(results):
        raise MirageError(
            f"--eval-json {eval_json}: not the results.json of `mirage-trl eval` (no per-mode results)"
        )
    settings = MirageSettings.read(folder)
    check_eval_results(
        {
            **results,
            "model": results.get("model") or "(no model named)",
        },  # unnamed: cannot be checked, refused
        eval_json,
        [folder],
        settings.latent_size if settings else None,
        folder / SETTINGS_FILE,
        folder,
    )
    readme = folder / "README.md"
    card = ModelCard(readme.read_text(encoding="utf-8") if readme.is_file() else "")
    card.data.eval_results = _eval_index(results)
    card.data.model_name = card.data.model_name or folder.resolve().name
    section = "\n".join(["### Evaluation", "", *_eval_table(results), "", ""])
    text, n = _EVAL_SECTION.subn(lambda _m: section, card.text, count=1)
    if not n:  # where build_model_card puts it: after the Mirage details, before the launch lines
        at = [text.find(f"\n{h}\n") for h in ("### Launch lines", "## Training procedure")]
        at = min((i for i in at if i >= 0), default=None)
        text = (
            text.rstrip("\n") + "\n\n" + section
            if at is None
            else f"{text[: at + 1]}{section}{text[at + 1 :]}"
        )
    card.text = text
    write_card(folder, str(card))
    return readme


# ---------------------------------------------------------------------------------------- export
def check_out_apart(out: Path, source: Path, what: str) -> None:
    """An export replaces `--out` whole: it must not be, contain or lie inside a folder it reads."""
    o, m = out.resolve(), source.resolve()
    if o == m or m in o.parents or o in m.parents:
        relation = "is" if o == m else ("is inside" if m in o.parents else "contains")
        raise MirageError(
            f"--out {out}: {relation} {what} {source}; an export never writes where it reads (choose another --out)"
        )


def write_card(folder, text: str) -> None:
    """README.md of a model folder, every credential-looking value scrubbed."""
    from .redact import scrub

    (Path(folder) / "README.md").write_text(scrub(text), encoding="utf-8")


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
    from .io import atomic_dir, check_output_dir

    out = check_output_dir(out, overwrite, "--out")  # before any work
    src = resolve_model_dir(model_path, latent_size=latent_size)
    check_out_apart(out, src.path, "--model")
    if src.is_adapter and Path(str(src.base)).exists():
        check_out_apart(out, Path(str(src.base)), "the base model its adapter names")
    eval_results = _load_eval(eval_json) if eval_json else None
    if eval_results is not None:
        check_eval_results(
            eval_results,
            eval_json,
            [src.path, out, *([push_to_hub] if push_to_hub else [])],
            src.latent_size,
            src.settings_file or src.path,
            f"{src.path} (the model exported) nor {out}",
        )
    kind = "merged" if (src.is_adapter and merge) else ("adapter" if src.is_adapter else "full")

    with atomic_dir(out, overwrite=overwrite, flag="--out") as tmp:
        # Merging is done in the saved precision; `dtype` casts the result.
        load_dtype = "auto" if (merge or dtype is None) else torch_dtype(dtype)
        model, processor, resized = load_source(src, dtype=load_dtype)
        settings = src.settings
        if kind == "adapter":
            config = model.peft_config[model.active_adapter]
            config.base_model_name_or_path = portable_model_ref(src.base)
            config.inference_mode = True
            if dtype is not None:
                model.to(torch_dtype(dtype))
            # "auto" misses a resized embedding on composite VL configs (PEFT 0.21): decide here.
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=bool(resized))
        else:
            if kind == "merged":
                model = model.merge_and_unload()
            if dtype is not None and torch_dtype(dtype) != "auto":
                model.to(torch_dtype(dtype))
            settings.save_to(model)
            model.config._name_or_path = str(out)
            model.save_pretrained(tmp, safe_serialization=True)
        save_processor(processor, tmp, model.config.model_type)
        base_model = settings.provenance.get("base_model")
        if src.is_adapter:
            base_model = portable_model_ref(src.base)  # the model the adapter loads over
        settings = settings.replace(
            format=kind, exported_from=portable_model_ref(src.path), base_model=base_model
        )
        settings.write(tmp)
        mirage = settings.to_dict()
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
        write_card(tmp, card)

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
    """The command line that ran this process, for the settings file and the model card, credentials redacted:
    `accelerate launch recipes/stage1_vsp.py --config ...` for a recipe (accelerate's own flags are not
    visible to its worker), `mirage-trl export ...` for the command."""
    from .redact import redact_argv

    argv = list(sys.argv if argv is None else argv)
    argv[0] = _program(argv[0])
    # accelerate launch sets these in its workers' environment (one process or many)
    under_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ and argv[0].endswith(".py")
    return shlex.join((["accelerate", "launch"] if under_accelerate else []) + redact_argv(argv))


def _program(path: str) -> str:
    """How a user names the program: `recipes/<script>` for a shipped recipe (in a clone or a wheel),
    `mirage-trl` for the command (`python -m mirage_trl` included), otherwise the file's name."""
    from .shipped import shipped

    script = Path(path).resolve()
    try:
        return f"recipes/{script.relative_to(shipped('recipes')).as_posix()}"
    except (ValueError, MirageError):
        pass
    if script.name == "__main__.py" and script.parent.name == "mirage_trl":
        return "mirage-trl"
    return script.name
