"""Whether a Trainer `checkpoint-N` folder is complete, and the one-line refusal of one that is not.

Mirage trainers write each checkpoint under a hidden name and rename it when complete
(`trainers.common.MirageTrainerMixin`); a folder without the Trainer's state file (written last) is
what an interrupted save, or a copy made by hand, leaves. Resume, export and eval check here.
"""

from __future__ import annotations

import glob
import os
import re

from .errors import MirageError

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
