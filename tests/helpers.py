"""Helpers shared across test modules: hand-built rows and images with an independent expectation of the
token layout (labels, latent slots) computed from the ids; running a recipe's `main` in-process; the
bad-input matrix's helpers (rows written with faults, CLI runs, recipe arguments, trainer setups)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import torch

from mirage_trl.cli import main
from mirage_trl.models.families import multimodal_model, unwrap

REPO = Path(__file__).resolve().parents[1]


def text_only_model():
    """(model, tokenizer): a tiny Qwen2 language model without a vision tower, for the refusals that need one."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mirage_trl.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok) + 16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return Qwen2ForCausalLM(config), tok


def recipe_main(name: str):
    """`main(script_args, training_args, model_args)` of `recipes/<name>.py` (what runs after TrlParser)."""
    import sys

    if (
        str(REPO / "recipes") not in sys.path
    ):  # the method scripts the recipes import, as `python recipes/x.py` finds them
        sys.path.insert(0, str(REPO / "recipes"))
    path = REPO / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def write_rows(path: Path, objs, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(o) for o in objs]
    for i, text in (raw_lines or {}).items():
        lines[i] = text
    path.write_text("".join(line + "\n" for line in lines))
    return path


def copy_objs(env):
    return [dict(o) for o in env["objs"]]


def broken_image(folder: Path, kind: str) -> str:
    """'unreadable': text bytes under a .png name; 'truncated': a real PNG cut in half."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}.png"
    if kind == "unreadable":
        path.write_text("this is not an image")
    else:
        from PIL import Image

        tmp = folder / "whole.png"
        Image.effect_noise((96, 96), 64).convert("RGB").save(tmp)
        data = tmp.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return str(path)


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_cli_error(rc, err, command: str, pattern: str):
    """Exit 2, exactly one `mirage-trl <command>: error: ...` line matching `pattern`, no stack trace."""
    assert rc == 2, err
    assert "Traceback" not in err, err
    # transformers' own "Loading weights" progress bars may precede the line; nothing else may.
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    errors = [line for line in lines if line.startswith(f"mirage-trl {command}: error: ")]
    assert len(errors) == 1 and len(lines) == 1, err
    assert re.search(pattern, errors[0]), (pattern, errors[0])


def nothing_written(folder: Path) -> bool:
    return not folder.exists() or not any(folder.iterdir())


def _recipe_args(argv):
    from trl import ModelConfig, TrlParser

    from mirage_trl.configs import MirageScriptArguments, MirageSFTConfig

    return TrlParser((MirageScriptArguments, MirageSFTConfig, ModelConfig)).parse_args_and_config(
        args=[str(a) for a in argv]
    )


def _recipe_argv(env, data, out, *extra):
    return [
        "--model_name_or_path",
        env["mirage"],
        "--dataset_name",
        data,
        "--output_dir",
        out,
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--max_steps",
        "1",
        "--latent_size",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_checkpointing",
        "false",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def sft_args(out, **kw):
    from mirage_trl.configs import MirageSFTConfig

    base = dict(
        output_dir=str(out),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        gradient_checkpointing=False,
        per_device_train_batch_size=2,
        logging_steps=1,
        max_steps=1,
        learning_rate=1e-3,
        disable_tqdm=True,
        bf16=False,
        seed=0,
        latent_size=2,
    )
    base.update(kw)
    return MirageSFTConfig(**base)


def sft_trainer(out, dataset, model=None, processor=None, **kw):
    from mirage_trl.models.tiny import build_tiny_model
    from mirage_trl.trainers.sft import MirageSFTTrainer

    if model is None:
        model, processor = build_tiny_model(seed=0)
    return MirageSFTTrainer(
        model=model, args=sft_args(out, **kw), train_dataset=dataset, processing_class=processor
    )


def no_checkpoint(out: Path) -> bool:
    return not out.exists() or not [
        p for p in out.iterdir() if p.name.startswith("checkpoint-") or p.suffix == ".safetensors"
    ]


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _nan_final_norm(trainer):
    from mirage_trl.models.families import unwrap

    norm = unwrap(trainer.model).model.language_model.norm
    return norm.register_forward_hook(lambda m, i, o: o * float("nan"))


def _skipped(trainer):
    return [h["skipped_steps"] for h in trainer.state.log_history if "skipped_steps" in h]


# bad data files: each builder writes one fault and returns (path, the error it must give)
def _malformed(env, folder):
    return write_rows(
        folder / "bad.jsonl", env["objs"], {1: '{"text_input": "half a row'}
    ), r"bad\.jsonl:2: malformed JSON"


def _missing_field(env, folder):
    objs = copy_objs(env)
    del objs[0]["text_input"]
    return write_rows(folder / "bad.jsonl", objs), r"bad\.jsonl:1:text_input: missing required field"


def _empty(env, folder):
    (folder / "bad.jsonl").write_text("\n\n")
    return folder / "bad.jsonl", r"bad\.jsonl: no rows \(the file is empty\)"


def _missing_image(env, folder):
    objs = copy_objs(env)
    objs[2]["image_input"] = str(folder / "nowhere.png")
    return write_rows(
        folder / "bad.jsonl", objs
    ), r"bad\.jsonl:3:image_input: image not found: .*nowhere\.png"


def _image_count(env, folder):
    objs = copy_objs(env)
    objs[0]["text_input"] += " <image>"
    return write_rows(
        folder / "bad.jsonl", objs
    ), r"bad\.jsonl:1:image_input: 2 <image> marker\(s\) in text_input but 1 input image"


def _output_image_count(env, folder):
    objs = copy_objs(env)
    objs[1]["text_output"] += " <output_image>"
    return write_rows(folder / "bad.jsonl", objs), (
        r"bad\.jsonl:2:image_output: 2 <output_image> marker\(s\) in text_output but 1 helper image"
    )


DATA_CASES = {
    "malformed_json": _malformed,
    "missing_field": _missing_field,
    "empty_file": _empty,
    "missing_image": _missing_image,
    "image_marker_count": _image_count,
    "output_image_marker_count": _output_image_count,
}


# ---------------------------------------------------------------- hand-built rows and the expected layout


IGNORE = -100


def noise_image(path: Path, width: int, height: int, seed: int) -> str:
    """A random RGB PNG (random so that every patch, and every pooled group, differs)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def make_images(folder: Path) -> dict[str, str]:
    """Input and helper images of different sizes (so their grids, and token counts, differ).

    With the tiny processor (patch 14, merge 2): 56x56 -> 4 visual tokens, 84x56 -> 6, 112x84 -> 12,
    112x112 -> 16.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {
        "in0": (56, 56),
        "in1": (84, 56),
        "in2": (112, 84),
        "h0": (84, 56),
        "h1": (112, 112),
        "h2": (56, 56),
        "h3": (112, 84),
        "h4": (84, 56),
        "h5": (56, 84),
    }
    return {
        name: noise_image(folder / f"{name}.png", w, h, seed=i)
        for i, (name, (w, h)) in enumerate(sizes.items())
    }


def make_row(prompt: str, answer: str, images: list[str], helpers: list[str], source: str = "test:1") -> dict:
    content = [{"type": "text", "text": prompt}] + [{"type": "image", "text": None} for _ in images]
    return {
        "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "images": list(images),
        "helper_images": list(helpers),
        "helper_texts": [],
        "prompt_text": prompt,
        "completion_text": answer,
        "benchmark": "vsp_planning",
        "answer": "A",
        "map_desc": None,
        "map_id": None,
        "level": None,
        "source": source,
    }


def four_rows(img: dict[str, str]) -> list[dict]:
    """Four different samples: 0, 1, 3 and 2 latent spans, different lengths, 0 to 2 input images."""
    return [
        make_row("Solve the maze.", "The answer is \\boxed{A}.", [img["in0"]], [], "test:1"),
        make_row(
            "Which way leads to the goal?",
            "<think> Moving RIGHT <output_image> keeps me safe. </think> \\boxed{R}",
            [img["in1"]],
            [img["h0"]],
            "test:2",
        ),
        make_row(
            "As a professional maze solver, devise an action plan for the player.",
            "<think> First RIGHT <output_image> then DOWN <output_image> and LEFT <output_image> "
            "reaches the Target without falling into any hole. </think> The answer is \\boxed{RDL}.",
            [img["in1"], img["in2"]],
            [img["h1"], img["h2"], img["h3"]],
            "test:3",
        ),
        make_row(
            "Plan the moves.",
            "<output_image> Next, <output_image> success. \\boxed{B}",
            [],
            [img["h4"], img["h5"]],
            "test:4",
        ),
    ]


def expected_layout(
    ids: torch.Tensor, tokenizer, latent_size: int, attention_mask: torch.Tensor | None = None
):
    """Labels and latent slot positions expected for one (possibly padded) sequence, from its ids only.

    The prompt ends with the last `<|im_start|>assistant\\n` header; after it every token is trained
    except latent pads; padding (attention 0) is ignored. Returns (labels, slot_positions, span_starts).
    """
    vocab = tokenizer.get_vocab()
    start, pad, end = vocab["<|latent_start|>"], vocab["<|latent_pad|>"], vocab["<|latent_end|>"]
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    seq = ids.tolist()
    valid = [True] * len(seq) if attention_mask is None else [bool(m) for m in attention_mask.tolist()]
    boundary = None
    for i in range(len(seq) - len(header), -1, -1):
        if seq[i : i + len(header)] == header and all(valid[i : i + len(header)]):
            boundary = i + len(header)
            break
    assert boundary is not None, "no assistant header"
    labels = [IGNORE] * len(seq)
    for i in range(boundary, len(seq)):
        if valid[i] and seq[i] != pad:
            labels[i] = seq[i]
    span_starts = [i for i in range(boundary, len(seq)) if seq[i] == start and valid[i]]
    slots = []
    for s in span_starts:
        slots.extend(range(s + 1, s + 1 + latent_size))
        assert seq[s + 1 + latent_size] == end
    return torch.tensor(labels), slots, span_starts


def trl_loss_logps(trainer, scored, monkeypatch):
    """Run TRL's own `_compute_loss` on a scored generation batch (no gradient) and return the per-token
    log-probs it computed through the trainer's `_get_per_token_logps_and_entropies`."""
    import torch

    seen = {}
    real = trainer._get_per_token_logps_and_entropies

    def spy(*a, **kw):
        result = real(*a, **kw)
        seen["logps"] = result[0].detach()
        return result

    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", spy)
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1, raising=False)
    with torch.no_grad():
        trainer._compute_loss(trainer.model, scored)
    return seen["logps"]


# ---------------------------------------------------------------------- the visual bottleneck, written out
# The reference of `latent.bottleneck`: one sample alone, its attention mask written pair by pair.

TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")  # per-token processor outputs (Qwen-VL, Gemma 3)


TWO_WAY_IMAGES = ("gemma3",)  # families whose image tokens attend to each other both ways


def _image_ids(config) -> set[int]:
    ids = {getattr(config, name, None) for name in ("image_token_id", "image_token_index")}
    return {i for i in ids if i is not None}


def reference_mask(
    model, ids: list[int], tokens, window: int | None = None, mode: str = "image"
) -> torch.Tensor:
    """(1, 1, L, L) additive mask of one sample, written pair by pair; `window`: a sliding-window layer's.
    "image": blind after the first span start; "strict": blind after the first image token."""
    config = unwrap(model).config
    images = _image_ids(config)
    two_way = config.model_type in TWO_WAY_IMAGES
    opened, blind, block, run = False, [], [], -1
    for i, t in enumerate(ids):
        if mode == "image":  # blind from the first span start on
            opened = opened or t == tokens.start_id
        else:  # "strict": blind from the first image token on
            opened = opened or t in images
        blind.append(opened and t not in (tokens.start_id, tokens.pad_id) and t not in images)
        if t in images and not (i and ids[i - 1] in images):
            run += 1
        block.append(run if t in images else None)
    L = len(ids)
    mask = torch.full((1, 1, L, L), torch.finfo(torch.float32).min)
    for i in range(L):
        for j in range(L):
            near = j <= i and (window is None or j > i - window)
            seen = near or (two_way and block[i] is not None and block[i] == block[j])
            if seen and not (blind[i] and ids[j] in images):
                mask[0, 0, i, j] = 0.0
    return mask


def reference_inputs(model, single, x, mask=None, t=None):
    """The inner model's inputs for the first `t` tokens of one processed sample, input embeddings `x`, and (if
    given) an attention mask: the processor's other outputs as they are (per-token ones cut to `t`). Qwen-VL's
    rope positions are computed by the model from the ids with a plain mask (a 4-D mask says nothing of them),
    and Qwen2/2.5-VL and Qwen3.5 also take the ids (they find image tokens there); the other families take
    embeddings alone (they find them by value)."""
    ids = single["input_ids"][:, :t]
    kw = {
        k: (v[:, :t] if k in TOKEN_KEYS else v)
        for k, v in single.items()
        if k not in ("input_ids", "attention_mask")
    }
    mt = unwrap(model).config.model_type
    if mt in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        kw["position_ids"] = multimodal_model(model).get_rope_index(
            ids, mm_token_type_ids=kw["mm_token_type_ids"], image_grid_thw=kw.get("image_grid_thw"),
            attention_mask=torch.ones_like(ids),
        )[0]  # fmt: skip
    if mt in ("qwen2_vl", "qwen2_5_vl", "qwen3_5"):
        kw["input_ids"] = ids
    n = ids.shape[1]
    if isinstance(mask, dict):  # one mask per layer type (Gemma 3's sliding-window layers)
        kw["attention_mask"] = {k: m[..., :n, :n] for k, m in mask.items()}
    elif mask is not None:
        kw["attention_mask"] = mask[..., :n, :n]
    return dict(kw, inputs_embeds=x[:, :n])


def layer_masks(model, ids: list[int], tokens, mode: str = "image"):
    """The reference mask, or one per layer type where the model has sliding-window layers."""
    text = unwrap(model).config.get_text_config()
    if "sliding_attention" not in (getattr(text, "layer_types", None) or ()):
        return reference_mask(model, ids, tokens, mode=mode)
    return {
        "full_attention": reference_mask(model, ids, tokens, mode=mode),
        "sliding_attention": reference_mask(model, ids, tokens, window=text.sliding_window, mode=mode),
    }


def reference_stage1(model, single, values, tokens, mode="image"):
    """One sample, `values` at its slots, one forward under the written-out mask."""
    inner = multimodal_model(model)
    ids = single["input_ids"]
    x = model.get_input_embeddings()(ids)
    slots = ids[0] == tokens.pad_id
    x = torch.cat(
        [
            x[:, i : i + 1] if not slots[i] else values[None, None, int(slots[:i].sum())]
            for i in range(ids.shape[1])
        ],
        1,
    )
    return inner(
        **reference_inputs(model, single, x, layer_masks(model, ids[0].tolist(), tokens, mode))
    ).last_hidden_state


# the fields of a loaded row that two sources of the same rows must agree on (besides the pictures)
ROW_FIELDS = (
    "messages",
    "prompt_text",
    "completion_text",
    "benchmark",
    "answer",
    "map_desc",
    "level",
    "helper_texts",
)


def assert_same_rows(got, expected, keys=ROW_FIELDS) -> None:
    """Loaded rows equal field by field (`keys`) and picture by picture, wherever their images are stored."""
    from PIL import Image

    def pixels(path) -> bytes:
        with Image.open(path) as im:
            return im.convert("RGB").tobytes()

    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for key in keys:
            assert g[key] == e[key], key
        assert [pixels(p) for p in g["images"]] == [pixels(p) for p in e["images"]]
        assert [pixels(p) for p in g["helper_images"]] == [pixels(p) for p in e["helper_images"]]
