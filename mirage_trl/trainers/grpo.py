"""`MirageGRPOTrainer`: TRL's `GRPOTrainer` whose rollouts imagine (stage 3, docs/method.md sections 3-4).

What latents change, and therefore what is overridden (everything else is TRL's: prompt
templating and image processing, generation batching, rewards and their weights, advantages,
loss types, clipping, KL, logging):

* `_generate_and_score_completions`: rows carry image *paths*; each generation batch gets its
  images loaded (PIL, what TRL's VLM prompt processing expects) and a `prompt` (the user turns
  of `messages`), then TRL does the rest. Afterwards the accuracy metric is logged.
* `_generate_single_turn`: the regular transformers branch is replaced by
  `generate_with_latents` (per-sample latent mode, KV cache). vLLM / continuous batching refuse.
* `_generate`: after TRL decodes and logs lengths, each completion gets a loss mask (TRL's
  `tool_mask`, "tokens the policy did not sample") that is 0 at latent slots and at the forced
  `<|latent_end|>` after each span. TRL multiplies it into `completion_mask` for the loss, the
  importance ratio, the KL, `num_items_in_batch` and every masked metric. `completion_mask`
  itself stays 1 there because TRL also uses it as the attention mask, and the slots must be
  attended. Logs the mean number of latent spans and of text tokens per completion.
* `_get_per_token_logps_and_entropies`: the forward is `self_latent_forward` over
  prompt + completion, slots recomputed from the model being scored (so the gradient flows
  through every latent into earlier positions), then log-probabilities (temperature-scaled, as
  TRL) of the completion's text tokens from the LM head; slot and forced positions get 0.
  The same function scores `old_per_token_logps` and the reference: the reference recomputes
  *its own* latents (its probability of the text under its own imagination; TRL's reference for
  a PEFT model is the base with adapters disabled, or the frozen "ref" copy of a loaded adapter).
* `_compute_loss`: TRL's loss, then the numerical guard (loss and latents finite, latent norm).

The slot layout is a function of the completion ids alone (`latent.layout.slot_masks`, the rule the
decoder follows step by step): every `<|latent_start|>` in a completion was sampled in text mode, so
the k positions after it are slots and the next one is the forced end.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from trl import GRPOTrainer
from trl.trainer import grpo_trainer as _trl_grpo

from ..configs import MirageGRPOConfig
from ..data.images import load_image
from ..errors import MirageError
from ..generation import generate_with_latents
from ..grading import BENCHMARKS
from ..latent.health import HEALTH_KEYS, latent_health
from ..latent.layout import count_spans, slot_masks
from ..latent.slots import latent_inputs
from ..latent.stage2 import SelfLatentOutput, self_latent_forward
from ..models.families import capture_final_hidden, family, output_logits, unwrap
from ..models.settings import MirageSettings
from ..rewards import accuracy_reward, get_reward_funcs
from ..stages import GRPO_STAGE
from .common import (
    MirageTrainerMixin,
    check_distributed_support,
    load_from_checkpoint,
    setup_model,
)

logger = logging.getLogger(__name__)

# LM-head rows scored at once (bounds the (rows, vocab) logits kept for the backward pass).
LOGPROB_CHUNK = 1024


def _text_logps(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """Log-probabilities of `targets` (N,) under `head(hidden)/temperature` (N, D), in float32, and entropies.

    The head is called as a module (a PEFT trainable-tokens wrapper keeps its rows), a chunk of
    rows at a time, each chunk recomputed in the backward pass so its logits are not kept.
    """

    def score(h, t):
        logp = (head(h).float() / temperature).log_softmax(-1)
        lp = logp.gather(-1, t[:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1) if with_entropy else lp.new_zeros(())
        return lp, ent

    logps, ents = [], []
    for s in range(0, hidden.shape[0], LOGPROB_CHUNK):
        h, t = hidden[s : s + LOGPROB_CHUNK], targets[s : s + LOGPROB_CHUNK]
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = checkpoint(score, h, t, use_reentrant=False)
        else:
            lp, ent = score(h, t)
        logps.append(lp)
        ents.append(ent)
    if not logps:
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def _user_turns(messages) -> list[dict]:
    return [m for m in messages if m["role"] != "assistant"]


def check_accuracy_benchmarks(benchmarks, where: str = "train_dataset") -> None:
    """Every row graded by the accuracy reward needs a benchmark with a grader."""
    bad = sorted({str(b) for b in benchmarks if b not in BENCHMARKS})
    if bad:
        raise MirageError(
            f"{where}: the accuracy reward has no grader for benchmark(s) {', '.join(repr(b) for b in bad)} "
            f"(graders: {', '.join(BENCHMARKS)}); set the rows' benchmark column (the scripts' --benchmark), or drop "
            "'accuracy' from --reward_names"
        )


class MirageGRPOTrainer(MirageTrainerMixin, GRPOTrainer):
    """GRPO with latent rollouts and a text-only loss whose gradient flows through recomputed latents."""

    _tag_names = ["trl", "grpo", "mirage"]
    _name = "Mirage GRPO"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: MirageGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs,
    ):
        if args is None:
            args = MirageGRPOConfig(output_dir="mirage-grpo")
        if not isinstance(args, MirageGRPOConfig):
            raise MirageError(f"MirageGRPOTrainer needs a MirageGRPOConfig, got {type(args).__name__}")
        model, processing_class, peft_config, self.latent_tokens = setup_model(
            model, processing_class, peft_config, args, stage=None
        )
        if reward_funcs is None:
            reward_funcs = get_reward_funcs(args.reward_names)
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self._grades_accuracy = any(f is accuracy_reward for f in funcs)
        if self._grades_accuracy:
            for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                column = getattr(dataset, "column_names", None)
                if column is not None:
                    check_accuracy_benchmarks(
                        set(dataset["benchmark"]) if "benchmark" in column else [None], name
                    )
        self._train_latents: list[torch.Tensor] = []
        self._rollout_fed = self._rollout_latents = self._batch_rollout = None  # rollout_latents="constant"
        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self._init_mirage_trainer()
        check_distributed_support(self.accelerator, "GRPO with latent rollouts")

    def mirage_checkpoint_settings(self):
        return super().mirage_checkpoint_settings().replace(stage=GRPO_STAGE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        load_from_checkpoint(self, resume_from_checkpoint, model, super()._load_from_checkpoint)

    # ------------------------------------------------------------------ rows -> TRL's inputs
    def _rollout_row(self, row: dict) -> dict:
        """A row as TRL's VLM path wants it: `prompt` = the user turns, `images` = PIL images."""
        row = dict(row)
        if "prompt" not in row:
            if "messages" not in row:
                raise MirageError(f"{row.get('source', '<row>')}: a GRPO row needs 'messages' or 'prompt'")
            row["prompt"] = _user_turns(row["messages"])
        paths = row.get("images")
        if paths:
            source = f"{row.get('source', '<row>')}:images"
            row["images"] = [load_image(p, source=source) if isinstance(p, str) else p for p in paths]
        if self._grades_accuracy:
            check_accuracy_benchmarks([row.get("benchmark")], row.get("source", "batch"))
        return row

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        with_images = [bool(x.get("images")) for x in inputs]
        if any(with_images) and not all(with_images):
            # TRL 1.16 processes a generation batch's prompts in one call that fails deep inside the
            # processor when only some rows carry images; say which rows, before any work is done.
            bare = [str(x.get("source", f"row {i}")) for i, x in enumerate(inputs) if not x.get("images")]
            raise MirageError(
                f"GRPO generation batch mixes rows with and without images (without: {', '.join(bare[:5])}"
                f"{' ...' if len(bare) > 5 else ''}); give every row an image or train the "
                "text-only rows in a separate run"
            )
        self._rollout_latents = None
        output = super()._generate_and_score_completions([self._rollout_row(x) for x in inputs])
        if self._constant_latents:
            # with the batch, so TRL's split and shuffle of a generation batch keep each row's latents
            output["rollout_latents"] = self._rollout_latents
            self._rollout_latents = None
        accuracy = self._metrics[mode].get("rewards/accuracy_reward/mean")
        if self._grades_accuracy and accuracy:
            self._metrics[mode]["accuracy"].append(accuracy[-1])
        return output

    # ------------------------------------------------------------------ rollouts
    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise MirageError(
                "latent rollouts need per-step hidden-state feedback: use the transformers generation path"
            )
        pad = _trl_grpo.pad
        tensors = [torch.tensor(ids) for ids in prompt_ids]
        inputs = {
            "input_ids": pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left"),
            "attention_mask": pad(
                [torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left"
            ),
        }
        fam = family(self.model)
        for key, value in multimodal_fields.items():
            if key in fam.token_keys:
                continue  # on the tokenizer's padding side, not the left padding above: derived from the ids below
            if isinstance(value, torch.Tensor):
                inputs[key] = value
            elif isinstance(value, list) and value and isinstance(value[0], list):  # per-token field
                inputs[key] = pad([torch.tensor(x) for x in value], padding_value=0, padding_side="left")
            else:
                inputs[key] = torch.tensor(np.array(value))
        inputs.update(fam.token_types(self.model, inputs["input_ids"]))
        inputs = super(GRPOTrainer, self)._prepare_inputs(inputs)  # Trainer's: to device
        with (
            _trl_grpo.profiling_context(self, "mirage.generate_with_latents"),
            _trl_grpo.unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped_model,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            out = generate_with_latents(
                unwrapped_model,
                self.processing_class,
                inputs,
                latent_tokens=self.latent_tokens,
                max_new_tokens=self.max_completion_length,
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self._tokenizer.pad_token_id,
                return_latents=self._constant_latents,
            )
        self._rollout_fed = out.latents  # per completion, the vectors fed at its slots (constant mode)
        lengths = out.num_generated_tokens.tolist()
        return [s[:n] for s, n in zip(out.sequences.tolist(), lengths)], None

    def _generate(self, prompts):
        result = list(super()._generate(prompts))
        completion_ids, tool_mask = result[1], result[2]
        # Every completion at once, on the host (TRL hands them over as lists): which tokens are scored (not a
        # latent slot, not a forced span end, not a tool's output), the spans opened, the text length.
        lengths = torch.tensor([len(ids) for ids in completion_ids], dtype=torch.long)
        ids = _trl_grpo.pad(
            [torch.tensor(c, dtype=torch.long) for c in completion_ids],
            padding_value=-1,
            padding_side="right",
        )
        real = torch.arange(ids.shape[1])[None] < lengths[:, None]
        slots, forced = slot_masks(ids, self.latent_tokens)
        keep = real & ~(slots | forced)
        if tool_mask is not None:
            tools = _trl_grpo.pad([torch.tensor(m, dtype=torch.long) for m in tool_mask], padding_value=0)
            keep &= tools.bool()
        result[2] = [row[:n] for row, n in zip(keep.long().tolist(), lengths.tolist())]
        if self._constant_latents:
            self._rollout_latents = self._pad_rollout_latents(slots & real)
        self._rollout_fed = None  # padded (constant mode) or not needed: not kept past the rollout
        mode = "train" if self.model.training else "eval"
        per_completion = torch.stack([count_spans(ids, self.latent_tokens), keep.sum(1)], dim=1)
        stats = self.accelerator.gather(per_completion.float().to(self.accelerator.device))
        # One host sync for the three rollout metrics.
        spans_mean, with_span, text_len = torch.stack(
            [stats[:, 0].mean(), (stats[:, 0] > 0).float().mean(), stats[:, 1].mean()]
        ).tolist()
        self._metrics[mode]["latent/spans_mean"].append(spans_mean)
        self._metrics[mode]["latent/with_span_frac"].append(with_span)
        self._metrics[mode]["completions/mean_text_length"].append(text_len)
        return tuple(result)

    def _pad_rollout_latents(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, C, D): the latents the rollout fed, at their completions' slot positions (`slots`, (B, C) on the host,
        TRL's right-padded completion layout), zeros elsewhere; what `rollout_latents="constant"` feeds again."""
        fed = self._rollout_fed or []
        counts = [int(x.shape[0]) for x in fed]
        if len(fed) != slots.shape[0] or counts != slots.sum(1).tolist():
            raise MirageError(
                "--rollout_latents constant: the rollout's latents do not match its completions' slots (a tool call "
                "or another generation path changed the completions); use --rollout_latents recompute"
            )
        device = self.accelerator.device
        width = fed[0].shape[-1] if fed else unwrap(self.model).get_input_embeddings().weight.shape[-1]
        dtype = fed[0].dtype if fed else torch.float32
        values = torch.cat(fed) if fed else torch.zeros(0, width, dtype=dtype)
        out = torch.zeros(*slots.shape, width, dtype=dtype, device=device)
        return out.masked_scatter(slots[..., None].to(device), values.to(device))

    @property
    def _constant_latents(self) -> bool:
        return self.args.rollout_latents == "constant"

    # ------------------------------------------------------------------ training forward
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        num_images=None,
        **inputs,
    ):
        """Per-token log-probs (B, C) of the completion's text tokens with the latents recomputed by `model`."""
        if compute_aux_loss:
            raise MirageError("MoE router auxiliary losses are not supported by Mirage GRPO")
        fam = family(model)
        images = {k: v for k, v in inputs.items() if k in fam.vision_keys and v is not None}
        others = [
            k for k, v in inputs.items() if v is not None and k not in (*fam.vision_keys, *fam.token_keys)
        ]
        if others:
            raise MirageError(f"Mirage GRPO: {fam.name} takes no input {', '.join(others)}")
        batch_size = batch_size or input_ids.size(0)
        C = logits_to_keep
        head = functools.partial(output_logits, model)  # the LM head as the model applies it
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            end = min(start + batch_size, input_ids.size(0))
            ids, attn = input_ids[start:end], attention_mask[start:end]
            vision = {}
            if (
                fam.vision_keys[0] in images
            ):  # select_images rebuilds what TRL does not pass (batch_num_images)
                counts = num_images if num_images is not None else [1] * input_ids.size(0)
                vision = fam.select_images(images, list(counts), start, end)
            # TRL builds mm_token_type_ids on the tokenizer's padding side while it left-pads the prompt
            # ids: with right padding they are misaligned, so they are derived from the ids instead.
            if vision:
                vision.update(fam.token_types(model, ids))
            completion = ids[:, -C:]
            slots_c, forced_c = slot_masks(completion, self.latent_tokens)
            real_c = attn[:, -C:].bool()
            slots_c = slots_c & real_c
            slot_mask = torch.zeros_like(ids, dtype=torch.bool)
            slot_mask[:, -C:] = slots_c
            positions = fam.position_ids(model, ids, attn, vision)
            with self.accelerator.autocast():
                if self._constant_latents:
                    out = self._forward_with_rollout_latents(
                        model, ids, attn, slot_mask, positions, vision, start, end
                    )
                else:
                    out = self_latent_forward(
                        model,
                        ids,
                        attn,
                        slot_mask,
                        position_ids=positions,
                        method=self.args.stage2_method,
                        max_round_tokens=self.args.max_round_tokens,
                        **vision,
                    )
                hidden = out.hidden_states[:, -C - 1 : -1]  # position t-1 predicts completion token t
                if self.args.cast_lm_head_to_fp32:
                    hidden = hidden.float()
                scored = real_c & ~slots_c & ~forced_c
                # Every completion position is scored, as TRL's own pass does, and the slots, forced ends and
                # padding are zeroed after: no compaction of the scored positions, so no host sync for their count.
                lp, ent = _text_logps(
                    head,
                    hidden.reshape(-1, hidden.shape[-1]),
                    completion.reshape(-1),
                    self.temperature,
                    compute_entropy,
                )
            all_logps.append(lp.view(scored.shape).masked_fill(~scored, 0.0))
            if compute_entropy:
                all_entropies.append(ent.view(scored.shape).masked_fill(~scored, 0.0))
            if torch.is_grad_enabled() and out.latents.shape[0]:
                self._train_latents.append(out.latents)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

    def _forward_with_rollout_latents(self, model, ids, attn, slot_mask, positions, vision, start, end):
        """`rollout_latents="constant"`: one forward with the rollout's latents (rows start:end of the batch being
        scored: a training batch carries them, a generation batch's old and reference scoring reads them from the
        rollout just made) fed as constants at the slots."""
        rollout = self._batch_rollout if self._batch_rollout is not None else self._rollout_latents
        if rollout is None:
            raise MirageError("--rollout_latents constant: this batch carries no rollout latents")
        C = rollout.shape[1]
        # row-major, the order the slots are filled in
        values = rollout[start:end][slot_mask[:, -C:]].detach()
        with latent_inputs(unwrap(model), slot_mask, values), capture_final_hidden(model) as captured:
            model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=family(model).model_positions(positions),
                **vision,
                use_cache=False,
                logits_to_keep=1,  # the log-probabilities come from the hidden states, below
            )
        return SelfLatentOutput(
            hidden_states=captured[-1],
            latents=values,
            method="rollout latents",
            steps=1,
            computed_tokens=ids.numel(),
        )

    # ------------------------------------------------------------------ loss + guard
    def _latent_health(self, latents: torch.Tensor) -> torch.Tensor:
        """`latent/...` health of the recomputed latents (HEALTH_KEYS, the SFT trainer's names), gathered over the
        ranks, on the device (NaN: not measurable)."""
        settings = MirageSettings.of_model(self.model)
        reference = settings.latent_target_norm if settings else None
        stats = latent_health(
            latents, self.mirage_settings.latent_size, reference, with_rank=self.logs_this_step()
        )
        nan = latents.new_tensor(float("nan"), dtype=torch.float32)
        values = torch.stack([stats.get(k, nan).float().reshape(()) for k in HEALTH_KEYS])
        return self.accelerator.gather(values[None]).nanmean(dim=0)

    def _compute_loss(self, model, inputs):
        self._train_latents = []
        self._batch_rollout = inputs.get("rollout_latents")
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._batch_rollout = None
        latents = torch.cat(self._train_latents) if self._train_latents else None
        self._train_latents = []
        mode = "train" if self.model.training else "eval"
        terms = {"loss": loss}
        health = None
        if latents is not None:
            terms["latents"] = latents
            health = self._latent_health(latents)
        loss, values = self.guard_step(mode, terms, latents, model, report=health)  # one host sync for both
        for name, value in zip(HEALTH_KEYS, values):
            if value == value:  # not NaN
                self._metrics[mode][f"latent/{name}"].append(value)
        return loss
