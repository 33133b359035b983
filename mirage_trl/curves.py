"""Training curves of a run, from the Trainer's own `trainer_state.json` (its `log_history`), drawn with
matplotlib: what `mirage-trl plot OUTPUT_DIR` shows, for any mirage-trl (or plain TRL) training output."""

from __future__ import annotations

from pathlib import Path

from .checkpoints import newest_complete_checkpoint
from .errors import MirageError
from .io import read_json

# Logged values that are bookkeeping, not curves.
_NOT_CURVES = {
    "epoch",
    "step",
    "total_flos",
    "train_runtime",
    "train_samples_per_second",
    "train_steps_per_second",
}


def find_state(folder) -> Path:
    """`trainer_state.json` of a training output: its own, or else the newest complete checkpoint's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MirageError(f"{folder}: no such training output folder")
    if (folder / "trainer_state.json").is_file():
        return folder / "trainer_state.json"
    newest = newest_complete_checkpoint(folder)
    if newest is None:
        raise MirageError(f"{folder}: no trainer_state.json, in the folder or in a complete checkpoint-N")
    return Path(newest) / "trainer_state.json"


def read_curves(state_path) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values) for every number logged during training, in step order."""
    history = read_json(state_path).get("log_history")
    if not isinstance(history, list):
        raise MirageError(f"{state_path}: no log_history list")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for entry in history:
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        for name, value in entry.items():
            if name in _NOT_CURVES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = curves.setdefault(name, ([], []))
            steps.append(step)
            values.append(float(value))
    if not curves:
        raise MirageError(f"{state_path}: the log history holds no numbers to draw")
    return curves


def plot_curves(curves: dict[str, tuple[list[int], list[float]]], path, title: str = "") -> list[str]:
    """One small panel per logged number (loss first), with labelled axes; returns the names drawn."""
    import math

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = sorted(curves, key=lambda n: (n != "loss", n.startswith("latent/"), n))
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = curves[name]
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set(title=name, xlabel="step")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return names
