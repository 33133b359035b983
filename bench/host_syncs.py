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


class SyncCounter:
    """Counts the synchronising operations on device tensors inside `with counter.mode():`."""

    def __init__(self, device_tensors):
        self._device: dict[int, weakref.ref] = {}  # by identity (a tensor's == is elementwise)
        self.calls: collections.Counter = collections.Counter()
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
                self.calls["copy to the host"] += 1
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
        if name in VALUE_READS:
            self.calls[name] += 1
        elif name in DATA_SHAPED:
            self.calls[name] += 1
        elif name in ("__getitem__", "__setitem__") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self.calls["boolean-mask indexing"] += 1
        elif (
            name == "repeat_interleave" and "output_size" not in kwargs and isinstance(args[1], torch.Tensor)
        ):
            self.calls["repeat_interleave"] += 1
        for t in _tensors(out):
            self.add(t)
        return out


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
        step()  # warm-up: one-time work is not a per-step cost
        model.zero_grad(set_to_none=True)
        counter = SyncCounter(on_device)
        with counter.mode():
            step()
        model.zero_grad(set_to_none=True)
        calls = counter.calls
        result["steps"][name] = {"syncs": sum(calls.values()), "by_operation": dict(calls.most_common())}
    result["syncs_per_stage2_step"] = max(r["syncs"] for r in result["steps"].values())
    for name, r in result["steps"].items():
        ops = ", ".join(f"{op} {n}" for op, n in r["by_operation"].items()) or "none"
        print(f"{name}: {r['syncs']} host syncs (goal <= {GOAL}): {ops}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
