"""covsvd.lab.plotting: where figures go, stable names, deterministic files, one colour per arm."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from covsvd.lab import plotting as cp  # noqa: E402


def _figure():
    cp.use_style()
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3], [1.0, 4.0, 9.0], color=cp.color("full"), label=cp.LABELS["full"])
    ax.legend()
    return fig


def test_save_figure_writes_png_svg_and_data_deterministically(tmp_path: Path):
    data = pl.DataFrame({"r": [1, 2, 3], "err": [0.1 + 0.2, 1e-9, math.nan], "metric": ["full", None, "diag"],
                         "whole": [56.0, 2e20, -3.0]})
    fig = _figure()
    a = cp.save_figure(fig, "99_demo", data, directory=tmp_path / "a")
    b = cp.save_figure(_figure(), "99_demo", data, directory=tmp_path / "b")
    plt.close("all")
    assert a.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert a.svg.read_bytes() == b.svg.read_bytes(), "SVG must not depend on the run (date, ids)"
    assert a.csv.read_bytes() == b.csv.read_bytes()
    assert b"<dc:date>" not in a.svg.read_bytes()
    assert a.csv.read_text() == "r,err,metric,whole\n1,0.3,full,56.0\n2,1e-09,,2e+20\n3,NaN,diag,-3.0\n"
    back = pl.read_csv(a.csv)
    assert back.schema == data.schema, "types survive the round trip"
    assert back["r"].to_list() == [1, 2, 3] and back["err"][1] == 1e-9 and math.isnan(back["err"][2])
    assert cp.saved().filter(pl.col("name") == "99_demo").height == 1, "saved() lists each name once"
    assert cp.list_figures("99", directory=tmp_path / "a") == ["99_demo"]


def test_float_noise_below_seven_digits_does_not_change_the_data_file(tmp_path: Path):
    x = 0.123456789
    a = cp.save_figure(_figure(), "99_noise", {"v": [x]}, directory=tmp_path / "a")
    b = cp.save_figure(_figure(), "99_noise", {"v": [x * (1 + 1e-12)]}, directory=tmp_path / "b")
    plt.close("all")
    assert a.csv.read_text() == b.csv.read_text() == "v\n0.1234568\n"


@pytest.mark.parametrize("name", ["metric_axis", "5_metric", "05-metric", "05_Metric", "05_", "05_a__b"])
def test_bad_names_are_refused(name, tmp_path: Path):
    with pytest.raises(ValueError, match="05_metric_axis"):
        cp.save_figure(_figure(), name, {"x": [1]}, directory=tmp_path)
    plt.close("all")


def test_data_must_be_a_nonempty_table(tmp_path: Path):
    with pytest.raises(ValueError, match="empty"):
        cp.save_figure(_figure(), "99_empty", pl.DataFrame({"x": []}), directory=tmp_path)
    with pytest.raises(TypeError, match="polars DataFrame"):
        cp.save_figure(_figure(), "99_list", [1, 2, 3], directory=tmp_path)
    plt.close("all")


def test_mode_and_output_directory(monkeypatch, tmp_path: Path):
    monkeypatch.delenv(cp.FIGURES_DIR_ENV, raising=False)
    monkeypatch.setenv(cp.QUICK_ENV, "0")
    assert not cp.quick() and cp.by_mode(full=10, quick=1) == 10
    assert cp.figures_dir() == cp.project_root() / "figures"
    monkeypatch.setenv(cp.QUICK_ENV, "1")
    assert cp.quick() and cp.by_mode(full=10, quick=1) == 1
    quick_dir = cp.figures_dir()
    assert cp.project_root() not in quick_dir.resolve().parents, "quick mode never writes into the project"
    monkeypatch.setenv(cp.FIGURES_DIR_ENV, str(tmp_path / "out"))
    assert cp.settings() == cp.Settings(quick=True, figures_dir=tmp_path / "out")
    assert (tmp_path / "out" / "data").is_dir()
    monkeypatch.setenv(cp.QUICK_ENV, "maybe")
    with pytest.raises(ValueError, match="COVSVD_QUICK"):
        cp.quick()


def test_every_arm_has_its_own_colour():
    arms = ["identity", "diag", "full", "corda", "asvd", "two-sided", "diag-G", "V", "U", "both"]
    assert set(cp.COLORS) == set(arms) and set(cp.LABELS) >= set(arms)
    assert len({cp.color(a) for a in arms} | {cp.OTHER_COLOR}) == len(arms) + 1
    with pytest.raises(KeyError, match="known"):
        cp.color("lora")


def test_label_points_keeps_labels_apart():
    cp.use_style()
    fig, ax = plt.subplots()
    x, y = [1.0, 1.01, 1.02, 5.0], [1.0, 1.0, 1.001, 3.0]
    ax.scatter(x, y)
    ax.set_xlim(0, 6)
    ax.set_ylim(0, 4)
    cp.label_points(ax, x, y, ["a", "b", "c", "d"], side=["left", "left", "left", "right"])
    fig.canvas.draw()
    boxes = [Text.get_window_extent(t) for t in ax.texts]  # the text alone, not its leader line
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())
    plt.close(fig)
