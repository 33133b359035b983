"""Pieces both Mirage trainers share: model preparation (latent tokens, frozen vision tower, PEFT
settings), the numerical guard, and `MirageTrainerMixin` (what both do around TRL's loop: a step
that is skipped really changes nothing, checkpoints appear whole or not at all, no credential is
saved, divergence is warned)."""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import shutil
import types

import torch
from transformers import TrainerCallback

from ..card import build_model_card, write_card
from ..checkpoints import (
    RUN_ARGS_FILE,
    check_resume_checkpoint,
    own_checkpoints,
    rotate_own_checkpoints,
    run_args,
)
from ..configs import MirageGRPOConfig, refuse_peft_under_zero3
from ..errors import MirageError, os_error_of, storage_error
from ..io import honour_umask_tree, write_json
from ..latent.bottleneck import check_bottleneck_support
from ..latent.health import collapse_reason
from ..models.families import LANGUAGE_MODEL_MODULES, unwrap
from ..models.load import keep_4bit_layers_trainable, load_checkpoint_weights, load_for_training
from ..models.prepare import prepare_model
from ..models.processors import load_processor
from ..models.settings import MirageSettings, check_checkpoint_latent_size
from ..models.tokens import LatentTokens
from ..redact import redacted_args
from ..stages import STAGE1
from ..versions import check_private_apis

logger = logging.getLogger(__name__)

# Linear layers of the language model (every supported family names them alike): what "all-linear" means
# for Mirage (the vision tower stays frozen).
_LM = "(?:" + "|".join(LANGUAGE_MODEL_MODULES) + ")"
LANGUAGE_MODEL_LINEAR = rf".*{_LM}.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def setup_model(model, processing_class, peft_config, args, stage: int | None = None):
    """What both Mirage trainers do before TRL's `__init__`: load a model given by name, find its
    processor, add the latent tokens, freeze the vision tower, adapt the PEFT config.

    Returns (model, processing_class, peft_config, latent_tokens)."""
    check_private_apis()  # an upgrade that renamed an overridden method would silently skip it
    refuse_peft_under_zero3(peft_config is not None)
    if isinstance(model, str):
        model, processing_class = load_for_training(model, args)
    if processing_class is None:
        processing_class = load_processor(unwrap(model).config._name_or_path)
    keep_4bit_layers_trainable(model)
    tokens = prepare_model(model, processing_class, args.latent_size, stage=stage)
    apply_slot_settings(model, args, stage)
    return model, processing_class, adapt_peft_config(peft_config, tokens), tokens


def apply_slot_settings(model, args, stage: int | None) -> None:
    """The run's markers-only / feedback-norm / bottleneck flags, merged with what the model was trained
    with, written into its Mirage settings (so checkpoints, outputs and exports carry them); stage 1 also
    records its latent objective. A bottleneck the run cannot apply is refused here, before training."""
    current = MirageSettings.of_model(model)  # recorded by `prepare_model`
    settings = current.for_run(args.markers_only, args.latent_feedback_norm, stage, args.latent_bottleneck)
    if stage == STAGE1:
        settings = settings.with_objective(args)
    if settings.latent_bottleneck != "none":
        if isinstance(args, MirageGRPOConfig):
            raise MirageError(
                f"the model was trained with the visual bottleneck (latent_bottleneck '{settings.latent_bottleneck}' "
                "in its Mirage settings), which GRPO does not apply yet; pass --latent_bottleneck none"
            )
        check_bottleneck_support(model)
    settings.save_to(model)


def adapt_peft_config(peft_config, tokens: LatentTokens):
    """Mirage defaults for a PEFT config: LoRA on the language model only, new token rows trainable."""
    peft_config = restrict_to_language_model(peft_config)
    if peft_config is None:
        return None
    ids = [tokens.start_id, tokens.pad_id, tokens.end_id]
    if hasattr(peft_config, "trainable_token_indices"):
        indices = dict(peft_config.trainable_token_indices or {})
        for layer in ("embed_tokens", "lm_head"):
            indices[layer] = sorted(set(indices.get(layer, [])) | set(ids))
        peft_config.trainable_token_indices = indices
    return peft_config


def restrict_to_language_model(peft_config):
    """LoRA targets of the language model only ("all-linear" or plain names would hit the vision tower)."""
    if peft_config is None:
        return None
    target = getattr(peft_config, "target_modules", None)
    if (
        target is None
        or target == "all-linear"
        or (not isinstance(target, str) and set(target) == {"all-linear"})
    ):
        peft_config.target_modules = LANGUAGE_MODEL_LINEAR
    elif not isinstance(target, str):
        # Plain names like ["q_proj", "v_proj"] would also hit the vision tower's layers: restrict them.
        names = "|".join(re.escape(t) for t in sorted(target))
        peft_config.target_modules = rf".*{_LM}.*\.({names})"
    return peft_config


def check_step(
    step: int,
    skip: bool,
    terms: dict,
    latents: torch.Tensor | None = None,
    bound: float | None = None,
    report: torch.Tensor | None = None,
) -> tuple[bool, list[float]]:
    """(ok, reported): ok is True when every term is finite and no latent's norm exceeds `bound` (None: no bound).

    Otherwise stop naming the step and the term (or the norm), or with `skip` return False so the
    caller skips the step. All checks of a step share one host sync, and so do the values of `report` (the step's
    logged metrics, a 1-d tensor), returned as floats.
    """
    checks = [torch.isfinite(t.detach()).all() for t in terms.values()]
    peak = None
    if latents is not None and latents.shape[0] and bound is not None:
        peak = latents.detach().float().norm(dim=-1).max()
        checks.append(peak <= bound)  # a NaN peak fails here too, but is reported as non-finite first
    read = torch.stack(checks).float()
    if report is not None:
        read = torch.cat([read, report.detach().float().flatten().to(read.device)])
    values = read.tolist()  # the step's one host sync
    flags, reported = [bool(v) for v in values[: len(checks)]], values[len(checks) :]
    bad = [name for name, ok in zip(terms, flags) if not ok]
    if bad:
        if skip:
            logger.warning("step %d: non-finite %s; step skipped", step, ", ".join(bad))
            return False, reported
        raise MirageError(
            f"step {step}: non-finite {', '.join(bad)} (NaN or inf); lower the learning rate, check the data, "
            "or set skip_nonfinite_steps=True to skip such steps"
        )
    if peak is not None and not flags[-1]:
        msg = f"step {step}: latent norm {float(peak):.3g} exceeds max_latent_norm={bound:g}"
        if skip:
            logger.warning("%s; step skipped", msg)
            return False, reported
        raise MirageError(msg + " (raise max_latent_norm, or set skip_nonfinite_steps=True)")
    return True, reported


def check_distributed_support(accelerator, what: str) -> None:
    """Self-generated latents run the model in several dependent passes per step, inside the
    trainer rather than through the wrapper's `forward`. Plain DDP only syncs gradients of a
    backward that follows its own `forward`, so it would silently train each rank alone; DeepSpeed
    reduces gradients per parameter and is fine. Refuse DDP with the fix in the message."""
    from accelerate.utils import DistributedType

    ddp = {DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU}
    for name in ("MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_HPU"):
        if hasattr(DistributedType, name):
            ddp.add(getattr(DistributedType, name))
    if accelerator.distributed_type in ddp and accelerator.num_processes > 1:
        raise MirageError(
            f"{what} on several processes needs DeepSpeed: plain DDP would not sync the gradients of the "
            "latent passes; launch with `accelerate launch --config_file zero_configs/zero2.yaml ...`"
        )


def load_from_checkpoint(trainer, resume_from_checkpoint, model, fallback) -> None:
    """Resume: refuse a latent size that disagrees with the checkpoint, then load its weights.

    transformers 5 saves Qwen-VL checkpoints under the hub's key names, which
    `Trainer._load_from_checkpoint` loads with strict=False: every weight would silently stay as
    initialised. Full-model checkpoints are read the way `from_pretrained` reads them; adapters go
    through the Trainer's own loader (`fallback`).
    """
    check_resume_checkpoint(resume_from_checkpoint)
    check_checkpoint_latent_size(resume_from_checkpoint, trainer.mirage_settings.latent_size)
    if not load_checkpoint_weights(model if model is not None else trainer.model, resume_from_checkpoint):
        fallback(resume_from_checkpoint, model)


# ---------------------------------------------------------------------------------------- trainer mixin
CHECKPOINT_STAGING = ".{name}.tmp"
STAGING_MARK = ".mirage-trl-staging"  # in a staging folder a run made: only those are cleaned up
# A logged loss this many times its first value is reported as divergence.
DIVERGENCE_FACTOR = 10.0


class DivergenceCallback(TrainerCallback):
    """Warn, naming the step, when a run diverges with finite numbers: the loss climbs far above its first
    logged value, or the gradient norm vanishes to zero (nothing trains). Each warning is given once."""

    def __init__(self):
        self.first_loss = None
        self.warned: set[str] = set()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            if self.first_loss is None:
                self.first_loss = loss
            elif (
                self.first_loss > 0
                and loss > DIVERGENCE_FACTOR * self.first_loss
                and "loss" not in self.warned
            ):
                self.warned.add("loss")
                logger.warning(
                    "step %d: loss %.4g is over %gx its first logged value %.4g: the run is diverging "
                    "(lower the learning rate)",
                    state.global_step,
                    loss,
                    DIVERGENCE_FACTOR,
                    self.first_loss,
                )
        if isinstance(grad_norm, (int, float)) and grad_norm == 0.0 and "grad" not in self.warned:
            self.warned.add("grad")
            logger.warning(
                "step %d: the gradient norm is 0: no parameter receives a gradient (vanished, or everything frozen)",
                state.global_step,
            )


class MirageTrainerMixin:
    """What both Mirage trainers add around TRL's training loop (put it first in the bases).

    * Skipped steps: `guard_step` runs the numerical guard on a micro-batch; in skip mode a bad
      micro-batch (or a non-finite gradient norm, checked once per optimizer step) makes the
      optimizer step a no-op: no weight and no optimizer state changes (AdamW would otherwise still
      apply momentum and weight decay). The skipped micro-batch's loss is logged as NaN, which the
      Trainer's `logging_nan_inf_filter` (on by default) leaves out of the logged mean, and
      `skipped_steps` counts them. In stop mode a non-finite gradient norm stops before the step,
      so the last checkpoint holds the last good weights. Under DeepSpeed the engine steps inside
      `backward`; a skipped micro-batch then contributes zero gradients.
    * Checkpoints are written under a hidden `.checkpoint-N.tmp` folder and renamed when complete
      (settings included); older ones are rotated only after that, and a leftover staging folder
      of a killed run is removed at the next save.
    * `training_args.bin` is saved without credentials (`hub_token`, ...): see `mirage_trl.redact`.
    """

    _skip_update = False
    _checkpoint_staging: str | None = None
    num_skipped_steps = 0

    @property
    def mirage_settings(self) -> MirageSettings:
        """The model's Mirage settings, the one holder of the latent size k and the slot settings (recorded
        when the model was prepared, `models.prepare`): what the trainer reads them from."""
        return MirageSettings.of_model(self.model)

    def _init_mirage_trainer(self):
        self.add_callback(DivergenceCallback())
        self._window = [0, 0]  # micro-batches since the last log, and how many of them were skipped

    def logs_this_step(self) -> bool:
        """Whether the metrics of the micro-batch being computed reach a log line: an evaluation, or a training step
        the Trainer logs (its logging steps, the first step with `logging_first_step`, or any step when logging by
        epoch). What costly metrics (the latents' effective rank) are computed on; the others are every step's."""
        if not self.model.training or self.args.logging_strategy == "epoch":
            return True
        if self.args.logging_strategy == "no":
            return False
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to
        every = self.state.logging_steps or self.args.logging_steps
        return step % max(int(every), 1) == 0 or (step == 1 and self.args.logging_first_step)

    # ------------------------------------------------------------------ the step guard
    def guard_step(self, mode: str, terms: dict, latents, model, report: torch.Tensor | None = None):
        """The numerical guard for one micro-batch: (the loss to backpropagate, a zero with the graph intact when the
        step is skipped; the values of `report` on the host, read in the guard's one sync)."""
        ok, reported = check_step(
            self.state.global_step,
            self.args.skip_nonfinite_steps,
            terms,
            latents,
            self.args.max_latent_norm,
            report,
        )
        if ok:
            return terms["loss"], reported
        self._skip_update = True
        self.num_skipped_steps += 1
        self._metrics[mode]["skipped_steps"].append(float(self.num_skipped_steps))
        # Zero gradients, graph intact (every rank still runs its backward); the optimizer step is skipped.
        return sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad), reported

    def training_step(self, model, inputs, num_items_in_batch=None):
        before = self.num_skipped_steps
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._window[0] += 1
        if self.num_skipped_steps != before:
            self._window[1] += 1
            return torch.full_like(loss, float("nan"))  # a skipped micro-batch has no loss to log
        return loss

    def log(self, logs, *args, **kwargs):
        window = self._window
        if "loss" in logs:
            if window[1] and window[1] == window[0]:
                logs["loss"] = float("nan")  # every step since the last log was skipped: there is no loss
            self._window = [0, 0]
        result = super().log(logs, *args, **kwargs)
        self._check_latent_health(logs)
        return result

    _collapsed = False

    def _check_latent_health(self, logs) -> None:
        """Warn (naming the step) when the logged latents collapse, and again when they recover."""
        stats = {k[len("latent/") :]: v for k, v in logs.items() if k.startswith("latent/")}
        if "cross_sample_cos" not in stats:
            return
        reason = collapse_reason(stats)
        if reason and not self._collapsed:
            target = stats.get("target_cross_sample_cos")
            also = (
                f" (the stage-1 targets themselves: cross-sample cosine {target:.3f})"
                if target is not None
                else ""
            )
            logger.warning("step %d: %s%s", self.state.global_step, reason, also)
        elif self._collapsed and not reason:
            logger.warning("step %d: the latents differ across inputs again", self.state.global_step)
        self._collapsed = bool(reason)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=self.accelerator.device).reshape(())
        flags = torch.stack(
            [~torch.isfinite(norm), torch.tensor(self._skip_update, device=norm.device)]
        ).float()
        if self.accelerator.num_processes > 1:  # every rank skips or none does
            flags = self.accelerator.reduce(flags, reduction="sum")
        nonfinite, skip = (
            bool(v) for v in flags.tolist()
        )  # the one host sync of the guard per optimizer step
        if nonfinite:
            if not getattr(self.args, "skip_nonfinite_steps", False):
                raise MirageError(
                    f"step {self.state.global_step}: non-finite gradient norm (NaN or inf) before the optimizer "
                    "step; no weight was changed. Lower the learning rate, check the data, or set "
                    "skip_nonfinite_steps=True to skip such steps"
                )
            logger.warning("step %d: non-finite gradient norm; step skipped", self.state.global_step)
            if not skip:
                self.num_skipped_steps += 1
                self._metrics["train"]["skipped_steps"].append(float(self.num_skipped_steps))
        self._skip_update = nonfinite or skip
        return grad_norm

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        # A second `train()` gets the first one's optimizer back, wrapped by accelerate around the guarded one.
        if any(
            getattr(o, "_mirage_guarded", False) for o in (optimizer, getattr(optimizer, "optimizer", None))
        ):
            return optimizer
        step = optimizer.step

        def guarded_step(opt, *args, **kwargs):
            if self._skip_update:
                self._skip_update = False
                opt.zero_grad(set_to_none=True)
                return None  # weights and optimizer state (moments, step counts) untouched
            return step(*args, **kwargs)

        # a bound method, as torch's LR schedulers expect of `optimizer.step` (they wrap its `__func__`)
        optimizer.step = types.MethodType(guarded_step, optimizer)
        optimizer._mirage_guarded = True
        return optimizer

    # ------------------------------------------------------------------ saving
    def save_mirage_state(self, folder) -> None:
        """Files a trainer keeps beside the Mirage settings in every checkpoint and output (none here; `save_model`
        writes them, for checkpoints too)."""

    def save_model(self, output_dir=None, _internal_call=False):
        with redacted_args(self.args):
            try:
                super().save_model(output_dir, _internal_call=True)
            except Exception as e:
                error = os_error_of(e)
                if error is None or storage_error(error) is None or error.filename is not None:
                    raise
                # a full disk in the weights writer names no file: name the folder being written
                raise OSError(error.errno, error.strerror, str(output_dir or self.args.output_dir)) from e
        if self.args.should_save:
            self.save_mirage_state(output_dir or self.args.output_dir)
            honour_umask_tree(output_dir or self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _get_output_dir(self, trial):
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """A Mirage model's card is mirage-trl's (stages, latent size, launch lines, latent decoding), for the
        training output, every checkpoint and the Hub, not PEFT's placeholder or TRL's text-generation quick
        start; a text-only baseline keeps TRL's."""
        settings = self.mirage_checkpoint_settings()
        if settings is None:
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return None

        saved = MirageSettings.read(self.args.output_dir)  # what save_outputs recorded: stages, base, launch
        if saved is not None:
            settings = settings.replace(**saved.provenance)
        name = model_name or os.path.basename(os.path.normpath(self.args.output_dir))
        from peft import PeftModel

        kind = "adapter" if isinstance(self.model, PeftModel) else "full"
        datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
        card = build_model_card(
            settings.to_dict(), kind=kind, model_name=name, repo_id=self.args.hub_model_id, datasets=datasets
        )
        write_card(self.args.output_dir, card)
        return None

    def mirage_checkpoint_settings(self) -> MirageSettings | None:
        """What `mirage_config.json` of each checkpoint holds (None: no such file, e.g. text-only baselines)."""
        return MirageSettings.of_model(self.model)

    def _save_checkpoint(self, model, trial):
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, CHECKPOINT_STAGING.format(name=name))
        if os.path.isdir(final) and final not in own_checkpoints(run_dir):
            raise MirageError(
                f"--output_dir {run_dir}: {name} is there and no mirage-trl run wrote it; it is not replaced "
                f"(move it away, or give another --output_dir)"
            )
        if os.path.isdir(staging) and not os.path.isfile(os.path.join(staging, STAGING_MARK)):
            raise MirageError(
                f"--output_dir {run_dir}: {os.path.basename(staging)} is there and no mirage-trl run made it; "
                f"it is not replaced (move it away, or give another --output_dir)"
            )
        if self.args.should_save:
            for leftover in glob.glob(os.path.join(run_dir, CHECKPOINT_STAGING.format(name="checkpoint-*"))):
                if os.path.isfile(
                    os.path.join(leftover, STAGING_MARK)
                ):  # only a killed run's, never a user's
                    shutil.rmtree(leftover, ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
            with open(os.path.join(staging, STAGING_MARK), "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))
        self.accelerator.wait_for_everyone()  # no rank writes into the staging folder before it is clean
        limit = self.args.save_total_limit
        self._checkpoint_staging = staging
        self.args.save_total_limit = None  # rotate only once the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging = None
            self.args.save_total_limit = limit
        staged = os.path.join(staging, name)
        settings = self.mirage_checkpoint_settings()
        if self.args.should_save and settings is not None:
            # The Mirage settings travel with every checkpoint, so a checkpoint loads and resumes on its own.
            settings.write(staged)
        if self.args.should_save:  # what a resume compares its arguments with (checkpoints.check_same_run)
            write_json(os.path.join(staged, RUN_ARGS_FILE), run_args(self.args))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):
                self.state.best_model_checkpoint = final + best[len(staged) :]
            # the Trainer's rotation would delete any checkpoint-N folder there, the user's too
            rotate_own_checkpoints(run_dir, limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
