"""Tiny random vision-language models of every supported family, for tests and the offline demo.

No hub is reachable here, so `build_tiny_model` makes everything from scratch: a byte-level
BPE tokenizer trained on a few kilobytes of VSP-like text, with the family's special tokens and
chat template; a PIL-backed image processor with small pixel bounds; a config of a few hundred thousand
parameters with random weights. What differs per family is the family's own tiny description
(`ModelFamily.tiny`, `tiny_config`, in `models.families`).
`save_tiny_model` writes a folder that `from_pretrained` loads offline, exactly like a real
checkpoint, so the same loading code serves `Qwen/Qwen2.5-VL-7B-Instruct` and the demo.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..data import vsp
from ..errors import MirageError
from ..folders import atomic_dir, check_output_dir

_CORPUS = [
    "As a professional maze solver, your task is to analyze a grid-based map and devise an action plan",
    "that enables a player to reach the goal from the starting point without falling into any holes.",
    "The action plan involves a series of moves: 'L' (left), 'R' (right), 'U' (up), or 'D' (down).",
    "Full Action Plan: RIGHT, UP, LEFT, DOWN. Please provide your answer. The answer is \\boxed{A}.",
    "<think> Moving to [(3,2),Ice] keeps me on the safe path, Next, Moving to [(0,2),Target] ensures",
    "success. Falling into a hole results in defeat. </think> A. Action Success. B. Action Failed.",
    "Which candidate patch fills the hole in the reference image? Answer with the letter, 0123456789.",
    "You FIRST think about the reasoning process as an internal monologue and then provide the final",
    "answer. The reasoning process MUST BE enclosed within <think> </think> tags. \\boxed{RRDDLU}",
]

# What a benchmark tokenizer keeps apart (everything else may merge into long pieces): digits, the
# move letters of a plan, the words that name moves, cells and choices, and the span and think markers.
# A model then reads a constant instruction as a few tokens and still spells out every answer.
BENCHMARK_SPLIT = (
    r"<output_image>|</?think>|\d|[LRUD](?=[LRUD}])|(?<=[{LRUD])[LRUD]"
    r"|\b(?:LEFT|RIGHT|UP|DOWN|Ice|Hole|Target|Start|A|B|C)\b"
)
TOKENIZER_CORPORA = ("demo", "benchmarks")


def benchmark_corpus(num_maps: int = 300, seed: int = 0) -> list[str]:
    """Prompts and answers of VSP planning (direct, CoT), reasoning and grounding rows on random maps of sides 3-6."""
    rng = random.Random(f"mirage-tokenizer:{seed}")
    texts = []
    for _ in range(num_maps):
        desc = vsp.random_map(rng.choice([3, 4, 5, 6]), rng)
        if vsp.shortest_path(desc) is None:
            continue
        row = vsp.grounding_row(desc, "0", "map.png", "direct")
        texts += [row["text_input"], row["text_output"]]
        for style in ("direct", "cot"):
            row = vsp.planning_row(desc, "0", "map.png", style, "path.png")
            texts += [row["text_input"], row["text_output"]]
            plan = vsp.random_plan(desc, rng.choice(["success", "hole", "short"]), rng)
            if plan:
                row = vsp.reasoning_row(desc, "0", plan, "map.png", style, "step.png", 1)
                texts += [row["text_input"], row["text_output"]]
    return texts


def build_tiny_tokenizer(vocab_size: int = 600, corpus: str = "demo", model_type: str = "qwen2_5_vl"):
    """A byte-level BPE tokenizer with the special tokens and chat template of `model_type`'s family
    (Qwen's `Qwen2Tokenizer` for the Qwen families; Gemma 3's turn and image tokens).

    corpus="demo": word-level pieces learnt from a few lines (what the tests use); "benchmarks": learnt
    from real VSP prompts and answers with `BENCHMARK_SPLIT`, so a planning prompt is a few tokens and a
    CoT answer about sixty (small models train ten times faster on such rows).
    """
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if corpus not in TOKENIZER_CORPORA:
        raise ValueError(f"unknown tokenizer corpus {corpus!r}; choose one of {TOKENIZER_CORPORA}")
    tiny = _family(model_type).tiny
    specials, eos, pad, bos, extra = tiny.special_tokens, tiny.eos, tiny.pad, tiny.bos, tiny.named_tokens
    tok = Tokenizer(models.BPE())
    if corpus == "benchmarks":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(BENCHMARK_SPLIT), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        texts = benchmark_corpus()
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        texts = _CORPUS * 4
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Qwen2Tokenizer rebuilds its own word-level pre-tokenizer when loaded; the generic fast tokenizer
    # keeps tokenizer.json as trained, so a saved benchmark tokenizer loads exactly as built.
    name = (
        tiny.demo_tokenizer_class
        if corpus == "demo" and tiny.demo_tokenizer_class
        else "PreTrainedTokenizerFast"
    )
    cls = getattr(transformers, name)
    named = {eos, pad, bos, *extra.values()}
    tokenizer = cls(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        additional_special_tokens=[t for t in specials if t not in named],
        extra_special_tokens=extra,
        model_max_length=4096,
    )
    tokenizer.chat_template = tiny.chat_template
    return tokenizer


IMAGE_PIXELS = ("demo", "tiles")


def build_tiny_image_processor(image_pixels: str = "demo", model_type: str = "qwen2_5_vl"):
    """image_pixels="demo": small bounds (few tokens per image); "tiles": keep 28 px-tile maps as drawn
    (the Qwen families; the others resize every image to one size)."""
    if image_pixels not in IMAGE_PIXELS:
        raise ValueError(f"unknown image_pixels {image_pixels!r}; choose one of {IMAGE_PIXELS}")
    return _family(model_type).tiny_image_processor(image_pixels)


def build_tiny_processor(model_type: str = "qwen2_5_vl", tokenizer=None, image_pixels: str = "demo"):
    """A processor without a video processor (torchvision is not installed here)."""
    from .processors import processor_class  # here, not at the top: see `_family`

    fam = _family(model_type)
    tokenizer = tokenizer or build_tiny_tokenizer(model_type=model_type)
    kw = dict(fam.tiny.processor)
    if fam.video_processor:  # the image-only processor still takes the argument
        kw["video_processor"] = None
    return processor_class(model_type)(
        image_processor=build_tiny_image_processor(image_pixels, model_type),
        tokenizer=tokenizer,
        chat_template=fam.tiny.chat_template,
        **kw,
    )


def tiny_config(model_type: str = "qwen2_5_vl", tokenizer=None, spare_rows: int = 16, **text_overrides):
    """Config of a random tiny model of `model_type` whose token ids agree with `tokenizer`."""
    tokenizer = tokenizer or build_tiny_tokenizer(model_type=model_type)
    return _family(model_type).tiny_config(tokenizer, spare_rows, **text_overrides)


def _family(model_type):
    # imported here, not at the top: the command line's parser reads this module's constants without torch
    from .families import family

    return family(model_type)


def config_from_file(path: str | os.PathLike, tokenizer):
    """A Qwen-VL config read from a config.json (e.g. bench/configs/qwen2_5_vl_7b_instruct.json) with its
    special-token ids moved to `tokenizer`'s: a real architecture with random weights that the
    local tokenizer can drive (throughput runs where no hub is reachable)."""
    from transformers import AutoConfig

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise MirageError(f"{path}: cannot read a model config: {err}") from None
    d.pop("_comment", None)
    try:
        fam = _family(d.get("model_type"))
    except MirageError as exc:
        raise MirageError(f"{path}: {exc}") from None
    text = d.setdefault("text_config", {})
    vocab = text.get("vocab_size", d.get("vocab_size", 0))
    if vocab < len(tokenizer):
        raise MirageError(f"{path}: vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    fam.adopt_tokenizer(d, tokenizer)  # the ids move before the config is built (it checks them)
    return AutoConfig.for_model(**d)


def build_tiny_model(
    model_type: str = "qwen2_5_vl",
    seed: int = 0,
    dtype=None,
    config_file=None,
    tokenizer_corpus: str = "demo",
    vocab_size: int = 600,
    image_pixels: str = "demo",
    **text_overrides,
):
    """Return (model, processor): a random tiny model of `model_type` and a matching processor.

    `config_file`: random weights with that config's architecture instead (see `config_from_file`).
    `tokenizer_corpus`, `vocab_size`: see `build_tiny_tokenizer`; `image_pixels`: see
    `build_tiny_image_processor`; `text_overrides`: text-config fields (hidden_size, num_hidden_layers, ...).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    if config_file is not None:
        processor = build_tiny_processor(_model_type_of(config_file))
        config = config_from_file(config_file, processor.tokenizer)
    else:
        tokenizer = build_tiny_tokenizer(vocab_size, corpus=tokenizer_corpus, model_type=model_type)
        processor = build_tiny_processor(model_type, tokenizer, image_pixels)
        config = tiny_config(model_type, processor.tokenizer, **text_overrides)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.float32)
    _family(config.model_type).tiny_init(model)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval(), processor


def _model_type_of(config_file) -> str:
    try:
        return json.loads(Path(config_file).read_text()).get("model_type", "")
    except (OSError, ValueError) as err:
        raise MirageError(f"{config_file}: cannot read a model config: {err}") from None


def save_tiny_model(
    out_dir: str | os.PathLike, model_type: str = "qwen2_5_vl", seed: int = 0, overwrite: bool = True, **kw
) -> Path:
    """Write a tiny model + processor folder that `from_pretrained` loads offline."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    model, processor = build_tiny_model(model_type, seed=seed, **kw)
    with atomic_dir(out_dir, overwrite=overwrite, command="tiny-model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out_dir
