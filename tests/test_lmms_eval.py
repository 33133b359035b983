"""lmms-eval's own command line, offline, with `--model mirage` (found through the `lmms_eval.models` entry point)
and the repository's task over a generated VSP dataset folder: every answer and the score equal `mirage-trl
eval`'s on the same rows, in two latent modes; what the model does not serve is refused in one clear line."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, run_cli

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'mirage-trl[lmms-eval]')")

TASKS = REPO / "mirage_trl" / "integrations" / "lmms_eval_tasks"
STEPS = 10


@pytest.fixture(scope="module")
def workdir(env, tmp_path_factory):
    """A Mirage model that opens a latent span at its first step (so the latents shape every answer), and the
    task's dataset folder, `mirage-vsp-planning`, beside it."""
    import io
    from contextlib import redirect_stdout

    from mirage_trl.cli import main
    from mirage_trl.data.sources import load_data
    from mirage_trl.evaluation import prompt_encoder
    from mirage_trl.generation import generate_with_latents
    from mirage_trl.models.load import load_model
    from mirage_trl.models.tokens import LatentTokens

    root = tmp_path_factory.mktemp("lmms_eval")
    with redirect_stdout(io.StringIO()):
        argv = ["data", "vsp", "--task", "planning", "--split", "test", "--style", "direct", "--levels", "3", "4",
                "--num-samples", "4", "--seed", "3", "--format", "dataset", "--out", str(root / "mirage-vsp-planning")]  # fmt: skip
        assert main(argv) == 0
    model, processor = load_model(env["mirage"])
    lt = LatentTokens.from_tokenizer(processor, 2)
    encoder = prompt_encoder(processor)
    row = load_data(str(root / "mirage-vsp-planning"), split="test")[0]
    batch = encoder.pad_prompts([encoder.encode_prompt(row)])
    first = generate_with_latents(model, processor, batch, max_new_tokens=1, eos_token_ids=[]).sequences[
        0, -1
    ]
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[lt.start_id] = head[int(first)] * 1.01  # where the model would write that token, it opens a span
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root


def _lmms_eval(workdir, latents: str) -> tuple[float, list[str]]:
    out = workdir / f"lmms-{latents}"
    p = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "mirage",
         "--model_args", f"pretrained={workdir / 'model'},latents={latents},max_new_tokens={STEPS}",
         "--tasks", "mirage_vsp_planning", "--include_path", str(TASKS), "--batch_size", "2",
         "--log_samples", "--output_path", str(out)],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"),
    )  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    (results,) = glob.glob(str(out / "*" / "*_results.json"))
    (samples,) = glob.glob(str(out / "*" / "*_samples_mirage_vsp_planning.jsonl"))
    score = json.loads(open(results).read())["results"]["mirage_vsp_planning"]["accuracy,none"]
    rows = sorted((json.loads(line) for line in open(samples)), key=lambda r: r["doc_id"])
    # lmms-eval logs `resps` only where its filter (a strip) changed the answer
    answers = [r.get("resps", r["filtered_resps"]) for r in rows]
    return score, [a[0] if isinstance(a, list) else a for a in answers]


def test_lmms_eval_answers_and_scores_equal_mirage_trl_eval(workdir, capsys):
    rc, _, err = run_cli(
        ["eval", "--model", workdir / "model", "--benchmark", "vsp_planning", "--data", workdir / "mirage-vsp-planning",
         "--data-split", "test", "--latents", "model", "remove", "--greedy", "--max-new-tokens", STEPS,
         "--batch-size", "2", "--no-progress", "--out", workdir / "ours"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    ours = json.loads((workdir / "ours" / "results.json").read_text())
    completions = [
        json.loads(line) for line in (workdir / "ours" / "completions.jsonl").read_text().splitlines()
    ]
    by_mode = {}
    for mode in ("model", "remove"):
        score, answers = _lmms_eval(workdir, mode)
        expected = [
            c["completion"] for c in sorted(completions, key=lambda c: c["index"]) if c["mode"] == mode
        ]
        assert answers == expected, mode
        assert score == pytest.approx(ours["modes"][mode]["groups"]["all"]["accuracy"]), mode
        by_mode[mode] = answers
    # the latents reach lmms-eval's path: spans were written, and removing them changes the answers
    assert sum(c["num_latent_spans"] for c in completions if c["mode"] == "model") >= 4
    assert by_mode["model"] != by_mode["remove"]


def test_what_the_mirage_model_does_not_serve_is_refused(workdir):
    from mirage_trl.errors import MirageError
    from mirage_trl.integrations.lmms_eval import MirageLMMS

    with pytest.raises(
        MirageError, match=r"latents=mean: choose one of model, zero, noise, shuffle, remove$"
    ):
        MirageLMMS(pretrained=str(workdir / "model"), latents="mean")
    with pytest.raises(MirageError, match=r"--model_args: temprature is not an argument of the mirage model"):
        MirageLMMS(pretrained=str(workdir / "model"), temprature=0.5)
    model = MirageLMMS(pretrained=str(workdir / "model"), batch_size="2")
    with pytest.raises(
        MirageError, match=r"serves generate_until tasks only: a Mirage answer depends on the latents"
    ):
        model.loglikelihood([])
