"""mirage-trl: Mirage latent visual reasoning (arXiv 2506.17218) for vision-language models, on TRL.

Heavy names (trainers, configs, generation) are imported lazily so that `import mirage_trl`
and the CLI stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "MirageError": "mirage_trl.errors",
    "MirageSFTConfig": "mirage_trl.configs",
    "MirageGRPOConfig": "mirage_trl.configs",
    "MirageSFTTrainer": "mirage_trl.trainers.sft",
    "MirageGRPOTrainer": "mirage_trl.trainers.grpo",
    "MirageDataCollator": "mirage_trl.latent.collator",
    "LatentTokens": "mirage_trl.models.tokens",
    "add_latent_tokens": "mirage_trl.models.prepare",
    "MirageSettings": "mirage_trl.models.settings",
    "generate_with_latents": "mirage_trl.generation",
    "load_model": "mirage_trl.models.load",
    "grade": "mirage_trl.grading",
    "load_reference_jsonl": "mirage_trl.data.reference",
    "load_data": "mirage_trl.data.sources",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mirage_trl' has no attribute {name!r}")
