"""Collator: reference-format rows -> a padded batch with latent spans laid out per sample.

Each `<output_image>` in the assistant text becomes `<|latent_start|>` + k x `<|latent_pad|>` +
`<|latent_end|>`. Labels follow docs/method.md section 2: the prompt (through the assistant header), padding and
latent pads are -100; start/end tokens and the answer text are trained. Every sample has its own
number and positions of spans, recorded in `latent_mask` (True at the pad slots). Helper images
are processed once per step into `helper_<key>` for each image input of the model's family
(`helper_pixel_values` / `helper_image_grid_thw` for Qwen-VL), one image per span, in row-major order
of the spans (the order `latent_mask.nonzero()` visits them). Which inputs carry images and which are
per-token comes from the family (`models.families`).

The prompt (with its images) and the completion are tokenized separately and concatenated, so the
prompt/completion boundary is exact whatever the tokenizer merges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..data.images import load_image
from ..data.reference import check_text
from ..errors import MirageError
from ..models.families import processor_family
from ..models.tokens import LatentTokens
from .layout import expand_markers, slot_masks
from .targets import reference_image

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRUNCATION_POLICIES = ("error", "drop")


def check_row_text(row, source: str) -> None:
    """Rows built by hand (not by the loader) get the loader's text checks: no reserved token written
    literally, no invalid Unicode."""
    for m in row["messages"]:
        content = m["content"]
        parts = [content] if isinstance(content, str) else [c.get("text") or "" for c in content]
        for text in parts:
            check_text(text, f"{source}:messages[{m['role']}]")


def _user_messages(row) -> list[dict]:
    return [m for m in row["messages"] if m["role"] != "assistant"]


def _assistant_text(row) -> str:
    for m in row["messages"]:
        if m["role"] == "assistant":
            content = m["content"]
            return content if isinstance(content, str) else "".join(c.get("text") or "" for c in content)
    return row.get("completion_text") or ""


@dataclass
class MirageDataCollator:
    """Turn loaded rows (see `mirage_trl.data.reference`) into a Mirage training batch.

    Args:
        processor: the VL processor (with the latent tokens added).
        latent_tokens: ids and latent size k.
        max_length: longest sequence kept; a longer row (any cut loses trained text: a span, or the
            answer after it) is an error (`truncation="error"`) or is dropped (`truncation="drop"`,
            counted in `num_dropped`).
        padding_side: "right" (training default) or "left".
        with_helpers: process helper images (stage 1 targets; the optional stage-2 drift metric).
        require_helpers: every latent span needs its helper image (stage 1): a row without is an error.
        with_references: also process each helper image's input image (the row's first) into
            `reference_<key>`, once per row, and `reference_index` (one per helper image: which of them it is
            compared with; stage-1 targets "delta" and "selected" compare the two).
        with_aux_text: tokenize each span's helper text (the row's `helper_texts`) into `aux_input_ids` /
            `aux_attention_mask` (spans, T), right-padded, in slot order (`latent_aux_text`); a row with spans
            but not one text per span is an error.
    """

    processor: object
    latent_tokens: LatentTokens
    max_length: int | None = None
    padding_side: str = "right"
    truncation: str = "error"
    with_helpers: bool = True
    require_helpers: bool = False
    with_references: bool = False
    with_aux_text: bool = False
    num_dropped: int = field(default=0, init=False)

    def __post_init__(self):
        if self.truncation not in TRUNCATION_POLICIES:
            raise MirageError(f"truncation={self.truncation!r} is not one of {TRUNCATION_POLICIES}")
        if self.padding_side not in ("left", "right"):
            raise MirageError(f"padding_side={self.padding_side!r} must be 'left' or 'right'")
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.family = processor_family(self.processor)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        end_of_turn = self.family.end_of_turn
        if end_of_turn not in self.tokenizer.get_vocab():  # a tokenizer without the family's chat tokens
            end_of_turn = self.tokenizer.eos_token
        self.end_of_turn = end_of_turn or ""

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, row, add_generation_prompt: bool = True, images: list | None = None) -> dict:
        """Tokenize the user turn(s) with their images: ids, the family's per-token inputs, its image inputs.
        `images`: the row's images already decoded (`row_images`), else they are decoded here."""
        text = self.processor.apply_chat_template(
            _user_messages(row), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if images is None:
            images = self.row_images(row)
        enc = self.processor(text=[text], images=images or None, return_tensors="pt")
        out = {"input_ids": enc["input_ids"][0]}
        for key in self.family.token_keys:
            value = enc.get(key)
            out[key] = torch.zeros_like(out["input_ids"], dtype=torch.int32) if value is None else value[0]
        if images:
            out.update({key: enc[key] for key in self.family.vision_keys})
        return out

    @staticmethod
    def row_images(row) -> list:
        """The row's input images, decoded (each once per batch: the prompt and the delta/selected targets share
        them)."""
        source = row.get("source", "<row>")
        return [load_image(p, source=f"{source}:images") for p in row.get("images") or []]

    def completion_ids(self, row) -> tuple[torch.Tensor, int]:
        """Completion token ids with each marker expanded to a latent span; also the number of spans."""
        ids, num_spans = expand_markers(_assistant_text(row), self.latent_tokens, self._encode_text)
        ids.extend(self._encode_text(self.end_of_turn))
        return torch.tensor(ids, dtype=torch.long), num_spans

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ batches
    def __call__(self, rows: list[dict]) -> dict:
        samples, helpers, references, reference_index, cached, aux = [], [], [], [], [], []
        for row in rows:
            images = self.row_images(row)
            sample = self._encode_row(row, images)
            if sample is None:
                continue
            samples.append(sample)
            aux.extend(sample.pop("aux_ids", []))
            paths = sample.pop("helper_paths")
            if row.get("latent_targets"):  # precomputed once (see latent.targets.precompute_latent_targets)
                cached.append(torch.tensor(row["latent_targets"]).flatten(0, 1))
            else:
                helpers.extend(paths)
                if self.with_references and paths:  # the row's input image once, shared by its helpers
                    references.append(reference_image(images, row.get("source", "<row>")))
                    reference_index.extend([len(references) - 1] * len(paths))
        if not samples:
            raise MirageError(
                f"every row of the batch was dropped by truncation at max_length={self.max_length}; raise max_length"
            )
        batch = self._pad(samples)
        if cached and helpers:
            raise MirageError(
                "a batch mixes rows with cached latent targets and rows without; cache the whole dataset"
            )
        if cached:
            batch["latent_targets"] = torch.cat(cached)
        if self.with_aux_text and aux:
            length = max(len(t) for t in aux)
            batch["aux_input_ids"] = torch.stack(
                [torch.cat([t, torch.full((length - len(t),), self.pad_id, dtype=t.dtype)]) for t in aux]
            )
            batch["aux_attention_mask"] = (
                torch.arange(length)[None] < torch.tensor([len(t) for t in aux])[:, None]
            ).long()
        if self.with_helpers and helpers:
            if getattr(self.processor, "image_processor", None) is None:
                raise MirageError(
                    f"{helpers[0][1]}: {type(self.processor).__name__} has no image processor, so the helper images "
                    "cannot be encoded into stage-1 targets; pass the model's processor (AutoProcessor), not its tokenizer"
                )
            decoded = [load_image(p, source=src) for p, src in helpers]
            for prefix, images in (("helper_", decoded), ("reference_", references)):
                if images:
                    enc = self.processor.image_processor(images=images, return_tensors="pt")
                    batch.update({f"{prefix}{key}": enc[key] for key in self.family.vision_keys})
            if references:
                batch["reference_index"] = torch.tensor(reference_index, dtype=torch.long)
        return batch

    def prompt_batch(self, rows: list[dict]) -> dict:
        """Left-padded prompts (generation prompt appended) for decoding and evaluation."""
        return self.pad_prompts([self.encode_prompt(row) for row in rows])

    def pad_prompts(self, prompts: list[dict]) -> dict:
        """Left-pad prompts already encoded by `encode_prompt` (callers that encode once, decode often)."""
        return self._pad(prompts, padding_side="left")

    def _encode_row(self, row, images: list) -> dict | None:
        source = row.get("source", "<row>")
        check_row_text(row, source)
        prompt = self.encode_prompt(row, add_generation_prompt=True, images=images)
        completion, num_spans = self.completion_ids(row)
        helper_paths = list(row.get("helper_images") or [])
        if (self.require_helpers or (self.with_helpers and helper_paths)) and len(helper_paths) != num_spans:
            raise MirageError(
                f"{source}:helper_images: {num_spans} <output_image> marker(s) but {len(helper_paths)} helper image(s)"
            )
        aux_ids = []
        if self.with_aux_text and num_spans:
            texts = list(row.get("helper_texts") or [])
            if len(texts) != num_spans:
                raise MirageError(
                    f"{source}:image_output_text: latent_aux_text needs one text per <output_image> marker "
                    f"({num_spans}), this row has {len(texts)}"
                )
            aux_ids = [torch.tensor(self._encode_text(t), dtype=torch.long) for t in texts]
            if any(len(t) == 0 for t in aux_ids):
                raise MirageError(f"{source}:image_output_text: a text gives no tokens")
        n_prompt = prompt["input_ids"].shape[0]
        ids = torch.cat([prompt["input_ids"], completion])
        labels = torch.cat([torch.full((n_prompt,), IGNORE_INDEX), completion])
        latent_mask = slot_masks(ids[None], self.latent_tokens)[0][0]
        labels[latent_mask] = IGNORE_INDEX
        if self.max_length is not None and ids.shape[0] > self.max_length:
            # Any cut loses trained text (a span, or the answer, boxed answer and end-of-turn after the last
            # span): the same policy for every cut, never a silent truncation.
            last_span_end = (
                int((ids == self.latent_tokens.end_id).nonzero().max()) + 1 if num_spans else n_prompt
            )
            if self.max_length <= n_prompt:
                what = "the prompt (with its image tokens)"
            elif self.max_length < last_span_end:
                what = "a latent span"
            else:
                what = "the answer after its last latent span" if num_spans else "the answer"
            if self.truncation == "drop":
                self.num_dropped += 1
                logger.warning("dropped %s: max_length=%d cuts through %s", source, self.max_length, what)
                return None
            raise MirageError(
                f"{source}: max_length={self.max_length} would cut through {what} (sequence has {ids.shape[0]} "
                "tokens); raise max_length or set truncation='drop' (latent_truncation) to skip such rows"
            )
        sample = {
            "input_ids": ids,
            "labels": labels,
            "latent_mask": latent_mask,
            "helper_paths": [(p, f"{source}:helper_images") for p in helper_paths]
            if self.with_helpers
            else [],
            "aux_ids": aux_ids,
        }
        for key in self.family.token_keys:  # the completion holds no image token
            sample[key] = torch.cat([prompt[key], torch.zeros(completion.shape[0], dtype=prompt[key].dtype)])
        sample.update({key: prompt[key] for key in self.family.vision_keys if key in prompt})
        return sample

    def _pad(self, samples: list[dict], padding_side: str | None = None) -> dict:
        """The one padding routine (training batches, prompts for eval, analysis and decoding)."""
        side = padding_side or self.padding_side
        length = max(s["input_ids"].shape[0] for s in samples)
        fills = {
            "input_ids": self.pad_id,
            "labels": IGNORE_INDEX,
            "latent_mask": False,
            **dict.fromkeys(self.family.token_keys, 0),
        }
        batch = {}
        for key, fill in fills.items():
            if key not in samples[0]:  # prompts alone have no labels or slots
                continue
            rows = []
            for s in samples:
                x = s[key]
                pad = torch.full((length - x.shape[0],), fill, dtype=x.dtype)
                rows.append(torch.cat([pad, x] if side == "left" else [x, pad]))
            batch[key] = torch.stack(rows)
        lengths = torch.tensor([s["input_ids"].shape[0] for s in samples])
        ar = torch.arange(length)
        batch["attention_mask"] = (
            ar[None] >= (length - lengths)[:, None] if side == "left" else ar[None] < lengths[:, None]
        ).long()
        batch.update(self.family.collate_images(samples))  # every sample's images, in batch order
        return batch
