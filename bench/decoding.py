"""Decoding speed: `generate_with_latents` vs plain `model.generate` on the same model, in one run.

    python bench/decoding.py [--quick] [--json PATH] [--batch 16] [--prompt-len 64] [--new-tokens 64]

Same model (a random Qwen2.5-VL, text hidden 256, 4 layers, so compute dominates on CPU),
same left-padded batch, greedy, same number of new tokens for every sample (EOS ignored:
`eos_token_ids=[]` for ours, `min_new_tokens` for `generate`). Reported, as tokens/s
(batch x new tokens / wall time, median over repeats, runs interleaved; the ratios are the median of
the per-repeat ratios):

* `generate`: transformers' `model.generate`;
* `latent_model_no_spans`: ours in model mode, no `<|latent_start|>` emitted (checked), so the
  lengths match `generate` exactly; its tokens are checked equal to `generate`'s;
* `latent_model_with_spans`: ours with the start token made likely, so samples enter latent
  mode at different steps (latent steps count as tokens).

The goal is ratio = latent_model_no_spans / generate >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL = 0.95


def build(batch: int, prompt_len: int):
    import torch

    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    model, processor = build_tiny_model(
        seed=0,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lt = add_latent_tokens(processor, model, latent_size=4)
    tok = processor.tokenizer
    gen = torch.Generator().manual_seed(0)
    # Ordinary vocabulary ids (no special tokens), ragged lengths, left padded to prompt_len.
    low, high = 20, tok.convert_tokens_to_ids("<|endoftext|>") or 500
    high = max(high, 400)
    input_ids = torch.full((batch, prompt_len), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, prompt_len, dtype=torch.long)
    for i in range(batch):
        n = prompt_len - (i % 4) * (prompt_len // 8)
        input_ids[i, prompt_len - n :] = torch.randint(low, high, (n,), generator=gen)
        attention_mask[i, prompt_len - n :] = 1
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": torch.zeros_like(input_ids),
    }
    return model, processor, lt, inputs


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    from mirage_trl.generation import generate_with_latents

    if args.threads:
        torch.set_num_threads(args.threads)
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 5)
    model, processor, lt, inputs = build(args.batch, args.prompt_len)
    plen = inputs["input_ids"].shape[1]

    def run_generate():
        with torch.no_grad():
            return model.generate(
                **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )

    def run_ours():
        return generate_with_latents(
            model, processor, inputs, latent_tokens=lt, max_new_tokens=new_tokens, eos_token_ids=[]
        )

    head = model.get_output_embeddings().weight
    original = head[lt.start_id].clone()
    trigger = {}

    def run_ours_spans():
        # `<|latent_start|>` wins wherever the trigger token would be the greedy pick.
        with torch.no_grad():
            head[lt.start_id] = head[trigger["id"]] * 1.01
        try:
            return run_ours()
        finally:
            with torch.no_grad():
                head[lt.start_id] = original

    # Warm up, and check that the comparison is fair: same tokens, no latent span, same lengths.
    ref = run_generate()[:, plen:]
    ours = run_ours()
    # Trigger: the token that most samples emit first, at different steps.
    firsts = {}
    for tok_id in torch.unique(ours.sequences).tolist():
        hits = ours.sequences == tok_id
        steps = {int(r.nonzero()[0, 0]) for r in hits if r.any() and int(r.nonzero()[0, 0]) < new_tokens - 6}
        firsts[tok_id] = (int(hits.any(1).sum()), len(steps))
    trigger["id"] = max(firsts, key=lambda t: (firsts[t][1], firsts[t][0]))
    assert ours.num_latent_spans.sum().item() == 0, "a latent span appeared in the no-span run"
    assert ours.sequences.shape == ref.shape == (args.batch, new_tokens)
    same_tokens = ours.sequences.tolist() == ref.tolist()
    spans = run_ours_spans()

    times = {"generate": [], "latent_model_no_spans": [], "latent_model_with_spans": []}
    for _ in range(repeats):
        times["generate"].append(timed(run_generate)[0])
        times["latent_model_no_spans"].append(timed(run_ours)[0])
        times["latent_model_with_spans"].append(timed(run_ours_spans)[0])
    tokens = args.batch * new_tokens
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}

    # Median of the per-repeat ratios: each repeat runs both back to back, so a slow spell of a shared
    # machine hits a pair alike instead of tilting one median.
    def paired(name):
        return statistics.median(g / o for g, o in zip(times["generate"], times[name]))

    ratio = paired("latent_model_no_spans")
    ratio_spans = paired("latent_model_with_spans")
    result = {
        "batch": args.batch,
        "prompt_len": plen,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "model": "qwen2_5_vl random, text hidden 256, 4 layers",
        "tokens_per_s": tps,
        "seconds": times,
        "ratio": ratio,
        "ratio_with_spans": ratio_spans,
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
        "same_tokens_as_generate": same_tokens,
        "latent_spans_in_span_run": int(spans.num_latent_spans.sum()),
        "latent_steps_in_span_run": int(spans.latent_mask.sum()),
        "samples_with_spans": int((spans.num_latent_spans > 0).sum()),
    }
    print(
        f"decoding benchmark: batch {args.batch}, prompt {plen}, {new_tokens} new tokens, "
        f"{repeats} repeats, {torch.get_num_threads()} threads"
    )
    for name, value in tps.items():
        print(f"  {name:26s} {value:9.1f} tokens/s")
    print(f"  same tokens as generate:   {same_tokens}")
    print(
        f"  span run: {result['latent_spans_in_span_run']} spans, {result['latent_steps_in_span_run']} latent steps, "
        f"{result['samples_with_spans']}/{args.batch} samples"
    )
    print(
        f"ratio latent/generate (no spans): {ratio:.3f} (goal >= {GOAL}) {'OK' if ratio >= GOAL else 'BELOW GOAL'}"
    )
    print(f"ratio latent/generate (with spans): {ratio_spans:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
