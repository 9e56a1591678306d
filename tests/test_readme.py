"""README.md as a user meets it: every python block runs as written, its images exist, and figures/ is
consistent (every figure has its PNG, SVG and data CSV, and the gallery shows each one).

The blocks are extracted from README.md itself and run in order in one namespace, in a fresh Python process
whose working directory is a temporary folder (files the examples write land there). A block that needs what
a machine may lack starts with ``# needs: cuda`` and/or ``# needs: checkpoint`` (a comma-separated list):
it is skipped by name, with that reason, when the need is not met. An unknown need fails.

Images: whatever README.md references is checked (Markdown ``![alt](path)`` and HTML ``<img src=...>``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import polars as pl
import pytest
import torch

from covsvd.lab.plotting import NAME_PATTERN

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"
NEEDS = re.compile(r"#\s*needs:\s*([\w\s,-]+?)(?:\s*\(.*\))?\s*$")
# What each need means, and whether this machine meets it. A checkpoint block downloads or reads a
# multi-GB model: it runs only where COVSVD_README_CHECKPOINTS=1 says such models are at hand.
KNOWN_NEEDS = {
    "cuda": lambda: torch.cuda.is_available(),
    "checkpoint": lambda: os.environ.get("COVSVD_README_CHECKPOINTS") == "1",
}
BLOCK_TIMEOUT_S = 600
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


@dataclass(frozen=True)
class Block:
    index: int  # 1-based, among the python blocks
    heading: str  # the nearest heading above it
    line: int  # README line of the opening fence
    code: str
    needs: tuple[str, ...]

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")
        return f"{self.index:02d}-{slug}"


def python_blocks(markdown: str) -> list[Block]:
    """Every fenced ```python block of ``markdown``, in order, with its heading and its ``# needs:`` line."""
    blocks, heading, inside, start, code = [], "", False, 0, []
    for n, line in enumerate(markdown.splitlines(), 1):
        if not inside and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif not inside and line.strip() == "```python":
            inside, start, code = True, n, []
        elif inside and line.strip() == "```":
            inside = False
            text = "\n".join(code) + "\n"
            m = NEEDS.match(code[0].strip()) if code else None
            needs = tuple(x.strip() for x in m.group(1).split(",") if x.strip()) if m else ()
            blocks.append(Block(len(blocks) + 1, heading, start, text, needs))
        elif inside:
            code.append(line)
    assert not inside, "README.md has an unclosed ```python block"
    return blocks


BLOCKS = python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def unmet(block: Block) -> list[str]:
    unknown = [n for n in block.needs if n not in KNOWN_NEEDS]
    assert not unknown, f"README block {block.name} (line {block.line}) needs {unknown}: known are {list(KNOWN_NEEDS)}"
    return [n for n in block.needs if not KNOWN_NEEDS[n]()]


RUNNER = """
import json, sys, time, traceback
blocks, out = json.load(open(sys.argv[1])), sys.argv[2]
namespace, results = {"__name__": "__main__"}, {}
for b in blocks:
    t = time.perf_counter()
    try:
        exec(compile(b["code"], f"README.md block {b['name']} (line {b['line']})", "exec"), namespace)
        results[b["name"]] = {"ok": True, "error": "", "seconds": time.perf_counter() - t}
    except BaseException:
        results[b["name"]] = {"ok": False, "error": traceback.format_exc(), "seconds": time.perf_counter() - t}
    json.dump(results, open(out, "w"))
"""


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> dict:
    """Run every README block whose needs are met, in order, in one namespace in a fresh process."""
    work = tmp_path_factory.mktemp("readme")
    runnable = [{"name": b.name, "line": b.line, "code": b.code} for b in BLOCKS if not unmet(b)]
    (work / "blocks.json").write_text(json.dumps(runnable), encoding="utf-8")
    (work / "runner.py").write_text(RUNNER, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"),
                                                                             os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "runner.py", "blocks.json", "results.json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    return {"results": results, "stderr": proc.stderr[-4000:], "returncode": proc.returncode}


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 4 and any(not b.needs for b in BLOCKS)
    assert len({b.name for b in BLOCKS}) == len(BLOCKS)


def test_block_parser_reads_needs_and_headings():
    text = "## A\n```python\n# needs: cuda, checkpoint (a 7B model)\nx = 1\n```\n### B c\n```python\ny = 2\n```\n"
    a, b = python_blocks(text)
    assert (a.name, a.needs, a.line) == ("01-a", ("cuda", "checkpoint"), 2)
    assert (b.name, b.needs, b.code) == ("02-b-c", (), "y = 2\n")


@pytest.mark.slow
@pytest.mark.xdist_group("readme")
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_readme_block_runs_as_written(block, readme_run):
    missing = unmet(block)
    if missing:
        pytest.skip(f"README block {block.name} needs {', '.join(missing)} (line {block.line})")
    result = readme_run["results"].get(block.name)
    assert result is not None, (f"README block {block.name} did not run (the process exited "
                                f"{readme_run['returncode']}):\n{readme_run['stderr']}")
    assert result["ok"], f"README block {block.name} (line {block.line}) failed:\n{result['error']}"
