"""The experiment's report: statistics over the runs, `report.md`, and matplotlib plots.

`summarize_results` pools each arm's test rows over seeds (Wilson 95 % intervals per level), tests
each latent ablation against the model's own latents and each planned arm comparison on the
paired rows (McNemar exact, paired bootstrap interval of the difference), and collects latent
health per arm. `write_report` and `write_plots` only present what the summary holds.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MirageError
from .io import atomic_file, read_json, save_figure
from .stats import compare, wilson_interval

# the comparisons of results written before arms were data (results.json without "comparisons")
LEGACY_COMPARISONS = (
    ("mirage_cot", "text_cot"),
    ("mirage_direct", "text_direct"),
    ("mirage_cot", "markers_cot"),
    ("markers_cot", "text_cot"),
    ("helper_input", "mirage_cot"),
    ("mirage_cot_fnorm", "mirage_cot"),
)
PROBE = "probe"  # the model's own latents decoded under the visual bottleneck; "probe_<ablation>" beside it
_PROBE_RULES = {
    True: "text after a span's start cannot see the image",
    "image": "text after a span's start cannot see the image",
    "strict": "no text after the image can see it, the prompt's included",
}


def _label(results: dict, arm: str) -> str:
    return results.get("arms", {}).get(arm, {}).get("label") or arm


def _is_mirage(results: dict, arm: str, runs) -> bool:
    spec = results.get("arms", {}).get(arm)
    if spec is not None:
        return spec["method"] in ("mirage", "markers")
    return any(len(r["curves"]) == 2 for r in runs if r["arm"] == arm)  # stage 1 and stage 2


def _by_seed(runs, a: tuple[str, str], b: tuple[str, str]) -> list[dict]:
    """b against a within each seed (its own test rows): the difference and McNemar's p, seed by seed."""
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        ra = next((r for r in runs if r["seed"] == seed and r["arm"] == a[0]), None)
        rb = next((r for r in runs if r["seed"] == seed and r["arm"] == b[0]), None)
        if ra is None or rb is None or a[1] not in ra["eval"] or b[1] not in rb["eval"]:
            continue
        c = compare(ra["eval"][a[1]]["correct"], rb["eval"][b[1]]["correct"])
        out.append({"seed": seed, "delta": c["delta"], "p_value": c["p_value"]})
    return out


def _paired(runs, a: tuple[str, str], b: tuple[str, str]) -> dict:
    """b against a on the rows pooled over seeds, and seed by seed."""
    return {**compare(_pooled(runs, *a), _pooled(runs, *b)), "per_seed": _by_seed(runs, a, b)}


def _pooled(runs, arm: str, mode: str = "model") -> list[bool]:
    return [c for r in runs if r["arm"] == arm for c in r["eval"][mode]["correct"]]


def _groups(runs, arm: str, mode: str = "model") -> dict:
    """Per level (and 'all'): correct and n summed over seeds, accuracy and its Wilson interval."""
    out: dict = {}
    for r in runs:
        if r["arm"] != arm:
            continue
        for key, g in r["eval"][mode]["groups"].items():
            bucket = out.setdefault(key, {"correct": 0, "n": 0, "invalid": 0, "per_seed": []})
            bucket["correct"] += g["correct"]
            bucket["n"] += g["n"]
            bucket["invalid"] += g["invalid"]
            bucket["per_seed"].append(g["accuracy"])
    for bucket in out.values():
        bucket["accuracy"] = bucket["correct"] / bucket["n"] if bucket["n"] else 0.0
        bucket["ci95"] = list(wilson_interval(bucket["correct"], bucket["n"]))
        bucket["invalid_rate"] = bucket["invalid"] / bucket["n"] if bucket["n"] else 0.0
    return out


def _health(runs, arm: str) -> dict:
    """Eval latent health of the model's own latents (mean over seeds) and the last logged training values."""
    evals = [r["eval"]["model"]["latent_health"] for r in runs if r["arm"] == arm]
    keys = sorted({k for h in evals for k in h})
    out = {"eval": {k: sum(h[k] for h in evals if k in h) / sum(1 for h in evals if k in h) for k in keys}}
    last = {}
    for r in runs:
        if r["arm"] == arm and r["curves"] and r["curves"][-1]["latent"]:
            last = r["curves"][-1]["latent"][-1]
    out["train_last"] = {k: v for k, v in last.items() if k != "step"}
    return out


def summarize_results(results: dict) -> dict:
    runs = results["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    summary: dict = {"arms": {}, "ablations": {}, "probe": {}, "comparisons": []}
    for arm in arms:
        summary["arms"][arm] = {"label": _label(results, arm), "groups": _groups(runs, arm)}
        if _is_mirage(results, arm, runs):
            summary["arms"][arm]["latent_health"] = _health(runs, arm)
        modes = [m for m in next(r for r in runs if r["arm"] == arm)["eval"] if m not in ("model", "notes")]
        ablations = [m for m in modes if not m.startswith(PROBE)]
        if ablations:
            summary["ablations"][arm] = {
                mode: {"groups": _groups(runs, arm, mode), **_paired(runs, (arm, "model"), (arm, mode))}
                for mode in ablations
            }
        if PROBE in modes:  # hiding the image from the answer: against the open model, then its own ablations
            summary["probe"][arm] = {
                "groups": _groups(runs, arm, PROBE),
                "vs_model": _paired(runs, (arm, "model"), (arm, PROBE)),
                "ablations": {
                    mode: {"groups": _groups(runs, arm, mode), **_paired(runs, (arm, PROBE), (arm, mode))}
                    for mode in modes
                    if mode.startswith(PROBE + "_")
                },
            }
    planned = results.get("comparisons", LEGACY_COMPARISONS)
    for b, a in planned:
        if b in arms and a in arms:
            summary["comparisons"].append({"b": b, "a": a, **_paired(runs, (a, "model"), (b, "model"))})
    best = max(arms, key=lambda arm: summary["arms"][arm]["groups"].get("3", {}).get("accuracy", -1.0))
    summary["best_arm_level3"] = {"arm": best, **summary["arms"][best]["groups"].get("3", {})}
    if results.get("warmups"):
        # the grounding warm-up's held-out maps: did the shared starting model learn to read them?
        summary["grounding"] = {
            "groups": _groups(
                [{"arm": "grounding", "eval": {"model": w}} for w in results["warmups"]], "grounding"
            )
        }
    return summary


# ------------------------------------------------------------------------------------------------ text


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def write_report(results: dict, path: Path) -> None:
    """The experiment's report.md: how it ran, then one section per finding."""
    s = results["summary"]
    levels = [str(v) for v in results["data"]["levels"]]
    lines = _header(results) + _arm_settings(results) + _accuracy(s, levels) + _grounding(s, levels)
    lines += _comparisons(s) + _ablations(s) + _probe(results, levels) + _health_table(s)
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]]
    with atomic_file(path) as f:  # a rebuilt report never half-replaces a good one
        f.write("\n".join(lines) + "\n")


def _header(results: dict) -> list[str]:
    cfg = results["config"]
    levels = [str(v) for v in results["data"]["levels"]]
    return [
        f"# Experiment: {cfg['name']}",
        "",
        f"- date: {results['date']}; wall time {results['wall_seconds'] / 60:.1f} min",
        f"- machine: {results['machine']['processor']}, {results['machine']['torch_threads']} torch threads, "
        f"{results['machine'].get('workers', 1)} arm(s) at a time, "
        f"torch {results['machine']['torch']}, {results['machine']['platform']}",
        f"- command: `{results['command']}`",
        f"- seeds: {cfg['seeds']}; data: {results['data']['train_rows']} training rows, "
        f"{results['data']['val_rows']} validation rows (curves), {results['data']['test_rows']} test rows per seed, "
        f"levels {', '.join(levels)}; test maps excluded from training",
        f"- model: {cfg['model'].get('model_type', 'qwen2_5_vl')}, hidden {cfg['model']['hidden_size']}, {cfg['model']['layers']} layers, vocabulary "
        f"{cfg['model']['vocab_size']}; training: lr {cfg['train']['learning_rate']}, batch "
        f"{cfg['train']['batch_size']}, text SFT {cfg['train']['text_steps']} steps, Mirage stage 1 "
        f"{cfg['train']['stage1_steps']} + stage 2 {cfg['train']['stage2_steps']} steps"
        + (
            f"; every arm starts from the grounded model ({cfg['train']['grounding_steps']} warm-up steps on "
            f"{results['data']['grounding_rows']} map descriptions)"
            if cfg["train"].get("grounding_steps")
            else ""
        ),
        "- decoding: greedy; accuracy = the plan reaches the goal without a hole (docs/method.md, grading)",
        "- statistics: Wilson 95 % intervals (rows pooled over seeds); paired differences on the same rows with a "
        "paired bootstrap 95 % interval (2000 resamples) and McNemar's exact test",
    ]


def _level_row(label: str, groups: dict, levels: list[str]) -> str:
    """One table row: accuracy with its interval per level and over all levels, and the invalid rate."""
    cells = [
        f"{_pct(groups[v]['accuracy'])} {_ci(groups[v]['ci95'])}" if v in groups else "-" for v in levels
    ]
    every = groups["all"]
    return (
        f"| {label} | "
        + " | ".join(cells)
        + f" | {_pct(every['accuracy'])} {_ci(every['ci95'])} | {_pct(every['invalid_rate'])} |"
    )


def _level_table(first: str, levels: list[str]) -> list[str]:
    return [f"| {first} | " + " | ".join(f"level {v}" for v in levels) + " | all | invalid % |",
            "|---|" + "---|" * (len(levels) + 2)]  # fmt: skip


def _accuracy(s: dict, levels: list[str]) -> list[str]:
    lines = ["", "## Accuracy per arm and level (%, 95 % interval)", "", *_level_table("arm", levels)]
    lines += [_level_row(a["label"], a["groups"], levels) for a in s["arms"].values()]
    best = s["best_arm_level3"]
    if "accuracy" in best:
        lines += [
            "",
            f"Best arm on held-out level-3 maps: **{s['arms'][best['arm']]['label']}**, "
            f"{_pct(best['accuracy'])} % {_ci(best['ci95'])}.",
        ]
    return lines


def _grounding(s: dict, levels: list[str]) -> list[str]:
    if "grounding" not in s:
        return []
    return [
        "",
        "## Grounding warm-up: describing held-out maps (%, 95 % interval)",
        "",
        "Correct = the first description names exactly the map's start, goal and holes; the maps are new to "
        "every stage of every arm.",
        "",
        *_level_table("model", levels),
        _level_row("grounded model (the arms' starting point)", s["grounding"]["groups"], levels),
    ]


def _comparisons(s: dict) -> list[str]:
    if not s["comparisons"]:
        return []
    lines = [
        "",
        "## Arm against arm (same test rows)",
        "",
        "| b against a | accuracy b - a (points) | 95 % interval | b right only | a right only | McNemar p | "
        "per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in s["comparisons"]:
        lines.append(
            f"| {s['arms'][c['b']]['label']} vs {s['arms'][c['a']]['label']} | {100 * c['delta']:+.1f} | "
            f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] | {c['b_only']} | {c['a_only']} | "
            f"{_p(c['p_value'])} | {_seeds(c)} |"
        )
    return lines


def _ablations(s: dict) -> list[str]:
    if not s["ablations"]:
        return []
    lines = [
        "",
        "## Latent ablations (decoding the same model; change against its own latents)",
        "",
        "| arm | ablation | accuracy % | change (points) | 95 % interval | McNemar p | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, modes in s["ablations"].items():
        for mode, m in modes.items():
            lines.append(
                f"| {s['arms'][arm]['label']} | {mode} | {_pct(m['groups']['all']['accuracy'])} | "
                f"{100 * m['delta']:+.1f} | [{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}] | "
                f"{_p(m['p_value'])} | {_seeds(m)} |"
            )
    return lines


def _seeds(m: dict) -> str:
    """Seed by seed: the change in points and McNemar's p ("-" when the results predate it)."""
    return "; ".join(f"{100 * x['delta']:+.1f} (p {_p(x['p_value'])})" for x in m.get("per_seed", ())) or "-"


def _arm_settings(results: dict) -> list[str]:
    arms = results.get("arms")
    if not arms:
        return []
    lines = [
        "",
        "## Arms",
        "",
        "| arm | method | answers | settings (both stages) | stage 2 only |",
        "|---|---|---|---|---|",
    ]
    for a in arms.values():
        both = ", ".join(f"{k}={v}" for k, v in a["settings"].items()) or "-"
        second = ", ".join(f"{k}={v}" for k, v in a["stage2"].items()) or "-"
        lines.append(f"| {a['label']} | {a['method']} | {a['style']} | {both} | {second} |")
    return lines


def _probe(results: dict, levels: list[str]) -> list[str]:
    s = results["summary"]
    if not s.get("probe"):
        return []
    fixed = results.get("best_fixed_answer", {})
    lines = [
        "",
        f"## Visual-bottleneck probe ({_PROBE_RULES.get(results['config'].get('probe'), '')})",
        "",
        "Accuracy under the probe far above the best fixed answer (the one plan that solves the most test maps) "
        "means the latents carry the image; its ablations say which part of that is latent content.",
        "",
        *_level_table("arm under the probe", levels),
    ]
    if fixed:
        cells = [f"{_pct(fixed[v]['accuracy'])}" if v in fixed else "-" for v in levels]
        lines.append(
            "| best fixed answer | " + " | ".join(cells) + f" | {_pct(fixed['all']['accuracy'])} | - |"
        )
    lines += [_level_row(s["arms"][arm]["label"], p["groups"], levels) for arm, p in s["probe"].items()]
    lines += ["", "| arm | change | accuracy % | change (points) | 95 % interval | McNemar p | per seed |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, p in s["probe"].items():
        label = s["arms"][arm]["label"]
        rows = [("probe vs own latents, open", p["vs_model"], p["groups"])]
        rows += [(f"{mode} vs probe", m, m["groups"]) for mode, m in p["ablations"].items()]
        for name, m, groups in rows:
            lines.append(
                f"| {label} | {name} | {_pct(groups['all']['accuracy'])} | {100 * m['delta']:+.1f} | "
                f"[{100 * m['ci95'][0]:+.1f}, {100 * m['ci95'][1]:+.1f}] | {_p(m['p_value'])} | {_seeds(m)} |"
            )
    return lines


def _health_table(s: dict) -> list[str]:
    health = {arm: a["latent_health"]["eval"] for arm, a in s["arms"].items() if "latent_health" in a}
    if not health:
        return []
    lines = [
        "",
        "## Latent health (test decoding, model's own latents; mean over seeds)",
        "",
        "| arm | trigger % | spans/answer | cross-sample cos | consecutive cos | norm | norm / target | "
        "effective rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in health.items():
        f = {k: f"{e[k]:.3f}" if k in e else "-" for k in ("cross_sample_cos", "consecutive_cos", "norm",
                                                            "norm_ratio", "effective_rank")}  # fmt: skip
        lines.append(
            f"| {s['arms'][arm]['label']} | {_pct(e.get('trigger_rate', 0.0))} | {e.get('spans_per_answer', 0.0):.2f} | "
            f"{f['cross_sample_cos']} | {f['consecutive_cos']} | {f['norm']} | {f['norm_ratio']} | "
            f"{f['effective_rank']} |"
        )
    return lines


# ------------------------------------------------------------------------------------------------ plots


def write_plots(results: dict, out: Path) -> list[str]:
    """training_curves.png, accuracy.png, ablations.png (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    runs = results["runs"]
    paths = []

    # training curves: loss (left) and validation accuracy (right), stages laid end to end
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in s["arms"]:
        for r in (r for r in runs if r["arm"] == arm):
            offset, xs, ys, vx, vy = 0, [], [], [], []
            for curve in r["curves"]:
                xs += [offset + p["step"] for p in curve["loss"]]
                ys += [p["loss"] for p in curve["loss"]]
                vx += [offset + p["step"] for p in curve["val"]]
                vy += [100 * p["eval_gen/accuracy"] for p in curve["val"]]
                offset = xs[-1] if xs else offset
            label = f"{s['arms'][arm]['label']} (seed {r['seed']})"
            ax_loss.plot(xs, ys, label=label)
            ax_val.plot(vx, vy, marker="o", label=label)
    for w in results.get("warmups", ()):
        curve = w["curves"][0]
        label = f"grounding warm-up (seed {w['seed']})"
        ax_loss.plot(
            [p["step"] for p in curve["loss"]], [p["loss"] for p in curve["loss"]], "k--", label=label
        )
        vx = [p["step"] for p in curve["val"]]
        ax_val.plot(vx, [100 * p["eval_gen/accuracy"] for p in curve["val"]], "k--", marker="s", label=label)
    ax_loss.set(xlabel="optimizer step (stage 2 follows stage 1)", ylabel="training loss", yscale="log")
    ax_val.set(xlabel="optimizer step", ylabel="validation accuracy % (greedy)", ylim=(0, 100))
    ax_val.legend(fontsize=7)
    fig.tight_layout()
    paths.append(str(out / "training_curves.png"))
    save_figure(fig, paths[-1], dpi=110)
    plt.close(fig)

    # accuracy per arm and level with Wilson intervals
    levels = [str(v) for v in results["data"]["levels"]] + ["all"]
    arms = list(s["arms"])
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        g = s["arms"][arm]["groups"]
        acc = [100 * g[v]["accuracy"] if v in g else 0 for v in levels]
        err = [
            [max(0.0, 100 * (g[v]["accuracy"] - g[v]["ci95"][0])) if v in g else 0 for v in levels],
            [max(0.0, 100 * (g[v]["ci95"][1] - g[v]["accuracy"])) if v in g else 0 for v in levels],
        ]
        ax.bar(
            [j + i * width for j in range(len(levels))],
            acc,
            width,
            yerr=err,
            capsize=2,
            label=s["arms"][arm]["label"],
        )
    ax.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(levels))])
    ax.set_xticklabels([f"level {v}" if v != "all" else "all" for v in levels])
    ax.set(ylabel="test accuracy % (95 % Wilson interval)", ylim=(0, 100))
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(str(out / "accuracy.png"))
    save_figure(fig, paths[-1], dpi=110)
    plt.close(fig)

    # ablation deltas with paired bootstrap intervals
    if s["ablations"]:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        names, deltas, lo, hi = [], [], [], []
        for arm, modes in s["ablations"].items():
            for mode, m in modes.items():
                names.append(f"{s['arms'][arm]['label']}\n{mode}")
                deltas.append(100 * m["delta"])
                # a percentile interval need not contain the observed difference: clamp the bar, keep the table exact
                lo.append(max(0.0, 100 * (m["delta"] - m["ci95"][0])))
                hi.append(max(0.0, 100 * (m["ci95"][1] - m["delta"])))
        ax.bar(range(len(names)), deltas, yerr=[lo, hi], capsize=3, color="tab:red")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=6, rotation=60, ha="right")
        ax.set(ylabel="accuracy change vs own latents (points, 95 % CI)")
        fig.tight_layout()
        paths.append(str(out / "ablations.png"))
        save_figure(fig, paths[-1], dpi=110)
        plt.close(fig)
    return paths


def rebuild(out: Path) -> dict:
    """Report and plots again from `out/results.json` (after editing the presentation, or a failed plot)."""
    out = Path(out)
    path = out / "results.json"
    if not path.is_file():
        raise MirageError(f"--report-only: {path} does not exist")
    results = read_json(path)  # not JSON, not an object: one line naming the file
    for key, kind in (("config", dict), ("data", dict), ("runs", list)):
        if not isinstance(results.get(key), kind):
            raise MirageError(
                f"--report-only: {path} is not the results of `mirage-trl experiment` (no {key!r} "
                f"{'list' if kind is list else 'section'})"
            )
    try:
        results["summary"] = summarize_results(results)  # the statistics may have gained a table since
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise MirageError(
            f"--report-only: {path} is not the results of `mirage-trl experiment` ({type(e).__name__}: {e})"
        ) from None
    results["plots"] = write_plots(results, out)
    write_report(results, out / "report.md")
    return results
