"""`mirage-trl experiment`: does training teach the model, and does it think with its latents?

One command, offline, on a CPU: generate VSP planning data (the test maps excluded from training,
a validation slice held out from the training maps for the curves), build a small model from the
configuration, train every arm in this one harness with the same rows and seeds, evaluate all of
them greedily per level, and write `results.json`, `report.md` and plots.

Arms are data (`Arm`, one table of built-in arms: `BUILTIN_ARMS`): each names its method (text-only
SFT, Mirage, markers-only, helper image as input), its answer style (direct or CoT) and any Mirage
training setting it overrides, so a YAML compares options without code:

    arms:
      - text_direct                      # a built-in arm
      - name: contrastive                # an arm described in place
        method: mirage
        style: direct
        settings: {latent_loss: contrastive, latent_variance_weight: 1.0}
        stage2: {latent_bottleneck_steps: 50}   # stage 2 only

Built in: ``text_direct`` / ``text_cot`` (TRL's `SFTTrainer`, markers and helper images removed),
``mirage_direct`` / ``mirage_cot`` (stage 1 then stage 2, `MirageSFTTrainer`), ``markers_direct`` /
``markers_cot`` (the markers-only control: zeros at every slot, so its gain over text-only is the span
format's), ``helper_input`` (the upper bound: the helper image as an input image, at test time too) and
``mirage_cot_fnorm`` (feedback-norm matching). The comparisons follow from the arms
(`planned_comparisons`); the report prints each arm's settings.

With `train.grounding_steps` > 0 every arm starts from the same *grounded* model: the random model
first learns to describe maps (the VSP grounding task, on maps of its own drawn without the test
maps) with text SFT, so that a model trained from scratch can read the images at all; the warm-up's
accuracy on held-out maps is reported beside the arms.

Mirage arms are also decoded with each latent ablation (zero, noise, mean, shuffle, remove) and, with
`probe: true`, again under the visual bottleneck (LIVR's probe, against the best fixed answer); every
difference is tested on the paired rows (`mirage_trl.stats`). Nothing is tuned on the test rows:
the configuration is fixed before the run and the validation slice is what the curves show.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .configs import BaselineSFTConfig, MirageSFTConfig
from .data.reference import helper_as_input, load_reference_jsonl
from .data.vsp import generate_vsp
from .errors import MirageError
from .evaluation import best_fixed_answer, evaluate
from .folders import read_marker, write_marker
from .io import write_json
from .models.families import SUPPORTED_MODEL_TYPES, vision_tower
from .models.load import load_for_training
from .models.tiny import save_tiny_model
from .preflight import fits_type, plain_type
from .report import summarize_results, write_plots, write_report
from .run import save_outputs
from .trainers.callbacks import GenerationEvalCallback
from .trainers.sft import MirageSFTTrainer
from .trainers.text_sft import TextSFTTrainer, build_sft_dataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arm:
    """One arm of the experiment, as data: how it trains (`method`), on which answers (`style`), and any Mirage
    training setting it overrides (`settings`: both stages; `stage2`: stage 2 only), by `MirageSFTConfig` name."""

    name: str
    method: str  # one of ARM_METHODS
    style: str  # "direct" or "cot": the answers it trains on (and is compared within)
    label: str = ""
    settings: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)

    @property
    def is_mirage(self) -> bool:
        """Trained with Mirage's stages (markers-only included), so decoded with the latent ablations."""
        return self.method in ("mirage", "markers")

    def to_dict(self) -> dict:
        return asdict(self)


# text: text-only SFT (markers and helper images removed); mirage: stage 1 then stage 2; markers: the same with
# zeros at every slot (the span format without latent content); helper_input: text SFT with the helper image
# given as an input image, at test time too (the upper bound)
ARM_METHODS = ("text", "mirage", "markers", "helper_input")
STYLES = ("direct", "cot")
# Mirage training settings an arm may override (fields of MirageSFTConfig)
ARM_SETTINGS = (
    "latent_loss",
    "latent_temperature",
    "latent_variance_weight",
    "latent_target",
    "latent_target_scale",
    "latent_aux_text",
    "latent_only_backprop",
    "latent_bottleneck",
    "latent_bottleneck_steps",
    "latent_feedback_norm",
    "latent_pooling",
    "text_loss_weight",
)
# The arms an experiment names without describing them: the one table of them.
BUILTIN_ARMS = {
    arm.name: arm
    for arm in (
        Arm("text_direct", "text", "direct", "text-only SFT, direct"),
        Arm("text_cot", "text", "cot", "text-only SFT, CoT"),
        Arm("mirage_direct", "mirage", "direct", "Mirage, direct"),
        Arm("mirage_cot", "mirage", "cot", "Mirage, CoT"),
        Arm("markers_direct", "markers", "direct", "markers only, direct"),
        Arm("markers_cot", "markers", "cot", "markers only, CoT"),
        Arm("helper_input", "helper_input", "cot", "helper image as input (upper bound)"),
        Arm("mirage_cot_fnorm", "mirage", "cot", "Mirage, CoT, feedback norm matched",
            {"latent_feedback_norm": "target"}),
    )
}  # fmt: skip
DEFAULT_ARMS = ("text_direct", "text_cot", "mirage_direct", "mirage_cot", "markers_cot", "helper_input")
ABLATIONS = ("zero", "noise", "mean", "shuffle", "remove")
BENCHMARK = "vsp_planning"
GROUNDING = "vsp_grounding"
SHIPPED = Path(__file__).parent / "experiments"  # the shipped experiments, by name: vsp_planning, ...
DEFAULT_CONFIG = SHIPPED / "vsp_planning.yaml"


@dataclass
class ModelSpec:
    # Qwen3-VL's vision tower adds learned absolute position embeddings to its patches, so even its random
    # features say where a tile is; Qwen2/2.5-VL towers place patches by rotary attention alone and a
    # random one gives two tiles of one kind the same features wherever they are (docs/experiments.md)
    model_type: str = "qwen3_vl"
    hidden_size: int = 128
    layers: int = 4
    vocab_size: int = 1000


@dataclass
class DataSpec:
    levels: list[int] = field(default_factory=lambda: [3, 4, 5])
    train_rows: int = 1200  # spread evenly over the levels
    val_rows: int = 60  # held out from the training maps: the curves' slice
    test_rows: int = 300  # spread evenly over the levels; never trained on, never tuned on
    tile_px: int = 28  # one vision token per tile
    data_seed: int = 0
    grounding_rows: int = 0  # maps to describe in the warm-up (never a test map); 0 = no warm-up
    grounding_max_hole_frac: float = 0.4  # more holes than the planning maps, so more different maps exist


@dataclass
class TrainSpec:
    learning_rate: float = 1e-3
    batch_size: int = 16
    text_steps: int = 500
    grounding_steps: int = 0  # the warm-up's text-SFT steps, shared by every arm of a seed
    grounding_train_vision_tower: bool = (
        False  # measured: training the random tower at lr 1e-3 stalls reading
    )
    stage1_steps: int = 350
    stage2_steps: int = 150
    latent_size: int = 4
    text_loss_weight: float = 1.0
    latent_feedback_norm: str | None = None
    warmup_steps: int = 20
    eval_every: int = 100
    max_new_tokens: int = 128


@dataclass
class ExperimentConfig:
    """What `mirage-trl experiment --config FILE` reads (a YAML with these sections); `quick` overrides."""

    name: str = "vsp_planning"
    seeds: list[int] = field(default_factory=lambda: [0])
    # a built-in arm's name (BUILTIN_ARMS), or a mapping {name, method, style, label, settings, stage2}
    arms: list = field(default_factory=lambda: list(DEFAULT_ARMS))
    ablations: list[str] = field(default_factory=lambda: list(ABLATIONS))
    # also decode every Mirage arm under this visual bottleneck ("image": text after a span's start cannot see the
    # image; "strict": no text after the image can; true means "image"), LIVR's probe; false: not
    probe: bool | str = False
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    quick: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("quick")
        return out

    @property
    def arm_specs(self) -> list[Arm]:
        """The arms as `Arm`s (checked by `check_config`)."""
        return [resolve_arm(a, "arms") for a in self.arms]


def resolve_arm(value, where: str) -> Arm:
    """A built-in arm's name, or a mapping describing an arm: the `Arm`, or one line saying what is wrong."""
    if isinstance(value, str):
        if value not in BUILTIN_ARMS:
            raise MirageError(
                f"{where}: arms [{value!r}]: choose from {', '.join(BUILTIN_ARMS)}, or describe the arm"
            )
        return BUILTIN_ARMS[value]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise MirageError(f"{where}: an arm is a built-in name or a mapping with a name, got {value!r}")
    name = value["name"]
    unknown = set(value) - {f.name for f in dataclasses.fields(Arm)}
    if unknown:
        raise MirageError(f"{where}: arm {name}: {', '.join(sorted(unknown))} is not a field of an arm")
    if value.get("method") not in ARM_METHODS:
        raise MirageError(
            f"{where}: arm {name}: method {value.get('method')!r}: choose one of {', '.join(ARM_METHODS)}"
        )
    if value.get("style") not in STYLES:
        raise MirageError(
            f"{where}: arm {name}: style {value.get('style')!r}: choose one of {', '.join(STYLES)}"
        )
    for part in ("settings", "stage2"):
        settings = value.get(part) or {}
        bad = [k for k in settings if k not in ARM_SETTINGS] if isinstance(settings, dict) else [settings]
        if bad:
            raise MirageError(f"{where}: arm {name}: {part} {bad}: an arm may set {', '.join(ARM_SETTINGS)}")
        if settings and value["method"] not in ("mirage", "markers"):
            raise MirageError(f"{where}: arm {name}: Mirage settings need method mirage or markers")
    return Arm(**{**value, "label": value.get("label") or name, "settings": dict(value.get("settings") or {}),
                  "stage2": dict(value.get("stage2") or {})})  # fmt: skip


_SECTIONS = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec}


def _check_value_type(name: str, value, hint, where: str) -> None:
    """A YAML value fits its setting's type (a bool is no number, a string no number), named by its key, before
    any data is generated."""
    expected = plain_type(hint)
    if expected is None or value is None:
        return
    if typing.get_origin(expected) is list:
        (elem,) = typing.get_args(expected)
        ok = isinstance(value, list) and all(fits_type(x, elem) for x in value)
        what = f"a list of {elem.__name__}"
    else:
        ok, what = fits_type(value, expected), expected.__name__
    if not ok:
        raise MirageError(f"{where}: {name}: expected {what}, got {type(value).__name__} {value!r}")


def _merge(cfg: ExperimentConfig, values: dict, where: str) -> ExperimentConfig:
    cfg = copy.deepcopy(cfg)
    for key, value in values.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise MirageError(f"{where}: {key} must be a mapping of settings")
            section = getattr(cfg, key)
            names = {f.name for f in dataclasses.fields(section)}
            hints = typing.get_type_hints(type(section))
            for sub, v in value.items():
                if sub not in names:
                    raise MirageError(
                        f"{where}: {key}.{sub} is not a setting (known: {', '.join(sorted(names))})"
                    )
                _check_value_type(f"{key}.{sub}", v, hints[sub], where)
                setattr(section, sub, v)
        elif key in {f.name for f in dataclasses.fields(cfg)}:
            _check_value_type(key, value, typing.get_type_hints(ExperimentConfig)[key], where)
            setattr(cfg, key, value)
        else:
            raise MirageError(f"{where}: {key} is not a setting of an experiment")
    return cfg


def load_config(path: str | Path | None = None, quick: bool = False) -> ExperimentConfig:
    """Read an experiment YAML (a path, or a shipped experiment's name; default: vsp_planning) and check it;
    `quick` applies its `quick` section."""
    import yaml

    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists() and (SHIPPED / f"{path}.yaml").is_file():
        path = SHIPPED / f"{path}.yaml"
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise MirageError(f"{path}: cannot read the experiment config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise MirageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise MirageError(f"{path}: an experiment config is a mapping of settings")
    cfg = _merge(ExperimentConfig(), values, str(path))
    if quick:
        cfg = _merge(cfg, cfg.quick, f"{path}: quick")
    check_config(cfg, str(path))
    return cfg


def check_config(cfg: ExperimentConfig, where: str) -> None:
    if not isinstance(cfg.arms, list) or not cfg.arms:
        raise MirageError(f"{where}: arms: a list of at least one arm")
    arms = [resolve_arm(a, where) for a in cfg.arms]
    for arm in arms:
        _check_arm_settings(arm, where)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise MirageError(
            f"{where}: arms: a name appears twice ({', '.join(sorted({n for n in names if names.count(n) > 1}))})"
        )
    if cfg.probe not in (True, False, "image", "strict"):
        raise MirageError(f"{where}: probe {cfg.probe!r}: false, true (image), image or strict")
    bad = [a for a in cfg.ablations if a not in ABLATIONS]
    if bad:
        raise MirageError(f"{where}: ablations {bad}: choose from {', '.join(ABLATIONS)}")
    if not cfg.seeds or any(type(s) is not int for s in cfg.seeds):
        raise MirageError(f"{where}: seeds must be a list of integers")
    d, t = cfg.data, cfg.train
    for name, value in (
        ("data.train_rows", d.train_rows),
        ("data.test_rows", d.test_rows),
        ("data.val_rows", d.val_rows),
        ("train.batch_size", t.batch_size),
        ("train.text_steps", t.text_steps),
        ("train.stage1_steps", t.stage1_steps),
        ("train.stage2_steps", t.stage2_steps),
        ("train.eval_every", t.eval_every),
        ("train.max_new_tokens", t.max_new_tokens),
    ):
        if type(value) is not int or value < 1:
            raise MirageError(f"{where}: {name} {value!r}: must be an integer >= 1")
    if type(t.grounding_steps) is not int or t.grounding_steps < 0 or type(d.grounding_rows) is not int:
        raise MirageError(f"{where}: train.grounding_steps and data.grounding_rows must be integers >= 0")
    if (t.grounding_steps > 0) != (d.grounding_rows > d.val_rows):
        raise MirageError(
            f"{where}: a grounding warm-up needs both train.grounding_steps and data.grounding_rows "
            f"(more than data.val_rows = {d.val_rows}); set both, or neither"
        )
    if d.train_rows <= d.val_rows:
        raise MirageError(
            f"{where}: data.train_rows ({d.train_rows}) must exceed data.val_rows ({d.val_rows})"
        )

    m = cfg.model
    for name, value, low in (
        ("model.hidden_size", m.hidden_size, 1),
        ("model.layers", m.layers, 1),
        ("model.vocab_size", m.vocab_size, 1),
        ("data.tile_px", d.tile_px, 1),
        ("data.data_seed", d.data_seed, 0),
        ("train.latent_size", t.latent_size, 1),
        ("train.warmup_steps", t.warmup_steps, 0),
    ):
        if value < low:
            raise MirageError(f"{where}: {name} {value!r}: must be an integer >= {low}")
    if not math.isfinite(t.learning_rate) or t.learning_rate <= 0:
        raise MirageError(f"{where}: train.learning_rate {t.learning_rate!r}: must be a number > 0")
    if not math.isfinite(t.text_loss_weight) or t.text_loss_weight < 0:
        raise MirageError(f"{where}: train.text_loss_weight {t.text_loss_weight!r}: must be a number >= 0")
    if not 0 <= d.grounding_max_hole_frac < 1:
        raise MirageError(
            f"{where}: data.grounding_max_hole_frac {d.grounding_max_hole_frac!r}: must be in [0, 1)"
        )
    if cfg.model.model_type not in SUPPORTED_MODEL_TYPES:
        raise MirageError(
            f"{where}: model.model_type {cfg.model.model_type!r}: choose from {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not d.levels or any(type(v) is not int or not 3 <= v <= 8 for v in d.levels):
        raise MirageError(f"{where}: data.levels must be grid sides from 3 to 8")


def _check_arm_settings(arm: Arm, where: str) -> None:
    """An arm's Mirage settings go through the trainer's own checks now, not after an hour of other arms."""
    import warnings

    for part in (arm.settings, {**arm.settings, **arm.stage2}) if arm.settings or arm.stage2 else ():
        try:
            with (
                warnings.catch_warnings()
            ):  # TRL's own deprecation notices about its defaults: not the user's
                warnings.simplefilter("ignore")
                MirageSFTConfig(output_dir="unused", report_to="none", use_cpu=True, **part)
        except (MirageError, TypeError, ValueError) as exc:
            raise MirageError(f"{where}: arm {arm.name}: {exc}") from None


# ------------------------------------------------------------------------------------------------ data


def prepare_data(cfg: ExperimentConfig, out: Path, progress: bool = False) -> dict:
    """Test maps first, then training maps that exclude them; the last val_rows training maps are held out."""
    d = cfg.data
    paths = {}
    # The test split is drawn like a training split (with helper images, needed by the upper bound's
    # inputs) but from its own seed; its maps are excluded from every training file.
    paths["test"] = generate_vsp(
        "planning",
        d.levels,
        d.test_rows,
        "train",
        "cot",
        seed=10_000 + d.data_seed,
        out_dir=out / "test",
        overwrite=True,
        progress=progress,
        tile_px=d.tile_px,
    )
    for style in ("direct", "cot"):
        paths[style] = generate_vsp(
            "planning",
            d.levels,
            d.train_rows,
            "train",
            style,
            seed=d.data_seed,
            out_dir=out / f"train_{style}",
            exclude=[paths["test"]],
            overwrite=True,
            progress=progress,
            tile_px=d.tile_px,
        )
    data = {name: load_reference_jsonl(p, benchmark=BENCHMARK) for name, p in paths.items()}
    n_train = d.train_rows - d.val_rows
    # the same maps in both styles (the generator draws maps before styles), so one split serves both
    val_index = list(range(n_train, d.train_rows))
    out_data = {
        "direct": data["direct"].select(range(n_train)),
        "cot": data["cot"].select(range(n_train)),
        "val": data["cot"].select(val_index),
        "test": data["test"],
    }
    if d.grounding_rows:
        out_data |= _grounding_data(cfg, out, paths, progress)
    return out_data | {"paths": {k: str(v) for k, v in paths.items()}}


def _grounding_data(cfg: ExperimentConfig, out: Path, paths: dict, progress: bool) -> dict:
    """Warm-up maps (none of them a test map), a validation slice of them, and held-out maps to report on."""
    d = cfg.data
    common = dict(levels=d.levels, overwrite=True, progress=progress, tile_px=d.tile_px)
    common["max_hole_frac"] = d.grounding_max_hole_frac
    paths["grounding"] = generate_vsp(
        "grounding", num_samples=d.grounding_rows, split="train", style="direct", seed=20_000 + d.data_seed,
        out_dir=out / "grounding", exclude=[paths["test"]], **common,
    )  # fmt: skip
    # held-out maps for the warm-up's own figure: seen by no stage of any arm
    paths["grounding_test"] = generate_vsp(
        "grounding", num_samples=d.test_rows, split="test", style="direct", seed=30_000 + d.data_seed,
        out_dir=out / "grounding_test", exclude=[paths["test"], paths["grounding"], paths["cot"]], **common,
    )  # fmt: skip
    rows = load_reference_jsonl(paths["grounding"], benchmark=GROUNDING)
    n_train = d.grounding_rows - d.val_rows
    return {
        "grounding": rows.select(range(n_train)),
        "grounding_val": rows.select(range(n_train, d.grounding_rows)),
        "grounding_test": load_reference_jsonl(paths["grounding_test"], benchmark=GROUNDING),
    }


# ------------------------------------------------------------------------------------------------ training


class _Progress:
    """One rich bar over every optimizer step of the run: arm, stage, elapsed and time left."""

    def __init__(self, total_steps: int, enabled: bool):
        self.enabled = enabled
        self.total = total_steps
        self.bar = None
        self.text = "experiment"
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
            )
            self.bar.start()
            self.task = self.bar.add_task("experiment", total=total_steps)

    def describe(self, text: str) -> None:
        self.text = text
        if self.bar:
            self.bar.update(self.task, description=text)

    def note(self, step: int, logs: dict) -> None:
        """One line per validation decoding, above the bar (or alone in a quiet run's log)."""
        line = (
            f"{self.text} | step {step}: validation accuracy {100 * logs['eval_gen/accuracy']:.1f} %, "
            f"invalid {100 * logs['eval_gen/invalid_rate']:.1f} %"
        )
        if self.bar:
            self.bar.console.print(line)
        else:
            print(line, flush=True)

    def callback(self):
        from transformers import TrainerCallback

        progress = self

        class _Step(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if progress.bar:
                    progress.bar.advance(progress.task)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "eval_gen/accuracy" in logs:
                    progress.note(state.global_step, logs)

        return _Step()

    def stop(self) -> None:
        if self.bar:
            self.bar.stop()


def _common_args(cfg: ExperimentConfig, out: Path, seed: int, steps: int) -> dict:
    t = cfg.train
    return dict(
        output_dir=str(out),
        max_steps=steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1,
        lr_scheduler_type="cosine",
        warmup_steps=min(t.warmup_steps, max(0, steps // 5)),
        weight_decay=0.0,
        logging_steps=max(1, min(25, steps // 10)),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=True,
        # TRL's defaults are bf16 and activation checkpointing on: on a CPU without bf16 units they make a
        # small model's step 6x slower
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=None,
    )


def _val_callback(cfg, rows, prepare_row=None, benchmark=BENCHMARK):
    return GenerationEvalCallback(
        rows,
        benchmark,
        cfg.train.eval_every,
        cfg.train.max_new_tokens,
        batch_size=64,
        prepare_row=prepare_row,
    )


def _curve(trainer, callback, stage: str) -> dict:
    losses = [
        {"step": h["step"], "loss": h["loss"]}
        for h in trainer.state.log_history
        if "loss" in h and "step" in h
    ]
    health = [
        {"step": h["step"], **{k: v for k, v in h.items() if k.startswith("latent/")}}
        for h in trainer.state.log_history
        if any(k.startswith("latent/") for k in h)
    ]
    return {"stage": stage, "loss": losses, "val": list(callback.history), "latent": health}


def _train_text(cfg, rows, model_dir: Path, out: Path, seed: int, steps: int, progress: _Progress, label: str, *,
                val_rows, benchmark: str = BENCHMARK, prepare_row=None, helper_as_input: bool = False,
                train_tower: bool = False):  # fmt: skip
    """Text SFT of `rows` from `model_dir` with the text-only baseline trainer: (trainer, val callback)."""
    model, processor = load_for_training(str(model_dir))
    vision_tower(model).requires_grad_(train_tower)  # frozen in every arm, as the Mirage trainers keep it
    callback = _val_callback(cfg, val_rows, prepare_row, benchmark=benchmark)
    trainer = TextSFTTrainer(
        model=model,
        args=BaselineSFTConfig(**_common_args(cfg, out, seed, steps)),
        train_dataset=build_sft_dataset(rows, helper_as_input),
        processing_class=processor,
        callbacks=[callback, progress.callback()],
    )
    callback.bind(_without_printer(trainer))
    progress.describe(f"seed {seed} | {label}")
    trainer.train()
    return trainer, callback


def train_grounding(cfg, data, model_dir: Path, out: Path, seed: int, progress: _Progress) -> dict:
    """The warm-up: text SFT on map descriptions; saves the grounded model to `out / "model"`."""
    start = time.perf_counter()
    trainer, callback = _train_text(
        cfg, data["grounding"], model_dir, out, seed, cfg.train.grounding_steps, progress, "grounding warm-up",
        val_rows=data["grounding_val"], benchmark=GROUNDING, train_tower=cfg.train.grounding_train_vision_tower,
    )  # fmt: skip
    processor = trainer.processing_class
    trainer.save_model(str(out / "model"))
    processor.save_pretrained(str(out / "model"))
    progress.describe(f"seed {seed} | grounding warm-up | evaluating")
    rows = [data["grounding_test"][i] for i in range(len(data["grounding_test"]))]
    result = evaluate(
        trainer.model.eval(), processor, rows, GROUNDING, batch_size=64,
        max_new_tokens=cfg.train.max_new_tokens, do_sample=False, progress=False,
    )  # fmt: skip
    mode = result.modes["model"]
    return {
        "seed": seed,
        "curves": [_curve(trainer, callback, "grounding")],
        "groups": {str(k): v for k, v in mode.groups.items()},
        "correct": [bool(c["correct"]) for c in mode.completions],
        "examples": [c["completion"] for c in mode.completions[:3]],
        "seconds": time.perf_counter() - start,
    }


def train_text_arm(cfg, data, arm: Arm, model_dir: Path, out: Path, seed: int, progress: _Progress):
    helper = arm.method == "helper_input"
    trainer, callback = _train_text(
        cfg, data[arm.style], model_dir, out, seed, cfg.train.text_steps, progress, f"{arm.name} | text SFT",
        val_rows=data["val"], prepare_row=helper_as_input if helper else None, helper_as_input=helper,
    )  # fmt: skip
    return trainer.model.eval(), trainer.processing_class, [_curve(trainer, callback, "sft")]


def train_mirage_arm(cfg, data, arm: Arm, model_dir: Path, out: Path, seed: int, progress: _Progress):
    rows = data[arm.style]
    t = cfg.train
    curves = []
    source = str(model_dir)
    for stage, steps in ((1, t.stage1_steps), (2, t.stage2_steps)):
        model, processor = load_for_training(source)
        callback = _val_callback(cfg, data["val"])
        settings = dict(text_loss_weight=t.text_loss_weight, latent_feedback_norm=t.latent_feedback_norm)
        settings |= arm.settings | (arm.stage2 if stage == 2 else {})
        args = MirageSFTConfig(
            **_common_args(cfg, out / f"stage{stage}", seed, steps),
            stage=stage,
            latent_size=t.latent_size,
            markers_only=arm.method == "markers",
            **settings,
        )
        trainer = MirageSFTTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            processing_class=processor,
            callbacks=[callback, progress.callback()],
        )
        callback.bind(_without_printer(trainer))
        progress.describe(f"seed {seed} | {arm.name} | stage {stage}")
        trainer.train()
        curves.append(_curve(trainer, callback, f"stage{stage}"))
        save_outputs(trainer, str(out / f"stage{stage}"), stage=stage, base_model=source)
        source = str(out / f"stage{stage}")
    return trainer.model.eval(), trainer.processing_class, curves


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_arm(cfg, model, processor, data, arm: Arm) -> dict:
    """Greedy decoding of the test rows; Mirage arms once per latent mode (the model's own latents first) and,
    with `probe`, again under the visual bottleneck (modes "probe", "probe_zero", ...)."""
    rows = [data["test"][i] for i in range(len(data["test"]))]
    if arm.method == "helper_input":
        rows = [helper_as_input(r) for r in rows]
    modes = ["model"]
    if arm.is_mirage:
        # markers-only feeds zeros whatever the mode: only removing the span changes what it decodes
        modes += [m for m in cfg.ablations if arm.method != "markers" or m == "remove"]
    runs = [("", modes, None)]
    if cfg.probe and arm.is_mirage:
        # under the probe, removing the span leaves nothing blind: that mode would be the plain one again
        runs.append(("probe", [m for m in modes if m != "remove"], probe_mode(cfg)))
    out = {"notes": []}
    for prefix, run_modes, bottleneck in runs:  # bottleneck None: as the arm's model was trained
        result = evaluate(
            model, processor, rows, BENCHMARK, batch_size=64, max_new_tokens=cfg.train.max_new_tokens,
            do_sample=False, latent_modes=run_modes, progress=False, bottleneck=bottleneck,
        )  # fmt: skip
        for mode, res in result.modes.items():
            key = mode if not prefix else (prefix if mode == "model" else f"{prefix}_{mode}")
            out[key] = {
                "groups": {str(k): v for k, v in res.groups.items()},
                "correct": [bool(c["correct"]) for c in res.completions],
                "latent_health": res.latent_health,
                "examples": [c["completion"] for c in res.completions[:3]],
            }
        out["notes"] += result.notes
    return out


# ------------------------------------------------------------------------------------------------ run


def _quiet() -> None:
    """The run's own progress bar and report replace the per-trainer log lines and load/save bars."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _without_printer(trainer):
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def total_steps(cfg: ExperimentConfig) -> int:
    per_seed = cfg.train.grounding_steps + sum(arm_steps(cfg, arm) for arm in cfg.arm_specs)
    return per_seed * len(cfg.seeds)


def probe_mode(cfg: ExperimentConfig) -> str:
    """The visual bottleneck the probe decodes under ("none" without a probe)."""
    return "image" if cfg.probe is True else (cfg.probe or "none")


def run_arm(cfg, data, arm: Arm, model_dir: Path, out: Path, seed: int, bar: _Progress) -> dict:
    """Train one arm from `model_dir` and evaluate it on the test rows: one entry of results["runs"]."""
    start = time.perf_counter()
    train = train_mirage_arm if arm.is_mirage else train_text_arm
    model, processor, curves = train(cfg, data, arm, model_dir, out, seed, bar)
    bar.describe(f"seed {seed} | {arm.name} | evaluating")
    evaluation = evaluate_arm(cfg, model, processor, data, arm)
    return {
        "seed": seed,
        "arm": arm.name,
        "curves": curves,
        "eval": evaluation,
        "seconds": time.perf_counter() - start,
    }


def _arm_worker(job: tuple, threads: int) -> dict:
    """One arm in a worker process: its own torch threads, quiet, validation lines printed."""
    import torch

    torch.set_num_threads(threads)
    _quiet()
    return run_arm(*job, _Progress(0, enabled=False))


def _run_parallel(jobs: list[tuple], workers: int, bar: _Progress) -> list[dict]:
    """Arms side by side in `workers` processes (spawned: forking a process that already ran torch
    threads can hang). A small model keeps two cores busy badly from one process, so two arms on one
    thread each finish sooner than one after the other on two."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    import torch

    threads = max(1, torch.get_num_threads() // workers)
    results = {}
    bar.describe(f"seed {jobs[0][5]} | {len(jobs)} arms, {workers} at a time")
    # longest first, so that the two workers finish together instead of one arm running alone at the end
    order = sorted(jobs, key=lambda job: -_arm_cost(job[0], job[2]))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_arm_worker, job, threads): job[2] for job in order}
        for future in as_completed(futures):
            arm = futures[future]
            results[arm.name] = future.result()
            line = f"{arm.name} done ({results[arm.name]['seconds'] / 60:.1f} min)"
            if bar.bar:
                bar.bar.advance(bar.task, arm_steps(jobs[0][0], arm))
                bar.bar.console.print(line)
            else:
                print(line, flush=True)
    return [results[job[2].name] for job in jobs]


def arm_steps(cfg: ExperimentConfig, arm: Arm) -> int:
    """Optimizer steps of one arm: stage 1 + stage 2 for Mirage arms, text SFT otherwise."""
    t = cfg.train
    return t.stage1_steps + t.stage2_steps if arm.is_mirage else t.text_steps


def _arm_cost(cfg: ExperimentConfig, arm: Arm) -> float:
    """Relative training + evaluation time of an arm (measured: a CoT step costs about twice a direct one)."""
    return arm_steps(cfg, arm) * (1.0 if arm.style == "direct" else 2.0)


def default_workers(cfg: ExperimentConfig) -> int:
    """Two arms at a time where there are two cores or more (measured faster on the 2-core machine)."""
    import os

    return max(1, min(2, os.cpu_count() or 1, len(cfg.arms)))


def planned_comparisons(arms: list[Arm]) -> list[list[str]]:
    """The paired comparisons [b, a] ("b against a") the report makes, from the arms themselves: every
    Mirage-trained or upper-bound arm against text-only in its answer style, every Mirage arm against
    markers-only in its style, every Mirage arm with settings of its own against plain Mirage in its style,
    and the upper bound against plain Mirage CoT."""

    def first(method: str, style: str, plain: bool = False) -> str | None:
        return next((a.name for a in arms if a.method == method and a.style == style
                     and not (plain and (a.settings or a.stage2))), None)  # fmt: skip

    pairs = []
    for arm in arms:
        if arm.method != "text":
            pairs.append((arm.name, first("text", arm.style)))
        if arm.method == "mirage":
            pairs.append((arm.name, first("markers", arm.style)))
            if arm.settings or arm.stage2:
                pairs.append((arm.name, first("mirage", arm.style, plain=True)))
        if arm.method == "helper_input":
            pairs.append((arm.name, first("mirage", "cot", plain=True)))
    return [[b, a] for b, a in pairs if a is not None and a != b]


def adopt_legacy_folder(out: str | Path) -> None:
    """Give the marker of the output-folder rule to an experiment folder written before markers existed,
    recognised by its settings: results.json with the experiment's runs, and nothing an experiment does not
    write (data/, seed<N>/, results.json, report.md, the plots). Any other folder is left to the rule."""
    out = Path(out)
    if not (out / "results.json").is_file() or read_marker(out) is not None:
        return
    own = re.compile(r"(data|seed\d+|results\.json|report\.md|[\w-]+\.png)")
    names = [e.name for e in out.iterdir()]
    try:
        runs = json.loads((out / "results.json").read_text(encoding="utf-8")).get("runs")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(runs, list) and all(own.fullmatch(n) for n in names):
        write_marker(out, "experiment", names)


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    progress: bool = True,
    command: str = "",
    workers: int | None = None,
) -> dict:
    """Run every arm for every seed; write results.json, report.md and the plots under `out`.

    `workers`: arms trained side by side in processes of their own (default `default_workers`); the
    warm-up and the data come first, once per seed, in this process."""
    import platform

    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = default_workers(cfg) if workers is None else workers
    _quiet()
    start = time.perf_counter()
    data = prepare_data(cfg, out / "data", progress=False)
    bar = _Progress(total_steps(cfg), progress)
    runs, warmups = [], []
    try:
        for seed in cfg.seeds:
            model_dir = save_tiny_model(
                out / f"seed{seed}" / "model",
                cfg.model.model_type,
                seed=seed,
                tokenizer_corpus="benchmarks",
                vocab_size=cfg.model.vocab_size,
                image_pixels="tiles",
                hidden_size=cfg.model.hidden_size,
                intermediate_size=2 * cfg.model.hidden_size,
                num_hidden_layers=cfg.model.layers,
            )
            if cfg.train.grounding_steps:
                warmups.append(
                    train_grounding(cfg, data, model_dir, out / f"seed{seed}" / "grounding", seed, bar)
                )
                model_dir = out / f"seed{seed}" / "grounding" / "model"
            jobs = [
                (cfg, data, arm, model_dir, out / f"seed{seed}" / arm.name, seed) for arm in cfg.arm_specs
            ]
            if workers > 1:
                runs += _run_parallel(jobs, workers, bar)
            else:
                runs += [run_arm(*job, bar) for job in jobs]
    finally:
        bar.stop()
    results = {
        "config": cfg.to_dict(),
        "command": command,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "workers": workers,
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {
            "train_rows": len(data["cot"]),
            "val_rows": len(data["val"]),
            "test_rows": len(data["test"]),
            "levels": cfg.data.levels,
            "grounding_rows": len(data.get("grounding", ())),
            "test_maps_excluded_from_training": True,
        },
        "warmups": warmups,
        "runs": runs,
        "arms": {arm.name: arm.to_dict() for arm in cfg.arm_specs},
        "comparisons": planned_comparisons(cfg.arm_specs),
        # what a model that ignores the image reaches at best: the bar for the bottleneck probe
        "best_fixed_answer": best_fixed_answer(
            BENCHMARK, [data["test"][i] for i in range(len(data["test"]))]
        ),
    }
    results["summary"] = summarize_results(results)
    results["wall_seconds"] = time.perf_counter() - start
    write_json(out / "results.json", results)
    results["plots"] = write_plots(results, out)
    write_report(results, out / "report.md")
    return results
