"""An interactive explorer of the orientation of one layer, for JupyterLab: ``explore(model, moments, held_out)``.

Choose a layer, a metric, the rank r and eps (a log slider) and see, for that orientation:

* the spectrum of ``W T`` (the metric's singular values, normalised by the largest; the comparison metric's in
  grey), with r marked;
* the row norms of ``P`` (the first r are the kept rows);
* the functional error ``||(W - U_r S_r P_r) C^{1/2}||_F / ||W C^{1/2}||_F`` against r on the calibration
  moment and on the held-out one (:func:`covsvd.functional_error`'s quantity; undamped C: the relative RMS
  output error of the truncated layer on that data), both metrics;
* the principal angles between the top-r input bases (rows of P) of the metric and of a second metric.

``two-sided`` (``N^{1/2} W M^{1/2}``, docs/algebra.md "The output side") is offered when the explorer is given the
layers' output moments (``output_moments=``, from :func:`covsvd.capture_output_moments`); its damping
``eps_output`` follows the same eps slider. Its U is not orthonormal, so its error curve is
:func:`oblique_error_curve` (exact for any factors) rather than :func:`error_curve` (projections only).

Two layers: :class:`Explorer` is pure (no widgets): :meth:`Explorer.view` maps a :class:`State` to a
:class:`View` (numbers and curves, fp64 tensors) and :func:`draw` maps a View to a matplotlib Figure; the
widget wiring (:class:`ExplorerApp`, built by :func:`explore`) only reads controls, calls them and shows
the result. Tests drive the pure layer headless (tests/lab/test_explore.py).

Speed: what does not depend on r is computed once per ``(layer, metric, eps)`` and cached (an LRU):
:func:`covsvd.orient` at the largest rank ``r_max`` (the top-r factors of any ``r <= r_max`` are the first r of
those, docs/algebra.md "Orientation by a metric"), and the error at *every* r (:func:`error_curve`). Moving
the r slider is then slicing plus one principal-angle computation; a new eps or metric costs one or two
orientations. notebooks/09_explorer.ipynb measures both over every layer of the default model.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.measures import principal_angles
from ..algebra.orient import orient
from ..algebra.validate import FULL_METRICS, METRICS, ONE_SIDED_METRICS, OUTPUT_METRICS
from ..capture.moments import SecondMoment
from ..data.targets import weight_matrix
from .error_curves import error_curve, oblique_error_curve, output_moment

F64 = torch.float64
#: eps slider range, as powers of ten.
EPS_EXPONENTS = (-8.0, 0.0)


# -------------------------------------------------------------------------------------------- pure state


@dataclass(frozen=True)
class State:
    """What the controls say: layer name, metric, rank r, eps (absolute or relative, as the explorer's
    ``eps_mode``) and the metric to compare with."""

    layer: str
    metric: str = "full"
    r: int = 64
    eps: float = DEFAULT_EPS
    other: str = "diag"


@dataclass(frozen=True)
class Basis:
    """The r-independent part of one ``(layer, metric, eps)``: fp64 tensors over all ``r_max`` kept directions.

    ``S (r_max,)`` the top singular values of ``W T`` (all of them when the calibration saw at least
    ``min(d_out, d_in)`` tokens); ``P (r_max, d_in)``;
    ``error_cal``, ``error_held``: ``(r_max + 1,)`` :func:`error_curve` on the calibration / held-out moment
    (``None`` without held-out moments); ``info``: :func:`covsvd.orient`'s info dict.
    """

    S: torch.Tensor
    P: torch.Tensor
    error_cal: torch.Tensor
    error_held: torch.Tensor | None
    info: dict


@dataclass(frozen=True)
class View:
    """Everything one update shows (numbers and curves; fp64 tensors, no figure).

    Attributes: ``state`` (r clamped to ``r_max``); ``shape`` ``(d_out, d_in)``; ``r_max`` (``min(d_out, d_in,
    calibration tokens)``); ``tokens`` / ``held_tokens``; ``basis`` / ``other`` the :class:`Basis` of the
    metric and of the comparison metric; ``angles (r,)`` radians, ascending, between their top-r input bases.
    """

    state: State
    shape: tuple[int, int]
    r_max: int
    tokens: int
    held_tokens: int | None
    basis: Basis
    other: Basis
    angles: torch.Tensor

    @property
    def row_norms(self) -> torch.Tensor:
        """``(r_max,)`` Euclidean norms of the rows of P (the first r are kept)."""
        return self.basis.P.norm(dim=1)

    @property
    def error_cal(self) -> float:
        return float(self.basis.error_cal[self.state.r])

    @property
    def error_held(self) -> float | None:
        return None if self.basis.error_held is None else float(self.basis.error_held[self.state.r])

    @property
    def energy_kept(self) -> float:
        """``sum_{j<=r} S_j^2 / sum_j S_j^2`` of ``W T`` (the metric's own energy), all j: orient's
        ``energy_kept`` at ``r_max`` times the share of the first r among the ``r_max``."""
        S2 = self.basis.S ** 2
        return float(S2[: self.state.r].sum() / S2.sum()) * self.basis.info["energy_kept"]


class _LRU(OrderedDict):
    """A dict that keeps its ``size`` most recently used entries (``get_or(key, make)``)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key, make: Callable):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


def _data_moment(m: SecondMoment) -> torch.Tensor:
    """The undamped ``C`` of a moment: ``(d_in, d_in)`` (kind full) or its ``(d_in,)`` diagonal, fp64."""
    return m.matrix() if m.kind == "full" else m.diag()


class Explorer:
    """The pure side of the explorer: weights and moments in, :class:`View` out, with caches.

    Args:
        model: the model the moments were captured from (weights read once per layer, in fp64).
        moments: ``{name: SecondMoment}`` of the calibration data (:func:`covsvd.capture_moments`); kind
            ``"full"`` for the full / corda metrics.
        held_out: the same for held-out text, or ``None``.
        names: the layers offered (default: every name in ``moments``; each must be a Linear / Conv1D of
            ``model``, else ``KeyError``).
        eps_mode: how ``State.eps`` is read (:func:`covsvd.orient`).
        cache_size: how many ``(layer, metric, eps)`` bases to keep (each holds ``r_max x d_in`` fp64).
        output_moments: ``{name: SecondMoment}`` of the layers' output gradients
            (:func:`covsvd.capture_output_moments`), or ``None``; with them ``metric="two-sided"`` is offered
            (:attr:`metrics`), damped by the same eps (``eps_output = eps``).

    ``counts``: how many bases have been computed (a cache miss each), for tests and timing.
    """

    def __init__(self, model: nn.Module, moments: Mapping[str, SecondMoment],
                 held_out: Mapping[str, SecondMoment] | None = None, *, names: Iterable[str] | None = None,
                 eps_mode: str = DEFAULT_EPS_MODE, cache_size: int = 48, output_moments: Mapping | None = None) -> None:
        self.names = list(moments) if names is None else list(names)
        if not self.names:
            raise ValueError("explore: no layers (the moments dict is empty)")
        modules = dict(model.named_modules())
        self.weights: dict[str, torch.Tensor] = {}
        for n in self.names:
            if n not in moments:
                raise KeyError(f"explore: no calibration moment for layer {n!r}")
            if n not in modules:
                raise KeyError(f"explore: {type(model).__name__} has no module {n!r} (moments from another model?)")
            self.weights[n] = weight_matrix(modules[n]).detach()  # (d_out, d_in), a view: no copy
        self.moments, self.held_out, self.eps_mode = moments, held_out, eps_mode
        self.output_moments = output_moments
        #: The metrics offered: the one-sided ones, and two-sided when output moments were given.
        self.metrics = ONE_SIDED_METRICS + (OUTPUT_METRICS if output_moments else ())
        self._bases = _LRU(cache_size)
        self._data = _LRU(8)  # layer -> ((C_cal, G_cal), (C_held, G_held)): undamped data moments
        self.counts = 0

    def r_max(self, layer: str) -> int:
        """The largest rank offered: ``min(d_out, d_in)``, and at most the calibration tokens (orient's rule)."""
        d_out, d_in = self.weights[layer].shape
        return min(d_out, d_in, self.moments[layer].count)

    def _held(self, layer: str) -> SecondMoment | None:
        return None if self.held_out is None else self.held_out.get(layer)

    def data(self, layer: str) -> tuple[tuple, tuple | None]:
        """``((C_cal, G_cal), (C_held, G_held))`` of ``layer``, cached: the undamped data moment (fp64) and
        its :func:`output_moment` when ``d_out <= d_in`` (else ``None``); the held-out pair is ``None``
        without held-out moments."""
        W = self.weights[layer]

        def pair(m: SecondMoment | None):
            if m is None:
                return None
            C = _data_moment(m)
            return C, output_moment(W, C) if W.shape[0] <= W.shape[1] else None

        return self._data.get_or(layer, lambda: (pair(self.moments[layer]), pair(self._held(layer))))

    def basis(self, layer: str, metric: str, eps: float) -> Basis:
        """The cached :class:`Basis` of ``(layer, metric, eps)``: one :func:`covsvd.orient` at ``r_max`` (fp64)
        and its :func:`error_curve` on each moment."""
        if metric not in METRICS:
            raise ValueError(f"explore: metric={metric!r}; expected one of {METRICS}")
        two = metric in OUTPUT_METRICS
        if two and (self.output_moments is None or layer not in self.output_moments):
            raise ValueError(f"explore: metric={metric!r} needs the output moment of {layer!r}: pass output_moments= "
                             "(covsvd.capture_output_moments(model, batches)) to explore / Explorer")

        def make():
            W = self.weights[layer]
            m = self.moments[layer]
            # the diagonal metrics get the diagonal moment: orient's own rel_error is then not measured
            # under the full C (two (d_out, d_in, d_in) products); error_curve measures every r instead
            m = m if metric in FULL_METRICS + OUTPUT_METRICS else m.to_diag()
            kw = dict(output=self.output_moments[layer], eps_output=eps) if two else {}
            o = orient(W, m, self.r_max(layer), metric, eps, self.eps_mode, storage_dtype=F64, name=layer, **kw)
            curves = [None if d is None else oblique_error_curve(W, o.U, o.S, o.P, d[0]) if two
                      else error_curve(W, o.U, o.S, o.P, *d) for d in self.data(layer)]
            self.counts += 1
            return Basis(o.S, o.P, curves[0], curves[1], o.info)

        return self._bases.get_or((layer, metric, float(eps)), make)

    def view(self, state: State) -> View:
        """The :class:`View` of ``state`` (its r clamped to ``[1, r_max]``). Raises ``KeyError`` for an unknown
        layer, ``ValueError`` for an unknown metric, and what :func:`covsvd.orient` raises."""
        if state.layer not in self.weights:
            raise KeyError(f"explore: unknown layer {state.layer!r}; have {self.names[:3]}...")
        r_max = self.r_max(state.layer)
        state = replace(state, r=max(1, min(int(state.r), r_max)), eps=float(state.eps))
        b = self.basis(state.layer, state.metric, state.eps)
        other = self.basis(state.layer, state.other, state.eps)
        angles = principal_angles(b.P[: state.r].T, other.P[: state.r].T)  # (r,)
        held = self._held(state.layer)
        return View(state, tuple(self.weights[state.layer].shape), r_max, self.moments[state.layer].count,
                    None if held is None else held.count, b, other, angles)


# --------------------------------------------------------------------------------------------- drawing


def draw(view: View, fig=None):
    """A 2 x 2 matplotlib Figure of ``view``: spectrum, row norms of P, error against r, principal angles.

    ``fig``: a Figure to draw into (cleared first); default a new ``matplotlib.figure.Figure`` (not registered
    with pyplot, so widget updates never accumulate open figures). Returns the figure.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    from .plotting import OTHER_COLOR, color, plain_log

    # a fixed layout (no layout engine, even under cp.use_style's constrained default), plain log tick labels and
    # no minor ticks: constrained layout, mathtext labels and tick objects were most of the drawing time
    # (profiled), and the widget redraws on every change
    fig = fig if fig is not None else Figure(figsize=(10.5, 6.6), layout="none")
    fig.clear()
    fig.set_layout_engine("none")
    s = view.state
    main, grey = color(s.metric), OTHER_COLOR
    ax = fig.subplots(2, 2, gridspec_kw=dict(left=0.07, right=0.985, bottom=0.08, top=0.9, hspace=0.42, wspace=0.2))
    idx = torch.arange(1, view.r_max + 1)

    a = ax[0, 0]
    for b, c, lbl, ls in ((view.other, grey, s.other, "--"), (view.basis, main, s.metric, "-")):
        a.plot(idx, b.S / b.S[0], color=c, ls=ls, lw=1.4, label=lbl)
    a.axvline(s.r, color="0.3", lw=0.9, ls=":")
    a.set(yscale="log", xlabel="index j", ylabel="s_j / s_1", title="Spectrum of W T")
    a.legend(loc="lower left")

    a = ax[0, 1]
    norms = view.row_norms
    a.plot(idx[: s.r], norms[: s.r], color=main, lw=1.4, label=f"kept (r = {s.r})")
    if s.r < view.r_max:
        a.plot(idx[s.r :], norms[s.r :], color=main, lw=1.0, alpha=0.35, label="dropped")
    a.set(yscale="log", xlabel="row j of P", ylabel="||p_j||", title="Row norms of P")
    a.legend(loc="lower right")

    a = ax[1, 0]
    shown = slice(1, max(view.r_max, 2))  # r = 1 .. r_max - 1: at r = min(d_out, d_in) the error is 0
    ranks = torch.arange(0, view.r_max + 1)[shown]
    for b, c, name in ((view.other, grey, s.other), (view.basis, main, s.metric)):
        a.plot(ranks, b.error_cal[shown], color=c, lw=1.4, label=f"{name}, calibration")
        if b.error_held is not None:
            a.plot(ranks, b.error_held[shown], color=c, lw=1.4, ls="--", label=f"{name}, held-out")
    a.plot([s.r], [view.error_cal], "o", color=main, ms=5)
    a.axvline(s.r, color="0.3", lw=0.9, ls=":")
    a.set(yscale="log", xlabel="rank r", ylabel="relative output error", title="Functional error vs r")
    a.legend(loc="lower left", fontsize=8)

    a = ax[1, 1]
    deg = torch.rad2deg(view.angles)
    a.plot(torch.arange(1, s.r + 1), deg, color=main, marker="." if s.r <= 64 else None, lw=1.2)
    a.axhline(float(deg.median()), color="0.4", lw=0.9, ls="--", label=f"median {float(deg.median()):.1f} deg")
    a.set(ylim=(0, 92), xlabel="angle index (ascending)", ylabel="degrees",
          title=f"Principal angles, top-{s.r} input bases: {s.metric} vs {s.other}")
    a.legend(loc="upper left")
    for a in ax.flat[:3]:
        plain_log(a, "y", subs=(1.0,))
        a.yaxis.set_minor_locator(NullLocator())
    fig.suptitle(f"{s.layer}  W {view.shape[0]}x{view.shape[1]}  metric {s.metric}  r = {s.r}  eps = {s.eps:.2g}",
                 fontsize=11)
    return fig


def summary(view: View) -> dict:
    """The numbers shown beside the figure, as a plain dict (for tables and tests)."""
    info = view.basis.info
    deg = torch.rad2deg(view.angles)
    return dict(layer=view.state.layer, metric=view.state.metric, other=view.state.other, r=view.state.r,
                eps=view.state.eps, eps_abs=info["eps"], cond=info["cond"], cond_method=info["cond_method"],
                tokens=view.tokens, held_tokens=view.held_tokens, energy_kept=view.energy_kept,
                error_cal=view.error_cal, error_held=view.error_held,
                other_error_cal=float(view.other.error_cal[view.state.r]),
                other_error_held=None if view.other.error_held is None else float(view.other.error_held[view.state.r]),
                angle_median_deg=float(deg.median()), angle_max_deg=float(deg.max()))


def summary_html(view: View) -> str:
    """:func:`summary` as a small HTML table."""
    s = summary(view)

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.3g}%"

    rows = [
        ("layer", f"{s['layer']} ({view.shape[0]} x {view.shape[1]})"),
        ("tokens", f"{s['tokens']} calibration" + ("" if s["held_tokens"] is None else f", {s['held_tokens']} held-out")),
        ("eps", f"{s['eps']:.3g} ({view.basis.info['eps_mode']}; {s['eps_abs']:.3g} added), cond(M) {s['cond']:.3g}"),
        ("rank", f"r = {s['r']} (of at most {view.r_max})"),
        ("energy kept", pct(s["energy_kept"])),
        (f"error, {s['metric']}", f"calibration {pct(s['error_cal'])}, held-out {pct(s['error_held'])}"),
        (f"error, {s['other']}", f"calibration {pct(s['other_error_cal'])}, held-out {pct(s['other_error_held'])}"),
        ("angles to " + s["other"], f"median {s['angle_median_deg']:.2f} deg, max {s['angle_max_deg']:.2f} deg"),
    ]
    cells = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table style='font-size:90%'>{cells}</table>"


def render_png(view: View, dpi: int = 80) -> bytes:
    """:func:`draw` rendered to PNG bytes (what the widget shows)."""
    import matplotlib as mpl

    buf = io.BytesIO()
    with mpl.rc_context({"savefig.bbox": "standard"}):  # not cp.use_style's "tight": a second full draw
        draw(view).savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- widgets


class ExplorerApp:
    """The widget wiring around an :class:`Explorer`: controls -> :class:`State` -> :meth:`Explorer.view` ->
    PNG + HTML. ``controls`` (dict of ipywidgets), ``view`` (the last :class:`View`), ``widget`` (the VBox
    shown; the app displays as it). ``update()`` re-reads the controls; every control change calls it."""

    def __init__(self, explorer: Explorer, state: State) -> None:
        import ipywidgets as w

        self.explorer = explorer
        ex = explorer
        first = ex.view(state)
        wide = w.Layout(width="46%")
        self.controls = {
            "layer": w.Dropdown(options=ex.names, value=first.state.layer, description="layer", layout=wide),
            "metric": w.Dropdown(options=ex.metrics, value=first.state.metric, description="metric"),
            "other": w.Dropdown(options=ex.metrics, value=first.state.other, description="compare"),
            "r": w.IntSlider(value=first.state.r, min=1, max=first.r_max, description="r", continuous_update=False,
                             layout=wide),
            "eps": w.FloatLogSlider(value=first.state.eps, base=10, min=EPS_EXPONENTS[0], max=EPS_EXPONENTS[1],
                                    step=0.25, description="eps", readout_format=".1e", continuous_update=False,
                                    layout=wide),
        }
        self.numbers = w.HTML()
        self.image = w.Image(format="png", layout=w.Layout(max_width="860px"))  # its own size, not the page's
        self.status = w.HTML()
        c = self.controls
        self.widget = w.VBox([w.HBox([c["layer"], c["metric"], c["other"]]), w.HBox([c["r"], c["eps"]]),
                              self.numbers, self.image, self.status])
        self._show(first)
        for ctl in c.values():
            ctl.observe(self._changed, names="value")

    def state(self) -> State:
        c = self.controls
        return State(c["layer"].value, c["metric"].value, c["r"].value, c["eps"].value, c["other"].value)

    def _changed(self, change) -> None:
        if change["owner"] is self.controls["layer"]:
            self.controls["r"].max = self.explorer.r_max(change["new"])  # clamps the value too
        self.update()

    def update(self) -> View:
        try:
            view = self.explorer.view(self.state())
        except (ValueError, RuntimeError) as e:  # e.g. corda on a kind="diag" moment: say so, keep the last view
            self.status.value = f"<span style='color:#d55e00'>{type(e).__name__}: {e}</span>"
            return self.view
        self._show(view)
        return view

    def _show(self, view: View) -> None:
        self.view = view
        self.numbers.value = summary_html(view)
        self.image.value = render_png(view)
        self.status.value = ""

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def explore(model: nn.Module, moments: Mapping[str, SecondMoment], held_out: Mapping[str, SecondMoment] | None = None,
            *, layer: str | None = None, metric: str = "full", r: int = 64, eps: float = DEFAULT_EPS,
            other: str = "diag", names: Iterable[str] | None = None, eps_mode: str = DEFAULT_EPS_MODE,
            output_moments: Mapping[str, SecondMoment] | None = None) -> ExplorerApp:
    """The explorer widget for JupyterLab (ipywidgets): layer, metric, r, eps (log slider), a comparison metric.

    ``moments`` / ``held_out``: ``{name: SecondMoment}`` (kind ``"full"`` for every metric; ``"diag"`` moments
    serve identity / diag / asvd only). ``output_moments``: the layers' output moments
    (:func:`covsvd.capture_output_moments`); with them the two-sided metric is offered. ``layer`` defaults to the first name; the other keywords set the
    starting :class:`State`. Returns an :class:`ExplorerApp`; as the last expression of a cell it displays the
    widget. The numbers and curves come from :meth:`Explorer.view` (see the module doc).
    """
    ex = Explorer(model, moments, held_out, names=names, eps_mode=eps_mode, output_moments=output_moments)
    return ExplorerApp(ex, State(layer if layer is not None else ex.names[0], metric, r, eps, other))
