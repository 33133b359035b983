"""CI smoke of the benchmark suite: tiny shapes, every script runs and every figure of the table is produced.
(Timings are not asserted: speed lives in `make bench`, not in tests.)"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_suite_produces_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    from bench.__main__ import FIGURES

    assert report["errors"] == {}
    assert [r["figure"] for r in report["figures"]] == [f[1] for f in FIGURES]
    for row in report["figures"]:
        assert isinstance(row["value"], float) and row["value"] > 0, row
        assert row["met"] in ("yes", "no")
    assert "stage-2 step / stage-1 step" in proc.stdout
