"""``python -m covsvd``: the verbs exist, ``figures`` fails cleanly, ``capture`` writes loadable moments,
``ablate`` runs a quick sweep, prints its summary and resumes without duplicating rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import covsvd
from covsvd.cli.main import build_parser, main


def test_verbs_and_help():
    verbs = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 (argparse has no public API)
    assert {"figures", "capture", "ablate"} <= set(verbs)
    out = subprocess.run([sys.executable, "-m", "covsvd", "--help"], capture_output=True, text=True, check=True)
    assert "figures" in out.stdout and "capture" in out.stdout and "ablate" in out.stdout


def test_figures_with_an_unknown_notebook_fails_with_a_message(capsys):
    assert main(["figures", "--only", "99_no_such_notebook"]) == 1
    assert "99_no_such_notebook" in capsys.readouterr().err


@pytest.mark.slow
def test_capture_writes_moments_that_load_back(tmp_path: Path, default_model):
    out = tmp_path / "minilm.moments.safetensors"
    target = r"encoder\.layer\.0\.attention\.self\.query"
    assert main(["capture", "--model", "default", "--out", str(out), "--kind", "diag", "--max-tokens", "300",
                 "--targets", target]) == 0
    model, tokenizer = default_model
    moments = covsvd.load_moments(out, model)
    assert list(moments) == ["encoder.layer.0.attention.self.query"]
    m = moments["encoder.layer.0.attention.self.query"]
    batches = covsvd.calibration_batches(tokenizer, max_tokens=300)
    assert m.kind == "diag" and m.count == covsvd.count_tokens(batches) >= 300
    assert torch.isfinite(m.diag()).all() and (m.diag() > 0).all()


@pytest.mark.slow
def test_ablate_quick_writes_rows_prints_a_summary_and_resumes(tmp_path: Path, capsys):
    from covsvd.lab.ablate import read_rows

    out = tmp_path / "rows.csv"
    argv = ["ablate", "--quick", "--arms", "baseline", "identity", "--out", str(out), "--cache-dir",
            str(tmp_path / "cache"), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    rows = read_rows(out)
    assert [(r["arm"], r["seed"], r["threads"]) for r in rows] == [("baseline", "0", "1"), ("identity", "0", "1")]
    assert "done in" in text and "per arm" in text and "verdict" in text and "untrained reference" in text
    assert main(argv) == 0  # everything is there: nothing runs, nothing is duplicated
    assert "0 to run" in capsys.readouterr().out
    assert read_rows(out) == rows
