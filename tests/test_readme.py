"""The README's images exist, and figures/ is consistent: every figure has its PNG, SVG and data CSV.

Whatever README.md references is checked (Markdown ``![alt](path)`` and HTML ``<img src=...>``), so the
test is real before the gallery exists and keeps the gallery honest after.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import polars as pl

from covsvd.lab.plotting import NAME_PATTERN

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
IMAGE_REF = re.compile(
    r"!\[[^\]]*\]\(\s*(?:<([^>]+)>|([^)\s]+))(?:\s+\"[^\"]*\")?\s*\)"  # ![alt](path "title"), ![alt](<a path>)
    r"|<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']",  # <img src="path">
    re.I,
)


def image_refs(markdown: str) -> list[str]:
    """Image targets referenced by Markdown or HTML in ``markdown`` (code blocks included: cheap and strict)."""
    return [a or b or c for a, b, c in IMAGE_REF.findall(markdown)]


def test_image_ref_parser():
    text = '![a](figures/01_x.png) and ![b](<figures/my fig.png> "t")\n<img alt="c" src="figures/02_y.svg" width=300>'
    assert image_refs(text) == ["figures/01_x.png", "figures/my fig.png", "figures/02_y.svg"]


def test_every_image_the_readme_references_exists():
    readme = ROOT / "README.md"
    missing = []
    for ref in image_refs(readme.read_text(encoding="utf-8")):
        url = urlparse(ref)
        if url.scheme in ("http", "https", "data"):
            continue  # badges and the like: not checkable offline
        target = (readme.parent / unquote(url.path)).resolve()
        if not target.is_file():
            missing.append(ref)
    assert not missing, f"README.md references images that do not exist: {missing} (run `make figures`?)"


def test_every_figure_has_png_svg_and_data():
    pngs = {p.stem for p in FIGURES.glob("*.png")}
    svgs = {p.stem for p in FIGURES.glob("*.svg")}
    csvs = {p.stem for p in (FIGURES / "data").glob("*.csv")}
    bad_names = sorted(n for n in pngs | svgs | csvs if not NAME_PATTERN.fullmatch(n))
    assert not bad_names, f"figure files must be named NN_what: {bad_names}"
    assert pngs == svgs, f"PNG without SVG: {sorted(pngs - svgs)}; SVG without PNG: {sorted(svgs - pngs)}"
    assert pngs == csvs, f"figure without data: {sorted(pngs - csvs)}; data without figure: {sorted(csvs - pngs)}"
    for name in sorted(csvs):
        df = pl.read_csv(FIGURES / "data" / f"{name}.csv")
        assert df.height > 0 and df.width > 0, f"figures/data/{name}.csv is empty"


def test_the_gallery_shows_every_figure():
    """Every figure ``make figures`` writes appears in the README (a figure nobody can find is not shown)."""
    shown = {Path(unquote(urlparse(ref).path)).stem for ref in image_refs((ROOT / "README.md").read_text("utf-8"))}
    unshown = sorted(p.stem for p in FIGURES.glob("*.png") if p.stem not in shown)
    assert not unshown, f"figures/ has figures the README gallery does not show: {unshown}"


def test_the_readme_api_list_is_covsvd_all():
    """The README's "Public API" table names exactly ``covsvd.__all__``: nothing exported goes undocumented, and
    nothing documented is missing."""
    import covsvd

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Public API\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`covsvd\.(\w+)`", section))
    assert listed == set(covsvd.__all__), (f"in __all__ only: {sorted(set(covsvd.__all__) - listed)}; "
                                           f"in the README only: {sorted(listed - set(covsvd.__all__))}")
