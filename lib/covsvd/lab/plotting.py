"""Figures for the notebooks: one style, one colour per arm, and ``save_figure`` (PNG + SVG + tidy CSV).

Every notebook starts with::

    from covsvd import plotting as cp
    cp.use_style()                                  # seaborn theme, readable fonts, colour-blind palette
    N_TOKENS = cp.by_mode(full=50_000, quick=2_000)  # smaller work under COVSVD_QUICK=1

and saves each figure with the table it was drawn from::

    fig, ax = plt.subplots()
    ax.plot(df["r"], df["error"], color=cp.COLORS["full"], label=cp.LABELS["full"])
    cp.save_figure(fig, "02_truncation_error", df)   # figures/02_truncation_error.{png,svg} + figures/data/….csv

Names are ``<NN>_<what>`` (``NN`` = the notebook's number), so a figure's file name says which notebook
made it, and stays the same from run to run. ``cp.saved()`` lists what this kernel has saved.

Where figures go (:func:`figures_dir`): ``$COVSVD_FIGURES_DIR`` when set; otherwise, in quick mode
(``COVSVD_QUICK=1``) a temporary directory, never the project's ``figures/``; otherwise ``<project>/figures``.

Determinism: the CSV holds floats to :data:`CSV_SIGNIFICANT_DIGITS` significant digits in ``%g`` form
(so last-bit noise does not change the file), the SVG has no date and a fixed ``svg.hashsalt``, so
running a notebook twice writes identical data and SVG files.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import polars as pl

QUICK_ENV = "COVSVD_QUICK"
FIGURES_DIR_ENV = "COVSVD_FIGURES_DIR"
NAME_PATTERN = re.compile(r"\d\d_[a-z0-9]+(?:_[a-z0-9]+)*")
CSV_SIGNIFICANT_DIGITS = 7
PNG_DPI = 150
SVG_HASHSALT = "covsvd"

# ---------------------------------------------------------------------------------------------- mode


def quick() -> bool:
    """True under ``COVSVD_QUICK=1`` (fewer tokens / layers; figures go to a temporary directory).

    Accepts ``1/true/yes`` and ``0/false/no/""``; anything else raises rather than guessing.
    """
    raw = os.environ.get(QUICK_ENV, "").strip().lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("", "0", "false", "no"):
        return False
    raise ValueError(f"{QUICK_ENV}={os.environ[QUICK_ENV]!r}; expected 1 (quick) or 0 (full)")


_quick = quick


def by_mode(*, full: Any, quick: Any) -> Any:
    """``quick`` under ``COVSVD_QUICK=1``, else ``full``: ``N = cp.by_mode(full=50_000, quick=2_000)``."""
    return quick if _quick() else full


def project_root() -> Path:
    """The covsvd checkout (the directory holding ``pyproject.toml`` and ``notebooks/``).

    Found from this file (editable install) or else from the working directory upwards.
    """
    candidates = [Path(__file__).resolve().parents[3], *Path.cwd().resolve().parents, Path.cwd().resolve()]
    for c in candidates:
        if (c / "pyproject.toml").is_file() and (c / "notebooks").is_dir():
            return c
    raise FileNotFoundError(
        f"cannot find the covsvd project (pyproject.toml + notebooks/) above {Path.cwd()}; "
        f"set {FIGURES_DIR_ENV}=<dir> to choose where figures go"
    )


_QUICK_TMP: Path | None = None


def figures_dir() -> Path:
    """Where :func:`save_figure` writes (created if missing); see the module docstring for the rule."""
    global _QUICK_TMP
    override = os.environ.get(FIGURES_DIR_ENV, "").strip()
    if override:
        out = Path(override)
    elif quick():
        if _QUICK_TMP is None:
            _QUICK_TMP = Path(tempfile.mkdtemp(prefix="covsvd-figures-quick-"))
        out = _QUICK_TMP
    else:
        out = project_root() / "figures"
    (out / "data").mkdir(parents=True, exist_ok=True)
    return out


@dataclass(frozen=True)
class Settings:
    quick: bool
    figures_dir: Path


def settings() -> Settings:
    """The mode and output directory in one object (printed at the top of each notebook)."""
    return Settings(quick=quick(), figures_dir=figures_dir())


# -------------------------------------------------------------------------------------------- colours
# seaborn's "colorblind" palette (Okabe-Ito based). One colour per arm, the same in every notebook.
PALETTE = {
    "blue": "#0173b2",
    "orange": "#de8f05",
    "green": "#029e73",
    "vermillion": "#d55e00",
    "purple": "#cc78bc",
    "brown": "#ca9161",
    "pink": "#fbafe4",
    "grey": "#949494",
    "yellow": "#ece133",
    "sky": "#56b4e9",
    "black": "#1a1a1a",
}
METRIC_COLORS = {
    "identity": PALETTE["blue"],
    "diag": PALETTE["orange"],
    "full": PALETTE["green"],
    "corda": PALETTE["vermillion"],
    "asvd": PALETTE["purple"],
    "two-sided": PALETTE["pink"],
    "diag-G": PALETTE["yellow"],
}
ROTATE_COLORS = {"V": PALETTE["sky"], "U": PALETTE["brown"], "both": PALETTE["black"]}
OTHER_COLOR = PALETTE["grey"]  # anything that is not one of the arms above (e.g. LoRA-family baselines)
COLORS = {**METRIC_COLORS, **ROTATE_COLORS}
LABELS = {
    "identity": "C = I (plain SVD)",
    "diag": "diag C (ASVD-style)",
    "full": "full C (whitening)",
    "corda": "W C (CorDA literal)",
    "asvd": "E|x| (ASVD paper)",
    "two-sided": "G and C (two-sided)",
    "diag-G": "diag G and C (FWSVD-style rows)",
    "V": "rotate V (input basis)",
    "U": "rotate U (output basis)",
    "both": "rotate both",
}


def color(key: str) -> str:
    """The colour of a metric (``identity/diag/full/corda/asvd/two-sided``, and notebook 10's ``diag-G``) or rotation
    (``V/U/both``)."""
    try:
        return COLORS[key]
    except KeyError:
        raise KeyError(f"no colour for {key!r}; known: {sorted(COLORS)} (use OTHER_COLOR for the rest)") from None


def use_style() -> None:
    """The shared look: seaborn whitegrid, readable fonts, the colour-blind palette, tight saving; and
    polars tables shown in full (up to 30 rows, 12 columns) so a notebook's tables are readable on GitHub."""
    import seaborn as sns

    pl.Config.set_tbl_rows(30)
    pl.Config.set_tbl_cols(12)
    pl.Config.set_fmt_str_lengths(60)
    pl.Config.set_tbl_width_chars(160)

    sns.set_theme(context="notebook", style="whitegrid", palette=list(PALETTE.values())[:10], font_scale=1.0)
    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 4.2),
            "figure.dpi": 100,
            "figure.constrained_layout.use": True,
            "axes.titlesize": 12,
            "axes.titleweight": "bold",
            "axes.labelsize": 11,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "legend.fontsize": 9.5,
            "legend.frameon": False,
            "lines.linewidth": 1.8,
            "errorbar.capsize": 3,
            "savefig.dpi": PNG_DPI,
            "savefig.bbox": "tight",
            "svg.hashsalt": SVG_HASHSALT,
        }
    )


# ----------------------------------------------------------------------------------------------- save


@dataclass(frozen=True)
class Saved:
    name: str
    png: Path
    svg: Path
    csv: Path
    rows: int


_SAVED: list[Saved] = []


def _as_frame(data: Any, name: str) -> pl.DataFrame:
    if isinstance(data, pl.DataFrame):
        df = data
    elif isinstance(data, dict):
        df = pl.DataFrame(data)
    elif type(data).__module__.startswith("pandas"):
        df = pl.from_pandas(data)
    else:
        raise TypeError(
            f"save_figure({name!r}): data is a {type(data).__name__}; pass the tidy table the figure was "
            "drawn from as a polars DataFrame (or a dict of equal-length columns)"
        )
    if df.height == 0 or df.width == 0:
        raise ValueError(f"save_figure({name!r}): the data table is empty; save the numbers the figure shows")
    return df


def _format_float(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    text = format(v, f".{CSV_SIGNIFICANT_DIGITS}g")
    return text if any(c in text for c in ".e") else text + ".0"  # 56.0 stays a float when read back


def _deterministic_csv(df: pl.DataFrame) -> str:
    """CSV text with floats in ``%.7g`` form (``56.0`` keeps its ``.0``; nulls empty, NaN as ``NaN``), other
    columns as polars writes them."""
    cols = []
    for s in df.get_columns():
        if s.dtype.is_float():
            s = pl.Series(s.name, [None if v is None else _format_float(v) for v in s.to_list()], dtype=pl.String)
        cols.append(s)
    return pl.DataFrame(cols).write_csv(line_terminator="\n")


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(project_root()))
    except (ValueError, FileNotFoundError):
        return str(path)


def save_figure(fig, name: str, data: Any, *, directory: str | os.PathLike | None = None) -> Saved:
    """Write ``<dir>/<name>.png`` (README), ``<dir>/<name>.svg`` (papers) and ``<dir>/data/<name>.csv``.

    Args:
        fig: a matplotlib Figure (left open, so the notebook still shows it).
        name: ``<NN>_<what>`` in lower case, e.g. ``"05_metric_axis"``; ``NN`` is the notebook's number.
        data: the tidy table behind the figure (polars DataFrame, or a dict of columns; pandas works too).
        directory: overrides :func:`figures_dir` (tests use this).

    Returns the paths written. The PNG is at 150 dpi; the SVG has no date and a fixed hash salt.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"figure name {name!r} must look like '05_metric_axis': two digits (the notebook), an underscore, "
            "then lower-case words joined by '_'"
        )
    df = _as_frame(data, name)
    out = Path(directory) if directory is not None else figures_dir()
    (out / "data").mkdir(parents=True, exist_ok=True)
    png, svg, csv = out / f"{name}.png", out / f"{name}.svg", out / "data" / f"{name}.csv"
    common = dict(bbox_inches="tight", facecolor="white")
    with mpl.rc_context({"svg.hashsalt": SVG_HASHSALT}):
        fig.savefig(png, format="png", dpi=PNG_DPI, **common)
        fig.savefig(svg, format="svg", metadata={"Date": None}, **common)
    csv.write_text(_deterministic_csv(df), encoding="utf-8")
    saved = Saved(name, png, svg, csv, df.height)
    _SAVED[:] = [s for s in _SAVED if s.name != name] + [saved]
    print(f"saved {name}: {_display(png)} (+ .svg), {_display(csv)} ({df.height} rows)")
    return saved


def saved() -> pl.DataFrame:
    """What this kernel has saved, in order: name, rows of data, and the three files."""
    return pl.DataFrame(
        {
            "name": [s.name for s in _SAVED],
            "rows": [s.rows for s in _SAVED],
            "png": [_display(s.png) for s in _SAVED],
            "svg": [_display(s.svg) for s in _SAVED],
            "csv": [_display(s.csv) for s in _SAVED],
        },
        schema={"name": pl.String, "rows": pl.Int64, "png": pl.String, "svg": pl.String, "csv": pl.String},
    )


def list_figures(prefix: str = "", directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the figures on disk (``<name>.png``) starting with ``prefix`` (e.g. ``"05"``), sorted."""
    out = Path(directory) if directory is not None else figures_dir()
    return sorted(p.stem for p in out.glob(f"{prefix}*.png") if NAME_PATTERN.fullmatch(p.stem))


# --------------------------------------------------------------------------------------------- labels


def label_points(ax, x, y, labels, *, side="right", dx_points: float = 6.0, fontsize: float = 9.0,
                 gap: float = 1.25, cluster_points: float = 40.0, color: str = "0.25") -> None:
    """Write ``labels`` beside points ``(x, y)``, pushed apart vertically so they do not overlap.

    Points whose x positions are within ``cluster_points`` (typographic points) of each other form a
    column of labels spaced ``gap`` line heights apart, centred on their points, on the ``side``
    (``"right"`` or ``"left"``, or one per point; points on different sides never share a column) of the
    column's outermost point; a thin leader line joins a label to its point when it had to move. Call it after
    setting the axes' scales and limits.
    """
    import numpy as np

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    sides = [side] * len(x) if isinstance(side, str) else list(side)
    if not (len(x) == len(y) == len(labels) == len(sides)):
        raise ValueError(f"label_points: x, y, labels, side have lengths {len(x)}, {len(y)}, {len(labels)}, {len(sides)}")
    if set(sides) - {"left", "right"}:
        raise ValueError(f"label_points: side must be 'left' or 'right', got {sorted(set(sides))}")
    ax.autoscale_view()
    px_per_pt = ax.figure.dpi / 72.0
    disp = ax.transData.transform(np.column_stack([x, y])) / px_per_pt  # (n, 2) in points
    step = gap * fontsize
    order = np.argsort(disp[:, 0], kind="stable")
    clusters: list[list[int]] = []
    for i in order:
        last = clusters[-1][-1] if clusters else None
        if last is not None and disp[i, 0] - disp[last, 0] <= cluster_points and sides[i] == sides[last]:
            clusters[-1].append(int(i))
        else:
            clusters.append([int(i)])
    for members in clusters:
        where = sides[members[0]]
        members = sorted(members, key=lambda i: disp[i, 1])
        want = np.array([disp[i, 1] for i in members])
        pos = want.copy()
        for k in range(1, len(pos)):
            pos[k] = max(pos[k], pos[k - 1] + step)
        pos -= (pos - want).mean()  # centre the column on its points
        for k in range(1, len(pos)):
            pos[k] = max(pos[k], pos[k - 1] + step)
        edge = max(disp[i, 0] for i in members) if where == "right" else min(disp[i, 0] for i in members)
        for k, i in enumerate(members):
            dy = pos[k] - want[k]
            dx = (edge - disp[i, 0] + dx_points) if where == "right" else (edge - disp[i, 0] - dx_points)
            moved = abs(dy) > 0.3 * fontsize or abs(dx) > dx_points + 1
            ax.annotate(
                str(labels[i]), (x[i], y[i]), xytext=(dx, dy), textcoords="offset points",
                fontsize=fontsize, color=color, va="center", ha="left" if where == "right" else "right",
                arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6, shrinkA=0, shrinkB=3) if moved else None,
            )


def plain_log(ax, axis: str = "y", subs: tuple[float, ...] | None = None) -> None:
    """Label a log ``axis`` (``"x"`` or ``"y"``) of ``ax`` in plain numbers (``0.02``, not ``2 x 10^-2``).

    Ticks at ``subs`` x 10^k; ``None`` chooses 1, 2, 5 x 10^k when the axis spans more than a decade and every
    digit when it spans less (so a short axis still gets labels). Call after the limits are set."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if axis not in ("x", "y"):
        raise ValueError(f"axis={axis!r}; expected 'x' or 'y'")
    a = ax.xaxis if axis == "x" else ax.yaxis
    if subs is None:
        lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
        subs = (1.0, 2.0, 5.0) if hi / lo > 10 else tuple(float(k) for k in range(1, 10))
    a.set_major_locator(LogLocator(base=10, subs=subs))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())
