"""Model cards and eval results: the README.md of every folder mirage-trl writes (training outputs, checkpoints,
exports), built on TRL's card with the Mirage details (`build_model_card`), an eval's accuracy table and
model-index put into any model folder's card (`add_eval_results`), and the launch line a card records
(`launch_line`)."""

from __future__ import annotations

import html
import math
import os
import re
import shlex
import sys
from pathlib import Path

from .errors import MirageError
from .folders import check_writable_dir
from .io import atomic_file, looks_like_hub_name, read_json
from .models.settings import SETTINGS_FILE, MirageSettings
from .models.tokens import LATENT_TOKEN_NAMES
from .redact import redact_argv, scrub
from .shipped import shipped
from .stages import STAGE_NAMES

PAPER_ID = "2506.17218"
PAPER_TITLE = "Machine Mental Imagery: Empower Multimodal Reasoning with Latent Visual Tokens"
PAPER_CITATION = """@article{yang2025mirage,
  title={Machine Mental Imagery: Empower Multimodal Reasoning with Latent Visual Tokens},
  author={Yang, Zeyuan and Yu, Xueyang and Chen, Delin and Shen, Maohao and Gan, Chuang},
  journal={arXiv preprint arXiv:2506.17218},
  year={2025}
}"""


def load_eval_results(path) -> dict:
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


def _md(value) -> str:
    """A string from an eval JSON as inert Markdown: HTML escaped (no raw tags), one line (no line break that
    starts a block), no table-cell or code-span delimiters."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return text.replace("|", "&#124;").replace("`", "&#96;")


def _eval_table(results: dict) -> list[str]:
    """Markdown table of a `mirage-trl eval` results.json: accuracy % per latent mode (rows) and level."""
    modes = results["modes"]
    groups = list(next(iter(modes.values()))["groups"])
    lines = [
        f"Benchmark `{_md(results.get('benchmark'))}`, {_md(results.get('num_rows'))} test rows "
        f"(`{_md(Path(str(results.get('data', ''))).name)}`), accuracy % per level; `model` = the model's own "
        "latents, the other rows are latent ablations:",
        "",
        "| latents | "
        + " | ".join(f"level {_md(g)}" if g != "all" else "all" for g in groups)
        + " | invalid % |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    for mode, res in modes.items():
        g = res["groups"]
        cells = [f"{100 * g[k]['accuracy']:.1f}" if k in g else "-" for k in groups]
        lines.append(f"| {_md(mode)} | " + " | ".join(cells) + f" | {100 * g['all']['invalid_rate']:.1f} |")
    return lines


def _eval_index(results: dict) -> list:
    """huggingface_hub `EvalResult`s (the card's model-index): accuracy per latent mode and level."""
    from huggingface_hub import EvalResult

    benchmark = _md(results.get("benchmark"))
    out = []
    for mode, res in results["modes"].items():
        mode = _md(mode)
        for group, g in res["groups"].items():
            where = "all levels" if group == "all" else f"level {_md(group)}"
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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_eval_results(results) -> bool:
    """A `mirage-trl eval` results.json (per-mode groups of numbers), as opposed to a plain metrics mapping or
    a file whose fields have the wrong types."""
    modes = results.get("modes") if isinstance(results, dict) else None
    return (
        isinstance(modes, dict)
        and bool(modes)
        and all(
            isinstance(m, dict)
            and isinstance(m.get("groups"), dict)
            and isinstance(m["groups"].get("all"), dict)
            and all(
                isinstance(g, dict)
                and _is_number(g.get("accuracy"))
                and _is_number(g.get("invalid_rate", 0.0))
                for g in m["groups"].values()
            )
            and _is_number(m["groups"]["all"].get("invalid_rate"))
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
    base_model = mirage.get("base_model")
    local_base = bool(base_model) and not looks_like_hub_name(str(base_model))
    datasets = _as_list(datasets) + [
        d for d in _as_list(mirage.get("datasets")) if d not in _as_list(datasets)
    ]
    target = repo_id or model_name
    card = _trl_card(mirage, kind, model_name, target, datasets)
    if local_base:
        card.data.base_model = None  # a local path is no Hub model id
    lines = _mirage_section(mirage, kind, target, datasets)
    if kind == "adapter":
        lines += _peft_section(target, base_model)
    if eval_results and _is_eval_results(eval_results):
        lines += ["### Evaluation", "", *_eval_table(eval_results), ""]
        card.data.eval_results = _eval_index(eval_results)
        card.data.model_name = target
    metrics = _flat_metrics(eval_results) if eval_results and not _is_eval_results(eval_results) else []
    if metrics:
        lines += ["### Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {n} | {v:.4g} |" if isinstance(v, float) else f"| {n} | {v} |" for n, v in metrics]
        lines.append("")
    lines += _launch_section(mirage, launch_lines)
    text = card.content
    if local_base:
        text = text.replace(f"[{base_model}](https://huggingface.co/{base_model})", f"`{base_model}`")
    # TRL's quick start uses a text-generation pipeline, which would decode without latents: replace it.
    section = "\n".join(lines)
    replaced, n = re.subn(r"## Quick start\n.*?\n```\n", lambda _m: section, text, count=1, flags=re.S)
    return replaced if n else text.rstrip() + "\n\n" + section


def _trl_card(mirage: dict, kind: str, model_name: str, target: str, datasets: list[str]):
    """TRL's model card (`generate_model_card`) with the Mirage paper, tags and pipeline."""
    from trl.trainer.utils import generate_model_card  # TRL loads only when a card is written

    base_model = mirage.get("base_model")
    card = generate_model_card(
        base_model=str(base_model) if base_model else None,
        model_name=model_name,
        hub_model_id=target,
        dataset_name=[d for d in datasets if looks_like_hub_name(d)] or None,
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
    return card


def _mirage_section(mirage: dict, kind: str, target: str, datasets: list[str]) -> list[str]:
    """What the weights are, how they were trained, and how to decode with latents."""
    stages = mirage.get("stages") or []
    what = {
        "adapter": "a LoRA adapter (load it over its base model)",
        "merged": "the LoRA adapter merged into the base model",
        "full": "a fully fine-tuned model",
    }[kind]
    return [
        "## Mirage",
        "",
        f"Trained with [Mirage](https://arxiv.org/abs/{PAPER_ID}) latent visual tokens: while reasoning the model "
        f"emits `<|latent_start|>`, then k latent vectors (its own hidden states), then `<|latent_end|>`.",
        "",
        f"- Weights: {what}",
        f"- Base model: `{mirage.get('base_model') or 'unknown'}`",
        f"- Stages run: {', '.join(f'stage {s}' for s in stages) if stages else 'unknown'}",
        f"- Latent size k: {mirage.get('latent_size')}; latent tokens: {', '.join(f'`{t}`' for t in LATENT_TOKEN_NAMES)}",
        f"- Datasets: {', '.join(f'`{d}`' for d in datasets) if datasets else 'not recorded'}",
        *_objective_lines(mirage),
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


def _objective_lines(mirage: dict) -> list[str]:
    """How the latents were taught and what decoding must keep (older settings record neither: nothing said)."""
    lines = []
    if "latent_loss" in mirage:
        loss = f"`{mirage['latent_loss']}`"
        if mirage["latent_loss"] == "contrastive":
            loss += f" (temperature {mirage.get('latent_temperature')})"
        if mirage.get("latent_variance_weight"):
            loss += f" + variance-covariance regulariser x {mirage['latent_variance_weight']}"
        lines.append(f"- Stage-1 latent loss: {loss}")
    target = mirage.get("latent_target", "pooled")
    if target != "pooled":
        scaled = " and scaled by the running standard deviation" if mirage.get("latent_target_scale") else ""
        lines.append(
            f"- Stage-1 latent targets: `{target}` ("
            + {
                "centred": f"pooled helper-image features minus their running mean{scaled}",
                "delta": "helper-image features minus the input image's, pooled",
                "selected": "helper-image features at the k patches that change most from the input image",
            }.get(target, target)
            + ")"
        )
    if mirage.get("latent_aux_text"):
        lines.append(
            f"- Auxiliary decoding of each latent span into its helper image's text, weight {mirage['latent_aux_text']}"
            + (" (gradient through the latents only)" if mirage.get("latent_only_backprop") else "")
        )
    bottleneck = mirage.get("latent_bottleneck", "none")
    if bottleneck != "none":
        lines.append(
            f"- Visual bottleneck: `{bottleneck}` (text after "
            + ("a latent span's start" if bottleneck == "image" else "the image")
            + " cannot attend to the image); `generate_with_latents` applies it from the saved settings"
        )
    return lines


def _peft_section(target: str, base_model) -> list[str]:
    """An adapter with PEFT alone: the weights, without the latent decoding loop."""
    return [
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


def _launch_section(mirage: dict, launch_lines: list[str] | None) -> list[str]:
    """The command lines that made the model, one per stage in order."""
    stages = mirage.get("stages") or []
    runs = _as_list(mirage.get("launch"))
    if len(runs) == len(stages):  # one line per stage, in order: say which
        runs = [f"# {STAGE_NAMES.get(s, f'stage {s}')}\n{line}" for s, line in zip(stages, runs)]
    launch = runs + _as_list(mirage.get("command")) + _as_list(launch_lines)
    return ["### Launch lines", "", "```bash", *launch, "```", ""] if launch else []


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


MODEL_FILES = ("config.json", "adapter_config.json", SETTINGS_FILE)  # what makes a folder a model's
_EVAL_SECTION = re.compile(r"^### Evaluation\n.*?(?=^#{2,3} |\Z)", re.S | re.M)


def add_eval_results(folder, eval_json) -> Path:
    """Put a `mirage-trl eval` results.json into the model card of `folder` (a training output, a checkpoint,
    an export, a text-only baseline or a GRPO run): the accuracy table per latent mode and level in the text,
    and the card's model-index (`EvalResult`s). An Evaluation section already there is replaced; results of
    another model or latent size are refused in one line. Returns the README path."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    if not folder.is_dir():
        raise MirageError(f"{folder}: no such model folder")
    if not any((folder / name).is_file() for name in MODEL_FILES):
        raise MirageError(
            f"{folder}: not a model folder (it has none of {', '.join(MODEL_FILES)}); give a training output, "
            "a checkpoint or an export"
        )
    check_writable_dir(folder, "card")  # a read-only folder: one line before any work
    results = read_json(eval_json)
    if not _is_eval_results(results):
        raise MirageError(
            f"--eval-json {eval_json}: not the results.json of `mirage-trl eval` (no per-mode results with numeric "
            "accuracies)"
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


def write_card(folder, text: str) -> None:
    """README.md of a model folder, every credential-looking value scrubbed; written atomically, so a full disk
    or a kill leaves the old card whole."""
    with atomic_file(Path(folder) / "README.md") as f:
        f.write(scrub(text))


def launch_line(argv: list[str] | None = None) -> str:
    """The command line that ran this process, for the settings file and the model card, credentials redacted:
    `accelerate launch recipes/stage1_vsp.py --config ...` for a recipe (accelerate's own flags are not
    visible to its worker), `mirage-trl export ...` for the command."""
    argv = list(sys.argv if argv is None else argv)
    argv[0] = _program(argv[0])
    # accelerate launch sets these in its workers' environment (one process or many)
    under_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ and argv[0].endswith(".py")
    return shlex.join((["accelerate", "launch"] if under_accelerate else []) + redact_argv(argv))


def _program(path: str) -> str:
    """How a user names the program: `recipes/<script>` for a shipped recipe (in a clone or a wheel),
    `mirage-trl` for the command (`python -m mirage_trl` included), otherwise the file's name."""
    script = Path(path).resolve()
    try:
        return f"recipes/{script.relative_to(shipped('recipes')).as_posix()}"
    except (ValueError, MirageError):
        pass
    if script.name == "__main__.py" and script.parent.name == "mirage_trl":
        return "mirage-trl"
    return script.name
