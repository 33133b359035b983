"""GRPO reward functions, looked up by name from the recipe YAML (as in open-r1's `rewards.py`).

Each follows TRL's signature `fn(prompts, completions, **kwargs) -> list[float]`: completions
are strings or conversations (`[{"role": "assistant", "content": ...}]`), and kwargs carry the
dataset columns as lists (`benchmark`, `answer`, `map_desc`, `source`, ...).
Stage 3 (docs section 3): reward = 0.9 x accuracy + 0.1 x format.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import MirageError
from .grading import format_ok, grade

DEFAULT_REWARD_WEIGHTS = {"accuracy": 0.9, "format": 0.1}


def completion_text(completion) -> str:
    """The text of a completion given as a string or as a conversation (last assistant turn)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    for message in reversed(list(completion)):
        if message.get("role", "assistant") == "assistant":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return "".join(c.get("text") or "" for c in content or [] if c.get("type") == "text")
    return ""


def _column(kwargs: dict, name: str, n: int) -> list:
    if name not in kwargs:
        raise MirageError(f"reward needs the dataset column {name!r}; keep it (remove_unused_columns=False)")
    values = kwargs[name]
    if len(values) != n:
        raise MirageError(f"reward: column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def accuracy_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 if `grade` marks the completion correct for its row's benchmark, else 0.0."""
    n = len(completions)
    benchmarks = _column(kwargs, "benchmark", n)
    row_keys = [k for k in ("answer", "map_desc", "source") if k in kwargs]
    rewards = []
    for i, completion in enumerate(completions):
        row = {k: kwargs[k][i] for k in row_keys}
        rewards.append(1.0 if grade(benchmarks[i], completion_text(completion), row).correct else 0.0)
    return rewards


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for a `<think>...</think>` block and a boxed answer, else 0.0."""
    return [1.0 if format_ok(completion_text(c)) else 0.0 for c in completions]


REWARD_FUNCS: dict[str, Callable] = {"accuracy": accuracy_reward, "format": format_reward}


def get_reward_funcs(names) -> list[Callable]:
    """The reward functions for `names` (e.g. `["accuracy", "format"]`), in order."""
    if isinstance(names, str):
        names = [names]
    funcs = []
    for name in names:
        if name not in REWARD_FUNCS:
            raise MirageError(f"unknown reward {name!r}; valid: {', '.join(REWARD_FUNCS)}")
        funcs.append(REWARD_FUNCS[name])
    return funcs
