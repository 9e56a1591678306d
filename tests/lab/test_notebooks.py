"""Every notebook executes in quick mode through the runner of ``make figures``, and the runner itself
reports failures by notebook, cell and traceback, never rewrites a notebook in quick mode, and keeps
``figures/`` in step with what the notebooks write.

New notebooks (``notebooks/NN_*.ipynb``) are picked up by the glob: nothing to register.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

import covsvd
from covsvd.lab.figures import (
    NOTEBOOK_GLOB,
    NotebookError,
    find_notebooks,
    longest_first,
    prime_moments,
    recorded_seconds,
    run_notebook,
)
from covsvd.lab.plotting import NAME_PATTERN

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob(NOTEBOOK_GLOB))
IDS = [p.stem for p in NOTEBOOKS]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_quick_mode(path: Path, tmp_path: Path):
    before = path.read_bytes()
    figures = tmp_path / "figures"
    run = run_notebook(path, quick=True, figures_dir=figures, write_to=tmp_path / path.name)
    assert path.read_bytes() == before, "quick mode must not rewrite the notebook"
    nb = nbformat.read(tmp_path / path.name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"]
    for name in run.figures:
        assert name.startswith(path.stem[:2] + "_"), f"{path.name} saved {name}: figure names start with its number"
        for f in (figures / f"{name}.png", figures / f"{name}.svg", figures / "data" / f"{name}.csv"):
            assert f.is_file() and f.stat().st_size > 0, f


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_shape(path: Path):
    """Opens and ends with Markdown, runs on the python3 kernel, imports covsvd and never redefines it."""
    assert re.fullmatch(r"\d\d_[a-z0-9_]+", path.stem), path.name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[-1].cell_type == "markdown"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert re.search(r"^\s*(import covsvd|from covsvd\b)", code, re.M), f"{path.name} does not import covsvd"
    redefined = {n for n in re.findall(r"^\s*(?:def|class)\s+(\w+)", code, re.M)} & set(covsvd.__all__)
    assert not redefined, f"{path.name} redefines covsvd's {sorted(redefined)}: import them instead"
    for cell in nb.cells:  # saved outputs (full mode) never hold an error
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], path.name


def _write(path: Path, *sources: str) -> Path:
    cells = [new_markdown_cell("# test")] + [new_code_cell(s) for s in sources] + [new_markdown_cell("done")]
    nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_runner_reports_the_failing_cell(tmp_path: Path):
    nb = _write(tmp_path / "98_broken.ipynb", "x = 1", "def f():\n    return 1 / 0\nf()", "print('never')")
    before = nb.read_bytes()
    with pytest.raises(NotebookError) as info:
        run_notebook(nb, quick=False, figures_dir=tmp_path / "figures", timeout=120)
    msg = str(info.value)
    assert "98_broken" in msg and "cell 2" in msg and "ZeroDivisionError" in msg and "return 1 / 0" in msg
    assert "\x1b[" not in msg, "ANSI colour codes stripped"
    assert nb.read_bytes() == before, "a failed notebook is not written back"


@pytest.mark.slow
def test_runner_full_mode_writes_back_and_drops_stale_figures(tmp_path: Path):
    figures = tmp_path / "figures"
    (figures / "data").mkdir(parents=True)
    for stale in (figures / "97_gone.png", figures / "97_gone.svg", figures / "data" / "97_gone.csv",
                  figures / "96_other.png"):
        stale.write_text("old")
    nb = _write(
        tmp_path / "97_ok.ipynb",
        "import os\nfrom covsvd.lab import plotting as cp\nimport matplotlib.pyplot as plt\n"
        "print(os.environ['COVSVD_QUICK'], cp.quick(), os.getcwd())",
        "fig, ax = plt.subplots()\nax.plot([1, 2], [3, 4])\ncp.save_figure(fig, '97_line', {'x': [1, 2], 'y': [3.0, 4.0]})",
    )
    run = run_notebook(nb, quick=False, figures_dir=figures, timeout=120)
    assert run.name == "97_ok" and run.cells == 2 and run.figures == ("97_line",)
    executed = nbformat.read(nb, as_version=4)
    out = executed.cells[1].outputs[0]["text"]
    assert out.split()[:2] == ["0", "False"] and out.split()[2] == str(tmp_path), "full mode, cwd = notebook's dir"
    assert any("image/png" in o.get("data", {}) for o in executed.cells[2].outputs), "inline figure kept"
    assert all("execution" not in c.metadata for c in executed.cells), "record_timing is off"
    assert (figures / "97_line.png").is_file() and (figures / "data" / "97_line.csv").is_file()
    assert not (figures / "97_gone.png").exists() and not (figures / "data" / "97_gone.csv").exists()
    assert (figures / "96_other.png").exists(), "another notebook's figures are left alone"


def test_find_notebooks_selects_by_prefix(tmp_path: Path):
    for stem in ("01_a", "02_b", "03_c"):
        _write(tmp_path / f"{stem}.ipynb", "1")
    (tmp_path / "scratch.ipynb").write_text("{}")
    assert [p.stem for p in find_notebooks(directory=tmp_path)] == ["01_a", "02_b", "03_c"]
    assert [p.stem for p in find_notebooks(["03", "01_a"], directory=tmp_path)] == ["01_a", "03_c"]
    with pytest.raises(NotebookError, match="09"):
        find_notebooks(["09"], directory=tmp_path)
    assert all(NAME_PATTERN.fullmatch(p.stem) for p in find_notebooks(directory=tmp_path))


def test_longest_first_orders_by_the_recorded_wall_time(tmp_path: Path):
    paths = [_write(tmp_path / f"{stem}.ipynb", "1") for stem in ("01_a", "02_b", "03_c", "04_d", "05_e")]
    for path, seconds in zip(paths, (40, 250, None, 40, 90), strict=True):
        if seconds is not None:
            nb = nbformat.read(path, as_version=4)
            nb.metadata["covsvd"] = {"seconds": seconds}
            nbformat.write(nb, path)
    assert recorded_seconds(paths[1]) == 250 and recorded_seconds(paths[2]) is None
    # unknown cost first, then longest first, ties in file order
    assert [p.stem for p in longest_first(paths)] == ["03_c", "02_b", "05_e", "01_a", "04_d"]
    # a run that captured the shared moments orders by the cold records, the warm one where a notebook has none
    nb = nbformat.read(paths[3], as_version=4)
    nb.metadata["covsvd"]["seconds_cold"] = 300
    nbformat.write(nb, paths[3])
    assert recorded_seconds(paths[3]) == 40 and recorded_seconds(paths[3], cold=True) == 300
    assert recorded_seconds(paths[1], cold=True) == 250
    assert [p.stem for p in longest_first(paths, cold=True)] == ["03_c", "04_d", "02_b", "05_e", "01_a"]


@pytest.mark.slow
def test_full_run_records_its_seconds_and_quick_runs_do_not(tmp_path: Path):
    nb = _write(tmp_path / "95_t.ipynb", "import time\ntime.sleep(0.2)")
    run_notebook(nb, quick=True, figures_dir=tmp_path / "f", write_to=tmp_path / "q" / nb.name, timeout=120)
    assert recorded_seconds(tmp_path / "q" / nb.name) is None
    run = run_notebook(nb, quick=False, figures_dir=tmp_path / "f", timeout=120)
    assert recorded_seconds(nb) == max(10, round(run.seconds, -1))
    assert "seconds_cold" not in nbformat.read(nb, as_version=4).metadata["covsvd"]
    run = run_notebook(nb, quick=False, figures_dir=tmp_path / "f", timeout=120, cold=True)  # its own record
    assert recorded_seconds(nb, cold=True) == max(10, round(run.seconds, -1))


def test_recorded_seconds_move_only_on_a_large_change():
    from covsvd.lab.figures import _record_seconds

    nb = new_notebook()
    _record_seconds(nb, 4.0)
    assert nb.metadata["covsvd"]["seconds"] == 10  # never 0
    nb.metadata["covsvd"]["seconds"] = 100
    _record_seconds(nb, 118.0)  # within 20%: kept, no churn in git
    assert nb.metadata["covsvd"]["seconds"] == 100
    _record_seconds(nb, 123.0)
    assert nb.metadata["covsvd"]["seconds"] == 120
    nb.metadata["covsvd"]["seconds"] = "fast"  # not a number: replaced
    _record_seconds(nb, 57.0)
    assert nb.metadata["covsvd"]["seconds"] == 60


@pytest.mark.slow
def test_prime_moments_fills_the_cache_the_notebooks_read(tmp_path: Path, monkeypatch):
    import io

    monkeypatch.setenv("COVSVD_CACHE_DIR", str(tmp_path / "cache"))
    log = io.StringIO()
    assert prime_moments(quick=True, stream=log)[1] is True  # it captured
    assert prime_moments(quick=True, stream=log)[1] is False  # all cached
    first, second = log.getvalue().splitlines()
    assert "train captured, heldout captured" in first and "train cached, heldout cached" in second, log.getvalue()
    assert len(list((tmp_path / "cache").glob("moments-*.safetensors"))) == 2
    # the notebooks capture with exactly these arguments: the expression the primer mirrors
    shared = re.compile(r'cached_capture\(model, (\w+), kind="full", progress=False\)')
    found = 0
    for path in NOTEBOOKS:
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for var in shared.findall(code):
            found += 1
            split = re.search(rf"^{var} = covsvd\.calibration_batches\(tok, split=\"(\w+)\", max_tokens=([^\n]+)\)$",
                              code, re.M)
            assert split, (path.name, var)
            assert split.group(2) in ("cp.by_mode(full=None, quick=4096)",), (path.name, split.group(2))
    assert found >= 10, found  # most notebooks read the shared moments


IMPORT = re.compile(r"^\s*(?:from\s+(covsvd[\w.]*)\s+import\s+(\([^)]*\)|[^\n#]+)|import\s+(covsvd[\w.]*))", re.M)
LAB_OR_ROOT = re.compile(r"covsvd(\.lab(\.\w+)?)?")
STAGES = ("data", "capture", "algebra", "adapt", "export")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_lives_on_the_public_api(path: Path):
    """Notebooks import ``covsvd`` (its ``__all__``), the stage packages (``covsvd.data``, ``covsvd.capture``,
    ``covsvd.algebra``, ``covsvd.adapt``, ``covsvd.export``: their ``__all__``) and ``covsvd.lab`` modules only:
    no private names, no module inside a stage reached into."""
    import importlib

    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    public = {"covsvd": set(covsvd.__all__)} | {
        f"covsvd.{stage}": set(importlib.import_module(f"covsvd.{stage}").__all__) for stage in STAGES}
    bad = []
    for frm, names, plain in IMPORT.findall(code):
        module = frm or plain
        if not (LAB_OR_ROOT.fullmatch(module) or module in public):
            bad.append(f"imports from {module}")
        if frm in public:
            for name in (n.split("#")[0].strip().split(" as ")[0] for n in names.strip("()").split(",")):
                if name and name not in public[frm] and name != "lab":
                    bad.append(f"{frm}.{name} is not in {frm}.__all__")
        if module and any(part.startswith("_") for part in module.split(".")):
            bad.append(f"private module {module}")
    for chain, attr in re.findall(r"\bcovsvd\.(\w+)\.(\w+)", code):
        if chain == "lab" or chain in covsvd.__all__:
            continue
        if chain not in STAGES or attr not in public[f"covsvd.{chain}"]:
            bad.append(f"covsvd.{chain}.{attr} is not public")
    assert not bad, f"{path.name}: {sorted(set(bad))}"
