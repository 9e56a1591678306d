"""Calibration sufficiency: split-half principal angles and the count < d_in warning.

Properties: identical halves give zero angles; the angles are symmetric in the halves and blind to a rescaled C
(relative eps); for independent draws from one distribution they shrink like n^-1/2 with the tokens; the
warning fires exactly when count < d_in for a metric reading the full C. On models: split_half equals the
angles of brute-force moments of the alternating halves (BERT Linear and GPT-2 Conv1D), duplicated batches give
zero angles, and the warning names exactly the layers wider than a half's token count.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import brute_force, make_W, padded_batches, random_orthogonal
from hypothesis import given, settings
from hypothesis import strategies as st

from covsvd import SecondMoment, capture_moments, weight_matrix
from covsvd.adapt.sufficiency import (
    InsufficientCalibrationWarning,
    basis_angles,
    check_sufficient,
    layer_angles,
    split_half,
)
from covsvd.algebra.orient import METRICS

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None)
pytestmark = pytest.mark.usefixtures("one_thread")


def sample(n: int, d: int, g: torch.Generator, decades: float = 1.0) -> torch.Tensor:
    """(n, d) fp64 Gaussian rows with a fixed anisotropic covariance (scales over `decades`, rotated)."""
    R = random_orthogonal(d, torch.Generator().manual_seed(1234))  # the same distribution for every draw
    scales = torch.logspace(0, -decades, d, dtype=F64)
    return (torch.randn(n, d, generator=g, dtype=F64) * scales) @ R


def recorded(fn, *args, **kwargs):
    """(result, [InsufficientCalibrationWarning messages]) of fn(*args, **kwargs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in caught if issubclass(w.category, InsufficientCalibrationWarning)]


# ------------------------------------------------------------------------------------------ pure tensors


@FAST
@given(seed=st.integers(0, 2**16), d_out=st.integers(2, 12), d_in=st.integers(2, 12), data=st.data())
def test_identical_moments_give_zero_angles(seed, d_out, d_in, data):
    r = data.draw(st.integers(1, min(d_out, d_in)))
    metric = data.draw(st.sampled_from(METRICS))
    side = data.draw(st.sampled_from(["input", "output"]))
    g = torch.Generator().manual_seed(seed)
    W = make_W(d_out, d_in, seed)
    C = SecondMoment.from_rows(sample(3 * d_in, d_in, g))
    # two-sided: both orientations share one output moment G (d_out wide)
    kw = dict(output=SecondMoment.from_rows(sample(3 * d_out, d_out, g))) if metric == "two-sided" else {}
    a = basis_angles(W, C, C, r, metric, side=side, **kw)
    assert a.shape == (r,) and a.dtype == F64
    assert float(a.max()) < 1e-10, a


@FAST
@given(seed=st.integers(0, 2**16), metric=st.sampled_from(["diag", "full", "corda"]))
def test_angles_are_symmetric_and_blind_to_the_scale_of_C(seed, metric):
    g = torch.Generator().manual_seed(seed)
    d_out, d_in, r = 7, 9, 3
    W = make_W(d_out, d_in, seed, spread=1.0)
    A, B = sample(20, d_in, g).T, sample(20, d_in, g).T  # (d_in, n)
    Ca, Cb = A @ A.T / 20, B @ B.T / 20  # (d_in, d_in)
    ab = basis_angles(W, Ca, Cb, r, metric, eps=1e-3, eps_mode="relative")
    ba = basis_angles(W, Cb, Ca, r, metric, eps=1e-3, eps_mode="relative")
    assert torch.allclose(ab, ba, atol=1e-9), (ab, ba)
    # M = C + eps mean(diag C) I scales with C: the same basis (the rows of P are only rescaled)
    scaled = basis_angles(W, Ca, 7.5 * Ca, r, metric, eps=1e-3, eps_mode="relative")
    assert float(scaled.max()) < 1e-7, scaled
    # ... and an absolute eps does not scale with C: a different basis (the check above can fail)
    moved = basis_angles(W, Ca * 1e-3, Ca, r, metric, eps=1e-3, eps_mode="absolute")
    assert float(moved.max()) > 1e-4, moved


def test_angles_shrink_as_tokens_grow():
    """Independent halves from one distribution: the mean angle falls at each decade of n and about like
    n^-1/2 overall (8 seeds; expected factor ~3.2 per decade, asserted > 1.5, slope in [-0.8, -0.3])."""
    d, r, ns = 24, 4, (100, 1000, 10000)
    W = make_W(16, d, 0, spread=1.0)
    mean_angle = []
    for n in ns:
        per_seed = []
        for seed in range(8):
            g = torch.Generator().manual_seed(100 * seed + n)
            Ca, Cb = SecondMoment.from_rows(sample(n, d, g)), SecondMoment.from_rows(sample(n, d, g))
            per_seed.append(float(basis_angles(W, Ca, Cb, r).mean()))
        mean_angle.append(sum(per_seed) / len(per_seed))
    assert all(a / b > 1.5 for a, b in zip(mean_angle, mean_angle[1:], strict=False)), mean_angle
    slope = math.log(mean_angle[-1] / mean_angle[0]) / math.log(ns[-1] / ns[0])
    assert -0.8 < slope < -0.3, (slope, mean_angle)


@FAST
@given(d_in=st.integers(2, 12), count=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_warning_exactly_when_count_below_d_in(d_in, count, seed):
    g = torch.Generator().manual_seed(seed)
    m = SecondMoment.from_rows(sample(count, d_in, g))
    short, msgs = recorded(check_sufficient, {"a": m, "b": SecondMoment.from_rows(sample(d_in, d_in, g))}, "full")
    assert (count < d_in) == bool(msgs) == ("a" in short)
    assert "b" not in short  # count == d_in is enough
    if short:
        assert short["a"] == (count, d_in) and len(msgs) == 1 and f"{count} tokens < d_in = {d_in}" in msgs[0]
    corda, corda_msgs = recorded(check_sufficient, m, "corda")  # the other metric that reads the full C
    assert bool(corda) == bool(corda_msgs) == (count < d_in)
    for metric in ("diag", "asvd", "identity"):  # no full matrix read: nothing to report
        assert recorded(check_sufficient, m, metric) == ({}, [])
    assert recorded(check_sufficient, m.to_diag(), "full") == ({}, [])


def test_check_sufficient_errors():
    m = SecondMoment.from_rows(torch.randn(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="metric"):
        check_sufficient(m, "whitening")
    with pytest.raises(KeyError, match="nope"):
        check_sufficient({"a": m}, names=["nope"])
    with pytest.raises(ValueError, match="side"):
        basis_angles(torch.randn(3, 4), m, m, 2, side="both")
    with pytest.raises(TypeError, match="storage_dtype"):
        basis_angles(torch.randn(3, 4), m, m, 2, storage_dtype=torch.float32)
    with pytest.raises(ValueError, match="fewer than r"):  # orient's own check still applies (3 tokens < r = 4)
        basis_angles(torch.randn(5, 4), m, m, 4, metric="full")


# ------------------------------------------------------------------------------------------- on models


def batches_of(n_batches: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [torch.randint(5, 21, (3,), generator=g).tolist() for _ in range(n_batches)]
    return padded_batches(lengths, seed=seed)


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_split_half_equals_brute_force_halves(which, bert_tiny, gpt2_tiny):
    model = bert_tiny if which == "bert" else gpt2_tiny
    batches = batches_of(10)  # ~ 5 x 38 tokens per half: above every d_in (32, 64; GPT-2 c_proj reads 128)
    names = [n for n, _ in model.named_modules() if n.endswith(("query", "output.dense", "c_attn", "c_fc"))]
    angles, msgs = recorded(split_half, model, batches, 4, targets=names, progress=False)
    assert list(angles) == names and not msgs
    rows = [brute_force(model, batches[i::2], names) for i in (0, 1)]  # {name: (N, d_in) fp64}, independent hooks
    modules = dict(model.named_modules())
    for n in names:
        Ca, Cb = (X[n].T @ X[n] / X[n].shape[0] for X in rows)  # (d_in, d_in)
        ref = basis_angles(weight_matrix(modules[n]).detach(), Ca, Cb, 4)
        a = angles[n]
        assert a.shape == (4,) and a.dtype == F64 and bool((a[1:] >= a[:-1]).all())
        assert 0 <= float(a.min()) and float(a.max()) <= math.pi / 2 + 1e-12
        assert torch.allclose(a, ref, atol=1e-7), (n, a, ref)
        assert float(a.max()) > 1e-3, "different halves, different bases (the comparison can fail)"


def test_split_half_of_duplicated_batches_is_zero(bert_tiny):
    base = batches_of(3, seed=1)
    twice = [b for b in base for _ in (0, 1)]  # b0 b0 b1 b1 b2 b2: both halves are the same batches
    angles, _ = recorded(split_half, bert_tiny, twice, 3, metric="full", progress=False)  # (the pooler is short)
    assert set(angles) == {n for n, m in bert_tiny.named_modules() if isinstance(m, torch.nn.Linear)}
    assert max(float(a.max()) for a in angles.values()) < 1e-10
    for metric in ("diag", "asvd", "corda"):
        diag = split_half(bert_tiny, twice, 3, metric=metric, targets=r".*query", progress=False)
        assert max(float(a.max()) for a in diag.values()) < 1e-10


def test_split_half_warns_exactly_for_layers_wider_than_a_half(bert_tiny):
    # halves of 32..63 tokens: the FFN output projections (d_in = 64) are short, the other token inputs (32)
    # are not; the pooler reads one row per sequence (6 per half), so it is short too
    batches = padded_batches([[10, 8], [9, 9], [8, 9], [10, 8], [9, 8], [8, 8]])
    halves = [capture_moments(bert_tiny, batches[i::2], progress=False) for i in (0, 1)]
    counts = [h["encoder.layer.0.attention.self.query"].count for h in halves]
    assert all(32 <= c < 64 for c in counts), counts
    smaller = {n: min(halves[0][n], halves[1][n], key=lambda m: m.count) for n in halves[0]}
    short = {n for n, m in smaller.items() if m.count < m.d_in}
    assert {n for n, m in smaller.items() if m.d_in == 64} | {"pooler.dense"} == short != set(smaller)
    angles, msgs = recorded(split_half, bert_tiny, batches, 4, progress=False)
    assert len(msgs) == 1 and msgs[0].startswith(f"{len(short)} layer(s)"), msgs
    assert set(recorded(check_sufficient, smaller)[0]) == short
    # the same halves under a diagonal metric: nothing is rank deficient
    assert recorded(split_half, bert_tiny, batches, 4, metric="diag", progress=False)[1] == []
    # layer_angles on the captured halves gives the same angles and the same warning
    again, msgs2 = recorded(layer_angles, bert_tiny, *halves, 4, progress=False)
    assert msgs2 == msgs and all(torch.equal(again[n], angles[n]) for n in angles)


def test_split_half_errors(bert_tiny):
    one = batches_of(1)
    with pytest.raises(ValueError, match="at least 2 batches"):
        split_half(bert_tiny, one, 2, progress=False)
    with pytest.raises(ValueError, match="metric"):
        split_half(bert_tiny, batches_of(2), 2, metric="whitening", progress=False)
    a = capture_moments(bert_tiny, batches_of(2), targets=r".*query", progress=False)
    b = capture_moments(bert_tiny, batches_of(2), targets=r".*key", progress=False)
    with pytest.raises(KeyError, match="missing"):
        layer_angles(bert_tiny, a, b, 2, progress=False)
