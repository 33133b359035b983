"""Peak memory of the text cross-entropy at a 152k vocabulary: all logits at once against chunks.

    python bench/logits_memory.py [--quick] [--json PATH] [--positions 4096] [--hidden 512] [--chunk 1024]

The loss stages 1 and 2 train on (`latent.losses.text_cross_entropy`) over `--positions` trained positions with
Qwen2.5-VL's vocabulary (152064 rows), forward and backward, once with every position's logits at once
(`logits_chunk_size 0`) and once in chunks (`--chunk`, the default of `logits_chunk_size`). The logits' memory is
positions x vocabulary whatever the hidden size, so a small `--hidden` keeps the matrix products short on a CPU
without changing what is measured; the LM head is frozen (LoRA), so its gradient takes nothing.

Peak memory is measured above what the inputs and weights already hold: `torch.cuda.max_memory_allocated` on a
GPU, and on a CPU the process's peak resident size (each measurement runs in its own process, so one run's peak
cannot hide the other's). Also printed: the size of one float32 logits matrix, the figure the saving should be
close to. The loss and gradient of both runs are compared (they must agree: the chunks change only memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 152064  # Qwen2.5-VL's LM head rows


def _head_model(lm_head):
    """What `text_cross_entropy` reads of a model: its parameters, output embeddings and config."""
    import types

    import torch

    model = torch.nn.Module()
    model.lm_head = lm_head
    model.config = types.SimpleNamespace()  # no final_logit_softcapping
    model.get_output_embeddings = lambda: lm_head
    return model


def measure(positions: int, hidden: int, vocab: int, chunk: int, device: str) -> dict:
    """One run in this process: peak bytes above the inputs, the loss and a checksum of the gradient."""
    import torch

    from mirage_trl.latent.losses import text_cross_entropy

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    h = torch.randn(1, positions + 1, hidden, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (1, positions + 1), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        ce_sum, n = text_cross_entropy(_head_model(head), h, labels, {}, chunk_size=chunk)
    ce_sum.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": peak, "loss": ce_sum.item() / int(n), "grad_sum": h.grad.float().abs().sum().item()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="256 positions, hidden 64, chunks of 64: a smoke run"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement, print its JSON
    args = ap.parse_args(argv)
    if args.quick:
        args.positions, args.hidden, args.chunk = 256, 64, 64
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one is not None:
        print(json.dumps(measure(args.positions, args.hidden, VOCAB, int(args.one), device)))
        return 0
    runs = {}
    for name, chunk in (("all_at_once", 0), ("chunked", args.chunk)):
        cmd = [sys.executable, __file__, "--positions", str(args.positions), "--hidden", str(args.hidden)]
        out = subprocess.run(
            [*cmd, "--one", str(chunk)], capture_output=True, text=True, check=True, env=dict(os.environ)
        )
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = runs["all_at_once"], runs["chunked"]
    logits_bytes = args.positions * VOCAB * 4
    result = {
        "device": device,
        "positions": args.positions,
        "vocabulary": VOCAB,
        "chunk": args.chunk,
        "float32_logits_mb": logits_bytes / 2**20,
        "peak_mb": {k: v["peak_bytes"] / 2**20 for k, v in runs.items()},
        "ratio": chunked["peak_bytes"] / max(full["peak_bytes"], 1),
        "loss_equal": abs(full["loss"] - chunked["loss"]) <= 1e-4 * abs(full["loss"]),
        "grad_equal": abs(full["grad_sum"] - chunked["grad_sum"]) <= 1e-3 * abs(full["grad_sum"]),
    }
    print(
        f"text cross-entropy, {args.positions} positions x {VOCAB} vocabulary on {device}: peak "
        f"{result['peak_mb']['all_at_once']:.0f} MB all at once, {result['peak_mb']['chunked']:.0f} MB in chunks of "
        f"{args.chunk} (ratio {result['ratio']:.2f}; one float32 logits matrix: {result['float32_logits_mb']:.0f} MB); "
        f"loss equal: {result['loss_equal']}, gradient equal: {result['grad_equal']}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["loss_equal"] and result["grad_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
