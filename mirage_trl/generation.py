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

Latent ablations (`latent_mode`, `mirage-trl eval --latents`) replace what is fed at the slots:

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

The visual bottleneck (`bottleneck="image"` or `"strict"`, default: as the model was trained, `latent.bottleneck`)
hides the prompt's image from every step after a sample's first span start ("strict": every step) that feeds
neither a start nor a latent: that step's key mask has zeros at the image columns (the cache keeps their keys;
only this query skips them). Under "strict" the prefill runs with the prompt's text after the image blind too.

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

import functools
import warnings
from dataclasses import dataclass, field

import torch

from .errors import MirageError
from .latent.bottleneck import check_bottleneck_support, trained_bottleneck, visual_bottleneck
from .latent.feedback import LatentFeedback
from .latent.layout import advance_spans, spans_to_markers
from .latent.slots import latent_inputs
from .models.families import ModelFamily, cache_kwargs, capture_final_hidden, family, unwrap
from .models.settings import BOTTLENECKS, MirageSettings
from .models.tokens import LATENT_TOKEN_NAMES, LatentTokens

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
    bottleneck: str | None = None,
) -> LatentGenerationOutput:
    """Decode a left-padded processor batch with per-sample latent mode (see the module doc).

    `inputs`: mapping with input_ids, attention_mask and, for images, the processor's image inputs
    (Qwen-VL: pixel_values, image_grid_thw, mm_token_type_ids). `latent_tokens=None` looks the tokens up in the
    tokenizer with the latent size of the model's Mirage settings; a tokenizer without them
    decodes as a plain model (with a warning). `eos_token_ids=None` means the tokenizer's EOS,
    `<|im_end|>` and the generation config's EOS ids; `[]` never stops early. `processor=None`
    decodes ids only (texts are empty), given latent_tokens, eos_token_ids and pad_token_id.
    `feedback`: a `LatentFeedback` (default: the model's saved slot settings). `bottleneck`: decode under this
    visual bottleneck, "none", "image" or "strict" (None: as the model was last trained, its `latent_bottleneck`).
    """
    _check_decoding_args(latent_mode, max_new_tokens, do_sample, temperature, top_p, latent_mean)
    net = unwrap(model)
    tok = _tokenizer(processor)
    ids = _Ids.resolve(net, processor, tok, latent_tokens, eos_token_ids, pad_token_id)
    feedback = LatentFeedback.from_model(net) if feedback is None else feedback
    if bottleneck is None:
        bottleneck = trained_bottleneck(net)
    if bottleneck not in BOTTLENECKS:
        raise MirageError(f"bottleneck {bottleneck!r}: choose one of {', '.join(BOTTLENECKS)}")
    if bottleneck != "none":
        check_bottleneck_support(net)
    prompt = _Prompt.of(net, inputs, max_new_tokens, bottleneck)
    if latent_mode == "shuffle" and prompt.batch == 1 and ids.latent is not None:
        warnings.warn("latent_mode='shuffle' with a batch of one sample feeds its own latents", stacklevel=2)
    state = _State.start(prompt, max_new_tokens, ids)
    pick = functools.partial(
        _pick, do_sample=do_sample, temperature=temperature, top_p=top_p, generator=generator
    )
    stored: list[tuple[int, torch.Tensor]] = []

    with capture_final_hidden(net) as captured:
        forward = _Forward(net, prompt, captured)
        logits, hidden = forward.prefill(bottleneck)
        mean_vec = _mean_vector(latent_mode, latent_mean, hidden)
        for t in range(max_new_tokens):
            # 1. Each sample's token: picked (text), the latent pad (latent), the forced end, or pad (finished).
            in_latent = state.remaining > 0
            token, text_step = state.record(t, pick(_without_spans(logits, latent_mode, ids)), in_latent, ids)
            # 2. What the latent samples feed at this step (ablations replace the model's own hidden state).
            all_done, any_latent = torch.stack((state.done.all(), in_latent.any())).tolist()  # one host sync
            values = None
            if any_latent:
                fed_back = hidden if feedback.is_identity else feedback(hidden)
                values = _latent_values(latent_mode, fed_back, in_latent, state.arange, generator, mean_vec)
                if return_latents:
                    stored.append((t, values))
            if t == max_new_tokens - 1 or all_done:
                state.steps = t + 1
                break
            # 3. One cached forward for the whole batch (under the bottleneck: who may not see the image).
            blind = None
            if prompt.images is not None:
                blind = ~in_latent & (token != ids.start)
                if bottleneck == "image":  # only after the sample's first span start
                    blind = blind & (state.spans > 0)
            logits, hidden = forward.step(token, t, in_latent if any_latent else None, values, blind)

    sequences, latent_mask = state.sequences[:, : state.steps], state.latent_mask[:, : state.steps]
    texts, raw_texts = _texts(tok, ids.latent, sequences, state.n_gen)
    return LatentGenerationOutput(
        sequences=sequences,
        latent_mask=latent_mask,
        texts=texts,
        raw_texts=raw_texts,
        num_latent_spans=state.spans,
        num_generated_tokens=state.n_gen,
        latents=_latents_per_sample(stored, latent_mask, hidden) if return_latents else None,
    )


@dataclass
class _Ids:
    """The ids decoding needs: the latent tokens (None: a plain model), the stop tokens and the pad token."""

    latent: LatentTokens | None
    eos: list[int]
    pad: int

    @classmethod
    def resolve(cls, net, processor, tok, latent_tokens, eos_token_ids, pad_token_id) -> _Ids:
        if tok is None and (latent_tokens is None or eos_token_ids is None or pad_token_id is None):
            raise MirageError(
                "generate_with_latents without a processor needs latent_tokens, eos_token_ids and pad_token_id"
            )
        latent = latent_tokens if latent_tokens is not None else _resolve_latent_tokens(net, processor)
        eos = _default_eos(net, tok) if eos_token_ids is None else [int(i) for i in eos_token_ids]
        pad = _pad_id(net, tok, eos) if pad_token_id is None else int(pad_token_id)
        return cls(latent, eos, pad)

    @property
    def start(self) -> int:
        return self.latent.start_id if self.latent is not None else -1

    @property
    def size(self) -> int:
        return self.latent.latent_size if self.latent is not None else 0


@dataclass
class _State:
    """Per-sample decoding state, all tensors: latent steps still to feed, a forced `<|latent_end|>`, finished
    samples, spans opened, tokens generated, and what was recorded at each step."""

    remaining: torch.Tensor
    force_end: torch.Tensor
    done: torch.Tensor
    spans: torch.Tensor
    n_gen: torch.Tensor
    sequences: torch.Tensor  # (B, max_new_tokens)
    latent_mask: torch.Tensor  # (B, max_new_tokens)
    arange: torch.Tensor
    eos: torch.Tensor  # the stop tokens' ids
    steps: int

    @classmethod
    def start(cls, prompt: _Prompt, max_new_tokens: int, ids: _Ids) -> _State:
        batch, device = prompt.batch, prompt.device
        zeros = functools.partial(torch.zeros, batch, device=device)
        return cls(
            remaining=zeros(dtype=torch.long),
            force_end=zeros(dtype=torch.bool),
            done=zeros(dtype=torch.bool),
            spans=zeros(dtype=torch.long),
            n_gen=zeros(dtype=torch.long),
            sequences=torch.full((batch, max_new_tokens), ids.pad, dtype=torch.long, device=device),
            latent_mask=torch.zeros(batch, max_new_tokens, dtype=torch.bool, device=device),
            arange=torch.arange(batch, device=device),
            eos=torch.tensor(ids.eos, dtype=torch.long, device=device),
            steps=max_new_tokens,
        )

    def record(self, t: int, picked: torch.Tensor, in_latent: torch.Tensor, ids: _Ids):
        """Record step t's tokens and advance every sample's mode; returns (tokens, which samples wrote text)."""
        text_step = ~(in_latent | self.force_end | self.done)
        latent = ids.latent
        token = torch.where(text_step, picked, ids.pad)
        token = torch.where(self.force_end, latent.end_id if latent is not None else ids.pad, token)
        token = torch.where(in_latent, latent.pad_id if latent is not None else ids.pad, token)
        self.sequences[:, t] = token
        self.latent_mask[:, t] = in_latent
        self.n_gen += (~self.done).long()
        started, self.force_end, self.remaining = advance_spans(
            token, text_step, self.remaining, ids.start, ids.size
        )
        self.spans += started.long()
        self.done = self.done | (text_step & torch.isin(token, self.eos))
        return token, text_step


class _Forward:
    """The model's forwards during decoding: one prefill of the prompt, then one cached step per token, latent
    samples fed through the slot mechanism."""

    def __init__(self, net, prompt: _Prompt, captured: list):
        from transformers import DynamicCache  # decoding only: the module stays importable without it loaded

        self.net, self.prompt, self.captured = net, prompt, captured
        self.cache = DynamicCache(config=getattr(net.config, "text_config", net.config))
        self.next_pos = prompt.next_pos
        self.kw = dict(use_cache=True, logits_to_keep=1)

    def _out(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """(last logits, last final-norm hidden state) of a forward."""
        hidden = self.captured.pop()[:, -1]
        self.captured.clear()
        return out.logits[:, -1], hidden

    def prefill(self, bottleneck: str = "none"):
        p = self.prompt
        # under "strict" the prompt's own text after its image is blind already (no span in a prompt)
        mode = "strict" if bottleneck == "strict" and p.images is not None else "none"
        no_slots = torch.zeros_like(p.input_ids, dtype=torch.bool)
        with visual_bottleneck(self.net, p.input_ids, no_slots, mode):
            out = self.net(
                input_ids=p.input_ids,
                attention_mask=p.attention_mask,
                position_ids=p.family.model_positions(p.positions),
                **cache_kwargs(self.net, self.cache),
                **p.vision,
                **self.kw,
            )
        return self._out(out)

    def step(self, token, t: int, in_latent: torch.Tensor | None, values: torch.Tensor | None, blind=None):
        p, batch = self.prompt, self.prompt.batch
        rows = p.positions.shape[0]  # the family's position rows (3 for M-RoPE)
        mask = p.full_mask[:, : p.input_ids.shape[1] + t + 1]
        if blind is not None:  # the visual bottleneck: a blind sample's query skips the prompt's image keys
            mask = mask.clone()
            prompt_len = p.input_ids.shape[1]
            mask[:, :prompt_len] *= ~(blind[:, None] & p.images)
        step_inputs = dict(
            input_ids=token.view(batch, 1),
            attention_mask=mask,
            position_ids=p.family.model_positions(self.next_pos.view(1, batch, 1).expand(rows, batch, 1)),
            **cache_kwargs(self.net, self.cache),
            **self.kw,
        )
        self.next_pos = self.next_pos + 1
        if in_latent is None:
            return self._out(self.net(**step_inputs))
        # Latent samples first, in batch order: masked_scatter takes source rows in order.
        order = torch.argsort((~in_latent).to(torch.int8), stable=True)
        with latent_inputs(self.net, in_latent.view(batch, 1), values[order]):
            return self._out(self.net(**step_inputs))


def _without_spans(logits: torch.Tensor, latent_mode: str, ids: _Ids) -> torch.Tensor:
    """latent_mode="remove": the span cannot open (its start's logit is -inf), so the answer goes without it."""
    if latent_mode != "remove" or ids.latent is None:
        return logits
    logits = logits.clone()
    logits[:, ids.start] = float("-inf")
    return logits


def _mean_vector(latent_mode: str, latent_mean, hidden: torch.Tensor) -> torch.Tensor | None:
    """latent_mode="mean": `latent_mean` on the model's device and dtype, checked against its hidden size."""
    if latent_mode != "mean":
        return None
    mean_vec = latent_mean.to(device=hidden.device, dtype=hidden.dtype).reshape(-1)
    if mean_vec.shape[0] != hidden.shape[-1]:
        raise MirageError(
            f"latent_mean has {mean_vec.shape[0]} values; the model's hidden size is {hidden.shape[-1]}"
        )
    return mean_vec


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
    images: torch.Tensor | None = None  # (B, P) the prompt's image positions, kept under the bottleneck

    @property
    def device(self):
        return self.input_ids.device

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def of(cls, net, inputs, max_new_tokens: int, bottleneck: str = "none") -> _Prompt:
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
        images = fam.image_mask(net, input_ids) if bottleneck != "none" and vision else None
        # Next position of each sample: one past the largest of its position coordinates (what generate does).
        return cls(
            input_ids,
            attention_mask,
            positions,
            positions.amax(dim=(0, 2)) + 1,
            full_mask,
            vision,
            fam,
            images,
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
