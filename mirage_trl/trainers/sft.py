"""`MirageSFTTrainer`: TRL's `SFTTrainer` with Mirage's stage-1 and stage-2 losses.

Stage 1: one forward in which the latent slots' input embeddings are the pooled helper-image
features; loss = gamma * CE(text) + mean over slots of (1 - cos(h[t-1], e[t])).
Stage 2: the input at each slot is the model's own final-norm hidden state at the previous
position (`latent.stage2.self_latent_forward`, exact with or without gradient checkpointing);
loss = CE(text), with gradients through every self-generated latent.

Both terms come from one graph built here: TRL's own `compute_loss` runs a fused LM head and
its returned outputs come from a separate no-grad forward (TRL 1.16). Logits are computed
only at trained positions, so the (B, L, V) logits tensor is never built.
"""

from __future__ import annotations

import logging
import math

import torch
from trl import SFTTrainer

from ..configs import MirageSFTConfig
from ..data.reference import require_helper_images
from ..errors import MirageError
from ..latent.aux_text import aux_text_loss
from ..latent.bottleneck import visual_bottleneck
from ..latent.collator import MirageDataCollator
from ..latent.feedback import LatentFeedback
from ..latent.health import HEALTH_KEYS, latent_health
from ..latent.losses import LATENT_LOSSES, cosine, text_cross_entropy, variance_covariance
from ..latent.slots import latent_inputs
from ..latent.stage2 import self_latent_forward
from ..latent.targets import (
    REFERENCED_TARGETS,
    TargetCentring,
    helper_inputs,
    helper_latent_targets,
    precompute_latent_targets,
)
from ..models.families import capture_final_hidden, family, unwrap
from ..models.settings import MirageSettings
from .common import (
    MirageTrainerMixin,
    check_distributed_support,
    load_from_checkpoint,
    setup_model,
)

logger = logging.getLogger(__name__)


def _has_helpers(dataset) -> bool:
    column = (
        dataset["helper_images"]
        if hasattr(dataset, "column_names")
        else [r.get("helper_images") for r in dataset]
    )
    return any(column)


class MirageSFTTrainer(MirageTrainerMixin, SFTTrainer):
    """Stage 1 / stage 2 Mirage training on top of `trl.SFTTrainer` (any batch size, LoRA, DeepSpeed)."""

    _tag_names = ["trl", "sft", "mirage"]
    _name = "Mirage SFT"

    def __init__(
        self,
        model,
        args: MirageSFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = MirageSFTConfig(output_dir="mirage-sft")
        if args.stage is None:  # a trainer built by hand; the recipes set their own stage
            args.stage = 1
        model, processing_class, peft_config, self.latent_tokens = setup_model(
            model, processing_class, peft_config, args, stage=args.stage
        )
        if args.stage == 1 and train_dataset is not None and not _has_helpers(train_dataset):
            # Rows without spans are fine in a mix; a stage-1 dataset with no helper image at all is a mistake.
            require_helper_images(train_dataset, stage=1)
        if args.cache_latent_targets and args.stage == 1 and train_dataset is not None:
            train_dataset = precompute_latent_targets(
                train_dataset,
                unwrap(model),
                processing_class,
                MirageSettings.of_model(model).latent_size,
                args.latent_pooling,
                target=args.latent_target,
            )
        if data_collator is None:
            data_collator = MirageDataCollator(
                processing_class,
                self.latent_tokens,
                max_length=args.max_length,
                padding_side=args.padding_side,
                truncation=args.latent_truncation,
                # stage 2 needs helper images only for the optional drift metric: skip decoding them otherwise
                with_helpers=args.stage == 1 or args.stage2_target_metric,
                require_helpers=args.stage == 1,
                with_references=(args.stage == 1 or args.stage2_target_metric)
                and self._target_kind(args, model) in REFERENCED_TARGETS,
                with_aux_text=bool(self._aux_text(args, model)[0]),
            )
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        # compute_loss normalises CE by `num_items_in_batch` itself. Qwen-VL classes declare
        # accepts_loss_kwargs=False, which would make Trainer skip that count (per-micro-batch means, then / GA).
        self.model_accepts_loss_kwargs = True
        self._init_mirage_trainer()
        self._target_norm_sum = (0.0, 0)
        # "centred" stage-1 targets: the running statistics, saved beside the settings (and resumed)
        self.target_centring = (
            TargetCentring(scale=args.latent_target_scale)
            if args.stage == 1 and args.latent_target == "centred"
            else None
        )
        self.aux_text_weight, self.latent_only_backprop = self._aux_text(args, self.model)
        if self.latent_only_backprop and getattr(self, "is_deepspeed_enabled", False):
            if self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise MirageError(
                    "--latent_only_backprop decodes on detached copies of the weights, which ZeRO-3 partitions "
                    "away; use ZeRO-2 or train without --latent_only_backprop"
                )
        if args.stage == 2:
            check_distributed_support(self.accelerator, "stage 2")

    # ------------------------------------------------------------------ forward passes
    def _positions(self, model, inputs) -> torch.Tensor:
        fam = family(model)
        return fam.position_ids(
            model, inputs["input_ids"], inputs["attention_mask"], fam.image_inputs(model, inputs)
        )

    @staticmethod
    def _target_kind(args, model) -> str:
        """The targets this run computes: stage 1's `latent_target`; stage 2 (its optional drift metric) those of
        the stage 1 it continues, uncentred (the running statistics stay with stage 1)."""
        if args.stage == 1:
            return args.latent_target
        settings = MirageSettings.of_model(model)
        kind = settings.latent_target if settings is not None else "pooled"
        return "pooled" if kind == "centred" else kind

    @staticmethod
    def _aux_text(args, model) -> tuple[float, bool]:
        """(weight, latent-only) of the auxiliary text decoding: the run's flags; unset, stage 1 off and stage 2 as
        its stage 1 was trained (the model's settings)."""
        settings = MirageSettings.of_model(model)
        inherited = settings if args.stage == 2 and settings is not None else None
        weight = args.latent_aux_text
        if weight is None:
            weight = inherited.latent_aux_text if inherited else 0.0
        latent_only = args.latent_only_backprop
        if latent_only is None:
            latent_only = inherited.latent_only_backprop if inherited else False
        return float(weight), bool(latent_only) and bool(weight)

    def _helper_targets(self, model, inputs) -> torch.Tensor | None:
        """The step's stage-1 targets (`latent.targets`), before any centring."""
        if "latent_targets" in inputs:  # cached up front with the dataset
            return inputs["latent_targets"]
        helpers = helper_inputs(model, inputs)
        if helpers is None:
            return None
        return helper_latent_targets(
            model,
            helpers,
            self.mirage_settings.latent_size,
            self.args.latent_pooling,
            self._target_kind(self.args, model),
            helper_inputs(model, inputs, prefix="reference_"),
            inputs.get("reference_index"),
        )

    def _centre(self, targets: torch.Tensor | None, mode: str) -> torch.Tensor | None:
        """`latent_target="centred"`: training steps add their targets to the running statistics (summed over
        processes) first; every step then subtracts the running mean (and divides by the standard deviation)."""
        if self.target_centring is None or targets is None or targets.shape[0] == 0:
            return targets
        if mode == "train" or self.target_centring.sum is None:
            reduce = None
            if self.accelerator.num_processes > 1:
                reduce = lambda t: self.accelerator.reduce(t, reduction="sum")  # noqa: E731
            self.target_centring.update(targets, reduce)
        return self.target_centring(targets)

    def stage1_forward(self, model, inputs, targets):
        """One forward with the targets at the slots; returns final-norm hidden states (B, L, D)."""
        # unwrap: a DDP wrapper has no get_input_embeddings (DeepSpeed's engine forwards it)
        values = targets
        if targets is not None and self.latent_feedback.slot_input == "zeros":
            values = torch.zeros_like(targets)  # markers-only control: no content at the slots
        with (
            latent_inputs(unwrap(model), inputs["latent_mask"], values),
            visual_bottleneck(model, inputs["input_ids"], inputs["latent_mask"], self.bottleneck),
            capture_final_hidden(model) as captured,
        ):
            model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                position_ids=family(model).model_positions(self._positions(model, inputs)),
                **family(model).image_inputs(model, inputs),
                use_cache=False,
                logits_to_keep=1,  # logits are computed at trained positions only, below
            )
        return captured[-1]

    def stage2_forward(self, model, inputs):
        return self_latent_forward(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["latent_mask"],
            position_ids=self._positions(model, inputs),
            method=self.args.stage2_method,
            max_round_tokens=self.args.max_round_tokens,
            feedback=self.latent_feedback,
            bottleneck=self.bottleneck,
            **family(model).image_inputs(model, inputs),
        )

    @property
    def latent_feedback(self):
        return LatentFeedback.from_model(self.model)

    @property
    def bottleneck(self) -> str:
        """The visual bottleneck this step runs under (the model's settings, which the schedule turns off)."""
        return self.mirage_settings.latent_bottleneck

    def _follow_bottleneck_schedule(self) -> None:
        """`--latent_bottleneck_steps N`: from optimizer step N on, the bottleneck is off, in the settings too
        (so validation decoding, checkpoints and the saved model go without it)."""
        steps = self.args.latent_bottleneck_steps
        if steps is not None and self.state.global_step >= steps and self.bottleneck != "none":
            self.mirage_settings.replace(latent_bottleneck="none").save_to(self.model)
            logger.info(
                "visual bottleneck off from step %d (--latent_bottleneck_steps)", self.state.global_step
            )

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._follow_bottleneck_schedule()
        slot_mask = inputs["latent_mask"]
        targets = self._helper_targets(model, inputs)
        if self.args.stage == 1:
            targets = self._centre(targets, mode)
        # Mixed precision: accelerate autocasts only the top-level forward; stage 2 runs the inner
        # model round by round and the logits are computed here, so both go under the same autocast.
        with self.accelerator.autocast():
            if self.args.stage == 1:
                hidden = self.stage1_forward(model, inputs, targets)
                latents = targets
            else:
                out = self.stage2_forward(model, inputs)
                hidden, latents = out.hidden_states, out.latents
            stats: dict = {}
            ce_sum, n_tokens = text_cross_entropy(
                model, hidden, inputs["labels"], stats, self.args.logits_chunk_size
            )
        # As TRL: normalise by the tokens of the whole accumulated batch when the Trainer gives that count.
        ce = ce_sum / (n_tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            ce = ce * self.accelerator.num_processes
        n = n_tokens.clamp(min=1)
        metrics = {
            "ce": ce_sum.detach() / n,
            # TRL's SFT metrics, from the same logits
            "mean_token_accuracy": stats["correct"].float() / n,
            "entropy": stats["entropy"] / n,
            "_tokens": inputs["attention_mask"].sum(),
        }
        loss = ce
        has_slots = latents is not None and latents.shape[0] > 0
        markers_only = self.latent_feedback.slot_input == "zeros"
        if self.args.stage == 1:
            # markers-only: the slots carry nothing, so there is nothing for h[t-1] to predict: CE alone
            loss = ce if markers_only else self.args.text_loss_weight * ce
            if has_slots:
                rows, before = slot_mask[:, 1:].nonzero(as_tuple=True)  # each slot's row and position - 1
                predicted = hidden[rows, before]  # h[t-1] for every slot t, in slot order
                loss_fn = LATENT_LOSSES[self.args.latent_loss]
                latent_loss, cos = loss_fn(predicted, targets, rows, self.args.latent_temperature)
                metrics["latent_cos"] = cos.detach().mean()
                if self.args.latent_variance_weight:
                    regulariser = variance_covariance(predicted)
                    metrics["latent_variance_covariance"] = regulariser.detach()
                    latent_loss = latent_loss + self.args.latent_variance_weight * regulariser
                metrics["latent_loss"] = latent_loss.detach()
                # A per-micro-batch mean: average it over the accumulation steps when CE already is.
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                if not markers_only:
                    loss = loss + latent_loss / steps
        if has_slots and self.aux_text_weight and not markers_only:
            # stage 1: the predictions h[t-1] (what stage 2 feeds); stage 2: the fed latents
            decoded = predicted if self.args.stage == 1 else latents
            aux_sum, aux_tokens = aux_text_loss(
                model,
                decoded,
                inputs["aux_input_ids"],
                inputs["aux_attention_mask"],
                self.mirage_settings.latent_size,
                latent_only=self.latent_only_backprop,
            )
            aux = aux_sum / aux_tokens.clamp(min=1)
            metrics["latent_aux_text_ce"] = aux.detach()
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.aux_text_weight * aux / steps
        # markers-only stage 2 feeds zeros: there is no latent content to describe
        if has_slots and not (markers_only and self.args.stage == 2):
            # stage 1: the health of what stage 2 will feed (the predictions), beside the targets they learn
            described = predicted if self.args.stage == 1 else latents
            metrics.update(self._latent_metrics(described, targets))

        terms = {"loss": loss}
        if has_slots:
            terms["latents"] = latents
        # One gather for all metrics of the step (NaN: not measurable on that rank), read on the host in the guard's
        # one sync.
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()])
        gathered = self.accelerator.gather_for_metrics(values[None]).nanmean(dim=0)
        loss, gathered = self.guard_step(mode, terms, latents if has_slots else None, model, report=gathered)
        for name, value in zip(metrics, gathered):
            if name == "_tokens":
                if mode == "train":  # TRL's running count of the tokens seen in training
                    self._total_train_tokens += int(round(value * self.accelerator.num_processes))
                    self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            elif not math.isnan(value):
                self._metrics[mode][name].append(value)
        if mode == "train" and self.args.stage == 1 and "latent/target_norm" in metrics:
            self._record_target_norm(model, gathered[list(metrics).index("latent/target_norm")])
        dropped = getattr(self.data_collator, "num_dropped", 0)
        if dropped:
            self._metrics[mode]["dropped_rows"].append(float(dropped))
        return (loss, {"hidden_states": hidden}) if return_outputs else loss

    def _latent_metrics(self, latents, targets) -> dict:
        """`latent/...` health of the latents (stage 1: the predictions h[t-1]; stage 2: the fed vectors)
        and of the stage-1 targets; every key present on every rank (NaN where not measurable)."""
        k = self.mirage_settings.latent_size
        reference = None
        if targets is not None:
            reference = targets.detach().float().norm(dim=-1).mean()
        else:
            settings = MirageSettings.of_model(self.model)
            reference = settings.latent_target_norm if settings else None
        stats = latent_health(latents, k, reference, with_rank=self.logs_this_step())
        out = {f"latent/{name}": stats.get(name, latents.new_tensor(float("nan"))) for name in HEALTH_KEYS}
        if reference is None:
            del out["latent/norm_ratio"]
        if targets is not None and targets.shape == latents.shape:
            target_stats = latent_health(targets, k, with_rank=False)
            out["latent/target_norm"] = target_stats["norm"]
            out["latent/target_cross_sample_cos"] = target_stats.get(
                "cross_sample_cos", latents.new_tensor(float("nan"))
            )
            out["latent/target_cos"] = cosine(latents.detach(), targets).mean()
        return out

    def _record_target_norm(self, model, value: float) -> None:
        """Running mean of the stage-1 target norm, kept in the Mirage settings (and so in every checkpoint
        and output): what `--latent_feedback_norm target` rescales to in later stages."""
        total, count = self._target_norm_sum
        self._target_norm_sum = (total + value, count + 1)
        mean = (total + value) / (count + 1)
        changes = {"latent_target_norm": mean}
        if self.args.latent_feedback_norm == "target":
            changes["latent_feedback_norm"] = mean
        MirageSettings.of_model(model).replace(**changes).save_to(model)

    def mirage_checkpoint_settings(self):
        return super().mirage_checkpoint_settings().replace(stage=self.args.stage)

    def save_mirage_state(self, folder) -> None:
        """What a stage-1 run keeps beside the settings of each checkpoint and output: the statistics of its
        centred targets."""
        if self.target_centring is not None:
            self.target_centring.save(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_from_checkpoint(self, resume_from_checkpoint, model, super()._load_from_checkpoint)
        if self.target_centring is not None:
            self.target_centring.load(resume_from_checkpoint)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
