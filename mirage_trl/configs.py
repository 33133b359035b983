"""Configs: TRL's `SFTConfig` / `GRPOConfig` extended with Mirage's knobs, and the recipes' script arguments.

Defaults here are library defaults; the recipe YAMLs carry the paper's settings (MIRAGE.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig, ScriptArguments, SFTConfig

from .errors import MirageError
from .latent.targets import POOLINGS

STAGES = (1, 2)
STAGE2_METHODS = ("auto", "rounds", "rounds_checkpointed", "recompute")


@dataclass
class MirageScriptArguments(ScriptArguments):
    """Where the data lives. `dataset_name` may be a local reference-format JSONL file."""

    dataset_name: str | None = field(default=None, metadata={"help": "reference-format JSONL (or a hub dataset)"})
    dataset_root: str | None = field(
        default=None, metadata={"help": "folder image paths are relative to (default: the JSONL's dataset root)"}
    )
    benchmark: str | None = field(
        default=None, metadata={"help": "vsp_planning, vsp_reasoning, jigsaw, sat or comt (inferred for VSP)"}
    )
    eval_dataset_name: str | None = field(default=None, metadata={"help": "optional eval JSONL"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N rows"})


@dataclass
class _MirageLatentArgs:
    latent_size: int = field(default=4, metadata={"help": "k: latent vectors per <output_image>"})
    latent_pooling: str = field(
        default="drop_remainder",
        metadata={"help": f"pooling of helper-image features into k targets: {', '.join(POOLINGS)}"},
    )
    latent_truncation: str = field(
        default="error",
        metadata={"help": "a row whose max_length cut goes through a latent span: 'error' or 'drop' (counted)"},
    )
    max_latent_norm: float | None = field(
        default=1e4, metadata={"help": "stop when a latent's norm exceeds this (None: no bound)"}
    )
    skip_nonfinite_steps: bool = field(
        default=False, metadata={"help": "skip (and count) a step whose loss or latents are not finite, instead of stopping"}
    )


@dataclass
class MirageSFTConfig(_MirageLatentArgs, SFTConfig):
    """`SFTConfig` plus the Mirage stage-1/stage-2 settings."""

    stage: int = field(default=1, metadata={"help": "1: CE + cosine latent loss; 2: text loss through self-generated latents"})
    text_loss_weight: float = field(default=0.1, metadata={"help": "gamma: weight of the text CE in stage 1 (paper 0.1)"})
    stage2_method: str = field(
        default="auto",
        metadata={"help": f"stage-2 forward: {', '.join(STAGE2_METHODS)} ('auto' picks the exact one for the checkpointing setting)"},
    )
    cache_latent_targets: bool = field(
        default=False, metadata={"help": "compute stage-1 targets once up front and cache them with the dataset"}
    )
    padding_side: str = field(default="right", metadata={"help": "padding side of training batches"})
    # TRL's collator and dataset preparation do not know latent spans: rows reach our collator raw.
    remove_unused_columns: bool = False
    dataset_kwargs: dict | None = field(default_factory=lambda: {"skip_prepare_dataset": True})

    def __post_init__(self):
        super().__post_init__()
        validate_latent_args(self)
        if self.stage not in STAGES:
            raise MirageError(f"--stage {self.stage}: must be 1 or 2")
        if self.stage2_method not in STAGE2_METHODS:
            raise MirageError(f"--stage2_method {self.stage2_method!r}: choose one of {', '.join(STAGE2_METHODS)}")


@dataclass
class MirageGRPOConfig(_MirageLatentArgs, GRPOConfig):
    """`GRPOConfig` plus the latent settings; rollouts decode latents, the loss covers text tokens only."""

    benchmark: str | None = field(default=None, metadata={"help": "benchmark whose grader gives the accuracy reward"})
    reward_names: list[str] = field(default_factory=lambda: ["accuracy", "format"], metadata={"help": "reward functions by name"})
    remove_unused_columns: bool = False

    def __post_init__(self):
        if self.reward_weights is None and self.reward_names == ["accuracy", "format"]:
            self.reward_weights = [0.9, 0.1]
        super().__post_init__()
        validate_latent_args(self)
        if getattr(self, "use_vllm", False):
            raise MirageError("--use_vllm: latent rollouts need per-step hidden-state feedback, which vLLM cannot do")


def validate_latent_args(args) -> None:
    if args.latent_size < 1:
        raise MirageError(f"--latent_size {args.latent_size}: must be >= 1")
    if args.latent_pooling not in POOLINGS:
        raise MirageError(f"--latent_pooling {args.latent_pooling!r}: choose one of {', '.join(POOLINGS)}")
    if args.latent_truncation not in ("error", "drop"):
        raise MirageError(f"--latent_truncation {args.latent_truncation!r}: choose 'error' or 'drop'")
