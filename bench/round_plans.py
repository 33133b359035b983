"""How many stage-2 rounds each schedule makes at the 7B YAMLs' shapes: planning only, no forward.

    python bench/round_plans.py [--json PATH] [--batch 8] [--text-len 600]

The batch is `bench/gpu_7b.py`'s synthetic one on the shipped Qwen2.5-VL-7B-Instruct config (8 rows per device as
the YAMLs, one 448 x 448 image = 256 tokens kept whole in the first round, ~600 text tokens, three spans of k = 4
at ragged places). For each schedule `latent.rounds.plan_rounds` lays the rounds out; printed per schedule: the
rounds (dependent passes through the model per step), the largest round's real tokens (what per-round
checkpointing replays at once, so the activation peak of `rounds_checkpointed` scales with it), and the keys and
values every round keeps for the later ones (the same for every schedule: every real token's, all layers). With
checkpointing, `auto` cuts rounds to the batch's real tokens / the number of layers; `--max_round_tokens N` sets
that cap (more rounds: lower peak, more passes; fewer: the reverse). Planning time is the median of 15 calls
after a warm-up; the planning is tensor operations with one copy of the masks to the host, no
Python loop over samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CAPS = (None, 256, 512, 1024, 2048)  # None: the default under checkpointing (real tokens / layers)
REPEATS = 15  # planning time: the median of these


def plans(batch: int, text_len: int) -> dict:
    from transformers import AutoConfig

    from bench.gpu_7b import CONFIG, synthetic_batch
    from mirage_trl.latent.rounds import plan_rounds

    d = json.loads(CONFIG.read_text())
    d.pop("_comment", None)
    config = AutoConfig.for_model(**d)
    text = config.text_config
    data, _ = synthetic_batch(config, batch, text_len, "cpu", tiny=False)
    attn, slots = data["attention_mask"], data["slot_mask"]
    images = data["input_ids"] == config.image_token_id
    real = int(attn.sum())
    kv_bytes = (
        2
        * real
        * text.num_hidden_layers
        * text.num_key_value_heads
        * (text.hidden_size // text.num_attention_heads)
        * 2
    )
    out = {
        "batch": batch,
        "real_tokens": real,
        "layers": text.num_hidden_layers,
        "kv_cache_mb": kv_bytes / 2**20,
        "schedules": {},
    }
    rows = [("aligned (rounds, no checkpointing)", "aligned", None)]
    rows += [
        (
            f"split, max_round_tokens {cap or f'default ({-(-real // text.num_hidden_layers)})'}",
            "auto",
            cap or -(-real // text.num_hidden_layers),
        )
        for cap in CAPS
    ]
    plan_rounds(attn, slots, "auto", None, keep_together=images)  # first call pays torch's one-time set-up
    for name, schedule, cap in rows:
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            plan = plan_rounds(attn, slots, schedule, cap, keep_together=images)
            times.append(time.perf_counter() - t)
        out["schedules"][name] = {
            "rounds": len(plan.rounds),
            "largest_round_tokens": max(plan.tokens),
            "planning_ms": statistics.median(times) * 1e3,
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=600)
    args = ap.parse_args(argv)
    result = plans(args.batch, args.text_len)

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"stage-2 rounds at 7B shapes: {result['batch']} rows, {result['real_tokens']} real tokens, "
        f"{result['layers']} layers; keys and values kept: {result['kv_cache_mb']:.0f} MB (every schedule)"
    )
    for col in ("schedule", "rounds", "largest round (tokens)", "planning (ms)"):
        table.add_column(col, justify="left" if col == "schedule" else "right")
    for name, r in result["schedules"].items():
        table.add_row(name, str(r["rounds"]), str(r["largest_round_tokens"]), f"{r['planning_ms']:.1f}")
    Console(width=120).print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
