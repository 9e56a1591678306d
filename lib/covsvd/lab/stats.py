"""Summaries of the sweep's rows: per-arm Student-t intervals over seeds, paired differences between arms, and a
verdict in words. Quantiles from ``scipy.stats.t``; every statistic in fp64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _scipy_stats

from .arms import ARMS


def t_interval(x: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """``{"n", "mean", "sd", "ci_low", "ci_high"}``: ``mean -/+ t_{(1+c)/2, n-1} sd / sqrt(n)``, fp64 (the quantile from scipy.stats.t).

    ``sd`` is the sample standard deviation (n - 1); with one value the interval is NaN (never a fake one).
    """
    x = [float(v) for v in x]
    n = len(x)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(x) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else float("nan")
    half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) if n > 1 else float("nan")
    return dict(n=n, mean=mean, sd=sd, ci_low=mean - half, ci_high=mean + half)


def one_config(df, config_hash: str | None = None):
    """``(rows of one config, its hash)``: ``config_hash`` if given (ValueError if absent), else the only one
    (ValueError if the rows hold several: results of different settings are never pooled)."""
    import polars as pl

    hashes = sorted(df["config_hash"].unique().to_list())
    if config_hash is None:
        if len(hashes) != 1:
            raise ValueError(f"the rows come from {len(hashes)} configs {hashes}; pass config_hash=")
        config_hash = hashes[0]
    elif config_hash not in hashes:
        raise ValueError(f"config_hash={config_hash!r} is not in the rows (have {hashes})")
    return df.filter(pl.col("config_hash") == config_hash), config_hash


def summarize(df, score: str = "score_after", confidence: float = 0.95, config_hash: str | None = None):
    """Per-arm mean of ``score`` over seeds with a Student-t confidence interval (polars DataFrame).

    Columns: ``arm, axis, metric, rotate, n_seeds, mean, sd, ci_low, ci_high`` (``mean -/+ t_{(1+c)/2, n-1}
    sd / sqrt(n)``: the spread over *training seeds* only; NaN for one seed), ``before`` (the untrained
    score), ``delta`` (mean - before), ``binom_se`` (``sqrt(p (1 - p) / n_eval)`` at the mean: the
    sampling error of the held-out set, which seeds do not capture), ``n_eval``, ``n_improved`` (seeds
    whose run beat the untrained accuracy), ``n_fixed``, ``n_broken`` (queries gained / lost against the
    untrained model, summed over seeds: the paired, per-query view), ``trainable_params``, ``init_s``,
    ``train_s`` (means), ``gain_norm`` (mean), ``min_gain_norm``, ``verdict`` (:func:`arm_verdict`),
    ``config_hash``. Arms in :data:`ARMS` order.

    ``df`` may hold rows of several configs; then ``config_hash`` must say which (ValueError otherwise).
    """
    import polars as pl

    df, config_hash = one_config(df, config_hash)
    out = []
    order = {name: i for i, name in enumerate(ARMS)}
    for arm in sorted(df["arm"].unique().to_list(), key=lambda a: (order.get(a, len(order)), a)):
        d = df.filter(pl.col("arm") == arm)
        t = t_interval(d[score].cast(pl.Float64).to_list(), confidence)
        n_eval = int(d["n_eval"][0])
        before_col = "mrr_before" if score.startswith("mrr") else "score_before"
        before = float(d[before_col].cast(pl.Float64).mean())
        p = min(max(t["mean"], 0.0), 1.0)
        row = dict(
            arm=arm, axis=d["axis"][0], metric=d["metric"][0], rotate=d["rotate"][0], n_seeds=t["n"],
            mean=t["mean"], sd=t["sd"], ci_low=t["ci_low"], ci_high=t["ci_high"], before=before,
            delta=t["mean"] - before, binom_se=math.sqrt(p * (1 - p) / n_eval), n_eval=n_eval,
            n_improved=int((d["score_after"].cast(pl.Float64) > d["score_before"].cast(pl.Float64)).sum()),
            n_fixed=int(d["n_fixed"].sum()) if "n_fixed" in d.columns else 0,
            n_broken=int(d["n_broken"].sum()) if "n_broken" in d.columns else 0,
            trainable_params=int(d["trainable_params"][0]), init_s=float(d["init_s"].mean()),
            train_s=float(d["train_s"].mean()), gain_norm=float(d["gain_norm"].cast(pl.Float64).mean()),
            min_gain_norm=float(d["gain_norm"].cast(pl.Float64).min()), config_hash=config_hash,
        )
        row["verdict"] = arm_verdict(row, trained=ARMS[arm].train if arm in ARMS else True)
        out.append(row)
    return pl.DataFrame(out)


def arm_verdict(summary_row: dict, trained: bool = True) -> str:
    """One arm's result against the untrained model, in words (a :func:`summarize` row).

    ``"untrained reference"``; ``"learned nothing (gains did not move)"`` when some seed's gains stayed at
    zero; ``"no gain"`` when the mean is not above the untrained score; ``"above untrained (seed CI
    excludes it)"`` when the t-interval over seeds lies above it; else ``"above untrained within seed
    noise"``. The seeds' interval does not include the sampling of held-out queries (see ``binom_se``
    and ``n_fixed`` / ``n_broken``).
    """
    if not trained:
        return "untrained reference"
    if summary_row["min_gain_norm"] == 0.0:
        return "learned nothing (gains did not move)"
    if not summary_row["mean"] > summary_row["before"]:
        return "no gain"
    if summary_row["ci_low"] > summary_row["before"]:
        return "above untrained (seed CI excludes it)"
    return "above untrained within seed noise"


def paired_differences(df, a: str, b: str, score: str = "score_after", confidence: float = 0.95,
                       config_hash: str | None = None) -> dict:
    """Arm ``a`` minus arm ``b`` seed by seed (the same seed draws the same batches: a paired design).

    Returns ``{"a", "b", "score", "n", "mean", "sd", "ci_low", "ci_high", "seeds", "diffs", "n_positive"}``
    with the Student-t interval of the per-seed differences (:func:`t_interval`); only seeds both arms
    have count. ``config_hash`` as in :func:`summarize`.
    """
    import polars as pl

    df, config_hash = one_config(df, config_hash)
    va = dict(df.filter(pl.col("arm") == a).select("seed", score).rows())
    vb = dict(df.filter(pl.col("arm") == b).select("seed", score).rows())
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        raise ValueError(f"arms {a!r} and {b!r} share no seed in config {config_hash} (have {sorted(va)} and "
                         f"{sorted(vb)})")
    diffs = [float(va[k]) - float(vb[k]) for k in seeds]
    return dict(a=a, b=b, score=score, **t_interval(diffs, confidence), seeds=seeds, diffs=diffs,
                n_positive=sum(d > 0 for d in diffs))
