"""Evaluation rows/s: batched latent decoding (B=16) against batch 1, same model, rows and settings.

    python bench/eval_throughput.py [--quick] [--json PATH]

Model: a random Qwen2.5-VL (text hidden 256, 4 layers) with the latent tokens, on the GPU where there is one; rows: generated VSP
planning test rows (one image each); greedy, a fixed number of new tokens (EOS ignored through
`eos_token_ids=[]`), so both runs decode the same number of steps. Goal: batched >= 8x batch 1
(an accelerator goal; a 2-core CPU has little parallelism to gain from batching).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

GOAL = 8.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args(argv)
    rows_n = args.rows or (8 if args.quick else 32)
    new_tokens = args.new_tokens or (8 if args.quick else 48)

    import torch

    from mirage_trl.data.reference import load_reference_jsonl
    from mirage_trl.data.vsp import generate_vsp
    from mirage_trl.evaluation import evaluate
    from mirage_trl.generation import generate_with_latents
    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    overrides = (
        {}
        if args.quick
        else dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024)
    )
    model, processor = build_tiny_model(**overrides)
    add_latent_tokens(processor, model, 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = generate_vsp(
            "planning",
            [3, 4],
            rows_n,
            split="test",
            style="cot",
            seed=0,
            out_dir=Path(tmp) / "d",
            progress=False,
        )
        rows = load_reference_jsonl(path)

        def fixed_length(*a, **kw):
            kw["eos_token_ids"] = []
            return generate_with_latents(*a, **kw)

        timings = {}
        for name, bs in (("batch_1", 1), ("batch_16", 16)):
            t = time.perf_counter()
            res = evaluate(
                model,
                processor,
                rows,
                "vsp_planning",
                batch_size=bs,
                max_new_tokens=new_tokens,
                do_sample=False,
                progress=False,
                generate_fn=fixed_length,
            )
            timings[name] = {
                "seconds": time.perf_counter() - t,
                "rows_per_s": res.modes["model"].rows_per_s,
                "tokens_per_s": res.modes["model"].tokens_per_s,
            }
    ratio = timings["batch_16"]["rows_per_s"] / timings["batch_1"]["rows_per_s"]
    result = {
        "config": {
            "rows": rows_n,
            "new_tokens": new_tokens,
            "model": overrides or "tiny",
            "threads": torch.get_num_threads(),
            "device": device,
        },
        "timings": timings,
        "ratio": ratio,
        "goal": GOAL,
        "meets_goal": ratio >= GOAL,
    }
    print(
        f"eval rows/s: batch 16 {timings['batch_16']['rows_per_s']:.2f}, batch 1 {timings['batch_1']['rows_per_s']:.2f}, "
        f"ratio {ratio:.2f}x (goal >= {GOAL}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
