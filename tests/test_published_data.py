"""data/published/*.csv hold exactly the published numbers of docs/algebra.md ("Published results"), each row with its source.

The values are written out here by hand from docs/algebra.md ("Published results"), so a
typo in a CSV, a dropped row or an edit that changes a number fails. Unstated facts stay empty in the
CSVs: the seed of every arm but AntiPaSTO-rot (V) (seed 0), the rank of IA3 (it has none), the metric
of the rot/ablate/dplr arms, the n behind "valid %", and the dataset of CorDA's Table 6.
"""

from pathlib import Path

import polars as pl
import pytest

DATA = Path(__file__).resolve().parents[1] / "data" / "published"

# arm: (test %, valid %, trainable params, init seconds) -- docs/algebra.md's table, in its order
ARMS = {
    "DoRA": (60.2, 68.0, 3.56e6, 0.16),
    "LoRA": (59.8, 68.0, 3.54e6, 0.02),
    "PiSSA": (59.8, 76.0, 3.54e6, 2.04),
    "HRA": (59.2, 70.0, 2.75e6, 0.04),
    "EVA": (59.3, 74.0, 3.54e6, 28.3),
    "IA3-FF": (56.3, 62.0, 0.086e6, 0.01),
    "DeLoRA": (56.2, 62.0, 3.54e6, 0.21),
    "AntiPaSTO (metric C=I)": (56.0, 62.0, 0.0061e6, 2.5),
    "AntiPaSTO-rot (V)": (57.2, 60.0, 0.0154e6, 2.0),
    "AntiPaSTO-ablate": (56.0, 68.0, 0.0062e6, 2.2),
    "AntiPaSTO-dplr": (56.0, 64.0, 0.1044e6, 3.6),
    "AntiPaSTO-ASVD (diag C)": (55.6, 64.0, 0.0061e6, 34.0),
    "AntiPaSTO-CorDA (full C)": (54.7, 58.0, 0.0061e6, 120.0),
    "IA3": (52.3, 62.0, 0.0061e6, 0.01),
}
# (rotate, seed): test %
ROTATION = {("V", 0): 57.2, ("U", 0): 56.5, ("both", 0): 55.6, ("U", 1): 57.5, ("both", 1): 56.9, ("V", 1): 56.2}
TWO_SEED_MEANS = {"U": 57.0, "V": 56.7, "both": 56.3}  # docs/algebra.md, rounded half up to 0.1
# (paper, method): perplexity
COMPRESSION = {
    ("SVD-LLM", "SVD"): 20061.0,
    ("SVD-LLM", "FWSVD"): 1727.0,
    ("SVD-LLM", "ASVD"): 11.14,
    ("SVD-LLM", "SVD-LLM (whitening)"): 7.94,
    ("SVD-LLM", "original"): 5.68,
    ("CorDA", "SVD"): 18.5,
    ("CorDA", "ASVD"): 9.92,
    ("CorDA", "CorDA"): 5.54,
}


def read(name: str) -> pl.DataFrame:
    return pl.read_csv(DATA / f"{name}.csv")


def test_every_published_file_has_a_source_on_every_row():
    files = sorted(DATA.glob("*.csv"))
    assert {f.stem for f in files} >= {"gsm8k_arms", "gsm8k_rotation_seeds", "compression_ppl"}
    for f in files:
        df = pl.read_csv(f)
        assert "source" in df.columns, f"{f.name} has no source column"
        empty = df.filter(pl.col("source").is_null() | (pl.col("source").str.strip_chars() == ""))
        assert empty.height == 0, f"{f.name}: rows without a source: {empty}"


def test_gsm8k_arm_table_matches_design():
    df = read("gsm8k_arms")
    assert df["arm"].to_list() == list(ARMS), "arms missing, extra or out of docs/algebra.md's order"
    for row in df.iter_rows(named=True):
        test, valid, params, init = ARMS[row["arm"]]
        assert row["test_pct"] == test, row["arm"]
        assert row["valid_pct"] == valid, row["arm"]
        assert row["trainable_params"] == pytest.approx(params, rel=1e-9), row["arm"]
        assert row["init_s"] == init, row["arm"]
        assert row["n_test"] == 1319
        assert row["source"].startswith("lora-lite README, 2026")
        antipasto = row["arm"].startswith("AntiPaSTO")
        assert row["family"] == ("AntiPaSTO" if antipasto else "standard"), row["arm"]
        assert row["lr"] == (5e-3 if antipasto else 1e-4), row["arm"]
        expected_r = 256 if antipasto else (None if row["arm"].startswith("IA3") else 32)
        assert row["r"] == expected_r, row["arm"]
    by_arm = {r["arm"]: r for r in df.iter_rows(named=True)}
    assert {a: by_arm[a]["metric"] for a in ARMS if by_arm[a]["metric"] is not None} == {
        "AntiPaSTO (metric C=I)": "identity",
        "AntiPaSTO-ASVD (diag C)": "diag",
        "AntiPaSTO-CorDA (full C)": "full",
    }
    assert by_arm["AntiPaSTO-rot (V)"]["rotate"] == "V"
    assert by_arm["AntiPaSTO-rot (V)"]["seed"] == 0
    assert df.filter(pl.col("arm") != "AntiPaSTO-rot (V)")["seed"].null_count() == df.height - 1
    assert "n_valid" not in df.columns  # the n behind valid % is not published: never invent one


def test_metric_axis_is_the_design_single_seed_ordering():
    df = read("gsm8k_arms").filter(pl.col("metric").is_not_null()).sort("test_pct", descending=True)
    assert df["metric"].to_list() == ["identity", "diag", "full"]
    assert df["test_pct"].to_list() == [56.0, 55.6, 54.7]


def test_rotation_seeds_match_design():
    df = read("gsm8k_rotation_seeds")
    got = {(r["rotate"], r["seed"]): r["test_pct"] for r in df.iter_rows(named=True)}
    assert got == ROTATION
    assert set(df["n_test"].to_list()) == {1319}
    means = df.group_by("rotate").agg(pl.col("test_pct").mean())
    for rotate, mean in means.iter_rows():
        assert abs(mean - TWO_SEED_MEANS[rotate]) <= 0.05 + 1e-9, rotate
    # the arm table's AntiPaSTO-rot (V) row is the rotation table's seed 0
    arm = read("gsm8k_arms").filter(pl.col("arm") == "AntiPaSTO-rot (V)").row(0, named=True)
    assert (arm["rotate"], arm["seed"], arm["test_pct"]) == ("V", 0, ROTATION[("V", 0)])


def test_compression_tables_match_issue_and_cite_the_papers():
    df = read("compression_ppl")
    got = {(r["paper"], r["method"]): r["ppl"] for r in df.iter_rows(named=True)}
    assert got == COMPRESSION
    arxiv = {"SVD-LLM": "arXiv:2403.07378", "CorDA": "arXiv:2406.05223"}
    table = {"SVD-LLM": "Table 1", "CorDA": "Table 6"}
    model = {"SVD-LLM": "LLaMA-7B", "CorDA": "LLaMA-2-7B"}
    for r in df.iter_rows(named=True):
        assert r["arxiv"] == arxiv[r["paper"]] and arxiv[r["paper"]] in r["source"]
        assert r["table"] == table[r["paper"]] and table[r["paper"]] in r["source"]
        assert r["model"] == model[r["paper"]]
    assert set(df.filter(pl.col("paper") == "SVD-LLM")["dataset"].to_list()) == {"WikiText-2"}
