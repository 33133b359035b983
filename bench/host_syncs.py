"""Host synchronisations per stage-2 step, counted on the CPU by following which tensors would live on the GPU.

    python bench/host_syncs.py [--quick] [--json PATH]

A GPU runs ahead of Python until the host needs a value or a shape from a tensor on it: `.item()`, `.tolist()`,
`int()` / `float()` / `bool()`, a copy to the host (`.cpu()`, `.to("cpu")`, `.numpy()`), and the operations
whose output shape depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
`repeat_interleave` without `output_size`). On a CPU none of this costs anything, so it is counted instead of
timed: a `TorchFunctionMode` follows every tensor operation of one step, marks as "device" tensors the model's
weights, the batch, and everything computed from them (and what is moved with `.to(some_tensor.device)`), marks
copies to `"cpu"` as host tensors, and counts the synchronising operations applied to device tensors. Index
planning done on host tensors is free, as it would be on a GPU machine.

The step: `bench/stage2_engine.py`'s batch (8 rows of ~600 tokens, three spans of k = 4), `self_latent_forward`
with the rounds (with and without their checkpointing) + the trainers' text cross-entropy + backward. Goal: at
most 2 per step. Also printed: which operations synchronise, and how often.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOAL = 2
VALUE_READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy"}
DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


LIBRARIES = ("mirage_trl", "trl", "transformers", "peft", "accelerate")


def _asked_by() -> str:
    """The library whose code asked for the value: the first caller outside torch and this file."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if f"{Path('torch')}/" not in name and not name.endswith("host_syncs.py"):
            return next((lib for lib in LIBRARIES if f"/{lib}/" in name), "other")
        frame = frame.f_back
    return "other"


class SyncCounter:
    """Counts the synchronising operations on device tensors inside `with counter.mode():`, by operation and by
    the library that asked for them."""

    def __init__(self, device_tensors):
        self._device: dict[int, weakref.ref] = {}  # by identity (a tensor's == is elementwise)
        self.calls: collections.Counter = collections.Counter()
        self.libraries: collections.Counter = collections.Counter()
        for t in device_tensors:
            self.add(t)

    def add(self, t) -> None:
        self._device[id(t)] = weakref.ref(t)

    def is_device(self, t) -> bool:
        ref = self._device.get(id(t))
        return ref is not None and ref() is t

    def mode(self):
        from torch.overrides import TorchFunctionMode

        counter = self

        class Follow(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                return counter.record(getattr(func, "__name__", ""), args, kwargs, out)

        return Follow()

    def record(self, name, args, kwargs, out):
        """Count `name` if it synchronises on a device tensor, mark `out`; returns `out` (a host copy of a device
        tensor is a new tensor even where the CPU would return the same one)."""
        import torch

        on_device = any(self.is_device(t) for t in _tensors((args, kwargs)))
        target = kwargs.get("device", args[1] if name == "to" and len(args) > 1 else None)
        if name in ("cpu",) or (name == "to" and isinstance(target, str) and target == "cpu"):
            if on_device:
                self._count("copy to the host")
                if out is args[0]:
                    out = out.clone()
            return out
        if name == "to" and isinstance(target, torch.device):
            on_device = True  # moved to a tensor's device: a device tensor on a GPU machine
        if not on_device:
            if isinstance(kwargs.get("device"), torch.device):  # created on a tensor's device
                for t in _tensors(out):
                    self.add(t)
            return out
        if name in VALUE_READS or name in DATA_SHAPED:
            self._count(name)
        elif name in ("__getitem__", "__setitem__") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self._count("boolean-mask indexing")
        elif (
            name == "repeat_interleave"
            and "output_size" not in kwargs
            and len(args) > 1
            and isinstance(args[1], torch.Tensor)
        ):
            self._count("repeat_interleave")
        for t in _tensors(out):
            self.add(t)
        return out

    def _count(self, operation: str) -> None:
        self.calls[operation] += 1
        self.libraries[_asked_by()] += 1


def count(step, device_tensors) -> dict:
    """The syncs of one call of `step` (after one warm-up call: one-time work is not a per-step cost)."""
    step()
    counter = SyncCounter(device_tensors)
    with counter.mode():
        step()
    return {
        "syncs": sum(counter.calls.values()),
        "by_operation": dict(counter.calls.most_common()),
        "by_library": dict(counter.libraries.most_common()),
    }


def trainer_steps(quick: bool, tmp: Path) -> dict:
    """Whole trainer steps, each beside the plain TRL trainer's on the same rows: `compute_loss` + backward of
    `MirageSFTTrainer` (stage 1, stage 2) and TRL's `SFTTrainer`; the training pass of `MirageGRPOTrainer` and TRL's
    `GRPOTrainer` (`_compute_loss` + backward on one generated batch; the rollout is not counted: latent decoding
    keeps its one sync per generated token, as `generate` does)."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bench import grpo as grpo_bench
    from bench.stage1 import MODEL, make_rows, plain_sft_trainer
    from mirage_trl.configs import MirageGRPOConfig, MirageSFTConfig
    from mirage_trl.data.images import load_image
    from mirage_trl.data.reference import _features, strip_latent_markers
    from mirage_trl.models.tiny import build_tiny_model
    from mirage_trl.trainers.grpo import MirageGRPOTrainer
    from mirage_trl.trainers.sft import MirageSFTTrainer

    out = {}
    common = dict(
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1
    )
    rows = make_rows(tmp, 4, 1 if quick else 2)
    plain_rows = [strip_latent_markers(r) for r in rows]
    for stage in (1, 2):
        model, processor = build_tiny_model(seed=0, **({} if quick else MODEL))
        trainer = MirageSFTTrainer(
            model=model,
            args=MirageSFTConfig(output_dir=str(tmp / f"m{stage}"), stage=stage, max_length=None, **common),
            train_dataset=Dataset.from_list(rows, features=_features()),
            processing_class=processor,
        )
        batch = trainer.data_collator(rows)
        model.train()
        out[f"MirageSFTTrainer stage {stage}"] = count(
            lambda t=trainer, m=model, b=batch: t.compute_loss(m, b).backward(), _device_tensors(model, batch)
        )
    plain = plain_sft_trainer(model, processor, tmp / "t", plain_rows, max_length=None, **common)
    full = trainer.data_collator(plain_rows)
    keys = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    plain_batch = {k: full[k] for k in keys if k in full}
    out["TRL SFTTrainer"] = count(
        lambda: plain.compute_loss(model, dict(plain_batch)).backward(), _device_tensors(model, plain_batch)
    )

    plain_model, mirage_model, processor, tokens, plain_bias, latent_bias, _ = grpo_bench.build(True, 4.0)
    data = grpo_bench.rows(tmp, 2)
    grpo = dict(
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=16,
        max_steps=1,
        learning_rate=1e-5,
        seed=0,
        **common,
    )
    mirage = MirageGRPOTrainer(
        mirage_model,
        args=MirageGRPOConfig(output_dir=str(tmp / "mg"), reward_names=["format"], latent_size=4, **grpo),
        train_dataset=Dataset.from_list(data),
        processing_class=processor,
    )
    plain_data = [{"prompt": r["messages"], "images": [load_image(p) for p in r["images"]]} for r in data]
    trl_grpo = GRPOTrainer(
        plain_model,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=GRPOConfig(output_dir=str(tmp / "pg"), **grpo),
        train_dataset=Dataset.from_list(plain_data),
        processing_class=processor,
    )
    grpo_bench.bias_logits(trl_grpo, plain_bias)
    grpo_bench.bias_logits(mirage, latent_bias)
    for name, trainer, inputs in (
        ("MirageGRPOTrainer training pass", mirage, data),
        ("TRL GRPOTrainer training pass", trl_grpo, plain_data),
    ):
        torch.manual_seed(0)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # what `train()` sets before its first step
        batch = trainer._generate_and_score_completions([r for r in inputs for _ in range(2)])
        out[name] = count(
            lambda t=trainer, b=batch: t._compute_loss(t.model, b).backward(),
            _device_tensors(trainer.model, batch),
        )
    return out


def _device_tensors(model, batch) -> list:
    return [*_tensors(batch), *model.parameters(), *model.buffers()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from bench.stage2_engine import FULL, QUICK, setup
    from mirage_trl.latent.losses import text_cross_entropy
    from mirage_trl.latent.stage2 import self_latent_forward
    from mirage_trl.models.families import family

    torch.set_num_threads(1)
    model, tokens, batch = setup(QUICK if args.quick else FULL)
    ids, attn, slots = batch["input_ids"], batch["attention_mask"], batch["slot_mask"]
    labels = torch.where(attn.bool() & ~slots, ids, torch.full_like(ids, -100))  # the trainer's: unshifted
    positions = family(model).position_ids(model, ids, attn)
    on_device = [ids, attn, slots, labels, positions, *model.parameters(), *model.buffers()]

    def stage2(method):
        def step():
            out = self_latent_forward(model, ids, attn, slots, position_ids=positions, method=method)
            ce_sum, n = text_cross_entropy(model, out.hidden_states, labels, {})
            (ce_sum / n).backward()

        return step

    result = {"goal": GOAL, "steps": {}}
    for name, step in (
        ("stage-2 step, rounds", stage2("rounds")),
        ("stage-2 step, rounds_checkpointed", stage2("rounds_checkpointed")),
    ):
        result["steps"][name] = count(step, on_device)
        model.zero_grad(set_to_none=True)
    result["syncs_per_stage2_step"] = max(r["syncs"] for r in result["steps"].values())
    with tempfile.TemporaryDirectory() as tmp:
        result["trainer_steps"] = trainer_steps(args.quick, Path(tmp))
    trainers = result["trainer_steps"]
    # what mirage-trl adds to a GRPO training pass: its own syncs (TRL's loss metrics are TRL's, paid by both)
    result["syncs_per_grpo_step"] = trainers["MirageGRPOTrainer training pass"]["by_library"].get(
        "mirage_trl", 0
    )
    for name, r in {**result["steps"], **trainers}.items():
        ops = ", ".join(f"{op} {n}" for op, n in r["by_operation"].items()) or "none"
        libs = ", ".join(f"{lib} {n}" for lib, n in r.get("by_library", {}).items())
        print(f"{name}: {r['syncs']} host syncs: {ops}" + (f" (asked by {libs})" if libs else ""))
    print(
        f"per stage-2 step (model): {result['syncs_per_stage2_step']}, per GRPO training pass (mirage-trl's own): "
        f"{result['syncs_per_grpo_step']} (goal <= {GOAL} each)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
