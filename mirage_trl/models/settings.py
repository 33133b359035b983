"""The Mirage settings of a model: one type, `MirageSettings`, the only reader and writer of them.

They travel in two places, always the same values:

* `config.json` key "mirage" (the attribute `model.config.mirage`), so anything `save_pretrained`
  writes carries them;
* `mirage_config.json` in every folder mirage-trl writes: training outputs, every `checkpoint-N` of
  every Mirage trainer, exports. An adapter folder has no config.json of its own, so for adapters the
  file is the only place.

What they hold: the latent size k and the latent token names (the model's inputs depend on both),
the slot settings (what a slot is fed after stage 1: `latent_slot_input`, `latent_feedback_norm`,
the measured stage-1 `latent_target_norm`), the visual bottleneck the model was last trained with
(`latent_bottleneck`: decoding applies it too), stage 1's latent objective (`latent_loss`,
`latent_temperature`, `latent_variance_weight`, `latent_target`, `latent_target_scale`, `latent_aux_text`,
`latent_only_backprop`: how the latents were taught, so a reader of any later checkpoint or export knows), the stage that wrote them, and provenance
(`stages` run so far, `base_model`, `datasets`, `launch`, and for exports `format`/`exported_from`),
kept as given.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MirageError
from ..io import write_json
from .families import unwrap
from .tokens import LATENT_TOKEN_NAMES

CONFIG_KEY = "mirage"  # config.json
SETTINGS_FILE = "mirage_config.json"

SLOT_INPUTS = ("latent", "zeros")  # "zeros": the markers-only control
FEEDBACK_NORM_CHOICES = ("none", "target")  # the training flag; the saved value is a float or None
# "image": text after a span's start cannot attend to the input image; "strict": no text after the image can, the
# prompt's included (`latent.bottleneck`)
BOTTLENECKS = ("none", "image", "strict")
LATENT_LOSS_NAMES = ("cosine", "contrastive")  # the functions: `latent.losses.LATENT_LOSSES`
LATENT_TARGET_NAMES = ("pooled", "centred", "delta", "selected")  # the functions: `latent.targets`
_OBJECTIVE = {
    "latent_loss": "cosine",
    "latent_temperature": 0.1,
    "latent_variance_weight": 0.0,
    "latent_target": "pooled",
    "latent_target_scale": False,
    "latent_aux_text": 0.0,
    "latent_only_backprop": False,
}
_TYPED = (
    "latent_size",
    "latent_tokens",
    "latent_slot_input",
    "latent_feedback_norm",
    "latent_target_norm",
    "latent_bottleneck",
    *_OBJECTIVE,
    "stage",
)


def _typed(name: str, value, kind: type):
    """`value` as the objective field's type; a JSON bool must be a bool (bool("false") is True)."""
    if kind is bool and not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {value!r}")
    return kind(value)


@dataclass(frozen=True)
class MirageSettings:
    """The Mirage settings of one model (see the module doc); `provenance` keeps every other key."""

    latent_size: int
    latent_slot_input: str = "latent"
    latent_feedback_norm: float | None = None  # None: hidden states are fed back as they are
    latent_target_norm: float | None = None  # mean norm of the stage-1 targets, measured in stage 1
    latent_bottleneck: str = "none"  # as the model was last trained: what decoding applies by default
    latent_loss: str = "cosine"  # stage 1's latent objective (what taught the latents)
    latent_temperature: float = 0.1
    latent_variance_weight: float = 0.0
    latent_target: str = "pooled"
    latent_target_scale: bool = False
    latent_aux_text: float = 0.0
    latent_only_backprop: bool = False
    stage: int | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        if (
            not isinstance(self.latent_size, int)
            or isinstance(self.latent_size, bool)
            or self.latent_size < 1
        ):
            raise MirageError(f"latent_size must be an integer >= 1, got {self.latent_size!r}")
        if self.latent_slot_input not in SLOT_INPUTS:
            raise MirageError(
                f"latent_slot_input {self.latent_slot_input!r}: choose one of {', '.join(SLOT_INPUTS)}"
            )
        if self.latent_bottleneck not in BOTTLENECKS:
            raise MirageError(
                f"latent_bottleneck {self.latent_bottleneck!r}: choose one of {', '.join(BOTTLENECKS)}"
            )
        if self.latent_loss not in LATENT_LOSS_NAMES:
            raise MirageError(
                f"latent_loss {self.latent_loss!r}: choose one of {', '.join(LATENT_LOSS_NAMES)}"
            )
        if self.latent_target not in LATENT_TARGET_NAMES:
            raise MirageError(
                f"latent_target {self.latent_target!r}: choose one of {', '.join(LATENT_TARGET_NAMES)}"
            )

    # ------------------------------------------------------------------ dict form (JSON)
    def to_dict(self, provenance: bool = True) -> dict:
        """The JSON form; `provenance=False` gives what describes the model alone (its config.json part)."""
        out = dict(self.provenance) if provenance else {}
        out.update(
            latent_size=self.latent_size,
            latent_tokens=list(LATENT_TOKEN_NAMES),
            latent_slot_input=self.latent_slot_input,
            latent_feedback_norm=self.latent_feedback_norm,
            latent_target_norm=self.latent_target_norm,
            latent_bottleneck=self.latent_bottleneck,
            **{name: getattr(self, name) for name in _OBJECTIVE},
        )
        if self.stage is not None and provenance:
            out["stage"] = self.stage
        return out

    @classmethod
    def from_dict(cls, value: dict, where: str = "the Mirage settings") -> MirageSettings:
        """Check and read a settings dict; `where` names its source in every error."""
        names = value.get("latent_tokens")
        if names is not None and list(names) != list(LATENT_TOKEN_NAMES):
            raise MirageError(f"{where} names latent tokens {names}, expected {list(LATENT_TOKEN_NAMES)}")
        size = value.get("latent_size")
        if size is None:
            raise MirageError(f"{where} has no latent_size")
        try:
            norm, target = (
                None if value.get(key) is None else float(value[key])
                for key in ("latent_feedback_norm", "latent_target_norm")
            )
            return cls(
                latent_size=size,
                latent_slot_input=value.get("latent_slot_input") or "latent",
                latent_feedback_norm=norm,
                latent_target_norm=target,
                latent_bottleneck=value.get("latent_bottleneck") or "none",
                stage=value.get("stage"),
                **{k: _typed(k, value.get(k, v), type(v)) for k, v in _OBJECTIVE.items()},
                provenance={k: v for k, v in value.items() if k not in _TYPED},
            )
        except (MirageError, TypeError, ValueError) as exc:
            raise MirageError(f"{where}: {exc}") from None

    def replace(self, **changes) -> MirageSettings:
        """A copy with `changes`; keys that are not fields go to `provenance`."""
        fields = {f.name for f in dataclasses.fields(self)} - {"provenance"}
        typed = {k: v for k, v in changes.items() if k in fields}
        extra = {k: v for k, v in changes.items() if k not in fields}
        return dataclasses.replace(self, **typed, provenance={**self.provenance, **extra})

    # ------------------------------------------------------------------ on a model
    @classmethod
    def of_model(cls, model) -> MirageSettings | None:
        """The settings in `model.config` (a model, a config, or a PEFT wrapper of one), None if none."""
        config = getattr(unwrap(model), "config", model)
        value = getattr(config, CONFIG_KEY, None)
        return cls.from_dict(value, f"config '{CONFIG_KEY}'") if isinstance(value, dict) else None

    def save_to(self, model) -> MirageSettings:
        """Write these settings into `model.config` (what `save_pretrained` saves): the model's part,
        not the stage or the provenance, which only the folder's file keeps. Returns them."""
        config = getattr(unwrap(model), "config", model)
        setattr(config, CONFIG_KEY, self.to_dict(provenance=False))
        return self

    @classmethod
    def adopt(cls, model, latent_size: int) -> MirageSettings:
        """Give `model` the latent size k: the one check of k against a model. A model whose settings name
        another latent size is refused in one line naming the folder it was loaded from and the file its
        settings came from; otherwise k is recorded (settings created when it has none)."""
        saved = cls.of_model(model)
        if saved is not None:
            inner = unwrap(model)
            name = getattr(getattr(inner, "config", None), "_name_or_path", "") or "the model"
            # set by models.load: the folder loaded (an adapter's, not its base's) and the file read
            name, source = getattr(inner, "mirage_settings_source", (name, f"config.json '{CONFIG_KEY}'"))
            saved.check_latent_size(latent_size, name, source)
        return cls.update(model, latent_size)

    @classmethod
    def update(cls, model, latent_size: int, **changes) -> MirageSettings:
        """Merge `changes` into the model's settings (created with `latent_size` if it has none)."""
        current = cls.of_model(model) or cls(latent_size=int(latent_size))
        return current.replace(latent_size=int(latent_size), **changes).save_to(model)

    # ------------------------------------------------------------------ in a folder
    @classmethod
    def read(cls, folder) -> MirageSettings | None:
        """The folder's `mirage_config.json`, None when it has none."""
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MirageError(f"{path}: cannot read it as JSON ({exc})") from None
        if not isinstance(value, dict):
            raise MirageError(f"{path}: expected a JSON object")
        return cls.from_dict(value, str(path))

    def write(self, folder) -> Path:
        """Write `mirage_config.json` into `folder` (atomically: a good file is never half-replaced)."""
        path = Path(folder) / SETTINGS_FILE
        write_json(path, self.to_dict())
        return path

    # ------------------------------------------------------------------ checks
    def check_latent_size(self, latent_size: int, name: str, source: str) -> None:
        """A model trained with latent size k must be used with k: anything else is one clear line naming
        the model (`name`) and where its k was read (`source`)."""
        if int(latent_size) != self.latent_size:
            raise MirageError(
                f"latent_size={latent_size} disagrees with {name}, which was trained with "
                f"latent_size={self.latent_size} ({source}); use the same latent size"
            )

    def for_run(
        self, markers_only: bool, feedback_norm: str | None, stage: int | None, bottleneck: str | None = None
    ) -> MirageSettings:
        """The slot settings a training run uses: these (the model's), changed by the run's flags.

        Markers-only stays on once a model was trained that way (stage 2 of a markers-only stage 1 is
        markers-only too); `feedback_norm` None keeps what the model has, "none" turns it off, "target"
        uses the measured stage-1 target norm (measured by this run when it is stage 1). `bottleneck`
        None keeps the model's visual bottleneck (stage 2 of a bottlenecked stage 1 is bottlenecked too).
        """
        slot_input = "zeros" if markers_only or self.latent_slot_input == "zeros" else "latent"
        norm = self.latent_feedback_norm
        if feedback_norm == "none":
            norm = None
        elif feedback_norm == "target":
            if self.latent_target_norm is None and stage != 1:
                raise MirageError(
                    "--latent_feedback_norm target: the model has no measured stage-1 target norm "
                    "(latent_target_norm in its Mirage settings); train stage 1 with mirage-trl first"
                )
            norm = self.latent_target_norm  # stage 1: set once measured
        return self.replace(
            latent_slot_input=slot_input,
            latent_feedback_norm=norm,
            latent_bottleneck=self.latent_bottleneck if bottleneck is None else bottleneck,
        )

    def with_objective(self, args) -> MirageSettings:
        """These settings with stage 1's latent objective taken from a training config (`MirageSFTConfig`; a field
        left None is the default)."""
        given = {name: getattr(args, name) for name in _OBJECTIVE}
        return self.replace(**{name: _OBJECTIVE[name] if v is None else v for name, v in given.items()})


def check_checkpoint_latent_size(checkpoint_dir, latent_size: int) -> None:
    """Resuming from a `checkpoint-N` trained with another latent size is refused (one line, both values)."""
    saved = MirageSettings.read(checkpoint_dir)
    if saved is not None and saved.latent_size != int(latent_size):
        raise MirageError(
            f"--latent_size {latent_size} disagrees with {Path(checkpoint_dir) / SETTINGS_FILE} "
            f"(latent_size={saved.latent_size}); resume with --latent_size {saved.latent_size}, or start a new run"
        )
