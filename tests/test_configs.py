"""The config classes document every Mirage parameter (what `help(MirageSFTConfig)` shows)."""

from __future__ import annotations

import ast
import dataclasses

import pytest
from trl import GRPOConfig, SFTConfig

from mirage_trl.configs import MirageGRPOConfig, MirageSFTConfig


@pytest.mark.parametrize(("cls", "base"), [(MirageSFTConfig, SFTConfig), (MirageGRPOConfig, GRPOConfig)])
def test_every_mirage_parameter_is_in_the_docstring_with_its_default(cls, base):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    own = sorted(fields.keys() - {f.name for f in dataclasses.fields(base)})
    assert "latent_size" in own and "markers_only" in own
    for name in own:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        entry = f"        {name} ("
        assert entry in cls.__doc__, name
        line = cls.__doc__.split(entry, 1)[1].splitlines()[0]
        documented = ast.literal_eval(line.split("defaults to `", 1)[1].split("`", 1)[0])
        assert documented == default, (name, documented, default)
