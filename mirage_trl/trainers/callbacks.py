"""Trainer callbacks that grade generations while training runs.

`GenerationEvalCallback` decodes a held-out slice greedily every `eval_every` optimizer steps
(latent decoding for Mirage models, plain decoding otherwise), grades it with the benchmark's
reference rules and logs `eval_gen/accuracy` (and, for Mirage models, the decoding trigger rate
and latent health) next to the training loss, so a breakthrough or a collapse shows as it happens.
Works with every mirage-trl trainer (and TRL's): attach it with `trainer.add_callback(...)`, then
call `bind(trainer)` so it can log through the trainer.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..evaluation import evaluate


class GenerationEvalCallback(TrainerCallback):
    """Grade `rows` (loaded reference rows, never the test rows) every `eval_every` steps."""

    def __init__(
        self,
        rows,
        benchmark: str,
        eval_every: int,
        max_new_tokens: int = 128,
        batch_size: int = 32,
        prepare_row=None,
    ):
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        self.rows = [prepare_row(r) for r in rows] if prepare_row else list(rows)
        self.benchmark = benchmark
        self.eval_every = eval_every
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.trainer = None
        self.history: list[dict] = []  # {"step", "accuracy", ...} per evaluation

    def bind(self, trainer) -> GenerationEvalCallback:
        self.trainer = trainer
        return self

    def evaluate_now(self, step: int) -> dict:
        trainer = self.trainer
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                result = evaluate(
                    model,
                    trainer.processing_class,
                    self.rows,
                    self.benchmark,
                    batch_size=self.batch_size,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    progress=False,
                )
        finally:
            model.train(was_training)
        mode = result.modes["model"]
        logs = {
            "eval_gen/accuracy": mode.accuracy,
            "eval_gen/invalid_rate": mode.groups["all"]["invalid_rate"],
        }
        for key in ("trigger_rate", "cross_sample_cos", "norm"):
            if key in mode.latent_health:
                logs[f"eval_gen/{key}"] = mode.latent_health[key]
        self.history.append({"step": step, **logs})
        return logs

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None or state.global_step % self.eval_every:
            return
        self.trainer.log(self.evaluate_now(state.global_step))
