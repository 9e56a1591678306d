"""The ablation harness: the row file (atomic, never duplicated), resuming after an interruption,
determinism of a row per seed, the summary's t-interval, and the CLI verb.

The sweep tests run the real default model in quick mode (a few seconds each).
"""

from __future__ import annotations

import argparse
import csv
import math
from dataclasses import replace

import polars as pl
import pytest

from covsvd import ablate as ab

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
    assert out.stat().st_mode & 0o777 == 0o644  # a normal data file, not mkstemp's 0600


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


# ------------------------------------------------------------------------------------------ summary


def test_t_quantile_matches_closed_forms_and_the_normal_limit():
    for p in (0.9, 0.975, 0.995):
        assert ab.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-6)
        assert ab.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-6)
    assert ab.t_quantile(0.975, 100000) == pytest.approx(1.959964, rel=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for dof in (3, 4, 9):
        assert ab.t_quantile(0.975, dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=1e-6)


def _results(scores: dict[str, list[float]], chash="h0") -> pl.DataFrame:
    rows = []
    for arm, xs in scores.items():
        for seed, x in enumerate(xs):
            rows.append(dict(arm=arm, axis=ab.ARMS[arm].axis, metric=ab.ARMS[arm].metric or "none",
                             rotate=ab.ARMS[arm].rotate or "none", seed=seed, score_after=x, score_before=0.4,
                             mrr_after=x, mrr_before=0.5, n_eval=200, trainable_params=384, init_s=1.0,
                             train_s=2.0, gain_norm=0.1, config_hash=chash))
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
                   log=None)
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
                  hook=hook, log=None)
    first = ab.read_rows(out)
    assert [(r["arm"], r["seed"]) for r in first] == [
        ("baseline", "0"), ("baseline", "1"), ("full", "0"), ("full", "1"), ("rot-V", "0")]

    seen = []
    df = ab.ablate(arms=ARMS, seeds=SEEDS, out=out, config=ab.QUICK_CONFIG, cache_dir=cache, progress=False,
                   hook=lambda arm, seed, step: seen.append((arm, seed)), log=None)
    assert set(seen) == {("rot-V", 1)}  # only the unfinished run ran again
    rows = ab.read_rows(out)
    assert rows[: len(first)] == first  # finished rows untouched
    assert len(rows) == len({(r["arm"], r["seed"]) for r in rows}) == len(ARMS) * len(SEEDS) == df.height
    # same seed, same row: the resumed sweep (moments from the cache) equals the uninterrupted one
    assert _stable(rows) == _stable(ab.read_rows(ref_out))

    again = ab.ablate(arms=ARMS, seeds=SEEDS, out=out, config=ab.QUICK_CONFIG, cache_dir=cache, progress=False,
                      hook=lambda *a: pytest.fail("a finished sweep ran again"), log=None)
    assert again.height == df.height and ab.read_rows(out) == rows
