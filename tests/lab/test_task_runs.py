"""Stored task runs (covsvd.lab.task_runs, notebook 08's training): a stored run gives the numbers of the run that
wrote it, exactly; only missing runs are trained; another input is another key; and the committed runs file is the
one notebook 08's figure data were drawn from.

The plumbing runs on a tiny random BERT over the real vocabulary (seconds).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch

import covsvd
from covsvd.lab import task_runs as tr
from covsvd.lab.arms import QUICK_CONFIG
from covsvd.lab.rowstore import read_rows
from covsvd.lab.task import RetrievalTask, TaskConfig

ROOT = Path(__file__).resolve().parents[2]
SMALL = TaskConfig(max_length=24, docs_per_batch=4, prototypes_per_doc=2, max_queries=40, eval_batch_size=16)
CONFIG = replace(QUICK_CONFIG, r=4, steps=3, task=SMALL)
SEEDS = (0, 1)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(covsvd.data.default_model_path(), local_files_only=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    calibration = covsvd.calibration_batches(tok, split="train", seq_len=32, max_tokens=1024)
    moments = covsvd.capture_moments(model, calibration, targets=CONFIG.targets, kind="full", progress=False)
    names = list(moments)
    ranks = {"uniform": CONFIG.r, "allocated": {names[0]: 6, names[1]: 2}}
    return model, moments, calibration, ranks, RetrievalTask(tok, SMALL)


def _numbers(runs):
    return [(r["arm"], r["seed"], r["trainable"], r["accuracy"], r["mrr"], r["losses"], r["correct"].tolist())
            for r in runs]


def test_stored_runs_give_the_numbers_of_the_runs_that_wrote_them(setup, tmp_path, monkeypatch):
    model, moments, calibration, ranks, task = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "runs.csv"
    reports, fresh = tr.task_runs(model, moments, calibration, ranks, task, CONFIG, SEEDS, path=out)
    assert [(r["arm"], r["seed"]) for r in fresh] == [(a, s) for s in SEEDS for a in ranks]
    assert not any(r["stored"] for r in fresh)
    assert all(len(r["losses"]) == CONFIG.steps and r["trainable"] == 2 * CONFIG.r for r in fresh)
    assert {row["name"]: row["r"] for row in reports["allocated"].rows} == ranks["allocated"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is never modified
    rows = read_rows(out, tr.COLUMNS)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(tr, "train_steps", no_training)
    _, again = tr.task_runs(model, moments, calibration, ranks, task, CONFIG, SEEDS, path=out)
    assert all(r["stored"] for r in again)
    assert _numbers(again) == _numbers(fresh)  # exactly: floats are written with repr
    assert len(read_rows(out, tr.COLUMNS)) == 4  # nothing appended


def test_only_missing_runs_are_trained_and_other_inputs_get_their_own_rows(setup, tmp_path):
    model, moments, calibration, ranks, task = setup
    out = tmp_path / "runs.csv"
    _, first = tr.task_runs(model, moments, calibration, ranks, task, CONFIG, (0,), path=out)
    _, both = tr.task_runs(model, moments, calibration, ranks, task, CONFIG, (0, 1), path=out)
    assert [r["stored"] for r in both] == [True, True, False, False]
    assert _numbers(both[:2]) == _numbers(first)
    # any input of the runs changes the key: the settings, the ranks, the calibration tokens, the weights
    key = tr.runs_key(model, calibration, ranks, CONFIG)
    assert tr.runs_key(model, calibration, ranks, replace(CONFIG, lr=CONFIG.lr / 2)) != key
    assert tr.runs_key(model, calibration, {**ranks, "allocated": {**ranks["allocated"], "x": 1}}, CONFIG) != key
    assert tr.runs_key(model, calibration[:-1], ranks, CONFIG) != key
    other = tr.runs_key(model, calibration, ranks, replace(CONFIG, task=replace(SMALL, max_queries=30)))
    assert other != key
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.encoder.layer[0].output.dense.weight[0, 0] += 1e-3
        assert tr.runs_key(model, calibration, ranks, CONFIG) != key
    finally:
        model.load_state_dict(moved)
    _, slower = tr.task_runs(model, moments, calibration, ranks, task, replace(CONFIG, lr=CONFIG.lr / 2), (0,),
                             path=out)
    assert not any(r["stored"] for r in slower)
    assert len(read_rows(out, tr.COLUMNS)) == 6 and len({r["key"] for r in read_rows(out, tr.COLUMNS)}) == 2


def test_bad_arguments_are_refused_before_any_run(setup, tmp_path):
    model, moments, calibration, ranks, task = setup
    with pytest.raises(ValueError, match="distinct seeds"):
        tr.task_runs(model, moments, calibration, ranks, task, CONFIG, (0, 0))
    with pytest.raises(ValueError, match="at least one arm"):
        tr.task_runs(model, moments, calibration, {}, task, CONFIG, (0,))
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="another schema"):
        tr.task_runs(model, moments, calibration, ranks, task, CONFIG, (0,), path=other)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not a directory"):  # no row could be written: nothing is trained
        tr.task_runs(model, moments, calibration, ranks, task, CONFIG, (0,), path=blocker / "runs.csv")
    # a stored row that does not parse is named, before anything is attached or trained
    out = tmp_path / "runs.csv"
    tr.task_runs(model, moments, calibration, {"uniform": ranks["uniform"]}, task, CONFIG, (0,), path=out)
    text = out.read_text()
    out.write_text(text.replace(text.splitlines()[1].split(",")[5], "n/a", 1))  # the accuracy field
    with pytest.raises(ValueError, match="does not parse"):
        tr.task_runs(model, moments, calibration, {"uniform": ranks["uniform"]}, task, CONFIG, (0,), path=out)


def test_the_committed_runs_are_notebook_08s_figure_data():
    """data/ablations/allocation_task.csv holds one key's six runs, and figures/data/08_task.csv (what the figure
    and the notebook's claims are drawn from) is computed from them."""
    rows = read_rows(ROOT / "data" / "ablations" / "allocation_task.csv", tr.COLUMNS)
    assert len({r["key"] for r in rows}) == 1
    assert sorted((r["arm"], int(r["seed"])) for r in rows) == sorted(
        (a, s) for a in ("uniform", "allocated") for s in (0, 1, 2))
    fig = pl.read_csv(ROOT / "figures" / "data" / "08_task.csv")
    assert fig.height == len(rows)
    for r in rows:
        losses = [float(v) for v in r["losses"].split()]
        third = len(losses) // 3
        d = fig.filter((pl.col("arm") == r["arm"]) & (pl.col("seed") == int(r["seed"]))).row(0, named=True)
        for name, value in (("accuracy", float(r["accuracy"])), ("mrr", float(r["mrr"])), ("loss_start", losses[0]),
                            ("loss_end", losses[-1]), ("loss_first_third", sum(losses[:third]) / third),
                            ("loss_last_third", sum(losses[-third:]) / third)):
            assert math.isclose(d[name], value, rel_tol=1e-6), (r["arm"], r["seed"], name, d[name], value)
        assert d["trainable"] == int(r["trainable"]) and len(r["correct"]) == 263
