"""GRPO reward functions: TRL's call signature, string and conversational completions."""

from __future__ import annotations

import json

import pytest

from mirage_trl.errors import MirageError
from mirage_trl.rewards import (
    DEFAULT_REWARD_WEIGHTS,
    REWARD_FUNCS,
    accuracy_reward,
    format_reward,
    get_reward_funcs,
)

GRID = json.dumps([[1, 0], [-1, 2]])
COLUMNS = {
    "benchmark": ["vsp_planning", "vsp_planning", "vsp_reasoning", "jigsaw"],
    "answer": ["", "", "B", "A"],
    "map_desc": [GRID, GRID, "", ""],
    "level": [2, 2, 3, 0],
}
TEXTS = [
    "<think> right then down </think> \\boxed{RD}",  # correct, formatted
    "\\boxed{DR}",  # falls into the hole, no think block
    "<think> hmm </think> The answer is \\boxed{B}.",  # correct
    "<think> unsure </think> maybe A",  # no boxed answer
]


def test_string_completions():
    prompts = ["p"] * 4
    assert accuracy_reward(prompts, TEXTS, **COLUMNS) == [1.0, 0.0, 1.0, 0.0]
    assert format_reward(prompts, TEXTS, **COLUMNS) == [1.0, 0.0, 1.0, 0.0]


def test_conversational_completions():
    as_str = [[{"role": "assistant", "content": t}] for t in TEXTS]
    as_parts = [[{"role": "assistant", "content": [{"type": "text", "text": t}]}] for t in TEXTS]
    prompts = [[{"role": "user", "content": "p"}]] * 4
    for completions in (as_str, as_parts):
        assert accuracy_reward(prompts, completions, **COLUMNS) == [1.0, 0.0, 1.0, 0.0]
        assert format_reward(prompts, completions, **COLUMNS) == [1.0, 0.0, 1.0, 0.0]


def test_registry_and_errors():
    assert get_reward_funcs(["accuracy", "format"]) == [accuracy_reward, format_reward]
    assert set(REWARD_FUNCS) == set(DEFAULT_REWARD_WEIGHTS)
    assert DEFAULT_REWARD_WEIGHTS == {"accuracy": 0.9, "format": 0.1}
    with pytest.raises(MirageError) as e:
        get_reward_funcs(["accuracy", "length"])
    assert str(e.value) == "unknown reward 'length'; valid: accuracy, format"
    with pytest.raises(MirageError) as e:
        accuracy_reward(["p"], ["\\boxed{A}"], answer=["A"])
    assert (
        str(e.value) == "reward needs the dataset column 'benchmark'; keep it (remove_unused_columns=False)"
    )
    with pytest.raises(MirageError) as e:
        accuracy_reward(["p"], ["\\boxed{A}"], benchmark=["blink"], answer=["A"])
    assert (
        str(e.value)
        == "unknown benchmark 'blink'; valid: vsp_planning, vsp_reasoning, vsp_grounding, jigsaw, sat, comt"
    )
