"""Batched latent decoding (docs/method.md section 4) with per-sample latent mode and a KV cache.

`generate_with_latents` runs one prefill over a left-padded processor batch, then one cached
forward per step for the whole batch. Every sample has its own mode:

* text: the next token is picked from the logits (greedy, or sampling with temperature/top-p);
* latent: after a sample emits `<|latent_start|>`, its next k inputs are its own last
  final-norm hidden states (the token recorded there is `<|latent_pad|>`, nothing is sampled),
  then `<|latent_end|>` is forced and text resumes;
* finished: after an EOS token it records the pad token and is ignored.

Latent vectors enter through the shared slot mechanism (`latent.slots.latent_inputs`): the
latent pad id is fed as the input id and the embedding hook overwrites it. All per-step work
is tensor ops over the batch; the only host sync per step is the early-stop check.

Timeline of one span for a sample (k = 2), step by step:

    recorded token : ...  <|latent_start|>  <pad>   <pad>   <|latent_end|>  text ...
    fed input      : ...  start embedding   h(start) h(pad1) end embedding  ...

i.e. the j-th latent is the final hidden state at the position just before its slot.
Latent steps count toward `max_new_tokens`.

Latent ablations (`latent_mode`, the issue's `--latents`) replace what is fed at the slots:

* ``model``   the model's own hidden state (Mirage);
* ``zero``    zeros;
* ``noise``   Gaussian noise (from `generator`) rescaled to the norm of the model's own latent at
  that step (the hidden state it would have fed);
* ``mean``    the vector `latent_mean` (D,), e.g. the mean latent over an eval set;
* ``shuffle`` another sample's latent at the same step: the samples in latent mode at that step,
  in batch order, are rolled by one (each gets the next one's hidden state, the last gets the
  first's). When only one sample is in latent mode, it gets the current last hidden state of the
  next sample in the batch (cyclically), whatever that sample's mode; in a batch of one there is
  no other sample and its own latent is fed (a warning says so);
* ``remove``  no latent span at all: `<|latent_start|>` cannot be picked (its logit is -inf), so
  the model writes its answer without a span (no span, no latent step, no marker in the text).

Before any ablation, the model's hidden state passes through its slot settings
(`latent.feedback.LatentFeedback`: feedback-norm matching, markers-only zeros), exactly as in
stage 2; the ablations then replace that vector. The returned `latents` are the vectors actually
fed (after the ablation).

Texts: `raw_texts` decode everything up to and including the stop token, special tokens kept.
`texts` skip special tokens, except that every span opened by `<|latent_start|>` (with its
pads and `<|latent_end|>`, also a removed or truncated span) is shown as one `<output_image>`,
the marker of the training data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .errors import MirageError
from .latent.layout import advance_spans, spans_to_markers
from .latent.model_utils import capture_final_hidden, unwrap
from .latent.settings import MirageSettings
from .latent.slots import latent_inputs
from .latent.tokens import LATENT_TOKEN_NAMES, LatentTokens
from .models.families import ModelFamily, family

LATENT_MODES = ("model", "zero", "noise", "mean", "shuffle", "remove")
DEFAULT_LATENT_SIZE = 4


@dataclass
class LatentGenerationOutput:
    """Result of `generate_with_latents` (T = number of decoding steps run)."""

    sequences: torch.Tensor  # (B, T) generated ids; latent steps hold the latent pad id, finished samples pad
    latent_mask: torch.Tensor  # (B, T) bool, True at latent steps
    texts: list[str]  # special tokens skipped, each latent span shown as `<output_image>`
    raw_texts: list[str]  # special tokens kept, up to and including the stop token
    num_latent_spans: torch.Tensor  # (B,) spans opened by `<|latent_start|>`
    num_generated_tokens: torch.Tensor  # (B,) tokens up to and including EOS, latent steps included
    latents: list[torch.Tensor] | None = field(default=None)  # per sample (n_i, D), the vectors fed


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _resolve_latent_tokens(model, processor) -> LatentTokens | None:
    tok = _tokenizer(processor)
    settings = MirageSettings.of_model(model)
    vocab = tok.get_vocab()
    if any(t not in vocab for t in LATENT_TOKEN_NAMES):
        warnings.warn(
            "the tokenizer has no latent tokens (<|latent_start|>, <|latent_pad|>, <|latent_end|>): "
            "decoding as a plain model, without latent spans",
            stacklevel=3,
        )
        return None
    if settings is None:
        warnings.warn(
            f"the model config has no Mirage latent size; using latent_size={DEFAULT_LATENT_SIZE}",
            stacklevel=3,
        )
        size = DEFAULT_LATENT_SIZE
    else:
        size = settings.latent_size
    return LatentTokens.from_tokenizer(tok, size)


def _default_eos(model, tok) -> list[int]:
    ids: list[int] = []
    if tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    im_end = tok.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.append(int(im_end))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.extend(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    return sorted(set(ids))


def _pad_id(model, tok, eos: list[int]) -> int:
    for candidate in (
        tok.pad_token_id,
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
        eos[0] if eos else None,
    ):
        if candidate is not None:
            return int(candidate)
    return 0


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """Next token per row: argmax, or a sample after temperature and top-p (as transformers does)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= 1.0 - top_p
        remove[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate_with_latents(
    model,
    processor,
    inputs,
    *,
    latent_tokens: LatentTokens | None = None,
    max_new_tokens: int = 1024,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    latent_mode: str = "model",
    latent_mean: torch.Tensor | None = None,
    return_latents: bool = False,
    eos_token_ids: list[int] | None = None,
    pad_token_id: int | None = None,
    feedback=None,
) -> LatentGenerationOutput:
    """Decode a left-padded processor batch with per-sample latent mode (see the module doc).

    `inputs`: mapping with input_ids, attention_mask and, for images, the processor's image inputs
    (Qwen-VL: pixel_values, image_grid_thw, mm_token_type_ids). `latent_tokens=None` looks the tokens up in the
    tokenizer with the latent size of the model's Mirage settings; a tokenizer without them
    decodes as a plain model (with a warning). `eos_token_ids=None` means the tokenizer's EOS,
    `<|im_end|>` and the generation config's EOS ids; `[]` never stops early. `processor=None`
    decodes ids only (texts are empty), given latent_tokens, eos_token_ids and pad_token_id.
    `feedback`: a `LatentFeedback` (default: the model's saved slot settings).
    """
    _check_decoding_args(latent_mode, max_new_tokens, do_sample, temperature, top_p, latent_mean)
    net = unwrap(model)
    tok = _tokenizer(processor)
    if tok is None and (latent_tokens is None or eos_token_ids is None or pad_token_id is None):
        raise MirageError(
            "generate_with_latents without a processor needs latent_tokens, eos_token_ids and pad_token_id"
        )
    lt = latent_tokens if latent_tokens is not None else _resolve_latent_tokens(net, processor)
    if feedback is None:
        from .latent.feedback import LatentFeedback

        feedback = LatentFeedback.from_model(net)
    eos = _default_eos(net, tok) if eos_token_ids is None else [int(i) for i in eos_token_ids]
    pad_id = _pad_id(net, tok, eos) if pad_token_id is None else int(pad_token_id)

    prompt = _Prompt.of(net, inputs, max_new_tokens)
    device, batch, full_mask = prompt.device, prompt.batch, prompt.full_mask
    prompt_len, next_pos = prompt.input_ids.shape[1], prompt.next_pos
    rows = prompt.positions.shape[0]  # the family's position rows (3 for M-RoPE)
    if latent_mode == "shuffle" and batch == 1 and lt is not None:
        warnings.warn("latent_mode='shuffle' with a batch of one sample feeds its own latents", stacklevel=2)

    from transformers import DynamicCache

    text_config = getattr(net.config, "text_config", net.config)
    cache = DynamicCache(config=text_config)
    forward_kw = dict(use_cache=True, logits_to_keep=1)

    # Per-sample state, all tensors.
    start_id = lt.start_id if lt is not None else -1
    latent_pad = lt.pad_id if lt is not None else pad_id
    end_id = lt.end_id if lt is not None else pad_id
    k = lt.latent_size if lt is not None else 0
    remaining = torch.zeros(batch, dtype=torch.long, device=device)  # latent steps still to feed
    force_end = torch.zeros(batch, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    spans = torch.zeros(batch, dtype=torch.long, device=device)
    n_gen = torch.zeros(batch, dtype=torch.long, device=device)
    sequences = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    latent_mask = torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    arange_b = torch.arange(batch, device=device)
    mean_vec = None
    stored: list[tuple[int, torch.Tensor]] = []

    with capture_final_hidden(net) as captured:
        out = net(
            input_ids=prompt.input_ids,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.family.model_positions(prompt.positions),
            cache=cache,
            **prompt.vision,
            **forward_kw,
        )
        logits = out.logits[:, -1]
        hidden = captured.pop()[:, -1]
        captured.clear()
        if latent_mode == "mean":
            mean_vec = latent_mean.to(device=device, dtype=hidden.dtype).reshape(-1)
            if mean_vec.shape[0] != hidden.shape[-1]:
                raise MirageError(
                    f"latent_mean has {mean_vec.shape[0]} values; the model's hidden size is {hidden.shape[-1]}"
                )

        steps = max_new_tokens
        for t in range(max_new_tokens):
            in_latent = remaining > 0
            text_step = ~(in_latent | force_end | done)
            if latent_mode == "remove" and lt is not None:
                logits = logits.clone()
                logits[:, start_id] = float("-inf")  # the span cannot open: the answer goes without it
            picked = _pick(logits, do_sample, temperature, top_p, generator)
            token = torch.where(text_step, picked, pad_id)
            token = torch.where(force_end, end_id, token)
            token = torch.where(in_latent, latent_pad, token)
            sequences[:, t] = token
            latent_mask[:, t] = in_latent
            n_gen += (~done).long()

            # State for the next step.
            started, force_end, remaining = advance_spans(token, text_step, remaining, start_id, k)
            spans += started.long()
            done = done | (text_step & torch.isin(token, eos_t))

            all_done, any_latent = torch.stack(
                (done.all(), in_latent.any())
            ).tolist()  # one host sync per step
            values = None
            if any_latent:
                # What the latent slots get at this step (ablations replace the model's own hidden state).
                fed_back = hidden if feedback.is_identity else feedback(hidden)
                values = _latent_values(latent_mode, fed_back, in_latent, arange_b, generator, mean_vec)
                if return_latents:
                    stored.append((t, values))
            if t == max_new_tokens - 1:
                break
            if all_done:
                steps = t + 1
                break

            step_inputs = dict(
                input_ids=token.view(batch, 1),
                attention_mask=full_mask[:, : prompt_len + t + 1],
                position_ids=prompt.family.model_positions(next_pos.view(1, batch, 1).expand(rows, batch, 1)),
                cache=cache,
                **forward_kw,
            )
            if any_latent:
                # Latent samples first, in batch order: masked_scatter takes source rows in order.
                order = torch.argsort((~in_latent).to(torch.int8), stable=True)
                with latent_inputs(net, in_latent.view(batch, 1), values[order]):
                    out = net(**step_inputs)
            else:
                out = net(**step_inputs)
            logits = out.logits[:, -1]
            hidden = captured.pop()[:, -1]
            next_pos = next_pos + 1

    sequences = sequences[:, :steps]
    latent_mask = latent_mask[:, :steps]
    latents = _latents_per_sample(stored, latent_mask, hidden) if return_latents else None
    texts, raw_texts = _texts(tok, lt, sequences, n_gen)
    return LatentGenerationOutput(
        sequences=sequences,
        latent_mask=latent_mask,
        texts=texts,
        raw_texts=raw_texts,
        num_latent_spans=spans,
        num_generated_tokens=n_gen,
        latents=latents,
    )


@dataclass
class _Prompt:
    """The prompt batch on the model's device, its rope positions and the preallocated attention mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor  # (rows, B, P) positions of the prompt (3 rows: M-RoPE)
    next_pos: torch.Tensor  # (B,) position of each sample's first new token
    full_mask: torch.Tensor  # (B, P + max_new_tokens): grows one column a step, passed as views
    vision: dict  # the image inputs given with the prompt (family.image_inputs)
    family: ModelFamily

    @property
    def device(self):
        return self.input_ids.device

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def of(cls, net, inputs, max_new_tokens: int) -> _Prompt:
        param = next(net.parameters(), None)
        device = param.device if param is not None else inputs["input_ids"].device
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, -1] == 0).any()):
            raise MirageError(
                "generate_with_latents needs left-padded inputs (pad the processor batch on the left)"
            )
        fam = family(net)
        vision = fam.image_inputs(net, inputs)
        positions = fam.position_ids(net, input_ids, attention_mask, vision)
        batch, prompt_len = input_ids.shape
        full_mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=attention_mask.dtype, device=device)
        full_mask[:, :prompt_len] = attention_mask
        # Next position of each sample: one past the largest of its position coordinates (what generate does).
        return cls(
            input_ids, attention_mask, positions, positions.amax(dim=(0, 2)) + 1, full_mask, vision, fam
        )


def _check_decoding_args(latent_mode, max_new_tokens, do_sample, temperature, top_p, latent_mean) -> None:
    if latent_mode not in LATENT_MODES:
        raise MirageError(f"unknown latent mode {latent_mode!r}; valid modes: {', '.join(LATENT_MODES)}")
    if max_new_tokens < 1:
        raise MirageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise MirageError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise MirageError(f"top_p must be in (0, 1], got {top_p}")
    if latent_mode == "mean" and latent_mean is None:
        raise MirageError("latent_mode='mean' needs latent_mean, a (hidden_size,) tensor (the mean latent)")


def _latents_per_sample(stored, latent_mask: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
    """The (n_i, D) vectors each sample was fed, from the (step, (B, D) values) recorded at latent steps."""
    batch, steps = latent_mask.shape
    per_step = torch.zeros(batch, steps, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    for t, v in stored:
        per_step[:, t] = v
    return [per_step[i][latent_mask[i]] for i in range(batch)]


def _texts(tok, lt, sequences: torch.Tensor, n_gen: torch.Tensor) -> tuple[list[str], list[str]]:
    """(texts with spans as markers, raw texts) up to and including each sample's stop token."""
    if tok is None:  # ids only (benchmarks on models without a matching tokenizer)
        return [""] * sequences.shape[0], [""] * sequences.shape[0]
    pairs = list(zip(sequences.tolist(), n_gen.tolist()))
    raw = [tok.decode(ids[:n], skip_special_tokens=False) for ids, n in pairs]
    return [spans_to_markers(tok, ids[:n], lt) for ids, n in pairs], raw


def _latent_values(mode, hidden, in_latent, arange_b, generator, mean_vec) -> torch.Tensor:
    """(B, D): the vector each sample would feed at a latent slot this step (rows of text samples unused)."""
    if mode == "model":
        return hidden
    if mode == "zero":
        return torch.zeros_like(hidden)
    if mode == "mean":
        return mean_vec.expand_as(hidden)
    if mode == "noise":
        noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=torch.float32)
        scale = hidden.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)
        return (noise * scale).to(hidden.dtype)
    if mode == "shuffle":
        batch = hidden.shape[0]
        n = in_latent.sum()
        rank = in_latent.long().cumsum(0) - 1
        order = torch.argsort((~in_latent).to(torch.int8), stable=True)  # latent samples first
        source = order[torch.remainder(rank + 1, n.clamp(min=1)).clamp(min=0)]
        source = torch.where(n == 1, torch.remainder(arange_b + 1, batch), source)
        return hidden[source]
    raise MirageError(f"unknown latent mode {mode!r}; valid modes: {', '.join(LATENT_MODES)}")
