"""What the console shows: progress bars only on a terminal, and no notice the user cannot act on.

`quiet_console` runs first in every command and recipe. On a terminal the libraries' progress bars (loading and
saving weights, datasets) stay; in a log file they would be one carriage-return-separated line per update, so
they are off there (the Trainer's own bar follows `disable_tqdm`, see `configs.quiet_defaults`). Deprecation
notices that one library raises about another's renamed attribute are filtered: no setting of the user's causes
them. `end_progress_bars` closes open bars so that an error message starts a line of its own, and
`HelpFormatter` shows each option's default once in `--help`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

# (message, category): raised inside the libraries, not by anything the user set
LIBRARY_NOTICES = (
    # PEFT 0.21 reads `is_gradient_checkpointing`, which transformers 5.2x renamed `is_activation_checkpointing`
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
)


# (logger, text): library log lines about nothing the user set. bitsandbytes' CPU backend (0.50, on CPUs with
# AVX512-BF16) tries to fetch an optional hub kernel when imported and logs a warning when it cannot (offline,
# untrusted publisher); it then runs its own kernel.
LIBRARY_LOG_NOTICES = (("bitsandbytes.backends.cpu.ops", "from kernels-community"),)


def quiet_console() -> None:
    for message, category in LIBRARY_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in LIBRARY_LOG_NOTICES:
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())
    if sys.stderr.isatty():
        return
    # The libraries read these when they are imported (workers launched from here inherit them); those already
    # imported are told directly. Nothing heavy is imported here: `--help` must not pay for torch.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def end_progress_bars() -> None:
    """Close every open tqdm bar (the Trainer's): a closed bar ends its line, so what is printed next starts
    on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # a bar that cannot be closed still must not hide the error
            pass
    sys.stderr.flush()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each default once: after the help text, unless that text already states it, and never
    "(default: None)" (an option that is unset by default says in its help what unset means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)
