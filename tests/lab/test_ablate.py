"""The ablation harness: the row file (atomic, never duplicated), resuming after an interruption,
determinism of a row per seed, the summary's t-interval and verdicts, runs that learn nothing, and the
CLI verb's options (``python -m covsvd ablate`` end to end is in tests/test_cli.py).

The sweep tests run the real default model in quick mode on one thread (a few seconds each).
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from covsvd.lab import ablate as ab
from covsvd.util.files import current_umask

# ------------------------------------------------------------------------------------------ row file


def _row(**kw) -> dict:
    row = dict.fromkeys(ab.COLUMNS, "x")
    row.update(config_hash="h0", arm="identity", seed=0, score_after=0.5)
    row.update(kw)
    return row


def test_append_row_never_duplicates_a_key_and_keeps_other_rows(tmp_path):
    out = tmp_path / "sub" / "rows.csv"
    assert ab.append_row(out, _row(seed=0))
    assert ab.append_row(out, _row(seed=1))
    assert not ab.append_row(out, _row(seed=0, score_after=0.9))  # same key: refused, first row kept
    assert ab.append_row(out, _row(seed=0, config_hash="h1"))  # same arm/seed, other config: a new row
    rows = ab.read_rows(out)
    assert [(r["config_hash"], r["seed"], r["score_after"]) for r in rows] == [
        ("h0", "0", "0.5"), ("h0", "1", "0.5"), ("h1", "0", "0.5")]
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["rows.csv"]  # no temp or lock file left
    assert out.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # what open() gives, not mkstemp's 0600


def test_concurrent_writers_lose_no_row(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "rows.csv"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: ab.append_row(out, _row(seed=s)), range(24)))
    assert sorted(int(r["seed"]) for r in ab.read_rows(out)) == list(range(24))


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    out = tmp_path / "rows.csv"
    ab.append_row(out, _row(seed=0))
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ab.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ab.append_row(out, _row(seed=1))
    assert out.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_schema_errors_are_clear(tmp_path):
    out = tmp_path / "old.csv"
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([["arm", "seed"], ["identity", "0"]])
    with pytest.raises(ValueError, match="another schema"):
        ab.read_rows(out)
    with pytest.raises(ValueError, match="out of the schema"):
        ab.append_row(tmp_path / "new.csv", {"arm": "identity"})


def test_config_hash_covers_the_task_and_the_model():
    c = ab.AblationConfig()
    h = c.config_hash("fp")
    assert h == ab.AblationConfig().config_hash("fp")
    assert h != c.config_hash("other-model")
    assert h != replace(c, lr=c.lr * 2).config_hash("fp")
    assert h != replace(c, task=replace(c.task, holdout="validation")).config_hash("fp")


@pytest.fixture(scope="module")
def tiny_bert():
    """A random 2-layer BERT (d=32) over the real tokenizer's vocabulary, with the targets' names."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    import covsvd

    tok = AutoTokenizer.from_pretrained(covsvd.data.default_model_path(), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval(), tok


def test_model_key_follows_the_weights_not_only_the_shapes(tiny_bert):
    import copy

    import torch

    model, _ = tiny_bert
    key = ab.model_key(model)
    assert ab.model_key(copy.deepcopy(model)) == key
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.encoder.layer[0].output.dense.weight[0, 0] += 1e-3  # a fine-tuned checkpoint of the same shape
    assert ab.model_key(other) != key
    assert ab.model_key(other).split("-")[0] == key.split("-")[0]  # the structural fingerprint agrees


def test_moments_cache_is_keyed_by_the_calibration_tokens(tiny_bert, tmp_path, monkeypatch):
    import torch

    import covsvd

    model, tok = tiny_bert
    cfg = replace(ab.QUICK_CONFIG, calib_tokens=1200, calib_seq_len=32)
    m1, i1 = ab.moments_for(model, tok, cfg, tmp_path, progress=False)
    m2, i2 = ab.moments_for(model, tok, cfg, tmp_path, progress=False)
    assert (i1["cached"], i2["cached"]) == (False, True) and i1["path"] == i2["path"]
    assert all(torch.equal(m1[k].matrix(), m2[k].matrix()) for k in m1)
    real = covsvd.calibration_batches
    monkeypatch.setattr(covsvd, "calibration_batches", lambda *a, **k: real(*a, **k)[:-1])  # other tokens
    m3, i3 = ab.moments_for(model, tok, cfg, tmp_path, progress=False)
    assert not i3["cached"] and i3["path"] != i1["path"] and i3["tokens"] < i1["tokens"]


# ------------------------------------------------------------------------------------------ summary


def test_t_interval_is_the_student_t_interval_in_closed_form():
    # dof 1 and 2 have closed-form quantiles: tan(pi (p - 1/2)) and (2p - 1) / sqrt(2 p (1 - p))
    for x, quantile in (([0.1, 0.4], math.tan(math.pi * 0.475)), ([0.1, 0.4, 0.2], 0.95 / math.sqrt(2 * 0.975 * 0.025))):
        n = len(x)
        mean = sum(x) / n
        sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1))
        t = ab.t_interval(x, 0.95)
        assert t["mean"] == pytest.approx(mean) and t["sd"] == pytest.approx(sd)
        assert t["ci_high"] - t["mean"] == pytest.approx(quantile * sd / math.sqrt(n), rel=1e-9)
        assert t["mean"] - t["ci_low"] == pytest.approx(t["ci_high"] - t["mean"], rel=1e-12)
    one = ab.t_interval([0.3])
    assert one["mean"] == 0.3 and math.isnan(one["ci_low"]) and math.isnan(one["sd"])  # never a fake interval
    with pytest.raises(ValueError, match="at least one"):
        ab.t_interval([])


def _results(scores: dict[str, list[float]], chash="h0") -> pl.DataFrame:
    rows = []
    for arm, xs in scores.items():
        for seed, x in enumerate(xs):
            rows.append(dict(arm=arm, axis=ab.ARMS[arm].axis, metric=ab.ARMS[arm].metric or "none",
                             rotate=ab.ARMS[arm].rotate or "none", seed=seed, score_after=x, score_before=0.4,
                             mrr_after=x, mrr_before=0.5, n_eval=200, n_fixed=3, n_broken=1,
                             trainable_params=384, init_s=1.0, train_s=2.0,
                             gain_norm=0.0 if arm == "baseline" else 0.1, config_hash=chash))
    return pl.DataFrame(rows)


def test_summarize_is_a_student_t_interval_over_seeds():
    s = ab.summarize(_results({"diag": [0.5, 0.6, 0.7], "baseline": [0.4, 0.4, 0.4], "identity": [0.55]}))
    assert s["arm"].to_list() == ["baseline", "identity", "diag"]  # ARMS order
    d = s.filter(pl.col("arm") == "diag").row(0, named=True)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert d["mean"] == pytest.approx(0.6) and d["sd"] == pytest.approx(0.1)
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(0.6 - half), pytest.approx(0.6 + half))
    assert d["delta"] == pytest.approx(0.2)
    assert d["binom_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 200))
    b = s.filter(pl.col("arm") == "baseline").row(0, named=True)
    assert b["ci_low"] == pytest.approx(b["ci_high"])  # a deterministic arm has no seed spread
    one = s.filter(pl.col("arm") == "identity").row(0, named=True)
    assert one["n_seeds"] == 1 and math.isnan(one["ci_low"])  # one seed: no interval, never a fake one
    assert (d["n_improved"], d["n_fixed"], d["n_broken"]) == (3, 9, 3)
    assert b["verdict"] == "untrained reference" and d["verdict"] == "above untrained within seed noise"
    assert one["verdict"] == "above untrained within seed noise"  # no interval: never called significant


def test_summarize_verdicts_name_arms_that_did_not_learn():
    s = ab.summarize(_results({"baseline": [0.4] * 3, "full": [0.39, 0.4, 0.41], "diag": [0.38, 0.45, 0.5],
                               "identity": [0.5, 0.52, 0.51]}))
    v = dict(s.select("arm", "verdict").rows())
    assert v["full"] == "no gain"  # mean == the untrained score
    assert v["diag"] == "above untrained within seed noise"  # mean above, interval reaches below
    assert v["identity"] == "above untrained (seed CI excludes it)"
    frozen = _results({"corda": [0.45, 0.45, 0.45]}).with_columns(
        gain_norm=pl.Series([0.1, 0.0, 0.1]))  # one seed whose gains never moved
    assert ab.summarize(frozen)["verdict"][0] == "learned nothing (gains did not move)"


def test_run_outcome_names_every_case():
    assert ab.run_outcome(False, 0.4, 0.4, 0.0, 0.0) == "untrained"
    assert ab.run_outcome(True, 0.4, 0.5, 0.0, 0.0) == "did not move"  # nothing moved: no credit for the score
    assert ab.run_outcome(True, 0.4, 0.4, 0.0, 0.2) == "no change"  # a rotation moved
    assert ab.run_outcome(True, 0.4, 0.5, 0.1, 0.0) == "improved"
    assert ab.run_outcome(True, 0.4, 0.3, 0.1, 0.0) == "worse"
    assert set(ab.OUTCOMES) >= set(ab.LEARNED_NOTHING)


def test_paired_differences_pair_by_seed():
    df = _results({"diag": [0.5, 0.6, 0.7, 0.9], "full": [0.45, 0.55, 0.64]})  # full lacks seed 3
    d = ab.paired_differences(df, "diag", "full")
    assert d["seeds"] == [0, 1, 2] and d["diffs"] == pytest.approx([0.05, 0.05, 0.06])
    t = ab.t_interval([0.05, 0.05, 0.06])
    assert (d["mean"], d["ci_low"], d["ci_high"]) == (pytest.approx(t["mean"]), pytest.approx(t["ci_low"]),
                                                      pytest.approx(t["ci_high"]))
    assert d["n_positive"] == 3 and d["ci_low"] > 0  # consistent sign, tight: the ordering is supported
    with pytest.raises(ValueError, match="share no seed"):
        ab.paired_differences(df, "diag", "rot-U")


def test_summarize_refuses_to_mix_configs():
    df = pl.concat([_results({"diag": [0.5, 0.6]}, "h0"), _results({"diag": [0.1, 0.2]}, "h1")])
    with pytest.raises(ValueError, match="2 configs"):
        ab.summarize(df)
    assert ab.summarize(df, config_hash="h1")["mean"][0] == pytest.approx(0.15)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_verb_parses_its_options():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb", required=True)
    ab.register_cli(sub)
    args = parser.parse_args(["ablate", "--quick", "--seeds", "0", "1", "--arms", "full", "rot-V",
                              "--out", "x.csv", "--lr", "0.1", "--holdout", "validation", "--threads", "1"])
    assert args.run is ab.run_cli
    assert (args.quick, args.seeds, args.arms, args.out, args.lr, args.holdout) == (
        True, [0, 1], ["full", "rot-V"], "x.csv", 0.1, "validation")
    assert args.threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["ablate", "--arms", "nope"])


# ------------------------------------------------------------------------------------------ the sweep


ARMS = ("baseline", "full", "rot-V")
SEEDS = (0, 1)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("moments")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """One uninterrupted quick sweep (captures the moments into ``cache``)."""
    out = tmp_path_factory.mktemp("ref") / "rows.csv"
    df = ab.ablate(arms=ARMS, seeds=SEEDS, out=out, config=ab.QUICK_CONFIG, cache_dir=cache, progress=False,
                   log=None, threads=1)
    return out, df


def _stable(rows: list[dict]) -> dict:
    return {(r["arm"], str(r["seed"])): {k: str(v) for k, v in r.items() if k not in ab.TIMING} for r in rows}


@pytest.mark.slow
def test_quick_sweep_rows_are_sane(reference):
    out, df = reference
    assert df.height == len(ARMS) * len(SEEDS)
    assert set(df["source"]) == {ab.SOURCE}
    base = df.filter(pl.col("arm") == "baseline")
    trained = df.filter(pl.col("arm") != "baseline")
    assert (base["score_after"] == base["score_before"]).all() and (base["trainable_params"] == 0).all()
    r = ab.QUICK_CONFIG.r
    assert (trained.filter(pl.col("arm") == "full")["trainable_params"] == 6 * r).all()
    assert (trained.filter(pl.col("arm") == "rot-V")["trainable_params"] > 6 * r).all()
    assert (trained["gain_norm"] > 0).all()  # the gains moved
    assert (trained.filter(pl.col("arm") == "rot-V")["rot_norm"] > 0).all()
    assert (trained["init_output_error"] < 1e-4).all()  # adapters are the original model at init
    assert (trained["init_s"] > 0).all() and (trained["train_s"] > 0).all()
    assert (df["threads"] == 1).all()
    # the per-query counts explain the accuracy change exactly (paired against the untrained model)
    n = df["n_eval"]
    assert ((df["score_after"] - df["score_before"]) * n - (df["n_fixed"] - df["n_broken"])).abs().max() < 1e-9
    assert (base["outcome"] == "untrained").all()
    for r in trained.iter_rows(named=True):
        assert r["outcome"] == ab.run_outcome(True, r["score_before"], r["score_after"], r["gain_norm"], r["rot_norm"])
    # the seed changes the training batches, hence the gains
    full = trained.filter(pl.col("arm") == "full").sort("seed")
    assert full["gain_norm"][0] != full["gain_norm"][1]


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_losing_or_duplicating_rows(reference, cache, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "rows.csv"

    def hook(arm, seed, step):
        if (arm, seed, step) == ("rot-V", 1, 1):
            raise Interrupt

    with pytest.raises(Interrupt):
        ab.ablate(arms=ARMS, seeds=SEEDS, out=out, config=ab.QUICK_CONFIG, cache_dir=cache, progress=False,
                  hook=hook, log=None, threads=1)
    first = ab.read_rows(out)
    assert [(r["arm"], r["seed"]) for r in first] == [
        ("baseline", "0"), ("baseline", "1"), ("full", "0"), ("full", "1"), ("rot-V", "0")]

    seen = []
    df = ab.ablate(arms=ARMS, seeds=SEEDS, out=out, config=ab.QUICK_CONFIG, cache_dir=cache, progress=False,
                   hook=lambda arm, seed, step: seen.append((arm, seed)), log=None, threads=1)
    assert set(seen) == {("rot-V", 1)}  # only the unfinished run ran again
    rows = ab.read_rows(out)
    assert rows[: len(first)] == first  # finished rows untouched
    assert len(rows) == len({(r["arm"], r["seed"]) for r in rows}) == len(ARMS) * len(SEEDS) == df.height
    # same seed, same row: the resumed sweep (moments from the cache) equals the uninterrupted one
    assert _stable(rows) == _stable(ab.read_rows(ref_out))

    again = ab.ablate(arms=ARMS, seeds=SEEDS, out=out, config=ab.QUICK_CONFIG, cache_dir=cache, progress=False,
                      hook=lambda *a: pytest.fail("a finished sweep ran again"), log=None, threads=1)
    assert again.height == df.height and ab.read_rows(out) == rows


@pytest.mark.slow
def test_a_run_that_learns_nothing_is_reported_as_such():
    lines = []
    df = ab.ablate(arms=["identity"], seeds=[0], out=None, config=replace(ab.QUICK_CONFIG, lr=0.0), cache_dir=None,
                   progress=False, log=lines.append, threads=1)
    r = df.row(0, named=True)
    assert r["gain_norm"] == 0.0 and r["outcome"] == "did not move"
    assert any(line.strip().startswith("LEARNED NOTHING: identity seed 0") for line in lines), lines
    assert ab.summarize(df)["verdict"][0] == "learned nothing (gains did not move)"
    assert any("per arm" in line and "identity" in line for line in lines)  # the closing timing lines


@pytest.mark.slow
def test_the_two_sided_arm_runs_and_caches_its_output_moments(reference, cache, tmp_path):
    """The two-sided arm: probe output moments captured once into the cache (then read back, checked against the
    model), adapters the identity at init, the gains trained; its row sits beside the other arms' config."""
    out = tmp_path / "rows.csv"
    before = {p.name for p in cache.iterdir()}
    df = ab.ablate(arms=["two-sided"], seeds=[0], out=out, config=ab.QUICK_CONFIG, cache_dir=cache, progress=False,
                   log=None, threads=1)
    row = df.row(0, named=True)
    assert df.height == 1 and row["arm"] == row["metric"] == "two-sided" and row["axis"] == "metric"
    assert row["init_output_error"] < 1e-4 and row["gain_norm"] > 0 and row["trainable_params"] == 6 * ab.QUICK_CONFIG.r
    assert row["config_hash"] == reference[1]["config_hash"][0]  # the arm does not change the other rows' key
    written = {p.name for p in cache.iterdir()} - before
    assert len(written) == 1 and next(iter(written)).startswith("output-probe0-")
    again = ab.ablate(arms=["two-sided"], seeds=[0, 1], out=out, config=ab.QUICK_CONFIG, cache_dir=cache,
                      progress=False, log=None, threads=1)
    assert again.height == 2 and {p.name for p in cache.iterdir()} - before == written  # read back, not recaptured
    assert again.filter(pl.col("seed") == 0).row(0, named=True)["score_after"] == row["score_after"]


def test_the_stored_sweep_rows_keep_their_key(default_model):
    """The sweep's config hash (config + model_key) of the default model is the one data/ablations/local.csv
    was written under: a refactor that changes the key would orphan every stored row."""
    import polars as pl

    from covsvd.capture.cache import model_key
    from covsvd.lab.arms import AblationConfig

    model, _ = default_model
    stored = pl.read_csv(Path(__file__).resolve().parents[2] / "data" / "ablations" / "local.csv")
    assert set(stored["config_hash"]) == {AblationConfig().config_hash(model_key(model))}
