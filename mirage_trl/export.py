"""Export, merge, upload and load a trained Mirage model.

A Mirage model is more than weights: the tokenizer carries the latent tokens, the embedding (and
LM head) hold their trained rows, and the latent size k must travel with it. This module

* resolves and loads a folder through `mirage_trl.models.load` (`resolve_model_dir`, `load_model`);
* exports it (`export_model`): the adapter as such (LoRA weights + PEFT trainable-token rows of
  the latent tokens), or merged into a full model (`merge_and_unload`), or a full model re-saved;
  always with the processor, the Mirage settings (config.json "mirage" and mirage_config.json),
  safetensors only, and a model card (`card`). The folder is written under a temporary name and renamed
  at the end (`io.atomic_dir`), so an interrupted export never leaves a folder that looks complete;
* uploads the exported folder through `huggingface_hub` (`push_folder`); a failure leaves the
  local export complete and says so in one line.
"""

from __future__ import annotations

from pathlib import Path

from .card import build_model_card, check_eval_results, load_eval_results, write_card
from .errors import MirageError
from .folders import atomic_dir, check_output_dir, check_writable_dir
from .hub import push_folder
from .models.load import load_source, torch_dtype
from .models.processors import save_processor
from .models.resolve import portable_model_ref, resolve_model_dir

# Files a training output may hold that an export must not carry (pickles, optimizer state).
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# ---------------------------------------------------------------------------------------- export
def check_out_apart(out: Path, source: Path, what: str) -> None:
    """An export replaces `--out` whole: it must not be, contain or lie inside a folder it reads."""
    o, m = out.resolve(), source.resolve()
    if o == m or m in o.parents or o in m.parents:
        relation = "is" if o == m else ("is inside" if m in o.parents else "contains")
        raise MirageError(
            f"--out {out}: {relation} {what} {source}; an export never writes where it reads (choose another --out)"
        )


def _check_safetensors_only(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file() and f.name.endswith(_UNSAFE_SUFFIXES):
            f.unlink()  # e.g. a pickle a saver added; the export carries safetensors only


def export_model(
    model_path,
    out,
    *,
    merge: bool = False,
    overwrite: bool = False,
    eval_json=None,
    dtype=None,
    latent_size: int | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    revision: str | None = None,
    launch_lines: list[str] | None = None,
    datasets: list[str] | None = None,
) -> Path:
    """Export a Mirage training output (see the module doc); returns the output folder.

    Adapter input: without `merge` the adapter (+ latent token rows), with `merge` a full model.
    Full input: re-saved. Then, with `push_to_hub`, the folder is uploaded; a failed upload raises
    `MirageError` after the local export is complete.
    """
    out = check_writable_dir(out, "--out")  # before any work
    src = resolve_model_dir(model_path, latent_size=latent_size)
    check_out_apart(out, src.path, "--model")
    if src.is_adapter and Path(str(src.base)).exists():
        check_out_apart(out, Path(str(src.base)), "the base model its adapter names")
    check_output_dir(out, overwrite, "--out")  # the rest of the output-folder rule
    eval_results = load_eval_results(eval_json) if eval_json else None
    if eval_results is not None:
        check_eval_results(
            eval_results,
            eval_json,
            [src.path, out, *([push_to_hub] if push_to_hub else [])],
            src.latent_size,
            src.settings_file or src.path,
            f"{src.path} (the model exported) nor {out}",
        )
    kind = "merged" if (src.is_adapter and merge) else ("adapter" if src.is_adapter else "full")

    with atomic_dir(out, overwrite=overwrite, flag="--out", command="export") as tmp:
        # Merging is done in the saved precision; `dtype` casts the result.
        load_dtype = "auto" if (merge or dtype is None) else torch_dtype(dtype)
        model, processor, resized = load_source(src, dtype=load_dtype)
        settings = src.settings
        if kind == "adapter":
            config = model.peft_config[model.active_adapter]
            config.base_model_name_or_path = portable_model_ref(src.base)
            config.inference_mode = True
            if dtype is not None:
                model.to(torch_dtype(dtype))
            # "auto" misses a resized embedding on composite VL configs (PEFT 0.21): decide here.
            model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=bool(resized))
        else:
            if kind == "merged":
                model = model.merge_and_unload()
            if dtype is not None and torch_dtype(dtype) != "auto":
                model.to(torch_dtype(dtype))
            settings.save_to(model)
            model.config._name_or_path = str(out)
            model.save_pretrained(tmp, safe_serialization=True)
        save_processor(processor, tmp, model.config.model_type)
        base_model = settings.provenance.get("base_model")
        if src.is_adapter:
            base_model = portable_model_ref(src.base)  # the model the adapter loads over
        settings = settings.replace(
            format=kind, exported_from=portable_model_ref(src.path), base_model=base_model
        )
        settings.write(tmp)
        mirage = settings.to_dict()
        _check_safetensors_only(tmp)
        card = build_model_card(
            mirage,
            kind=kind,
            model_name=out.name,
            repo_id=push_to_hub,
            eval_results=eval_results,
            launch_lines=launch_lines,
            datasets=datasets,
        )
        write_card(tmp, card)

    if push_to_hub:
        push_folder(out, push_to_hub, private=private, revision=revision)
    return out
