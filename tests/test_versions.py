"""Declared versions are tested versions: the lower bounds in pyproject.toml are the oldest tested (`make
test-min` runs the exactness tests there), the KV cache goes under the name the installed transformers takes,
the private upstream methods the trainers override exist (and an override cannot be added without listing it),
and `mirage-trl env` warns about versions outside the tested range."""

from __future__ import annotations

import inspect
import re

import pytest
import tomllib
import torch
from helpers import REPO

from mirage_trl.errors import MirageError
from mirage_trl.models.families import cache_kwargs
from mirage_trl.versions import PRIVATE_APIS, TESTED, check_private_apis, untested


def test_every_lower_bound_is_the_oldest_tested_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    bounds = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep)
        if m:
            bounds[m[1].replace("-", "_")] = m[2]
    from packaging.version import Version

    for name, (oldest, _) in TESTED.items():
        assert name in bounds, f"{name} has no lower bound in pyproject.toml"
        assert Version(bounds[name]) == Version(oldest), (name, bounds[name], oldest)


class OldSignature(torch.nn.Module):
    """A forward as transformers < 5.2x spells it: the cache is `past_key_values`, the rest goes to **kwargs."""

    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return past_key_values


class NewSignature(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return cache


def test_the_cache_goes_under_the_name_the_forward_takes():
    cache = object()
    # the other name would vanish into **kwargs: the forward would run without a cache and say nothing
    assert OldSignature()(**cache_kwargs(OldSignature(), cache)) is cache
    assert NewSignature()(**cache_kwargs(NewSignature(), cache)) is cache
    from mirage_trl.models.tiny import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    for module in (model, model.model.language_model):
        (name,) = cache_kwargs(module, cache)
        assert name in inspect.signature(type(module).forward).parameters


def test_the_private_methods_the_trainers_rely_on_exist_and_a_missing_one_is_one_line(monkeypatch):
    check_private_apis()  # the installed versions have every one
    import trl

    monkeypatch.delattr(trl.GRPOTrainer, "_compute_loss")
    with pytest.raises(MirageError, match=r"^trl\.GRPOTrainer\._compute_loss: gone in the installed transformers .* mirage-trl's trainers rely on them"):  # fmt: skip
        check_private_apis()


def test_every_private_override_of_the_trainers_is_listed():
    """A new override of an upstream underscore method must be listed (and so checked)."""
    import transformers
    import trl

    from mirage_trl.trainers.common import MirageTrainerMixin
    from mirage_trl.trainers.grpo import MirageGRPOTrainer
    from mirage_trl.trainers.sft import MirageSFTTrainer

    listed = {name for names in PRIVATE_APIS.values() for name in names}
    for ours, upstream in ((MirageSFTTrainer, trl.SFTTrainer), (MirageGRPOTrainer, trl.GRPOTrainer)):
        defined = set(vars(ours)) | set(vars(MirageTrainerMixin))
        overrides = {
            n
            for n in defined
            if n.startswith("_") and not n.startswith("__") and callable(getattr(upstream, n, None))
        }
        assert overrides <= listed, overrides - listed
    assert "_save_checkpoint" in vars(MirageTrainerMixin) and hasattr(
        transformers.Trainer, "_save_checkpoint"
    )


def test_env_warns_about_versions_outside_the_tested_range(capsys, monkeypatch):
    lines = untested(
        {"transformers": "5.17.0", "trl": "9.0.0", "torch": "2.13.0+cpu", "peft": "not installed"}
    )
    assert lines == [
        "transformers 5.17.0 is older than the oldest tested (5.18.0); pip install 'transformers>=5.18.0'",
        "trl 9.0.0 is newer than the newest tested (1.16.0); if something breaks, `pip install 'trl==1.16.0'` and "
        "report it with this output",
    ]
    import mirage_trl.cli.env as env
    from mirage_trl.cli import main

    real = env.versions
    monkeypatch.setattr(env, "versions", lambda: {**real(), "transformers version": "5.17.0"})
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "- transformers version: 5.17.0" in out
    assert "warning: transformers 5.17.0 is older than the oldest tested (5.18.0)" in out
