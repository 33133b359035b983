"""Helpers shared by the stage-1 tests (collator, trainer, distributed): hand-built rows and images,
and an independent expectation of the token layout (labels, latent slots) computed from the ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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
