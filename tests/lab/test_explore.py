"""The explorer, headless: its pure update (Explorer.view) against covsvd.orient,
functional_error and principal_angles; the all-ranks error curve against functional_error and
truncation_curve; the cache; the drawing; and the widget wiring (controls -> state -> view), without a browser.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_W, padded_batches
from hypothesis import example, given, settings
from hypothesis import strategies as st

from covsvd import (
    SecondMoment,
    capture_moments,
    capture_output_moments,
    functional_error,
    orient,
    principal_angles,
    weight_matrix,
)
from covsvd.algebra.validate import ONE_SIDED_METRICS
from covsvd.lab.explore import (
    Explorer,
    ExplorerApp,
    State,
    draw,
    error_curve,
    explore,
    oblique_error_curve,
    render_png,
    summary,
)
from covsvd.lab.teaching import truncation_curve

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=25, deadline=None)
@given(d_out=st.integers(2, 12), d_in=st.integers(2, 12), seed=st.integers(0, 2**16),
       metric=st.sampled_from(ONE_SIDED_METRICS), diag=st.booleans())  # projections; two-sided: the oblique curve
@example(d_out=8, d_in=3, seed=1, metric="corda", diag=False)  # the full-rank error is sqrt(1.7e-14): cancellation
def test_error_curve_equals_functional_error_at_every_rank(d_out, d_in, seed, metric, diag):
    """Both branches (d_out <= d_in: W C W^T; d_out > d_in: S^2 p^T C p), every metric, full and diagonal C.

    error_curve forms each error energy as a difference (tr G - sum of kept energies), so it is exact to
    ~1e-14 in the *squared* relative error; the square root of that rounding is ~1e-7, which is why the
    curves are compared as energies."""
    g = torch.Generator().manual_seed(seed)
    W = make_W(d_out, d_in, seed)
    X = torch.randn(3 * d_in, d_in, generator=g, dtype=F64) * torch.logspace(0, -1.5, d_in, dtype=F64)
    m = SecondMoment.from_rows(X)
    k = min(d_out, d_in)
    o = orient(W, m, k, metric, storage_dtype=F64)
    C = m.diag() if diag else m.matrix()
    curve = error_curve(W, o.U, o.S, o.P, C)
    assert curve.shape == (k + 1,) and curve.dtype == F64
    ref = torch.tensor([functional_error(W, (o.U[:, :r] * o.S[:r]) @ o.P[:r], C) for r in range(k + 1)], dtype=F64)
    assert torch.allclose(curve**2, ref**2, rtol=1e-6, atol=1e-12), (curve, ref)
    other = truncation_curve(W, o.U, o.S, o.P, range(k + 1), C)
    assert torch.allclose(curve**2, other**2, rtol=1e-6, atol=1e-12), (curve, other)
    assert float(curve[0]) == pytest.approx(1.0) and float(curve[-1]) < 1e-6
    assert bool((curve[1:] <= curve[:-1] + 1e-12).all()), "the error never grows with r"


def test_error_curve_rejects_shapes():
    W = make_W(4, 5, 0)
    o = orient(W, None, 4, "identity", storage_dtype=F64)
    with pytest.raises(ValueError, match="do not fit"):
        error_curve(W, o.U, o.S, o.P, torch.eye(4, dtype=F64))


@pytest.fixture(scope="module")
def setup(bert_tiny):
    batches = padded_batches([[20, 17, 12], [18, 20, 9], [15, 11, 20], [19, 13, 16]], seed=3)
    cal = capture_moments(bert_tiny, batches[:3], progress=False)
    held = capture_moments(bert_tiny, batches[3:], progress=False)
    return bert_tiny, cal, held


LAYER = "encoder.layer.0.intermediate.dense"  # W (64, 32): d_out > d_in
NARROW = "encoder.layer.1.output.dense"  # W (32, 64): d_out < d_in


@pytest.mark.parametrize("layer", [LAYER, NARROW])
@pytest.mark.parametrize("metric,other", [("full", "diag"), ("corda", "identity"), ("asvd", "full")])
def test_view_matches_orient_at_r(setup, layer, metric, other):
    model, cal, held = setup
    ex = Explorer(model, cal, held)
    W = weight_matrix(model.get_submodule(layer)).detach()
    for r, eps in ((5, 1e-3), (17, 0.3)):
        v = ex.view(State(layer, metric, r, eps, other))
        assert v.state.r == r and v.r_max == 32 and v.shape == tuple(W.shape)
        o = orient(W, cal[layer], r, metric, eps, storage_dtype=F64)
        o2 = orient(W, cal[layer], r, other, eps, storage_dtype=F64)
        B = (o.U * o.S) @ o.P  # (d_out, d_in)
        assert torch.allclose(v.row_norms[:r], o.P.norm(dim=1), rtol=1e-8)
        assert torch.allclose(v.basis.S[:r], o.S, rtol=1e-10)
        assert v.error_cal == pytest.approx(functional_error(W, B, cal[layer].matrix()), rel=1e-6)
        assert v.error_held == pytest.approx(functional_error(W, B, held[layer].matrix()), rel=1e-6)
        ref = principal_angles(o.P.T, o2.P.T)
        assert v.angles.shape == (r,) and torch.allclose(v.angles, ref, atol=1e-7)
        assert v.energy_kept == pytest.approx(o.info["energy_kept"], rel=1e-9)
        s = summary(v)
        assert s["cond"] == o.info["cond"] and s["eps_abs"] == o.info["eps"]
        assert s["angle_median_deg"] == pytest.approx(math.degrees(float(ref.median())), abs=1e-5)


def test_view_same_metric_has_zero_angles_and_clamps_r(setup):
    model, cal, _ = setup
    ex = Explorer(model, cal)
    v = ex.view(State(LAYER, "full", 10_000, 1e-3, "full"))
    assert v.state.r == v.r_max == 32 and float(v.angles.max()) < 1e-10
    assert v.error_held is None and v.held_tokens is None
    assert ex.view(State(LAYER, "full", 0)).state.r == 1


def test_cache_reuses_bases_by_layer_metric_eps(setup):
    model, cal, held = setup
    ex = Explorer(model, cal, held, cache_size=3)
    ex.view(State(LAYER, "full", 4, 1e-3, "diag"))
    assert ex.counts == 2  # full and diag
    for r in (1, 9, 30):
        ex.view(State(LAYER, "full", r, 1e-3, "diag"))
    ex.view(State(LAYER, "diag", 7, 1e-3, "full"))  # swapped: both cached
    assert ex.counts == 2, "r never recomputes a basis"
    ex.view(State(LAYER, "full", 4, 1e-2, "diag"))
    assert ex.counts == 4, "a new eps is a new basis for both metrics"
    ex.view(State(NARROW, "full", 4, 1e-2, "diag"))
    assert ex.counts == 6 and len(ex._bases) == 3, "the LRU keeps cache_size bases"
    ex.view(State(NARROW, "full", 4, 1e-2, "diag"))
    assert ex.counts == 6


def test_view_errors(setup, bert_tiny):
    model, cal, _ = setup
    ex = Explorer(model, cal)
    with pytest.raises(KeyError, match="unknown layer"):
        ex.view(State("nope"))
    with pytest.raises(ValueError, match="metric"):
        ex.view(State(LAYER, "whitening"))
    diag = {n: m.to_diag() for n, m in cal.items()}
    with pytest.raises(ValueError, match="kind='diag'"):
        Explorer(model, diag).view(State(LAYER, "full"))
    with pytest.raises(KeyError, match="no module"):
        Explorer(model, {"not.a.layer": cal[LAYER]})


def test_draw_and_png(setup):
    model, cal, held = setup
    v = Explorer(model, cal, held).view(State(NARROW, "full", 12, 1e-3, "identity"))
    fig = draw(v)
    assert len(fig.axes) == 4
    (line,) = [ln for ln in fig.axes[2].get_lines() if ln.get_marker() == "o"]  # the marker at r, error panel
    assert list(line.get_xdata()) == [12] and list(line.get_ydata()) == pytest.approx([v.error_cal])
    png = render_png(v)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_widget_wiring_updates_the_view(setup):
    import ipywidgets  # noqa: F401  (the test extra installs it: a missing one fails)
    model, cal, held = setup
    app = explore(model, cal, held, layer=LAYER, r=8)
    assert isinstance(app, ExplorerApp) and app.view.state == State(LAYER, "full", 8, 1e-3, "diag")
    png = app.image.value
    app.controls["r"].value = 3
    assert app.view.state.r == 3 and app.image.value != png and "r = 3 (of at most 32)" in app.numbers.value
    app.controls["eps"].value = 1e-5
    assert app.view.state.eps == pytest.approx(1e-5) and app.explorer.counts == 4
    app.controls["metric"].value = "corda"
    assert app.view.state.metric == "corda"
    app.controls["layer"].value = "pooler.dense"  # the pooler saw 9 rows: r_max drops to 9
    assert app.controls["r"].max == 9 and app.view.state.layer == "pooler.dense" and app.view.r_max == 9
    # an error is shown, the last view kept
    diag_app = explore(model, {n: m.to_diag() for n, m in cal.items()}, metric="diag", other="identity")
    diag_app.controls["metric"].value = "full"
    assert "kind='diag'" in diag_app.status.value and diag_app.view.state.metric == "diag"
    assert "application/vnd.jupyter.widget-view+json" in app._repr_mimebundle_()


# ------------------------------------------------------------------------------------------------ two-sided


@settings(max_examples=25, deadline=None, derandomize=True)  # the same examples on every run
@given(d_out=st.integers(2, 12), d_in=st.integers(2, 12), seed=st.integers(0, 2**16), diag=st.booleans())
@example(d_out=9, d_in=4, seed=5, diag=False)
def test_oblique_error_curve_equals_functional_error_for_two_sided(d_out, d_in, seed, diag):
    """U is G-orthonormal, not orthonormal: the projection shortcut of error_curve does not apply; the expanded
    form does, compared as energies (a difference of fp64 sums, exact to ~1e-14 of the total)."""
    g = torch.Generator().manual_seed(seed)
    W = make_W(d_out, d_in, seed)
    m = SecondMoment.from_rows(torch.randn(3 * d_in, d_in, generator=g, dtype=F64) * torch.logspace(0, -1.5, d_in,
                                                                                                     dtype=F64))
    G = SecondMoment.from_rows(torch.randn(3 * d_out, d_out, generator=g, dtype=F64) * torch.logspace(0, -2, d_out,
                                                                                                      dtype=F64))
    k = min(d_out, d_in)
    o = orient(W, m, k, "two-sided", output=G, storage_dtype=F64)
    C = m.diag() if diag else m.matrix()
    curve = oblique_error_curve(W, o.U, o.S, o.P, C)
    ref = torch.tensor([functional_error(W, (o.U[:, :r] * o.S[:r]) @ o.P[:r], C) for r in range(k + 1)], dtype=F64)
    assert curve.shape == (k + 1,) and torch.allclose(curve**2, ref**2, rtol=1e-6, atol=1e-12), (curve, ref)
    if k < d_out:  # the projection shortcut gives a different (wrong) curve here
        assert not torch.allclose(error_curve(W, o.U, o.S, o.P, C) ** 2, ref**2, rtol=1e-6, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        oblique_error_curve(W, o.U, o.S, o.P, torch.eye(d_in + 1, dtype=F64))


def test_two_sided_view_matches_orient_and_needs_output_moments(setup):
    model, cal, held = setup
    batches = padded_batches([[20, 17, 12], [18, 20, 9], [15, 11, 20]], seed=3)
    outs = capture_output_moments(model, batches, "probe", targets=r"encoder\..*", progress=False)
    with pytest.raises(ValueError, match="needs the output moment"):
        Explorer(model, cal, held).view(State(LAYER, "two-sided", 5, 1e-3, "full"))
    ex = Explorer(model, cal, held, output_moments=outs)
    assert ex.metrics[-1] == "two-sided" and "two-sided" not in Explorer(model, cal).metrics
    W = weight_matrix(model.get_submodule(LAYER)).detach()
    v = ex.view(State(LAYER, "two-sided", 5, 1e-3, "full"))
    o = orient(W, cal[LAYER], 5, "two-sided", 1e-3, output=outs[LAYER], eps_output=1e-3, storage_dtype=F64)
    assert torch.allclose(v.basis.S[:5], o.S, rtol=1e-10) and torch.allclose(v.basis.P[:5].abs(), o.P.abs(), rtol=1e-6)
    B = (o.U * o.S) @ o.P
    assert v.error_cal == pytest.approx(functional_error(W, B, cal[LAYER].matrix()), rel=1e-6)
    assert v.error_held == pytest.approx(functional_error(W, B, held[LAYER].matrix()), rel=1e-6)
    app = explore(model, cal, held, layer=LAYER, r=8, output_moments=outs)
    assert "two-sided" in app.controls["metric"].options
    app.controls["metric"].value = "two-sided"
    assert app.view.state.metric == "two-sided" and app.status.value == ""
