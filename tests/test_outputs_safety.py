"""What training runs and exports write, through the real entry points:
the stage-1 recipe under `accelerate launch` and `mirage-trl export` as subprocesses.

* no credential anywhere: a `--hub_token` on the command line and tokens in the environment are grepped for
  in every byte of every file written (training output, checkpoints, `training_args.bin`, exports, cards);
* exported adapters name their base by an absolute path and load from another working directory;
* files and folders honour the umask (0644 / 0755 under 022), like `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARG_SECRET = "hf_argSECRETvalue0123456789"
ENV_SECRET = "hf_envSECRETvalue9876543210"
WANDB_SECRET = "wandbSECRETvalue5555555555"


def _env(**extra):
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        HF_TOKEN=ENV_SECRET,
        WANDB_API_KEY=WANDB_SECRET,
        HF_HUB_OFFLINE="1",
        **extra,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Stage 1 (LoRA, 2 steps, a checkpoint per step) launched from another working directory with relative
    paths and a hub token on the command line, then adapter and merged exports; umask 022."""
    from mirage_trl.data.vsp import generate_vsp
    from mirage_trl.models.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("outputs")
    save_tiny_model(root / "tiny")
    generate_vsp(
        "planning", [3], 4, split="train", style="cot", seed=0, out_dir=root / "data", progress=False
    )
    old = os.umask(0o022)
    try:
        launch = [
            sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(REPO / "recipes/stage1_vsp.py"), "--config", str(REPO / "recipes/tiny/stage1/config_vsp_smoke.yaml"),
            "--model_name_or_path", "tiny", "--dataset_name", "data/planning_train_cot.jsonl",
            "--output_dir", "run", "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
            "--per_device_train_batch_size", "2", "--hub_token", ARG_SECRET,
        ]  # fmt: skip
        p = subprocess.run(launch, cwd=root, capture_output=True, text=True, env=_env(), timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        outs = []
        for name, extra in (("adapter", []), ("merged", ["--merge"])):
            cmd = [sys.executable, "-m", "mirage_trl", "export", "--model", "run", "--out", f"export-{name}"]
            q = subprocess.run(cmd + extra, cwd=root, capture_output=True, text=True, env=_env(), timeout=300)
            assert q.returncode == 0, q.stderr[-3000:]
            outs.append(q.stdout + q.stderr)
    finally:
        os.umask(old)
    return dict(root=root, logs=p.stdout + p.stderr + "".join(outs))


def _written(root: Path):
    return [p for p in (root / "run").rglob("*")] + [
        p for name in ("export-adapter", "export-merged") for p in (root / name).rglob("*")
    ]


def test_no_secret_in_any_file_written(run):
    files = [p for p in _written(run["root"]) if p.is_file()]
    names = {p.name for p in files}
    assert {"training_args.bin", "mirage_config.json", "README.md", "adapter_config.json"} <= names
    assert any(p.parent.name == "checkpoint-2" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (ARG_SECRET, ENV_SECRET, WANDB_SECRET):
            assert secret.encode() not in data, f"{secret[:12]}... written to {path}"
    for secret in (ARG_SECRET, ENV_SECRET, WANDB_SECRET):
        assert secret not in run["logs"]
    (launch,) = json.loads((run["root"] / "run" / "mirage_config.json").read_text())["launch"]  # one stage
    assert "--hub_token '***'" in launch or "--hub_token ***" in launch, launch
    assert launch.startswith("accelerate launch recipes/stage1_vsp.py --config "), launch  # what the user ran


def test_training_args_keep_the_other_settings(run):
    """Only the credential is gone from `training_args.bin`; the saved settings are otherwise the run's."""
    import torch

    args = torch.load(run["root"] / "run" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.max_steps == 2 and args.latent_size == 4


def test_exported_adapter_names_an_absolute_base_and_loads_elsewhere(run, tmp_path):
    root = run["root"]
    for folder in ("run", "export-adapter"):
        base = json.loads((root / folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(base).is_absolute() and Path(base) == (root / "tiny").resolve(), base
        assert Path(
            json.loads((root / folder / "mirage_config.json").read_text())["base_model"]
        ).is_absolute()
    code = (
        "from mirage_trl import load_model\n"
        f"model, processor = load_model({str(root / 'export-adapter')!r})\n"
        "print(type(model).__name__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert p.returncode == 0, p.stderr[-2000:]


def test_files_and_folders_honour_the_umask(run):
    modes = {}
    for path in _written(run["root"]):
        modes[path] = stat.S_IMODE(path.stat().st_mode)
    bad = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)}
    for folder in ("run", "export-adapter", "export-merged"):
        assert stat.S_IMODE((run["root"] / folder).stat().st_mode) == 0o755
    assert not bad, bad
