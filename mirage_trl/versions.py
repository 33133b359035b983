"""The library versions mirage-trl is tested with, and the private TRL and transformers APIs its trainers rely on.

`TESTED`: for each library, the oldest version the exactness tests pass on (what `make test-min` installs, the
lower bound in pyproject.toml) and the newest one CI ran the whole suite on. `mirage-trl env` warns about an
installed version outside that range (`untested`).

`PRIVATE_APIS`: the underscore methods of TRL's and transformers' trainers that mirage-trl's trainers override or
call. An upgrade that renames one would not fail: the override would simply never be called again (checkpoints
written in place, losses computed without latents). `check_private_apis` fails in one line naming what is gone;
the trainers call it when they are built, and a test runs it on the installed versions.
"""

from __future__ import annotations

import importlib

from .errors import MirageError

# (oldest with the exactness tests passing: `make test-min`, newest with the whole suite passing: CI), 2026-12-03
TESTED = {
    "torch": ("2.13.0", "2.13.0"),
    "transformers": ("5.18.0", "5.25.0"),
    "trl": ("1.16.0", "1.16.0"),
    "peft": ("0.21.0", "0.21.2"),
    "accelerate": ("1.10.1", "1.16.0"),
    "datasets": ("4.7.0", "5.2.0"),
    "huggingface_hub": ("1.31.0", "2.4.0"),
    # the [deepspeed] extra: older releases fail ZeRO-3 with checkpointed rounds (empty frozen weights)
    "deepspeed": ("0.19.8", "0.19.8"),
}

# "module:Class" -> the private methods the trainers override or call there
PRIVATE_APIS = {
    "transformers:Trainer": (
        "_save_checkpoint",  # checkpoints staged, settings added, own rotation (trainers.common)
        "_get_output_dir",  # where a staged checkpoint is written
        "_load_from_checkpoint",  # resume loads the weights under the hub's key names
        "_get_grad_norm",  # the non-finite gradient guard
        "_prepare_inputs",
    ),
    "trl:GRPOTrainer": (
        "_generate_and_score_completions",  # rollouts with latent decoding
        "_generate",
        "_generate_single_turn",
        "_compute_loss",  # the training pass through the latents
        "_get_per_token_logps_and_entropies",
    ),
}


def _key(version: str):
    from packaging.version import Version

    return Version(version)


def untested(installed: dict[str, str]) -> list[str]:
    """One line per library of `installed` ({name: version}) outside its tested range."""
    lines = []
    for name, (oldest, newest) in TESTED.items():
        version = installed.get(name)
        if not version or version == "not installed":
            continue
        base = version.split("+")[0]  # 2.13.0+cpu is 2.13.0
        if _key(base) < _key(oldest):
            lines.append(
                f"{name} {version} is older than the oldest tested ({oldest}); pip install '{name}>={oldest}'"
            )
        elif _key(base) > _key(newest):
            lines.append(
                f"{name} {version} is newer than the newest tested ({newest}); if something breaks, "
                f"`pip install '{name}=={newest}'` and report it with this output"
            )
    return lines


def missing_private_apis() -> list[str]:
    """The `Class._method` names of `PRIVATE_APIS` the installed libraries do not have."""
    missing = []
    for where, names in PRIVATE_APIS.items():
        module, cls = where.split(":")
        owner = getattr(importlib.import_module(module), cls)
        missing += [f"{module}.{cls}.{name}" for name in names if not callable(getattr(owner, name, None))]
    return missing


def check_private_apis() -> None:
    """One line naming every private method mirage-trl relies on that the installed TRL / transformers lack."""
    missing = missing_private_apis()
    if missing:
        from importlib.metadata import version

        raise MirageError(
            f"{', '.join(missing)}: gone in the installed transformers {version('transformers')} / trl "
            f"{version('trl')}, and mirage-trl's trainers rely on them; install a tested version (`mirage-trl env` "
            "says which)"
        )
