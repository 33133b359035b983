"""A Mirage model for lmms-eval: `lmms-eval --model mirage --model_args pretrained=DIR,latents=model ...`.

lmms-eval evaluates vision-language models on dozens of benchmarks, one command per model; a Mirage model needs
latent decoding, which its built-in models do not do. `MirageLMMS` is an lmms-eval model (registered through
lmms-eval's entry-point group `lmms_eval.models`, see `manifest`) that loads a Mirage model, adapter or full,
through `load_model` and answers `generate_until` requests with batched latent decoding
(`generate_with_latents`): the same prompts and decoding as `mirage-trl eval`, so both give the same answers on
the same rows.

Model args: `pretrained` (a folder or Hub id), `latents` (model, zero, noise, shuffle, remove: the ablations of
`mirage-trl eval`), `latent_size`, `max_new_tokens` (when given, it overrides the task's: latent spans and a
chain of thought need room), `dtype`, `bottleneck`, `seed`; the batch size and the device are lmms-eval's own
`--batch_size` and `--device`. A request's `<image>`
markers place its images; without them the images come first, as lmms-eval's models do. `loglikelihood` is
refused with a clear message: a Mirage answer depends on the latents the model writes while decoding.

Needs `pip install "mirage-trl[lmms-eval]"`.
"""

from __future__ import annotations

import json

import torch
from lmms_eval.api.model import lmms

from ..data.reference import IMAGE_MARKER, user_content
from ..errors import MirageError
from ..evaluation import prompt_encoder
from ..generation import LATENT_MODES, generate_with_latents
from ..models.load import load_model

MODEL_NAME = "mirage"
# latent modes an outside harness can ask for: "mean" needs a first pass over the whole eval set
SERVED_MODES = tuple(m for m in LATENT_MODES if m != "mean")


def manifest():
    """The entry point lmms-eval loads (group `lmms_eval.models`): `--model mirage` is `MirageLMMS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MirageLMMS")


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


class MirageLMMS(lmms):
    """lmms-eval's model interface over a Mirage model (see the module doc)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        latents: str = "model",
        latent_size: int | None = None,
        max_new_tokens: int | None = None,
        batch_size: int = 1,
        device: str | None = None,
        dtype: str | None = None,
        bottleneck: str | None = None,
        seed: int = 42,
        trust_remote_code=False,
        max_batch_size=None,  # lmms-eval's "auto" batch sizing, which this model does not do
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise MirageError(
                f"--model_args: {', '.join(sorted(unknown))} is not an argument of the mirage model (it takes "
                "pretrained, latents, latent_size, max_new_tokens, dtype, bottleneck, seed)"
            )
        if latents not in SERVED_MODES:
            raise MirageError(f"--model_args latents={latents}: choose one of {', '.join(SERVED_MODES)}")
        self.latents = latents
        if not str(batch_size).isdigit():
            raise MirageError(f"--batch_size {batch_size}: the mirage model takes a number of rows")
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens not in (None, "", "None") else None
        self.bottleneck = bottleneck
        self.seed = int(seed)
        if self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise MirageError("--model_args: batch_size and max_new_tokens must be >= 1")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_model(
            str(pretrained),
            dtype=dtype,
            device=self.device,
            latent_size=int(latent_size) if latent_size not in (None, "", "None") else None,
            require_mirage=False,
            trust_remote_code=_flag(trust_remote_code),
        )
        self.model.eval()
        self.encoder = prompt_encoder(self.processor)

    # ---------------------------------------------------------------------------------- requests
    def _prompt(self, context: str, visuals) -> dict:
        """The encoded user turn: the context's `<image>` markers take the visuals in order; without markers,
        the images come first."""
        visuals = [v for v in (visuals or []) if v is not None]
        if context.count(IMAGE_MARKER) != len(visuals):
            context = IMAGE_MARKER * len(visuals) + context.replace(IMAGE_MARKER, "")
        row = {"messages": [{"role": "user", "content": user_content(context)}], "images": visuals}
        return self.encoder.encode_prompt(row)

    def generate_until(self, requests) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        encoded, settings = [], []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            encoded.append(self._prompt(context, visuals))
            settings.append(dict(gen_kwargs or {}))
        # one batch per decoding setting, longest prompts first (as `mirage-trl eval` batches them)
        order = sorted(
            range(len(requests)),
            key=lambda i: (
                json.dumps(settings[i], sort_keys=True, default=str),
                -encoded[i]["input_ids"].shape[0],
            ),
        )
        batches, current = [], []
        for i in order:
            if current and (len(current) == self.batch_size or settings[current[0]] != settings[i]):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        generator = torch.Generator(device=self.model.device).manual_seed(self.seed)
        for batch in batches:
            kwargs = settings[batch[0]]
            inputs = {
                k: v.to(self.model.device)
                for k, v in self.encoder.pad_prompts([encoded[i] for i in batch]).items()
            }
            temperature = float(kwargs.get("temperature", 0) or 0)
            do_sample = _flag(kwargs.get("do_sample", False)) or temperature > 0
            out = generate_with_latents(
                self.model,
                self.processor,
                inputs,
                max_new_tokens=self.max_new_tokens or int(kwargs.get("max_new_tokens", 1024)),
                do_sample=do_sample,
                temperature=temperature if do_sample else 1.0,
                top_p=float(kwargs.get("top_p", 1.0) or 1.0) if do_sample else 1.0,
                generator=generator,
                latent_mode=self.latents,
                bottleneck=self.bottleneck,
            )
            until = kwargs.get("until") or []
            for j, i in enumerate(batch):
                answers[i] = _cut(out.texts[j], [until] if isinstance(until, str) else list(until))
        return answers

    def loglikelihood(self, requests):
        raise MirageError(
            "the mirage model serves generate_until tasks only: a Mirage answer depends on the latents the model "
            "writes while it decodes, which a log-likelihood of a given continuation leaves out"
        )

    def generate_until_multi_round(self, requests):
        raise MirageError(
            "the mirage model does not serve multi-round tasks; use single-turn generate_until tasks"
        )


def _cut(text: str, until: list[str]) -> str:
    """The text up to the first stop string (lmms-eval's `until`)."""
    cut = min((text.find(s) for s in until if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]
