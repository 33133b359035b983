"""Stage-1 step time: `MirageSFTTrainer` vs a plain TRL `SFTTrainer` step on the same batch, in one run.

    python bench/stage1.py [--quick] [--json PATH] [--batch 8] [--text-repeats 6] [--repeats 9] [--profile]

Same model instance (a random Qwen2.5-VL, text hidden 256, 4 layers, 1024 MLP, so compute dominates
on CPU; vision tower frozen in both), same rows: the Mirage batch has 1 to 3 `<output_image>` spans
per sample with their helper images; the baseline batch is the same rows through
`strip_latent_markers` (text only, no helpers). Both batches are collated once up front; a timed
step is zero_grad + the trainer's `compute_loss` + backward + AdamW step. Steps of the two kinds
are interleaved after warm-up, and the median over repeats is reported.

A third step is the Mirage step under the strict visual bottleneck (`--latent_bottleneck strict`), whose
cost is reported as ratio_bottleneck = bottleneck / mirage (goal <= 1.25).

The Mirage step does more work by design: it encodes every helper image through the vision tower
(no grad) to build the targets, and its sequences are longer by k + 2 tokens per span. The goal is
ratio = mirage / trl <= 1.15. `--profile` prints where the time of one step of each kind goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL = 1.15
MODEL = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
)
TEXT = (
    "Moving to [(3,2),Ice] keeps me on the safe path, next moving to [(0,2),Target] ensures success; "
    "falling into a hole results in defeat. "
)


def make_rows(folder: Path, batch: int, text_repeats: int) -> list[dict]:
    """`batch` rows of several hundred tokens, 1..3 spans each, 112x112 input and helper images."""
    import numpy as np
    from PIL import Image

    rows = []
    rng = np.random.default_rng(0)
    for i in range(batch):
        spans = 1 + i % 3
        paths = []
        for j in range(1 + spans):
            p = folder / f"r{i}_{j}.png"
            Image.fromarray(rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)).save(p)
            paths.append(str(p))
        reps = text_repeats + i % 3  # ragged lengths
        answer = (
            " ".join(f"<think> {TEXT * reps} <output_image>" for _ in range(spans)) + " </think> \\boxed{RDL}"
        )
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Plan the moves. " + TEXT},
                            {"type": "image", "text": None},
                        ],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": paths[:1],
                "helper_images": paths[1:],
                "helper_texts": [],
                "prompt_text": "Plan the moves.",
                "completion_text": answer,
                "benchmark": "vsp_planning",
                "answer": "RDL",
                "map_desc": None,
                "map_id": None,
                "level": None,
                "source": f"bench:{i}",
            }
        )
    return rows


def plain_sft_trainer(model, processor, output_dir: Path, plain_rows: list[dict], **args):
    """TRL's own `SFTTrainer` on the same rows with the latent markers removed: the baseline every figure divides
    by (the rows are already collated by the Mirage collator's format, so TRL's dataset preparation is skipped)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from mirage_trl.data.reference import _features

    return SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(output_dir),
            remove_unused_columns=False,
            dataset_kwargs={"skip_prepare_dataset": True},
            **args,
        ),
        train_dataset=Dataset.from_list(plain_rows, features=_features()),
        processing_class=processor,
    )


def build(batch: int, text_repeats: int, tmp: Path):
    import torch
    from datasets import Dataset

    from mirage_trl.configs import MirageSFTConfig
    from mirage_trl.data.reference import _features, strip_latent_markers
    from mirage_trl.models.settings import MirageSettings
    from mirage_trl.models.tiny import build_tiny_model
    from mirage_trl.trainers.sft import MirageSFTTrainer

    model, processor = build_tiny_model(seed=0, **MODEL)
    rows = make_rows(tmp, batch, text_repeats)
    plain_rows = [strip_latent_markers(r) for r in rows]
    common = dict(
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        activation_checkpointing=False,
        per_device_train_batch_size=batch,
        disable_tqdm=True,
        max_length=None,
    )
    mirage = MirageSFTTrainer(
        model=model,
        args=MirageSFTConfig(output_dir=str(tmp / "m"), **common),
        train_dataset=Dataset.from_list(rows, features=_features()),
        processing_class=processor,
    )
    trl = plain_sft_trainer(model, processor, tmp / "t", plain_rows, **common)
    model.model.visual.requires_grad_(False)  # frozen in both (MirageSFTTrainer already froze it)
    model.train()
    m_batch = mirage.data_collator(rows)
    # The same collation for the text-only rows (no spans, so no latent slots and no helper images),
    # with only the keys a plain Qwen-VL forward takes.
    t_full = mirage.data_collator(plain_rows)
    assert not t_full["latent_mask"].any() and "helper_pixel_values" not in t_full
    t_batch = {
        k: t_full[k]
        for k in (
            "input_ids",
            "attention_mask",
            "labels",
            "mm_token_type_ids",
            "pixel_values",
            "image_grid_thw",
        )
    }
    params = [p for p in model.parameters() if p.requires_grad]
    opt_m = torch.optim.AdamW(params, lr=1e-5)
    opt_t = torch.optim.AdamW(params, lr=1e-5)

    def step_mirage():
        opt_m.zero_grad(set_to_none=True)
        loss = mirage.compute_loss(model, m_batch)
        loss.backward()
        opt_m.step()
        return loss

    def step_trl():
        opt_t.zero_grad(set_to_none=True)
        loss = trl.compute_loss(model, dict(t_batch))
        loss.backward()
        opt_t.step()
        return loss

    def step_bottleneck():
        """The same Mirage step under the strict visual bottleneck (the model's setting, switched for it)."""
        settings = MirageSettings.of_model(model)
        settings.replace(latent_bottleneck="strict").save_to(model)
        try:
            return step_mirage()
        finally:
            settings.save_to(model)

    info = {
        "model": "Qwen2.5-VL (random), text " + ", ".join(f"{k}={v}" for k, v in MODEL.items()),
        "params_trainable_M": round(sum(p.numel() for p in params) / 1e6, 2),
        "batch": batch,
        "mirage_tokens": int(m_batch["attention_mask"].sum()),
        "mirage_padded_len": int(m_batch["input_ids"].shape[1]),
        "trl_tokens": int(t_batch["attention_mask"].sum()),
        "trl_padded_len": int(t_batch["input_ids"].shape[1]),
        "latent_spans": int(m_batch["latent_mask"].sum()) // 4,
        "helper_images": int(m_batch["helper_image_grid_thw"].shape[0]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    return (
        {"mirage": step_mirage, "trl": step_trl, "bottleneck": step_bottleneck},
        info,
        (mirage, model, m_batch),
    )


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call. CPU time (all threads of this process) is the fairer figure when
    other processes compete for the cores: it does not count time spent waiting for one."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def profile(step_mirage, step_trl, top: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, fn in (("mirage", step_mirage), ("trl", step_trl)):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n== {name}: top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def phases(mirage, model, batch, repeats: int) -> dict:
    """Median time of the Mirage step's parts: helper targets, forward + loss, backward."""
    out = {"targets": [], "forward_loss": [], "backward": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        mirage._helper_targets(model, batch)
        t1 = time.perf_counter()
        loss = mirage.compute_loss(model, batch)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        out["targets"].append(t1 - t0)
        out["forward_loss"].append(t2 - t1)  # includes the targets again
        out["backward"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="batch 4, shorter rows, fewer repeats (a smoke run)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8; 4 with --quick)")
    parser.add_argument("--text-repeats", type=int, default=None, help="sentences per think block (length)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler tables of one step of each kind"
    )
    opts = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    if opts.threads:
        torch.set_num_threads(opts.threads)
    batch = opts.batch or (4 if opts.quick else 8)
    text_repeats = opts.text_repeats or (2 if opts.quick else 4)
    repeats = opts.repeats or (3 if opts.quick else 9)
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        steps, info, parts = build(batch, text_repeats, Path(tmp))
        for _ in range(opts.warmup):
            for fn in steps.values():
                fn()
        times = {name: [] for name in steps}
        cpu = {name: [] for name in steps}
        load_before = os.getloadavg()[0]
        for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
            for name, fn in steps.items():
                wall, c = timed(fn)
                times[name].append(wall)
                cpu[name].append(c)
        load_after = os.getloadavg()[0]
        breakdown = phases(*parts, repeats=max(3, repeats // 3))
        if opts.profile:
            profile(steps["mirage"], steps["trl"])
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = med["mirage"] / med["trl"]
    ratio_cpu = med_cpu["mirage"] / med_cpu["trl"]
    ratio_min = min(times["mirage"]) / min(times["trl"])  # the least disturbed step of each kind
    # what the strict visual bottleneck adds to a stage-1 step (its wrapped attention runs SDPA with a full mask)
    ratio_bottleneck = med["bottleneck"] / med["mirage"]
    info["load_average_1min"] = f"{load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores"

    config = Table(title="stage-1 benchmark: config", show_header=False)
    for k, v in info.items():
        config.add_row(k, str(v))
    config.add_row("repeats (after warm-up)", f"{repeats} (+{opts.warmup})")
    console.print(config)
    table = Table(title="step time (zero_grad + compute_loss + backward + AdamW), median")
    table.add_column("step")
    table.add_column("median s", justify="right")
    table.add_column("min s", justify="right")
    table.add_column("max s", justify="right")
    table.add_column("CPU s (median)", justify="right")
    table.add_column("tokens/s", justify="right")
    for name, key, tokens in (
        ("trl SFTTrainer (markers removed)", "trl", info["trl_tokens"]),
        ("MirageSFTTrainer stage 1", "mirage", info["mirage_tokens"]),
        ("the same, strict visual bottleneck", "bottleneck", info["mirage_tokens"]),
    ):
        v = times[key]
        m = statistics.median(v)
        table.add_row(
            name, f"{m:.4f}", f"{min(v):.4f}", f"{max(v):.4f}", f"{med_cpu[key]:.4f}", f"{tokens / m:,.0f}"
        )
    console.print(table)
    parts_table = Table(title="MirageSFTTrainer step parts, median s")
    for k in breakdown:
        parts_table.add_column(k, justify="right")
    parts_table.add_row(*(f"{v:.4f}" for v in breakdown.values()))
    console.print(parts_table)
    verdict = "[green]meets[/green]" if ratio <= GOAL else "[red]above[/red]"
    console.print(
        f"ratio mirage / trl = [bold]{ratio:.3f}x[/bold] wall, {ratio_cpu:.3f}x CPU time "
        f"({verdict} the goal <= {GOAL}x on wall time); fastest steps {ratio_min:.3f}x"
    )
    console.print(f"ratio bottleneck / mirage = [bold]{ratio_bottleneck:.3f}x[/bold] wall (goal <= 1.25x)")
    if load_before > os.cpu_count():
        console.print(
            f"[yellow]the machine was loaded (load {load_before:.1f} on {os.cpu_count()} cores): "
            "wall times are noisy, the CPU-time ratio is the steadier figure[/yellow]"
        )
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "config": info,
                    "repeats": repeats,
                    "warmup": opts.warmup,
                    "times_s": times,
                    "median_s": med,
                    "cpu_times_s": cpu,
                    "median_cpu_s": med_cpu,
                    "mirage_parts_median_s": breakdown,
                    "ratio": ratio,
                    "ratio_cpu": ratio_cpu,
                    "ratio_min": ratio_min,
                    "ratio_bottleneck": ratio_bottleneck,
                    "goal": GOAL,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
