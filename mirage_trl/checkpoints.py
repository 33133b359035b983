"""Whether a Trainer `checkpoint-N` folder is complete, and the one-line refusal of one that is not.

Mirage trainers write each checkpoint under a hidden name and rename it when complete
(`trainers.common.MirageTrainerMixin`); a folder without the Trainer's state file (written last) is
what an interrupted save, or a copy made by hand, leaves. Resume, export and eval check here.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

from .errors import MirageError
from .redact import is_secret_name, scrub

# The file whose presence makes a `checkpoint-N` folder complete: the Trainer writes its state last.
CHECKPOINT_STATE = "trainer_state.json"


def checkpoint_is_complete(folder) -> bool:
    return os.path.isdir(folder) and os.path.isfile(os.path.join(folder, CHECKPOINT_STATE))


def newest_complete_checkpoint(run_dir) -> str | None:
    found = []
    for path in glob.glob(os.path.join(str(run_dir), "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and checkpoint_is_complete(path):
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def own_checkpoints(run_dir) -> list[str]:
    """The complete `checkpoint-N` folders of `run_dir` that a mirage-trl run wrote (they hold its
    `run_args.json`), oldest first: the only ones a run may resume from, replace or rotate away."""
    found = []
    for path in glob.glob(os.path.join(str(run_dir), "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and checkpoint_is_complete(path) and os.path.isfile(os.path.join(path, RUN_ARGS_FILE)):
            found.append((int(m.group(1)), path))
    return [path for _, path in sorted(found)]


def rotate_own_checkpoints(
    run_dir, save_total_limit: int | None, best_model_checkpoint: str | None = None
) -> None:
    """`save_total_limit` as the Trainer means it (the newest and the best are kept), counting and deleting only
    the checkpoints a run wrote (`own_checkpoints`): a user's `checkpoint-0/` beside them is never touched."""
    if not save_total_limit or save_total_limit <= 0:
        return
    own = own_checkpoints(run_dir)
    keep = {own[-1]} if own else set()
    if best_model_checkpoint:
        keep.add(os.path.normpath(str(best_model_checkpoint)))
    excess = len(own) - max(save_total_limit, len(keep))
    for path in [p for p in own if os.path.normpath(p) not in keep][: max(0, excess)]:  # oldest first
        shutil.rmtree(path, ignore_errors=True)


def check_resume_checkpoint(path, flag: str = "--resume_from_checkpoint") -> None:
    """A checkpoint to resume from exists, is a folder and is complete; otherwise one line naming the newest
    complete one beside it."""
    if path is None or isinstance(path, bool):
        return
    path = str(path)
    if not os.path.exists(path):
        raise MirageError(f"{flag} {path}: no such checkpoint folder")
    if not os.path.isdir(path):
        raise MirageError(f"{flag} {path}: is a file, expected a checkpoint-N folder")
    if not checkpoint_is_complete(path):
        newest = newest_complete_checkpoint(os.path.dirname(os.path.abspath(path)))
        hint = f"; the newest complete one is {newest}" if newest else ""
        raise MirageError(
            f"{flag} {path}: not a complete checkpoint (no {CHECKPOINT_STATE}: an interrupted save or not a "
            f"checkpoint){hint}"
        )


# ---------------------------------------------------------------------------------------- same run
RUN_ARGS_FILE = "run_args.json"  # the training arguments of the run that wrote a checkpoint (no credentials)
# What may differ between a run and its resume: where and how it logs, saves, uploads and resumes, and how long
# it trains. Anything else changes the run (its rate, seed, batch, data order, Mirage settings).
RESUMABLE_ARGS = frozenset(
    {
        "output_dir", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step", "report_to",
        "run_name", "project", "trackio_space_id", "save_steps", "save_strategy", "save_total_limit",
        "save_only_model", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_strategy",
        "hub_private_repo", "hub_revision", "hub_always_push", "disable_tqdm", "dataloader_num_workers",
        "max_steps", "num_train_epochs", "eval_steps", "eval_strategy", "per_device_eval_batch_size",
        "overwrite_output_dir", "log_level", "log_level_replica", "log_on_each_node",
    }
)  # fmt: skip


def run_args(args) -> dict:
    """A training config as JSON values, credentials left out (what `run_args.json` holds)."""
    values = json.loads(args.to_json_string())
    # secret-named fields left out; a secret value in any other field (a token pasted as a run name) scrubbed
    return {
        k: scrub(v, args) if isinstance(v, str) else v for k, v in values.items() if not is_secret_name(k)
    }


def check_same_run(checkpoint, args, flag: str = "--output_dir") -> None:
    """Resuming `checkpoint` with `args` must continue the same run: a run that already finished, or arguments
    that differ in anything but `RESUMABLE_ARGS`, are refused in one line naming each flag with its old and new
    value. A checkpoint written before this record existed is resumed as it is."""
    state = os.path.join(str(checkpoint), CHECKPOINT_STATE)
    try:
        with open(state, encoding="utf-8") as f:
            saved_state = json.load(f)
        step, planned = int(saved_state.get("global_step", 0)), int(saved_state.get("max_steps", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        step, planned = 0, 0
    if planned > 0 and step >= planned and (args.max_steps <= 0 or args.max_steps <= step):
        raise MirageError(
            f"{flag} {os.path.dirname(os.path.abspath(str(checkpoint)))}: the run there already finished "
            f"({os.path.basename(str(checkpoint))} is step {step} of {planned}); nothing to train: give a new "
            f"{flag}, or a larger --max_steps to train on"
        )
    path = os.path.join(str(checkpoint), RUN_ARGS_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
    except (OSError, ValueError) as exc:
        raise MirageError(f"{path}: cannot read it as JSON ({exc})") from None
    now = run_args(args)
    changed = [
        f"--{k} {json.dumps(before[k])} -> {json.dumps(now[k])}"
        for k in sorted(set(before) & set(now))
        if k not in RESUMABLE_ARGS and before[k] != now[k]
    ]
    if changed:
        raise MirageError(
            f"{flag}: {checkpoint} was trained with other arguments ({'; '.join(changed)}); resume with the same "
            f"arguments, or start afresh with a new {flag}"
        )
