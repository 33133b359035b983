"""Per model family: the stage-2 / stage-1 step ratio and the latent decoding / `generate` ratio, in one run.

    python bench/families.py [--quick] [--json PATH]

Each family's bench-sized random model (text hidden 256, 4 layers, 4 heads; the tiny vision tower, unused:
text rows, so the figures compare the language models) runs the same shapes: a right-padded batch of
ragged rows with latent spans for the training steps (stage 1: the slots filled with fixed vectors, one
forward + backward; stage 2: `self_latent_forward` with `stage2_method="auto"`, + backward), and a
left-padded prompt batch for decoding (greedy, EOS ignored, no span opened: checked). Timings are medians
over interleaved repeats; each family's ratios are also given relative to Qwen2.5-VL's in the same run
(goal: within 10 %). Qwen3.5's rounds carry each sample's gated-delta and convolution states from round to
round (`latent.recurrent_rounds`); on a CPU its gated-delta kernel is the PyTorch fallback of transformers (no
flash-linear-attention), whose share of the step is printed (`--families qwen3_5` measures it alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASELINE = (
    "qwen2_5_vl"  # every family (mirage_trl.models.families.SUPPORTED_MODEL_TYPES) is measured against it
)
K = 4


def build(model_type: str, quick: bool):
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if quick else {}
    size = size or dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    model, processor = build_tiny_model(
        model_type, seed=0, num_attention_heads=4, num_key_value_heads=2, **size
    )
    return model, processor, add_latent_tokens(processor, model, latent_size=K)


def batches(processor, lt, batch: int, length: int):
    """(training batch with spans, right padded; prompt batch, left padded), ordinary vocabulary ids."""
    import torch

    tok = processor.tokenizer
    special = set(tok.all_special_ids) | {lt.start_id, lt.pad_id, lt.end_id}
    vocab = torch.tensor([i for i in range(len(tok)) if i not in special])
    gen = torch.Generator().manual_seed(0)
    span = [lt.start_id] + [lt.pad_id] * K + [lt.end_id]
    ids = torch.full((batch, length), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros(batch, length, dtype=torch.long)
    prompts = torch.full((batch, length // 2), tok.pad_token_id, dtype=torch.long)
    pmask = torch.zeros_like(prompts)
    for b in range(batch):
        n = length - (b % 4) * (length // 8)
        row = vocab[torch.randint(len(vocab), (n,), generator=gen)].tolist()
        for s in range(1 + b % 3):  # 1 to 3 spans a row, at different places
            at = (s + 1) * n // 5 + b
            row[at : at + len(span)] = span
        ids[b, :n] = torch.tensor(row[:n])
        attn[b, :n] = 1
        p = length // 2 - (b % 4) * (length // 16)
        prompts[b, length // 2 - p :] = vocab[torch.randint(len(vocab), (p,), generator=gen)]
        pmask[b, length // 2 - p :] = 1
    labels = torch.where(attn.bool() & (ids != lt.pad_id), ids, -100)
    train = dict(input_ids=ids, attention_mask=attn, slot_mask=ids == lt.pad_id, labels=labels)
    return train, dict(input_ids=prompts, attention_mask=pmask)


def steps(model, train):
    import torch

    from mirage_trl.latent.slots import latent_inputs
    from mirage_trl.latent.stage2 import self_latent_forward
    from mirage_trl.models.families import capture_final_hidden, family
    from mirage_trl.trainers.sft import text_cross_entropy

    fam = family(model)
    ids, attn, slots, labels = (
        train["input_ids"],
        train["attention_mask"],
        train["slot_mask"],
        train["labels"],
    )
    pos = fam.position_ids(model, ids, attn)
    D = model.get_input_embeddings().weight.shape[1]
    fixed = torch.randn(int(slots.sum()), D, generator=torch.Generator().manual_seed(1)) * 0.02

    def stage1():
        with latent_inputs(model, slots, fixed), capture_final_hidden(model) as cap:
            model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=fam.model_positions(pos),
                use_cache=False,
                logits_to_keep=1,
            )
        ce, n = text_cross_entropy(model, cap[-1], labels)
        (ce / n).backward()

    def stage2():
        out = self_latent_forward(model, ids, attn, slots, position_ids=pos, method="auto")
        ce, n = text_cross_entropy(model, out.hidden_states, labels)
        (ce / n).backward()
        return out.method

    return stage1, stage2


def measure(model_type: str, quick: bool, repeats: int) -> dict:
    import torch

    from mirage_trl.generation import generate_with_latents

    model, processor, lt = build(model_type, quick)
    train, prompts = batches(processor, lt, 4 if quick else 8, 48 if quick else 192)
    new_tokens = 8 if quick else 48
    model.train()
    stage1, stage2 = steps(model, train)
    method = stage2()  # warm-up (and the method "auto" chose)
    stage1()

    def generate():
        with torch.no_grad():
            return model.generate(
                **prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )

    def ours():
        return generate_with_latents(
            model, processor, prompts, latent_tokens=lt, max_new_tokens=new_tokens, eos_token_ids=[]
        )

    model.eval()
    spans = int(ours().num_latent_spans.sum())
    generate()
    t = {"stage1": [], "stage2": [], "generate": [], "latent_decoding": []}
    for _ in range(repeats):
        model.train()
        for name, fn in (("stage1", stage1), ("stage2", stage2)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - start)
        model.eval()
        for name, fn in (("generate", generate), ("latent_decoding", ours)):
            start = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in t.items()}
    return {
        "stage2_method": method,
        "stage2_over_stage1": med["stage2"] / med["stage1"],
        # tokens/s of latent decoding over generate's: the inverse ratio of their times
        "decoding_over_generate": med["generate"] / med["latent_decoding"],
        "spans_in_decoding": spans,
        "median_s": med,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--families", nargs="*", help="measure only these model types (Qwen2.5-VL is always measured)"
    )
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 5)
    from mirage_trl.models.families import SUPPORTED_MODEL_TYPES

    chosen = [mt for mt in SUPPORTED_MODEL_TYPES if not args.families or mt in {BASELINE, *args.families}]
    results = {mt: measure(mt, args.quick, repeats) for mt in chosen}
    base = results[BASELINE]
    for r in results.values():
        r["stage2_vs_qwen2_5_vl"] = r["stage2_over_stage1"] / base["stage2_over_stage1"]
        r["decoding_vs_qwen2_5_vl"] = r["decoding_over_generate"] / base["decoding_over_generate"]
    table = Table(title=f"model families ({'quick' if args.quick else 'bench'} shapes, 1 thread)")
    for col in (
        "family",
        "stage 2 method",
        "stage-2 / stage-1",
        "vs Qwen2.5-VL",
        "latent dec. / generate",
        "vs Qwen2.5-VL",
    ):
        table.add_column(col, justify="left" if col in ("family", "stage 2 method") else "right")
    for mt, r in results.items():
        table.add_row(
            mt, r["stage2_method"], f"{r['stage2_over_stage1']:.2f}x", f"{r['stage2_vs_qwen2_5_vl']:.2f}",
            f"{r['decoding_over_generate']:.2f}x", f"{r['decoding_vs_qwen2_5_vl']:.2f}",
        )  # fmt: skip
    Console().print(table)
    if any(r["spans_in_decoding"] for r in results.values()):
        print(
            "note: a latent span opened in the decoding comparison of",
            [m for m, r in results.items() if r["spans_in_decoding"]],
        )
    if args.json:
        args.json.write_text(json.dumps({"families": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
