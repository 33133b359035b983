"""Credentials never leave the process: what is recorded (launch lines, settings files, model cards,
`training_args.bin`) is written with every secret replaced.

A setting is a secret when its name says so (`hub_token`, `*_token`, `*secret*`, `*password*`,
`*api_key*`, ...); names that only count or name tokens of a vocabulary (`pad_token`,
`max_new_tokens`) are not. Values of secret-named environment variables (`HF_TOKEN`,
`WANDB_API_KEY`, ...) are scrubbed from any text we write as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re

REDACTED = "***"
# A word of the name (split at _ - .) that marks a credential.
_SECRET_WORDS = re.compile(
    r"(^|[_\-.])(token|secret|password|passwd|api_?key|access_?key|auth|credentials?)($|[_\-.])", re.I
)
# Tokenizer vocabulary settings that contain the word "token" but hold no credential.
_NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
# Shorter values are not scrubbed from free text (a one-letter "secret" would blank every such letter).
_MIN_SCRUB_LENGTH = 6


def is_secret_name(name: str) -> bool:
    name = name.lstrip("-").replace("-", "_").lower()
    return name not in _NOT_SECRET and bool(_SECRET_WORDS.search(name))


def secret_values(*objects) -> list[str]:
    """Secret values held by secret-named environment variables and by secret-named fields of `objects`."""
    values = [v for k, v in os.environ.items() if is_secret_name(k) and v]
    for obj in objects:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name, None)
                if is_secret_name(f.name) and isinstance(value, str) and value:
                    values.append(value)
    return sorted({v for v in values if len(v) >= _MIN_SCRUB_LENGTH}, key=len, reverse=True)


def scrub(text: str, *objects) -> str:
    """`text` with every known secret value (see `secret_values`) replaced by `***`."""
    for value in secret_values(*objects):
        text = text.replace(value, REDACTED)
    return text


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the value of every secret flag (`--hub_token X`, `--hub_token=X`) replaced."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and is_secret_name(arg.split("=", 1)[0]):
            if "=" in arg:
                arg = arg.split("=", 1)[0] + "=" + REDACTED
            else:
                hide_next = True
        out.append(scrub(arg))
    return out


@contextlib.contextmanager
def redacted_args(args):
    """Secret-named fields of a (training arguments) dataclass set to None for the duration.

    `Trainer` pickles its whole `TrainingArguments` into `training_args.bin` of every output and
    checkpoint folder; saving under this context keeps `hub_token` out of them, while uploads
    that run after it still have the token.
    """
    saved = {}
    if dataclasses.is_dataclass(args):
        for f in dataclasses.fields(args):
            value = getattr(args, f.name, None)
            if is_secret_name(f.name) and isinstance(value, str) and value:
                saved[f.name] = value
                setattr(args, f.name, None)
    try:
        yield args
    finally:
        for name, value in saved.items():
            setattr(args, name, value)
