"""Configs: TRL's `SFTConfig` / `GRPOConfig` extended with Mirage's knobs, and the recipes' script arguments.

Defaults here are library defaults; the recipe YAMLs carry the paper's settings (docs/method.md section 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import GRPOConfig, ScriptArguments, SFTConfig

from .errors import MirageError
from .grading import BENCHMARKS, one_of
from .latent.collator import TRUNCATION_POLICIES
from .latent.losses import LATENT_LOSSES, LOGITS_CHUNK_SIZE
from .latent.stage2 import METHODS as STAGE2_METHODS
from .latent.targets import LATENT_TARGETS, POOLINGS
from .models.settings import BOTTLENECKS, FEEDBACK_NORM_CHOICES
from .rewards import DEFAULT_REWARD_WEIGHTS, get_reward_funcs
from .stages import SFT_STAGES

# Bounds checked at start: far past what any run needs, short of what would exhaust memory or time first.
MAX_LATENT_SIZE = 64  # the paper's best k is 4-6; k = 8 already hurts
MAX_SEQUENCE_LENGTH = 1 << 20


@dataclass
class MirageScriptArguments(ScriptArguments):
    """Where the data lives: TRL's dataset arguments (`dataset_name`, `dataset_config`, `dataset_train_split`,
    `dataset_test_split`), read by `mirage_trl.data.sources.load_data`."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "reference-format JSONL, a local dataset folder (save_to_disk, parquet, JSONL + images) or a "
            "dataset id; reference or TRL conversational schema"
        },
    )
    dataset_root: str | None = field(
        default=None,
        metadata={"help": "folder image paths are relative to (default: the JSONL's dataset root)"},
    )
    benchmark: str | None = field(
        default=None,
        metadata={"help": f"{one_of(BENCHMARKS)} (inferred for VSP)"},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "optional eval data, as dataset_name (its split: dataset_test_split)"}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N rows"})


@dataclass
class BaselineScriptArguments(MirageScriptArguments):
    helper_as_input: bool = field(
        default=False,
        metadata={"help": "upper bound: give the helper images as real input images (markers removed)"},
    )
    # A pretrained tower already encodes where things are; a randomly initialised one does not (its features
    # of two tiles of one kind are the same wherever they are), so a small model trained from scratch can
    # only learn to read a map if the tower learns too: the grounding warm-up's switch.
    train_vision_tower: bool = field(
        default=False,
        metadata={
            "help": "also train the vision tower (default: frozen, as for Mirage); for a grounding warm-up of a "
            "model trained from scratch (docs/experiments.md)"
        },
    )


def quiet_defaults(args) -> None:
    """What every training config of ours does before TrainingArguments' own checks, so a run prints nothing the
    user did not cause:

    - transformers 5.2x renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)` and warns
      on the old name, which TRL's configs default to and every recipe YAML sets: the value moves to the new
      name where it exists (older versions keep the old one);
    - progress bars only on a terminal: unset, `disable_tqdm` is on when stderr is not one (a log file gets the
      Trainer's one line per logging step instead);
    - unset, `bf16` stays off where no accelerator has it (TRL turns it on everywhere, and transformers then
      refuses to start on such a machine unless `use_cpu` is given too), so one script runs on a laptop and a GPU.
    """
    import dataclasses
    import sys

    names = {f.name for f in dataclasses.fields(args)}
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if new in names and getattr(args, new) is None and getattr(args, old) is not None:
            setattr(args, new, getattr(args, old))
            setattr(args, old, None)
    if getattr(args, "disable_tqdm", False) is None:
        args.disable_tqdm = not sys.stderr.isatty()
    if getattr(args, "bf16", False) is None and not args.fp16 and not args.use_cpu:
        from transformers.utils import is_torch_bf16_gpu_available

        if not is_torch_bf16_gpu_available():  # no accelerator with bf16: full precision, not a refusal
            args.bf16 = False


@dataclass
class BaselineSFTConfig(SFTConfig):
    """TRL's `SFTConfig` for the text-only baseline, with `quiet_defaults`."""

    def __post_init__(self):
        quiet_defaults(self)
        super().__post_init__()


@dataclass
class _MirageLatentArgs:
    latent_size: int = field(default=4, metadata={"help": "k: latent vectors per <output_image>"})
    latent_pooling: str = field(
        default="drop_remainder",
        metadata={"help": f"pooling of helper-image features into k targets: {', '.join(POOLINGS)}"},
    )
    latent_truncation: str = field(
        default="error",
        metadata={
            "help": "a row whose max_length cut goes through a latent span: 'error' or 'drop' (counted)"
        },
    )
    max_latent_norm: float | None = field(
        default=1e4, metadata={"help": "stop when a latent's norm exceeds this (None: no bound)"}
    )
    stage2_method: str = field(
        default="auto",
        metadata={
            "help": f"forward with self-generated latents (stage 2, GRPO training): {', '.join(STAGE2_METHODS)} "
            "('auto' picks the exact one for the checkpointing setting)"
        },
    )
    latent_feedback_norm: str | None = field(
        default=None,
        metadata={
            "help": "rescale the hidden state fed back at a slot (stage 2, decoding, GRPO): 'target' to the mean "
            "norm of the stage-1 targets (measured in stage 1, saved with the model), 'none' off; default: as "
            "the model was trained"
        },
    )
    markers_only: bool = field(
        default=False,
        metadata={
            "help": "control arm: keep spans, markers and slots but feed zeros at the slots in every stage and "
            "at decoding (no latent loss in stage 1); saved with the model"
        },
    )
    latent_bottleneck: str | None = field(
        default=None,
        metadata={
            "help": "visual bottleneck: 'image' stops text after a latent span's start from attending to the "
            "input image (only the latents carry it), 'strict' every text token after the image (the prompt's "
            "too), 'none' off; default: as the model was trained; saved with the model, decoding applies it too"
        },
    )
    latent_bottleneck_steps: int | None = field(
        default=None,
        metadata={
            "help": "with --latent_bottleneck image or strict: keep it for this run's first N optimizer steps, then train "
            "(and save) without it; default: the whole run"
        },
    )
    max_round_tokens: int | None = field(
        default=None,
        metadata={
            "help": "stage 2 and GRPO training with the round methods: at most this many real tokens per round "
            "(more, smaller rounds: a lower activation peak under checkpointing); default: the batch's real tokens "
            "/ the number of layers with checkpointing, the fewest rounds without"
        },
    )
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={
            "help": "skip (and count) a step whose loss or latents are not finite, instead of stopping"
        },
    )


@dataclass
class MirageSFTConfig(_MirageLatentArgs, SFTConfig):
    # The docstring (every Mirage parameter, grouped, with why) is set below from the shared parameter text.

    stage: int | None = field(
        default=None,
        metadata={
            "help": "1: CE + cosine latent loss; 2: text loss through self-generated latents (default: the "
            "recipe's stage; 1 for a trainer built by hand)"
        },
    )
    text_loss_weight: float = field(
        default=0.1, metadata={"help": "gamma: weight of the text CE in stage 1 (paper 0.1)"}
    )
    latent_loss: str = field(
        default="cosine",
        metadata={"help": f"stage 1's latent loss: {', '.join(LATENT_LOSSES)} (cosine: the paper's)"},
    )
    latent_temperature: float = field(
        default=0.1, metadata={"help": "temperature of the contrastive latent loss"}
    )
    latent_variance_weight: float = field(
        default=0.0,
        metadata={"help": "weight of the variance-covariance regulariser on stage 1's predictions (0: off)"},
    )
    latent_target: str = field(
        default="pooled",
        metadata={
            "help": f"stage 1's targets: {', '.join(LATENT_TARGETS)} (pooled: the paper's; centred: minus the running "
            "mean; delta: helper minus input image features; selected: the k most changed patches)"
        },
    )
    latent_target_scale: bool = field(
        default=False,
        metadata={
            "help": "with --latent_target centred: also divide each dimension by its running standard deviation"
        },
    )
    latent_aux_text: float | None = field(
        default=None,
        metadata={
            "help": "weight of the auxiliary decoding of each latent span into its helper image's text (the row "
            "field image_output_text) by the model's own language model, in stages 1 and 2 (0: off); default: "
            "stage 1 off, stage 2 as its stage 1 was trained"
        },
    )
    latent_only_backprop: bool | None = field(
        default=None,
        metadata={
            "help": "with --latent_aux_text: its gradient reaches the weights only through the latent vectors (the "
            "decoding pass itself trains nothing); default: stage 1 off, stage 2 as its stage 1 was trained"
        },
    )
    stage2_target_metric: bool = field(
        default=False,
        metadata={
            "help": "stage 2: also encode the helper images every step to log latent_target_cos (cosine of "
            "the self-generated latents to the stage-1 targets); costs one vision-tower pass per step"
        },
    )
    cache_latent_targets: bool = field(
        default=False,
        metadata={"help": "compute stage-1 targets once up front and cache them with the dataset"},
    )
    logits_chunk_size: int | None = field(
        default=LOGITS_CHUNK_SIZE,
        metadata={
            "help": "trained positions whose logits exist at once in the text cross-entropy (each chunk recomputed "
            "in the backward); 0: all at once"
        },
    )
    padding_side: str = field(default="right", metadata={"help": "padding side of training batches"})
    # TRL's collator and dataset preparation do not know latent spans: rows reach our collator raw.
    remove_unused_columns: bool = False
    dataset_kwargs: dict | None = field(default_factory=lambda: {"skip_prepare_dataset": True})

    def __post_init__(self):
        quiet_defaults(self)
        refuse_unsupported(self)
        super().__post_init__()
        validate_latent_args(self)
        if not (math.isfinite(self.text_loss_weight) and self.text_loss_weight >= 0):
            raise MirageError(f"--text_loss_weight {self.text_loss_weight}: must be a finite number >= 0")
        if self.latent_loss not in LATENT_LOSSES:
            raise MirageError(f"--latent_loss {self.latent_loss!r}: choose one of {', '.join(LATENT_LOSSES)}")
        if not (math.isfinite(self.latent_temperature) and self.latent_temperature > 0):
            raise MirageError(f"--latent_temperature {self.latent_temperature}: must be a finite number > 0")
        if not (math.isfinite(self.latent_variance_weight) and self.latent_variance_weight >= 0):
            raise MirageError(
                f"--latent_variance_weight {self.latent_variance_weight}: must be a finite number >= 0"
            )
        if self.stage not in (None, *SFT_STAGES):
            raise MirageError(f"--stage {self.stage}: must be 1 or 2")
        if self.latent_target not in LATENT_TARGETS:
            raise MirageError(
                f"--latent_target {self.latent_target!r}: choose one of {', '.join(LATENT_TARGETS)}"
            )
        if self.latent_target_scale and self.latent_target != "centred":
            raise MirageError(
                "--latent_target_scale scales centred targets: give --latent_target centred too"
            )
        if self.latent_aux_text is not None and not (
            math.isfinite(self.latent_aux_text) and self.latent_aux_text >= 0
        ):
            raise MirageError(f"--latent_aux_text {self.latent_aux_text}: must be a finite number >= 0")
        if self.latent_aux_text and self.markers_only:
            raise MirageError(
                "--latent_aux_text decodes what the latents carry; markers-only slots carry nothing"
            )
        if self.latent_only_backprop and self.latent_aux_text == 0:
            raise MirageError(
                "--latent_only_backprop concerns the auxiliary text decoding: give --latent_aux_text too"
            )


# What the GRPO training pass feeds at the slots (MirageGRPOConfig.rollout_latents).
ROLLOUT_LATENTS = ("recompute", "constant")


@dataclass
class MirageGRPOConfig(_MirageLatentArgs, GRPOConfig):
    # The docstring is set below, like MirageSFTConfig's.

    # No `benchmark` here: the accuracy reward grades each row by its own `benchmark` column, which the data
    # loader fills from the script's --benchmark (one field in both dataclasses would clash in TrlParser).
    reward_names: list[str] = field(
        default_factory=lambda: ["accuracy", "format"], metadata={"help": "reward functions by name"}
    )
    rollout_latents: str = field(
        default="recompute",
        metadata={
            "help": "the training pass's latents: recompute (exact: the policy's own, gradient through them) or "
            "constant (the rollout's, fed as constants: one pass, no gradient through them)",
            "choices": list(ROLLOUT_LATENTS),
        },
    )
    remove_unused_columns: bool = False

    def __post_init__(self):
        quiet_defaults(self)
        refuse_unsupported(self)
        if self.rollout_latents not in ROLLOUT_LATENTS:
            raise MirageError(
                f"--rollout_latents {self.rollout_latents!r}: choose one of {', '.join(ROLLOUT_LATENTS)}"
            )
        if isinstance(self.reward_names, str):
            self.reward_names = [self.reward_names]
        get_reward_funcs(self.reward_names)  # an unknown name: one clear line
        if self.latent_bottleneck not in (None, "none"):
            raise MirageError(
                f"--latent_bottleneck {self.latent_bottleneck}: GRPO's rollouts and recomputed latents do not apply the visual "
                "bottleneck yet; train GRPO with --latent_bottleneck none"
            )
        if self.reward_weights is None and set(self.reward_names) <= set(DEFAULT_REWARD_WEIGHTS):
            self.reward_weights = [DEFAULT_REWARD_WEIGHTS[n] for n in self.reward_names]
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_names):
            raise MirageError(
                f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_names)} reward(s) "
                f"{self.reward_names}"
            )
        if getattr(self, "use_vllm", False):
            raise MirageError(
                "--use_vllm: latent rollouts need per-step hidden-state feedback, which vLLM cannot do"
            )
        try:
            super().__post_init__()
        except ValueError:
            gbs, n = self.generation_batch_size, self.num_generations
            if gbs and n and gbs % n:
                raise MirageError(
                    f"generation batch {gbs} (per_device_train_batch_size x processes x steps_per_generation) is not "
                    f"divisible by num_generations={n}: every prompt needs its full group; make it a multiple of {n}"
                ) from None
            raise
        validate_latent_args(self)
        # Latent decoding samples with temperature and top-p only.
        unsupported = {
            "top_k": (self.top_k, (0, None)),
            "min_p": (self.min_p, (None, 0.0)),
            "repetition_penalty": (self.repetition_penalty, (1.0,)),
            "generation_kwargs": (self.generation_kwargs, (None, {})),
        }
        for name, (value, defaults) in unsupported.items():
            if value not in defaults:
                raise MirageError(
                    f"--{name} {value!r}: latent rollouts sample with temperature and top_p only"
                )
        if self.use_transformers_continuous_batching:
            raise MirageError(
                "--use_transformers_continuous_batching: latent rollouts use mirage-trl's own decoding"
            )


# What `help(MirageSFTConfig)` / `help(MirageGRPOConfig)` show, in the manner of TRL's config docstrings: the
# parameters both share are written once.
_LATENT_PARAMS = """
        > Parameters of the latent tokens

        latent_size (`int`, *optional*, defaults to `4`):
            k, the latent vectors that stand in for one `<output_image>` (the paper's best k is 4-6; k = 8
            already hurts). A model is used with the k it was trained with: anything else is refused.
        latent_pooling (`str`, *optional*, defaults to `"drop_remainder"`):
            How the helper image's n vision features become k stage-1 targets: `"drop_remainder"` (the
            reference's: k means of n // k features, the rest dropped) or `"even"` (k nearly equal groups).

        > Parameters of what a slot receives after stage 1

        latent_feedback_norm (`str` or `None`, *optional*, defaults to `None`):
            `"target"` rescales every hidden state fed back at a slot (stage 2, decoding, GRPO) to the mean
            norm of the stage-1 targets, measured in stage 1 and saved with the model; `"none"` turns it
            off; `None` keeps what the model was trained with. Why: a final-norm hidden state has norm
            ~ sqrt(hidden size), pooled vision features often far less, so without it later stages feed
            inputs of a scale stage 1 never showed the model.
        markers_only (`bool`, *optional*, defaults to `False`):
            The control arm: spans, markers and slots stay but every stage and every decoding step feeds
            zeros at the slots (stage 1 has no latent loss). Saved with the model, so whatever such a model
            gains comes from the span format, not from latent content.
        latent_bottleneck (`str` or `None`, *optional*, defaults to `None`):
            `"image"`: the visual bottleneck (LIVR's mask): text tokens after a latent span's start cannot
            attend to the input image's tokens; the span's start and slots still can, so what the answer
            learns about the image must pass through the latents. `"strict"`: every text token after the
            image is blind, the rest of the prompt included (under `"image"` the answer can still read the
            prompt's text that read the image). `"none"`: off. `None`: as the model was
            trained (stage 2 of a bottlenecked stage 1 keeps it). Saved with the model; decoding applies
            it too. Refused for models with recurrent layers (Qwen3.5: their state reads the image past any
            mask) and by GRPO.
        latent_bottleneck_steps (`int` or `None`, *optional*, defaults to `None`):
            A schedule: the bottleneck for the run's first N optimizer steps, then off (the saved model has
            it off). `None`: the whole run.

        > Parameters of the data and the forward

        latent_truncation (`str`, *optional*, defaults to `"error"`):
            A row longer than `max_length` loses trained text wherever it is cut: `"error"` stops naming
            the row, `"drop"` skips it (counted in the logs as `dropped_rows`). Never a silent cut.
        stage2_method (`str`, *optional*, defaults to `"auto"`):
            The forward with self-generated latents (stage 2, GRPO training): `"rounds"` (one pass per latent
            round, KV reused), `"rounds_checkpointed"` (the same, exact under gradient checkpointing),
            `"recompute"` (the reference's full recomputation); `"auto"` picks the exact one for the
            checkpointing setting. All give the same loss and gradients.
        max_round_tokens (`int` or `None`, *optional*, defaults to `None`):
            With the round methods, at most this many real tokens per round: more, smaller rounds, so a lower
            activation peak under checkpointing (the replayed round's activations over every layer). `None`:
            the batch's real tokens / the number of layers with checkpointing, the fewest rounds without.

        > Parameters of the numerical guard

        max_latent_norm (`float` or `None`, *optional*, defaults to `1e4`):
            Stop (one line naming the step) when a latent's norm exceeds this: a diverging feedback loop
            shows there first. `None`: no bound.
        skip_nonfinite_steps (`bool`, *optional*, defaults to `False`):
            Skip and count a step whose loss or latents are not finite (nothing changes: no optimizer,
            scheduler or scaler step), instead of stopping.
"""

MirageSFTConfig.__doc__ = f"""Configuration class for `MirageSFTTrainer`: TRL's `SFTConfig` plus the Mirage parameters.

    Only the Mirage parameters are listed here; every other one is `SFTConfig`'s (see its documentation).
    Defaults are library defaults; the recipe YAMLs carry the paper's settings (docs/method.md).

    Parameters:
        > Parameters of the stage

        stage (`int` or `None`, *optional*, defaults to `None`):
            `1`: text cross-entropy x `text_loss_weight` + cosine of the predictions h[t-1] to the pooled
            helper-image features at the slots; `2`: text cross-entropy with gradients through the model's
            own latents. `None`: the recipe's stage (a recipe refuses another), 1 for a trainer built by hand.
        text_loss_weight (`float`, *optional*, defaults to `0.1`):
            gamma, the weight of the text loss in stage 1 (the paper's 0.1 suits a pretrained model that
            already writes well; a model trained from scratch needs ~1).
        latent_loss (`str`, *optional*, defaults to `"cosine"`):
            Stage 1's latent loss (`mirage_trl.latent.losses`): `"cosine"`, the paper's 1 - cos(h[t-1], e[t]);
            `"contrastive"`, InfoNCE in which each prediction must pick its own target against the other
            rows' targets. Why: targets that differ little between images are met by their mean direction
            under the cosine loss, so the latents can carry nothing about the image; the contrastive loss
            can only be lowered by what tells one image's targets from another's.
        latent_temperature (`float`, *optional*, defaults to `0.1`):
            Temperature of the contrastive latent loss (lower: harder negatives).
        latent_variance_weight (`float`, *optional*, defaults to `0.0`):
            Weight of a VICReg-style variance-covariance regulariser on stage 1's predictions across the batch
            (each dimension's standard deviation held at 1 or more, covariances pushed to 0): a guard against
            latents that collapse into one vector. 0: off.
        latent_target (`str`, *optional*, defaults to `"pooled"`):
            What stage 1's targets are (`mirage_trl.latent.targets`): `"pooled"`, the paper's averages of the
            helper image's patch features; `"centred"`, the same minus the running mean of all targets seen
            (saved beside the settings, `latent_target_stats.safetensors`); `"delta"`, the helper image's
            features minus the input image's, pooled (what the imagined image adds); `"selected"`, the helper
            image's features at the k patches that change most from the input image. Why: pooled targets differ
            little between images, so a latent that matches them need not say anything about this image.
        latent_target_scale (`bool`, *optional*, defaults to `False`):
            With `latent_target="centred"`: also divide each dimension by its running standard deviation.
        latent_aux_text (`float` or `None`, *optional*, defaults to `None`):
            Weight of an auxiliary loss in stages 1 and 2 (`mirage_trl.latent.aux_text`): the model's own
            language model reads each span's k latents as a prefix and must write what its helper image shows,
            the row's `image_output_text` (VSP: the cells of the drawn path). Nothing is added to the model, so
            nothing is dropped from exports. 0: off. `None`: off in stage 1; in stage 2, as its stage 1 trained
            (saved with the model).
        latent_only_backprop (`bool` or `None`, *optional*, defaults to `None`):
            With `latent_aux_text`: the decoding pass runs on detached weights, so its gradient reaches the model
            only through the latent vectors and the auxiliary task cannot help by reshaping shared weights alone.
            `None`: off in stage 1; in stage 2, as its stage 1 trained.
        stage2_target_metric (`bool`, *optional*, defaults to `False`):
            Stage 2: also encode the helper images every step to log `latent/target_cos` (one vision-tower
            pass per step, so off by default).
        cache_latent_targets (`bool`, *optional*, defaults to `False`):
            Stage 1: compute the targets once before training and keep them with the dataset (the vision
            tower is frozen, so they never change); refused if the tower changes.
        logits_chunk_size (`int` or `None`, *optional*, defaults to `1024`):
            The text cross-entropy computes the logits of this many trained positions at a time, each chunk
            recomputed in the backward, so the (positions x vocabulary) matrix never exists whole (at a 152k
            vocabulary, 1024 positions are 0.6 GB of float32 logits). 0 or `None`: all at once. Under ZeRO-3
            the logits are computed at once whatever the value (every rank must gather the LM head equally
            often).
        padding_side (`str`, *optional*, defaults to `"right"`):
            Padding side of training batches; both give the same loss.

        > Not supported (refused in one line before the model loads)

        `use_liger_kernel`, `torch_compile`, `packing`, `padding_free`: see `UNSUPPORTED_TRAINING_FLAGS`.
{_LATENT_PARAMS}"""

MirageGRPOConfig.__doc__ = f"""Configuration class for `MirageGRPOTrainer`: TRL's `GRPOConfig` plus the Mirage parameters.

    Rollouts decode with latents (temperature and top-p only: `top_k`, `min_p`, `repetition_penalty`,
    vLLM and continuous batching are refused); the loss covers text tokens only, its gradient flows
    through recomputed latents. Every other parameter is `GRPOConfig`'s.

    Parameters:
        > Parameters of the rewards

        reward_names (`list[str]`, *optional*, defaults to `["accuracy", "format"]`):
            Reward functions by name (`mirage_trl.rewards`); without `reward_weights`, the paper's 0.9 x
            accuracy + 0.1 x format. The accuracy reward grades each row by its own `benchmark` column.

        > Parameters of the training pass

        rollout_latents (`str`, *optional*, defaults to `"recompute"`):
            `"recompute"` (exact): the training pass recomputes every latent from the model being trained, in
            rounds, and the loss's gradient flows through them into the positions before each span.
            `"constant"`: the latents the rollout fed are kept with the batch and fed again as constants, so the
            training pass (and the old and reference log-probabilities) is one plain forward; the loss has the same
            value while the weights are those that generated (one optimizer step per generation batch, TRL's
            default), but no gradient flows through the latents, and with more steps per generation the latents
            are those of the older weights. Faster (docs/benchmarks.md, GRPO), not the exact gradient: off by
            default.
{_LATENT_PARAMS}"""


def _check_int(args, name: str, low: int, high: int, optional: bool = False) -> None:
    value = getattr(args, name, None)
    if value is None and optional:
        return
    if type(value) is not int or not low <= value <= high:
        raise MirageError(f"--{name} {value!r}: must be an integer from {low} to {high}")


def validate_latent_args(args) -> None:
    """Checks both configs share, at start (before any model loads), each naming its flag."""
    lr = args.learning_rate
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise MirageError(f"--learning_rate {lr}: must be a finite number > 0")
    _check_int(args, "latent_size", 1, MAX_LATENT_SIZE)
    _check_int(args, "per_device_train_batch_size", 1, 1 << 16)
    _check_int(args, "gradient_accumulation_steps", 1, 1 << 16)
    _check_int(args, "max_length", 1, MAX_SEQUENCE_LENGTH, optional=True)
    for name in ("max_completion_length", "max_prompt_length"):
        if hasattr(args, name):
            _check_int(args, name, 1, MAX_SEQUENCE_LENGTH, optional=True)
    bound = args.max_latent_norm
    if bound is not None and not (math.isfinite(bound) and bound > 0):
        raise MirageError(f"--max_latent_norm {bound}: must be a finite number > 0 (or None: no bound)")
    if args.latent_pooling not in POOLINGS:
        raise MirageError(f"--latent_pooling {args.latent_pooling!r}: choose one of {', '.join(POOLINGS)}")
    if args.latent_truncation not in TRUNCATION_POLICIES:
        raise MirageError(
            f"--latent_truncation {args.latent_truncation!r}: choose {' or '.join(map(repr, TRUNCATION_POLICIES))}"
        )
    if args.latent_feedback_norm not in (None, *FEEDBACK_NORM_CHOICES):
        raise MirageError(
            f"--latent_feedback_norm {args.latent_feedback_norm!r}: choose one of {', '.join(FEEDBACK_NORM_CHOICES)}"
        )
    if args.latent_bottleneck not in (None, *BOTTLENECKS):
        raise MirageError(
            f"--latent_bottleneck {args.latent_bottleneck!r}: choose one of {', '.join(BOTTLENECKS)}"
        )
    _check_int(args, "latent_bottleneck_steps", 0, 1 << 40, optional=True)
    if args.latent_bottleneck_steps is not None and args.latent_bottleneck in (None, "none"):
        raise MirageError(
            "--latent_bottleneck_steps schedules the bottleneck: give --latent_bottleneck image (or strict) too"
        )
    if args.stage2_method not in STAGE2_METHODS:
        raise MirageError(
            f"--stage2_method {args.stage2_method!r}: choose one of {', '.join(STAGE2_METHODS)}"
        )
    _check_int(args, "max_round_tokens", 1, MAX_SEQUENCE_LENGTH, optional=True)
    if hasattr(args, "logits_chunk_size"):
        _check_int(args, "logits_chunk_size", 0, MAX_SEQUENCE_LENGTH, optional=True)


def zero3_configured() -> bool:
    """Whether this process trains under DeepSpeed ZeRO-3: a `--deepspeed` config (TrainingArguments registers
    it with transformers) or `accelerate launch` with a ZeRO-3 config file (its environment)."""
    import os

    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled() or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"


def refuse_peft_under_zero3(use_peft: bool) -> None:
    """LoRA under ZeRO-3 is refused before the model loads. The latent tokens' embedding and LM-head rows train
    through PEFT's trainable tokens, whose forward reads the wrapped layer's weight directly instead of through
    the layer, so ZeRO-3 never gathers it: the partitioned (empty) weight reaches `index_copy` and the first step
    fails (PEFT 0.21; its ZeRO-3 set-up of those rows is also CUDA only). A LoRA run's weights fit on one GPU
    anyway: ZeRO-2 shards the rest."""
    if use_peft and zero3_configured():
        raise MirageError(
            "LoRA under DeepSpeed ZeRO-3 is not supported: PEFT's trainable token rows (the latent tokens) read the "
            "partitioned embedding without gathering it; train LoRA with zero_configs/zero2.yaml (ZeRO-3 is for "
            "full fine-tuning, docs/benchmarks.md)"
        )


def refuse_unsupported(args) -> None:
    """One line for a switch of `UNSUPPORTED_TRAINING_FLAGS`, before TrainingArguments' own checks (which would
    import Liger, or set up compilation, first)."""
    for flag, why in UNSUPPORTED_TRAINING_FLAGS.items():
        if getattr(args, flag, None):
            raise MirageError(f"--{flag}: not supported by the Mirage trainers: {why}")


# TrainingArguments / SFTConfig / GRPOConfig switches the Mirage trainers cannot honour, refused before any model
# loads rather than silently ignored or half applied.
UNSUPPORTED_TRAINING_FLAGS = {
    "use_liger_kernel": "Liger patches the model's forward and fuses the LM head into its own loss, while stage 1, "
    "stage 2 and GRPO compute their losses from the hidden states (latent slots, rounds); the text "
    "cross-entropy is already chunked (--logits_chunk_size)",
    "torch_compile": "the latent rounds change shape with every batch (one recompilation per step); run "
    "without it",
    "packing": "latent slots and rounds are laid out per row, so rows cannot share a sequence",
    "padding_free": "latent slots and rounds are laid out per padded row",
}
