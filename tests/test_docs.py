"""README.md and docs/ for users: generated pages current, no development history, the methods cited, the
"which metric?" table equal to the notebooks' data, every linked page present, the README short."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {p: p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
HISTORY = re.compile(r"\b(this round|the issue|issue \d+|previously|formerly|no longer|until this|used to be|"
                     r"the former default|is now|are now|now (?:uses|has|takes|writes|is))\b", re.I)
CITED = {"PiSSA": "2024", "CorDA": "2024", "ASVD": "2023", "SVD-LLM": "2024", "EVA": "2024", "AntiPaSTO": "2026",
         "LoftQ": "2023", "QLoRA": "2023", "FWSVD": "2022"}
README_LIMIT = 300  # lines before the figure gallery


def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "docs" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_current():
    for path, text in make_docs().outputs().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run python docs/make_docs.py"


def test_api_page_lists_every_public_name():
    import covsvd

    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    top = api.split("\n## `covsvd.", 1)[0]
    listed = set(re.findall(r"^- (?:class )?`(\w+)", top, re.M))
    assert listed == set(covsvd.__all__)


def test_no_development_history_in_readme_or_docs():
    found = [f"{p.name}: {m.group(0)!r}" for p, text in PAGES.items() for m in HISTORY.finditer(text)]
    assert not found, found


def test_the_readme_cites_every_method_with_its_year():
    for method, year in CITED.items():
        assert re.search(rf"{re.escape(method)}[^|\n]*\b{year}\b", README), f"{method} ({year}) is not cited"


def test_every_linked_page_exists_and_the_readme_is_short():
    for target in re.findall(r"\]\((docs/[^)#\s]+)\)", README):
        assert (ROOT / target).is_file(), target
    head = README.split("\n## Gallery", 1)[0]
    assert len(head.splitlines()) <= README_LIMIT


def table_row(metric: str) -> str:
    section = README.split("## Which metric?", 1)[1].split("\n## ", 1)[0]
    (row,) = [line for line in section.splitlines() if line.startswith(f"| `{metric}` |")]
    return row


def test_which_metric_table_is_the_notebooks_data():
    """Each number of the README's "which metric?" table recomputed from figures/data (notebooks 02, 05, 07)."""
    layers = pl.read_csv(ROOT / "figures/data/02_layer_summary.csv")
    wide = layers.pivot(on="metric", index=["layer", "kind"], values="error_held")
    keep = pl.read_csv(ROOT / "figures/data/07_keep_fraction.csv")
    local = pl.read_csv(ROOT / "figures/data/05_local_metric_axis.csv")
    for metric in ("identity", "diag", "full", "corda"):
        row = table_row(metric)
        ratio = wide[metric] / wide["identity"]
        if metric != "identity":
            assert f"{ratio.min():.2f}–{ratio.max():.2f} (median {ratio.median():.2f})" in row, row
        errors = [keep.filter((pl.col("metric") == metric) & (pl.col("removed_target") == f))["hidden_rel_error"][0]
                  for f in (0.2, 0.4, 0.6)]
        assert " / ".join(f"{e:.2f}" for e in errors) in row, row
        mean = local.filter((pl.col("source") == "local") & (pl.col("arm") == metric) & (pl.col("seed") == "mean"))
        est, lo, hi = mean["estimate_pct"][0], mean["ci95_low"][0], mean["ci95_high"][0]
        assert f"{est:.1f} [{lo:.1f}, {hi:.1f}]" in row, row
    untrained = local.filter(pl.col("arm") == "baseline")["estimate_pct"][0]
    assert f"untrained model scores {untrained:.1f}%" in README
    two = local.filter((pl.col("source") == "local") & (pl.col("arm") == "two-sided") & (pl.col("seed") == "mean"))
    assert f"{two['estimate_pct'][0]:.1f} [{two['ci95_low'][0]:.1f}, {two['ci95_high'][0]:.1f}]" in table_row("two-sided")
    truncation = pl.read_csv(ROOT / "figures/data/10_truncation.csv").filter(pl.col("kind") == "all layers")
    at = {(a, r): e for a, r, e in truncation.select("arm", "r", "hidden_rel_error").rows()}
    assert at["two-sided", 96] < at["full", 96] and at["two-sided", 192] < at["full", 192]
    assert at["two-sided", 32] > at["full", 32]  # "not at r = 32"
    assert f"{at['two-sided', 96]:.3f} against {at['full', 96]:.3f} for `full` at r = 96" in README


def test_every_name_the_readme_shows_is_public():
    """The methods table and the examples use only public names: ``covsvd.NAME`` and the table's first column
    (``name(`` or bare identifiers) are in ``covsvd.__all__``."""
    import covsvd

    table = README.split("| covsvd | method | paper |", 1)[1].split("\n\n", 1)[0]
    first = [row.split("|")[1] for row in table.splitlines()[2:] if row.startswith("|")]
    names = {m for cell in first for m in re.findall(r"`(\w+)[`(]", cell) if m != "metric"}
    names |= set(re.findall(r"\bcovsvd\.(\w+)\b", README.split("\n## Gallery", 1)[0]))
    names -= {"lab", "util", "data", "capture", "algebra", "adapt", "export", "cli"}  # subpackages
    missing = sorted(n for n in names if n not in covsvd.__all__)
    assert not missing, f"README.md shows names that covsvd does not export: {missing}"


def resolves(dotted: str) -> bool:
    """Whether ``covsvd.a.b.c`` names a module or an attribute of one."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_dotted_name_in_readme_and_docs_exists():
    names = {m for text in PAGES.values() for m in re.findall(r"\b(covsvd(?:\.\w+)+)", text)}
    missing = sorted(n for n in names if not resolves(n))
    assert not missing, f"README.md / docs name what does not exist: {missing}"
