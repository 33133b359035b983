"""Benchmark of the stage-2 forward (self-generated latents) against stage 1 and a reference-style loop.

    python bench/stage2_engine.py            # B=8, ~600 tokens, hidden 256, 4 layers (a few minutes on 2 cores)
    python bench/stage2_engine.py --quick    # tiny shapes, seconds
    python bench/stage2_engine.py --json out.json

Each timing is one training step, forward + CE loss + backward, float32, CPU. Methods run
round-robin (so machine load hits all alike): warm-up, then the median of --repeats.

- plain: one forward with every latent slot filled with fixed vectors (the stage-1 cost).
- rounds / rounds_checkpointed / recompute: `self_latent_forward` with that method.
- plain (ckpt): the plain forward with the model's gradient checkpointing on (non-reentrant),
  the baseline of rounds_checkpointed (which runs with the model's checkpointing on, as TRL does).
- reference-style: a faithful re-implementation of the reference approach: batch 1, looping over
  samples; per sample a forward segment up to the first latent, then one forward segment per
  latent token (input = last hidden state) and the text up to the next latent, all on a
  grad-carrying KV cache; loss.backward() per sample.

Peak memory: each of the measured configurations runs one step in a fresh subprocess with
glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to the
OS at once); the figure is ru_maxrss during the step minus the RSS just before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(batch=8, length=600, hidden=256, layers=4, heads=8, kv_heads=2, intermediate=1024, spans=3, k=4)
QUICK = dict(batch=4, length=96, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, spans=3, k=4)


def setup(cfg, seed=0):
    import torch

    from mirage_trl.models.prepare import add_latent_tokens
    from mirage_trl.models.tiny import build_tiny_model

    model, processor = build_tiny_model(
        "qwen2_5_vl",
        seed=seed,
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        intermediate_size=cfg["intermediate"],
    )
    tokens = add_latent_tokens(processor, model, cfg["k"])
    model.train()
    g = torch.Generator().manual_seed(seed)
    B, L, k = cfg["batch"], cfg["length"], cfg["k"]
    pad = processor.tokenizer.pad_token_id
    ids = torch.full((B, L), pad, dtype=torch.long)
    attn = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n = L - int(torch.randint(0, max(L // 15, 1), (1,), generator=g))  # ragged lengths
        row = torch.randint(10, 500, (n,), generator=g)
        # three spans at ragged positions: around 25%, 50%, 75% of the sample, +-10%
        for _s, centre in enumerate((0.25, 0.5, 0.75)[: cfg["spans"]]):
            jitter = float(torch.rand((), generator=g)) * 0.2 - 0.1
            start = int((centre + jitter) * n)
            row[start] = tokens.start_id
            row[start + 1 : start + 1 + k] = tokens.pad_id
            row[start + 1 + k] = tokens.end_id
        ids[b, :n] = row
        attn[b, :n] = 1
    slot = ids == tokens.pad_id
    labels = torch.where(attn.bool() & ~slot, ids, torch.full_like(ids, -100))
    labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    return model, tokens, dict(input_ids=ids, attention_mask=attn, slot_mask=slot, labels=labels)


def _ce(model, hidden, labels):
    import torch

    from mirage_trl.models.families import unwrap

    logits = unwrap(model).lm_head(hidden)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def make_steps(model, tokens, batch):
    import torch

    from mirage_trl.latent.slots import latent_inputs
    from mirage_trl.latent.stage2 import self_latent_forward
    from mirage_trl.models.families import family, multimodal_model

    inner = multimodal_model(model)
    ids, attn, slot, labels = batch["input_ids"], batch["attention_mask"], batch["slot_mask"], batch["labels"]
    pos = family(model).position_ids(model, ids, attn)
    D = model.get_input_embeddings().weight.shape[1]
    fixed = torch.randn(int(slot.sum()), D) * 0.02

    from mirage_trl.latent.stage2 import is_checkpointing

    def ckpt(on):
        if on == is_checkpointing(model):
            return
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()

    def plain(on=False):
        def step():
            ckpt(on)
            with latent_inputs(model, slot, fixed):
                h = inner(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
            _ce(model, h, labels).backward()

        return step

    def stage2(method, on=False, **kw):
        def step():
            ckpt(on)
            out = self_latent_forward(model, ids, attn, slot, position_ids=pos, method=method, **kw)
            _ce(model, out.hidden_states, labels).backward()

        return step

    def reference_style():
        from transformers import DynamicCache

        ckpt(False)
        n_targets = int((labels != -100).sum())
        emb = model.get_input_embeddings()
        for b in range(ids.shape[0]):
            n = int(attn[b].sum())
            row, p, lab = ids[b : b + 1, :n], pos[:, b : b + 1, :n], labels[b : b + 1, :n]
            cuts = [0] + slot[b, :n].nonzero().flatten().tolist() + [n]
            cache = DynamicCache(config=model.config)
            hs, last = [], None
            for a, e in zip(cuts[:-1], cuts[1:]):
                x = emb(row[:, a:e])
                if a > 0:  # a latent token: its input is the previous hidden state
                    x = torch.cat([last, x[:, 1:]], dim=1)
                h = inner(
                    inputs_embeds=x, position_ids=p[:, :, a:e], cache=cache, use_cache=True
                ).last_hidden_state
                hs.append(h)
                last = h[:, -1:]
            h = torch.cat(hs, dim=1)
            (_ce(model, h, lab) * (int((lab != -100).sum()) / n_targets)).backward()

    return {
        "plain": plain(False),
        "rounds": stage2("rounds"),
        # the rounds cut as checkpointing cuts them (real tokens / layers each), without checkpointing
        "rounds_split": stage2(
            "rounds",
            schedule="split",
            max_round_tokens=-(-int(attn.sum()) // model.config.text_config.num_hidden_layers),
        ),
        "plain_ckpt": plain(True),
        "rounds_checkpointed": stage2("rounds_checkpointed", True),
        "recompute": stage2("recompute"),
        "reference_style": reference_style,
    }


def run_timings(cfg, repeats, names=None):
    import torch

    torch.set_num_threads(cfg.get("threads", 1))
    model, tokens, batch = setup(cfg)
    steps = make_steps(model, tokens, batch)
    names = names or list(steps)
    times = {n: [] for n in names}
    for rep in range(repeats + 1):  # first pass is warm-up
        for n in names:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            steps[n]()
            dt = time.perf_counter() - t0
            if rep:
                times[n].append(dt)
    from mirage_trl.latent.rounds import plan_rounds

    plan = plan_rounds(batch["attention_mask"], batch["slot_mask"])  # the default schedule, as timed
    real = int(batch["attention_mask"].sum())
    split = plan_rounds(batch["attention_mask"], batch["slot_mask"], "split", -(-real // cfg["layers"]))
    info = dict(
        rounds=len(plan.rounds),
        split_rounds=len(split.rounds),
        schedule=plan.schedule,
        round_tokens=plan.computed_tokens,
        real_tokens=real,
        padded_tokens=int(batch["attention_mask"].numel()),
        torch_threads=torch.get_num_threads(),
    )
    return {n: statistics.median(v) for n, v in times.items()}, times, info


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(cfg, name):
    """Run in a fresh process: a warm-up step of `name`, then one measured step.

    Prints the peak RSS of the measured step (VmHWM, reset through /proc/self/clear_refs) minus
    the RSS just before it.
    """
    import gc

    import torch

    torch.set_num_threads(cfg.get("threads", 1))
    model, tokens, batch = setup(cfg)
    steps = make_steps(model, tokens, batch)
    steps[name]()  # warm-up: one-time allocations (thread pools, lazy inits) are not the method's
    model.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kib("VmRSS") * 1024
    steps[name]()
    peak = _status_kib("VmHWM") * 1024
    print(json.dumps({"name": name, "delta": peak - before, "before": before, "peak": peak}))


def run_memory(cfg, names):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = {}
    for name in names:
        res = subprocess.run(
            [sys.executable, __file__, "--memory-child", name, "--config", json.dumps(cfg)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)"
    )
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        memory_child(json.loads(args.config), args.memory_child)
        return
    cfg = dict(QUICK if args.quick else FULL, threads=args.threads)
    medians, raw, info = run_timings(cfg, args.repeats)
    mem = {} if args.no_memory else run_memory(cfg, ["plain", "rounds", "plain_ckpt", "rounds_checkpointed"])

    B = cfg["batch"]
    ratios = {
        "rounds / plain": (medians["rounds"] / medians["plain"], "<= 1.25"),
        "rounds_checkpointed / plain_ckpt": (
            medians["rounds_checkpointed"] / medians["plain_ckpt"],
            "<= 1.5",
        ),
        "reference_style / rounds (samples/s gain)": (medians["reference_style"] / medians["rounds"], ">= 5"),
        "rounds_split (more, smaller rounds) / plain": (medians["rounds_split"] / medians["plain"], "-"),
        "recompute / plain": (medians["recompute"] / medians["plain"], "-"),
    }
    if mem:
        ratios["peak mem rounds_checkpointed / plain_ckpt"] = (
            mem["rounds_checkpointed"]["delta"] / mem["plain_ckpt"]["delta"],
            "<= 1.15",
        )
        ratios["peak mem rounds / plain"] = (mem["rounds"]["delta"] / mem["plain"]["delta"], "-")

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"config: {cfg}, float32, CPU, torch threads {info['torch_threads']}, "
        f"{args.repeats} repeats after 1 warm-up (median)"
    )
    console.print(
        f"rounds per batch {info['rounds']} ({info['schedule']} schedule; {info['split_rounds']} when split for "
        f"checkpointing); tokens run by the round methods {info['round_tokens']} (packed) vs "
        f"{info['padded_tokens']} padded / {info['real_tokens']} real tokens in the batch"
    )
    t = Table(title="stage-2 step time (forward + backward)")
    t.add_column("method")
    t.add_column("median s", justify="right")
    t.add_column("samples/s", justify="right")
    t.add_column("all runs s", justify="right")
    t.add_column("peak mem MiB", justify="right")
    for n, v in medians.items():
        m = f"{mem[n]['delta'] / 2**20:.1f}" if n in mem else ""
        t.add_row(n, f"{v:.3f}", f"{B / v:.1f}", " ".join(f"{x:.3f}" for x in raw[n]), m)
    console.print(t)
    r = Table(title="ratios")
    r.add_column("ratio")
    r.add_column("value", justify="right")
    r.add_column("goal")
    for k, (v, goal) in ratios.items():
        r.add_row(k, f"{v:.2f}", goal)
    console.print(r)
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(
                    config=cfg,
                    info=info,
                    median_s=medians,
                    runs_s=raw,
                    memory=mem,
                    ratios={k: v for k, (v, _) in ratios.items()},
                ),
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
