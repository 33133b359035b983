"""Evaluation: batched latent decoding, reference grading, per-level / per-task tables, latent ablations.

`evaluate(model, processor, dataset, benchmark, ...)`:

* encodes every prompt once (chat template + generation prompt + input images), sorts the rows by
  prompt length so batches carry little padding, decodes each batch with `generate_with_latents`
  and puts the completions back in the rows' order;
* grades every completion with `grading.grade` (docs/method.md section 1.3);
* groups rows by level for VSP, by the row's `task` field (else the benchmark) for the others;
* runs once per latent mode (`latent_modes`, the ablation table): the same rows, batches and seed
  for every mode. "mean" feeds the mean latent of the eval set, taken from the "model" run's
  returned latents, so "model" runs first (it is added when "mean" is asked for without it).

Per mode and group: accuracy, invalid rate, mean latent spans per answer; per mode: generated
tokens/s (latent steps included) and rows/s (decoding and grading; prompt encoding is timed once,
separately, in `EvalResult.encode_seconds`).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import MirageError
from .generation import LATENT_MODES, generate_with_latents
from .grading import BENCHMARKS, CHOICE_BENCHMARKS, GRID_BENCHMARKS, extract_choice, grade, summarize
from .io import save_figure
from .latent.bottleneck import trained_bottleneck
from .latent.collator import MirageDataCollator
from .latent.health import collapse_reason, latent_health
from .models.settings import MirageSettings
from .models.tokens import LatentTokens
from .stats import wilson_interval

logger = logging.getLogger(__name__)

GROUP_ALL = "all"


@dataclass
class ModeResult:
    """One decoding run (one latent mode) over the eval rows."""

    mode: str
    groups: dict  # group -> {n, correct, invalid, accuracy, invalid_rate, latent_spans, mean_latent_spans}
    completions: list[dict]  # one per row, in the dataset's order
    seconds: float  # decoding + grading wall time
    num_generated_tokens: int  # latent steps included
    latent_health: dict = field(
        default_factory=dict
    )  # "model" mode: latent.health statistics of the fed latents

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_s(self) -> float:
        return len(self.completions) / self.seconds if self.seconds > 0 else 0.0

    @property
    def accuracy(self) -> float:
        return self.groups[GROUP_ALL]["accuracy"]

    def to_dict(self) -> dict:
        return {
            "groups": {str(k): v for k, v in self.groups.items()},
            "seconds": self.seconds,
            "num_generated_tokens": self.num_generated_tokens,
            "tokens_per_s": self.tokens_per_s,
            "rows_per_s": self.rows_per_s,
            "latent_health": dict(self.latent_health),
        }


@dataclass
class EvalResult:
    benchmark: str
    settings: dict
    modes: dict[str, ModeResult] = field(default_factory=dict)  # in run order ("model" first)
    encode_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "settings": dict(self.settings),
            "num_rows": self.num_rows,
            "encode_seconds": self.encode_seconds,
            "modes": {m: r.to_dict() for m, r in self.modes.items()},
            "notes": list(self.notes),
        }

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.modes.values())).completions) if self.modes else 0

    def completion_rows(self) -> list[dict]:
        """Every completion of every mode (mode-major, rows in the dataset's order)."""
        return [c for r in self.modes.values() for c in r.completions]


# ---------------------------------------------------------------------------------------------- checks


def row_group(benchmark: str, row) -> object:
    """VSP: the level (grid side); others: the row's `task` field when it has one, else the benchmark."""
    if benchmark.startswith("vsp"):
        return int(row.get("level") or 0)
    task = row.get("task")
    return str(task) if task else benchmark


def best_fixed_answer(benchmark: str, rows: Sequence) -> dict:
    """Accuracy per group (and over all rows) of the best single answer given to every row, the answers tried
    being the rows' own reference answers: the most a model that ignores its input can score (for VSP, the best
    fixed plan). What the visual-bottleneck probe is measured against."""
    rows = list(rows)
    candidates = sorted({f"\\boxed{{{r['answer']}}}" for r in rows if r.get("answer")})
    solved = {c: [grade(benchmark, c, r).correct for r in rows] for c in candidates}
    groups = [row_group(benchmark, r) for r in rows]
    out = {}
    for key in [*dict.fromkeys(groups), GROUP_ALL]:
        idx = [i for i, g in enumerate(groups) if key == GROUP_ALL or g == key]
        best = max(candidates, key=lambda c: sum(solved[c][i] for i in idx), default=None)
        hits = sum(solved[best][i] for i in idx) if best else 0
        out[str(key)] = {"answer": best, "accuracy": hits / len(idx) if idx else 0.0, "n": len(idx)}
    return out


def check_rows(benchmark: str, rows: Sequence) -> None:
    """Every row carries what grading its benchmark needs; a one-line `MirageError` names the field."""
    if benchmark not in BENCHMARKS:
        raise MirageError(f"unknown benchmark {benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    for i, row in enumerate(rows):
        where = row.get("source") or f"row {i}"
        if "messages" not in row:
            raise MirageError(
                f"{where}: no messages (load the data with mirage_trl.data.reference.load_reference_jsonl)"
            )
        if benchmark in GRID_BENCHMARKS:
            if not str(row.get("map_desc") or "").strip():
                raise MirageError(f"{where}:map_desc: {benchmark} rows need map_desc (the grid) for grading")
        elif benchmark in CHOICE_BENCHMARKS and extract_choice(str(row.get("answer") or "")) is None:
            raise MirageError(
                f"{where}:answer: {benchmark} rows need answer (the reference choice letter, or a boxed answer in "
                f"text_output), got {row.get('answer')!r}"
            )


def check_latent_modes(modes: Sequence[str]) -> list[str]:
    """Validate and order the modes: unique, "model" first (added when "mean" needs it)."""
    modes = list(dict.fromkeys(modes))
    if not modes:
        raise MirageError(f"no latent mode given; valid modes: {', '.join(LATENT_MODES)}")
    bad = [m for m in modes if m not in LATENT_MODES]
    if bad:
        raise MirageError(f"unknown latent mode {bad[0]!r}; valid modes: {', '.join(LATENT_MODES)}")
    if "mean" in modes and "model" not in modes:
        modes.insert(0, "model")
    if "model" in modes:
        modes.remove("model")
        modes.insert(0, "model")
    return modes


# ---------------------------------------------------------------------------------------------- batching


def prompt_encoder(processor):
    """The collator that encodes prompts for decoding (left padding, no helper images); a plain model too."""
    try:
        lt = LatentTokens.from_tokenizer(processor, 1)
    except MirageError:  # a plain model: prompts do not use the latent tokens
        lt = LatentTokens(-1, -1, -1, 1)
    return MirageDataCollator(processor, lt, padding_side="left", with_helpers=False)


def _model_device(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        import torch

        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate(
    model,
    processor,
    dataset,
    benchmark: str,
    *,
    batch_size: int = 16,
    num_samples: int | None = None,
    max_new_tokens: int = 1024,
    do_sample: bool = True,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 42,
    latent_modes: Sequence[str] = ("model",),
    progress: bool = True,
    generate_fn: Callable | None = None,
    on_decoded: Callable[[list[dict]], None] | None = None,
    bottleneck: str | None = None,
) -> EvalResult:
    """Decode, grade and summarise `dataset` (rows of `load_reference_jsonl`) once per latent mode.

    `num_samples`: the first N rows. `generate_fn`: defaults to `generation.generate_with_latents`
    (tests inject a fake with the same signature and output fields). `on_decoded`: called after every
    batch with its decoded rows (mode, index, source, completion), so a caller can keep them as they come.
    `bottleneck`: decode every mode under this visual bottleneck ("image" or "strict": LIVR's probe; "none":
    without; None: as the model was last trained).
    """
    import torch

    # 1. Check the arguments and the rows before anything is decoded.
    modes = check_latent_modes(latent_modes)
    rows = _eval_rows(dataset, benchmark, batch_size, num_samples)
    generate_fn = generate_fn or generate_with_latents
    settings = {
        "batch_size": batch_size,
        "num_samples": num_samples,
        "num_rows": len(rows),
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "temperature": temperature if do_sample else None,
        "top_p": top_p if do_sample else None,
        "seed": seed,
        "latent_modes": modes,
        "bottleneck": trained_bottleneck(model) if bottleneck is None else bottleneck,
    }
    result = EvalResult(benchmark=benchmark, settings=settings)
    if "mean" in latent_modes and "model" not in latent_modes:
        result.notes.append(
            "'mean' needs the eval set's mean latent: the 'model' run was added to compute it"
        )

    # 2. Encode every prompt once; sort by length (longest first) to cut padding.
    encoder = prompt_encoder(processor)
    t0 = time.perf_counter()
    encoded = [encoder.encode_prompt(r) for r in _progress(rows, progress, "encoding prompts")]
    result.encode_seconds = time.perf_counter() - t0
    order = sorted(range(len(rows)), key=lambda i: -encoded[i]["input_ids"].shape[0])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = _model_device(model)
    groups = [row_group(benchmark, r) for r in rows]

    # 3. Decode and grade once per latent mode ("model" first: "mean" feeds its mean latent).
    sampling = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
    sampling["bottleneck"] = settings["bottleneck"]
    latent_mean = None
    for mode in modes:
        want_latents = mode == "model"  # for the health statistics, and for "mean"
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        texts, spans, ntok, collected = _decode_mode(
            generate_fn, model, processor, encoder, encoded, batches, rows, mode,
            generator=torch.Generator(device=device).manual_seed(seed), latent_mean=latent_mean,
            return_latents=want_latents, sampling=sampling, progress=progress, on_decoded=on_decoded,
        )  # fmt: skip
        grades = [grade(benchmark, texts[i], rows[i]) for i in range(len(rows))]
        seconds = time.perf_counter() - start

        health = {}
        if want_latents:
            if "mean" in modes:
                latent_mean = _mean_latent(collected, model, result)
            health = decoding_health(collected, model, spans)
            _warn_collapse(health, result)
        table = summarize(grades, groups)
        _add_spans(table, groups, spans)
        completions = _completions(rows, benchmark, groups, mode, texts, grades, spans, ntok)
        result.modes[mode] = ModeResult(mode, table, completions, seconds, sum(ntok), health)
    return result


def _eval_rows(dataset, benchmark: str, batch_size: int, num_samples: int | None) -> list[dict]:
    """The rows to decode (the first `num_samples`), each checked for what its grader needs."""
    if batch_size < 1:
        raise MirageError(f"--batch-size must be >= 1, got {batch_size}")
    if num_samples is not None and num_samples < 1:
        raise MirageError(f"--num-samples must be >= 1, got {num_samples}")
    rows = [dataset[i] for i in range(len(dataset))] if not isinstance(dataset, list) else list(dataset)
    if num_samples is not None:
        rows = rows[:num_samples]
    if not rows:
        raise MirageError("the eval data has no rows")
    check_rows(benchmark, rows)
    return rows


def _completions(rows, benchmark, groups, mode, texts, grades, spans, ntok) -> list[dict]:
    """One record per row of a mode's decoding: what was written, how it was graded."""
    return [
        {
            "index": i,
            "source": rows[i].get("source", ""),
            "benchmark": benchmark,
            "level": rows[i].get("level"),
            "group": groups[i],
            "mode": mode,
            "completion": texts[i],
            "answer": grades[i].answer,
            "reference": rows[i].get("answer") or None,
            "correct": grades[i].correct,
            "invalid": grades[i].invalid,
            "num_latent_spans": spans[i],
            "num_generated_tokens": ntok[i],
        }
        for i in range(len(rows))
    ]


def _decode_mode(generate_fn, model, processor, encoder, encoded, batches, rows, mode, *, generator, latent_mean,
                 return_latents, sampling, progress, on_decoded):  # fmt: skip
    """Decode every row in one latent mode, batch by batch: (texts, spans, tokens per row, latents fed)."""
    device = _model_device(model)
    texts: list[str | None] = [None] * len(rows)
    spans, ntok, collected = [0] * len(rows), [0] * len(rows), []
    for idx in _progress(batches, progress, f"decoding ({mode})"):
        batch = {k: v.to(device) for k, v in encoder.pad_prompts([encoded[i] for i in idx]).items()}
        out = generate_fn(
            model, processor, batch, generator=generator, latent_mode=mode, latent_mean=latent_mean,
            return_latents=return_latents, **sampling,
        )  # fmt: skip
        for j, i in enumerate(idx):
            texts[i] = out.texts[j]
            spans[i] = int(out.num_latent_spans[j])
            ntok[i] = int(out.num_generated_tokens[j])
        if on_decoded is not None:
            on_decoded(
                [
                    {"mode": mode, "index": i, "source": rows[i].get("source", ""), "completion": texts[i]}
                    for i in idx
                ]
            )
        if return_latents and out.latents is not None:
            collected.extend(x.detach().float().cpu() for x in out.latents if x.shape[0])
    return texts, spans, ntok, collected


def _mean_latent(collected, model, result: EvalResult):
    import torch

    if collected:
        stacked = torch.cat(collected)
        result.notes.append(f"mean latent over {stacked.shape[0]} latent vectors of the 'model' run")
        return stacked.mean(dim=0)
    config = getattr(model, "config", None)
    size = getattr(getattr(config, "text_config", config), "hidden_size", None)
    msg = "the 'model' run produced no latents; 'mean' feeds zeros (it feeds nothing if no span opens)"
    warnings.warn(msg, stacklevel=3)
    result.notes.append(msg)
    return torch.zeros(int(size or 1))


def decoding_health(collected, model, spans: list[int]) -> dict:
    """`latent.health` statistics of the latents fed while decoding (one list entry per answer with
    spans), with the trigger rate (share of answers that open a span) and spans per answer."""
    import torch

    settings = MirageSettings.of_model(model)
    target_norm = settings.latent_target_norm if settings else None
    out = {
        "trigger_rate": sum(s > 0 for s in spans) / len(spans) if spans else 0.0,
        "spans_per_answer": sum(spans) / len(spans) if spans else 0.0,
    }
    if settings is not None and settings.latent_slot_input == "zeros":
        return out  # markers-only: zeros by design, nothing to describe
    k = settings.latent_size if settings else 0
    # only whole spans (a span cut by max_new_tokens would shift every later span's positions)
    whole = [x[: (x.shape[0] // k) * k] for x in collected if k and x.shape[0] >= k]
    if whole:
        stats = latent_health(torch.cat(whole), k, target_norm)
        out.update({name: float(v) for name, v in stats.items()})
    return out


def _warn_collapse(health: dict, result: EvalResult) -> None:
    reason = collapse_reason(health)
    if reason:
        msg = f"eval: {reason}"
        warnings.warn(msg, stacklevel=3)
        result.notes.append(msg)


def _add_spans(table: dict, groups: list, spans: list[int]) -> None:
    for key, bucket in table.items():
        mine = [s for g, s in zip(groups, spans) if key == GROUP_ALL or g == key]
        bucket["latent_spans"] = sum(mine)
        bucket["mean_latent_spans"] = sum(mine) / bucket["n"] if bucket["n"] else 0.0
        bucket["trigger_rate"] = sum(s > 0 for s in mine) / bucket["n"] if bucket["n"] else 0.0


def _progress(items, enabled: bool, label: str):
    if not enabled:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        yield from bar.track(list(items))


# ---------------------------------------------------------------------------------------------- tables


def _pct(x: float) -> str:
    return f"{100 * x:.1f}" if not math.isnan(x) else "-"


def print_tables(result: EvalResult, console=None) -> None:
    """One rich table per latent mode (groups + "all"), and an ablation summary when several modes ran."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    group_name = "level" if result.benchmark.startswith("vsp") else "task"
    mode = result.settings.get("bottleneck", "none")
    under = f" | visual bottleneck ({mode})" if mode != "none" else ""
    for mode, res in result.modes.items():
        table = Table(
            title=f"{result.benchmark} | latents: {mode}{under}",
            caption=f"{res.tokens_per_s:.1f} tok/s, {res.rows_per_s:.2f} rows/s",
        )
        table.add_column(group_name)
        table.add_column("n", justify="right")
        table.add_column("accuracy %", justify="right")
        table.add_column("invalid %", justify="right")
        table.add_column("spans/answer", justify="right")
        table.add_column("trigger %", justify="right")
        for key, b in res.groups.items():
            style = "bold" if key == GROUP_ALL else None
            table.add_row(
                str(key),
                str(b["n"]),
                _pct(b["accuracy"]),
                _pct(b["invalid_rate"]),
                f"{b['mean_latent_spans']:.2f}",
                _pct(b.get("trigger_rate", float("nan"))),
                style=style,
            )
        console.print(table)
        if res.latent_health:
            console.print(health_line(res.latent_health))
    if len(result.modes) > 1:
        base = result.modes.get("model")
        keys = list(next(iter(result.modes.values())).groups)
        table = Table(title=f"{result.benchmark} | latent ablation: accuracy % per {group_name}")
        table.add_column("latents")
        for key in keys:
            table.add_column(str(key), justify="right")
        table.add_column("vs model", justify="right")
        table.add_column("invalid %", justify="right")
        table.add_column("spans/answer", justify="right")
        for mode, res in result.modes.items():
            delta = "" if base is None or mode == "model" else f"{100 * (res.accuracy - base.accuracy):+.1f}"
            table.add_row(
                mode,
                *(_pct(res.groups[k]["accuracy"]) for k in keys),
                delta,
                _pct(res.groups[GROUP_ALL]["invalid_rate"]),
                f"{res.groups[GROUP_ALL]['mean_latent_spans']:.2f}",
            )
        console.print(table)


def health_line(health: dict) -> str:
    """One line: trigger rate, spans per answer and the latents' health (see `latent.health`)."""
    parts = [f"trigger rate {100 * health.get('trigger_rate', 0.0):.1f} %"]
    parts.append(f"spans/answer {health.get('spans_per_answer', 0.0):.2f}")
    names = {
        "cross_sample_cos": "cross-sample cos",
        "consecutive_cos": "consecutive cos",
        "norm": "norm",
        "norm_ratio": "norm / stage-1 target",
        "effective_rank": "effective rank",
    }
    parts += [f"{label} {health[key]:.3f}" for key, label in names.items() if key in health]
    return "latent health: " + ", ".join(parts)


def accuracy_bars(result: EvalResult) -> dict[str, list[tuple[object, float, float, float]]]:
    """Per latent mode, (group, accuracy %, 95 % Wilson low %, high %) for every group: what the plot draws."""
    out = {}
    for mode, run in result.modes.items():
        rows = []
        for group, cell in run.groups.items():
            lo, hi = wilson_interval(cell["correct"], cell["n"])
            rows.append((group, 100 * cell["accuracy"], 100 * lo, 100 * hi))
        out[mode] = rows
    return out


def plot_accuracy(result: EvalResult, path) -> None:
    """`accuracy.png` (matplotlib): accuracy per level, one bar per latent mode, with 95 % Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    bars = accuracy_bars(result)
    modes = list(bars)
    groups = [g for g, *_ in bars[modes[0]]]
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1.0, len(modes) / 2)), 4.2))
    x = np.arange(len(groups))
    for j, mode in enumerate(modes):
        acc = [a for _, a, _, _ in bars[mode]]
        # max(0, ...): at 0 % or 100 % the interval's end equals the accuracy up to rounding
        err = [
            [max(0.0, a - lo) for _, a, lo, _ in bars[mode]],
            [max(0.0, hi - a) for _, a, _, hi in bars[mode]],
        ]
        ax.bar(
            x + (j - (len(modes) - 1) / 2) * width, acc, width, yerr=err, capsize=3, label=f"latents: {mode}"
        )
    ax.set_xticks(x, [f"level {g}" if isinstance(g, int) else str(g) for g in groups])
    ax.set(ylabel="accuracy % (95 % Wilson interval)", ylim=(0, 100), title=result.benchmark)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
