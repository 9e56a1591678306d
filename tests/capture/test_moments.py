"""SecondMoment and the streaming accumulator, as pure tensor algebra (no model)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import covsvd
from covsvd.capture.gram import add_column_sums_, add_gram_upper_, block_edges, mirror_lower_
from covsvd.capture.moments import MomentAccumulator, SecondMoment

FAST = settings(max_examples=25, deadline=None)


def rows(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a nonzero mean and uneven scales, like real activations
    return (torch.randn(n, d, generator=g) * torch.linspace(0.1, 5.0, d) + 0.7).to(dtype)  # (n, d)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@FAST
@given(n=st.integers(1, 40), d=st.integers(1, 24), block=st.integers(1, 30), seed=st.integers(0, 10**6))
def test_blocked_upper_gram_mirrored_equals_full_product(n, d, block, seed):
    x = rows(n, d, seed, torch.float64)
    out = torch.zeros(d, d, dtype=torch.float64)
    add_gram_upper_(out, x, block)
    edges = block_edges(d, block)
    for bi, (i0, i1) in enumerate(edges):  # below the diagonal blocks: not touched until mirrored
        assert not out[i1:, i0:i1].any(), (bi, edges)
    mirror_lower_(out, block)
    assert torch.equal(out, out.T)
    assert rel(out, x.T @ x) <= 1e-14
    assert edges[0][0] == 0 and edges[-1][1] == d and all(a[1] == b[0] for a, b in zip(edges, edges[1:], strict=False))


@FAST
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 20),
    cuts=st.lists(st.integers(0, 60), max_size=4),
    block=st.integers(1, 25),
    seed=st.integers(0, 10**6),
)
def test_streaming_chunks_equal_brute_force_fp64(n, d, cuts, block, seed):
    x = rows(n, d, seed)
    acc = MomentAccumulator(d, "full", "float64", block=block)
    bounds = sorted({0, n, *[c % (n + 1) for c in cuts]})
    for a, b in zip(bounds, bounds[1:], strict=False):
        acc.add(x[a:b])
    m = acc.moment()
    X = x.double()
    assert m.count == n
    assert rel(m.matrix(), X.T @ X / n) <= 1e-12
    assert rel(m.mean(), X.mean(0)) <= 1e-12
    assert rel(m.mean_abs(), X.abs().mean(0)) <= 1e-12
    cov = X.T @ X / n - torch.outer(X.mean(0), X.mean(0))
    assert (m.covariance() - cov).norm() <= 1e-12 * (X.T @ X / n).norm()  # cov is 0 for n == 1


@FAST
@given(n=st.integers(2, 50), d=st.integers(1, 16), seed=st.integers(0, 10**6))
def test_diag_kind_is_the_diagonal_of_full(n, d, seed):
    x = rows(n, d, seed)
    full = SecondMoment.from_rows(x, "full")
    diag = SecondMoment.from_rows(x, "diag")
    assert diag.sum_xx.shape == (d,)
    assert rel(diag.diag(), full.matrix().diagonal()) <= 1e-14
    assert rel(full.to_diag().diag(), diag.diag()) <= 1e-14
    assert (diag.covariance() - full.covariance().diagonal()).norm() <= 1e-12 * diag.diag().norm()
    with pytest.raises(ValueError, match="kind='diag'"):
        diag.matrix()


def test_float32_products_are_close_but_not_exact():
    x = rows(3000, 64, 1)
    exact = SecondMoment.from_rows(x, accumulate="float64")
    fast = SecondMoment.from_rows(x, accumulate="float32")
    assert fast.accumulate == "float32"
    assert 0 < rel(fast.matrix(), exact.matrix()) <= 1e-5
    assert rel(fast.mean(), exact.mean()) <= 1e-14  # the O(d) sums are fp64 in both modes


@FAST
@given(n1=st.integers(1, 30), n2=st.integers(1, 30), d=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_add_equals_capture_of_the_union(n1, n2, d, seed):
    x = rows(n1 + n2, d, seed)
    a, b = SecondMoment.from_rows(x[:n1]), SecondMoment.from_rows(x[n1:])
    whole = SecondMoment.from_rows(x)
    s = a + b
    assert s.count == whole.count == n1 + n2
    for field in ("sum_xx", "sum_x", "sum_abs"):
        assert rel(getattr(s, field), getattr(whole, field)) <= 1e-13


def test_bad_combinations_raise():
    a = SecondMoment.from_rows(rows(4, 3, 0))
    with pytest.raises(ValueError, match="cannot add"):
        a + SecondMoment.from_rows(rows(4, 5, 0))
    with pytest.raises(ValueError, match="cannot add"):
        a + SecondMoment.from_rows(rows(4, 3, 0), kind="diag")
    b = SecondMoment.from_rows(rows(4, 3, 1))
    a.model, b.model = {"fingerprint": "x"}, {"fingerprint": "y"}
    with pytest.raises(ValueError, match="different models"):
        a + b
    with pytest.raises(ValueError, match="kind"):
        SecondMoment.zeros(3, "blockdiag")
    with pytest.raises(ValueError, match="accumulate"):
        MomentAccumulator(3, accumulate="bfloat16")
    with pytest.raises(ValueError, match="fp64"):
        SecondMoment("full", torch.zeros(2, 2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match=r"rows of shape \(N, 3\)"):
        MomentAccumulator(3).add(torch.zeros(2, 4))


def test_empty_moment_and_too_few_tokens_raise_with_the_count():
    with pytest.raises(ValueError, match="no real tokens"):
        SecondMoment.zeros(4).matrix()
    m = SecondMoment.from_rows(rows(5, 4, 0))
    W = torch.randn(6, 4, dtype=torch.float64)
    covsvd.orient(W, m, 4, "full")  # 5 tokens carry rank 4
    with pytest.raises(ValueError, match=r"layer 'q': the SecondMoment saw 5 real tokens, fewer than r=6"):
        covsvd.orient(torch.randn(8, 6, dtype=torch.float64), SecondMoment.from_rows(rows(5, 6, 0)), 6, "full",
                      name="q")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_column_sums_accumulate_in_fp64_with_or_without_reused_ones(dtype):
    x = rows(37, 5, seed=1, dtype=dtype)
    expect = x.double().sum(0)
    for ones in (None, torch.ones(50, dtype=torch.float64), torch.ones(10, dtype=torch.float64)):  # short: not used
        out = torch.full((5,), 2.0, dtype=torch.float64)
        add_column_sums_(out, x, ones)
        assert rel(out - 2.0, expect) <= 1e-15


@pytest.mark.parametrize("accumulate", ["float64", "float32"])
def test_add_overwrites_its_input_only_when_handed_over(accumulate):
    dtype = torch.float64 if accumulate == "float64" else torch.float32
    x = rows(30, 6, seed=2, dtype=dtype)
    keep = x.clone()
    reference = SecondMoment.from_rows(keep, accumulate=accumulate)
    acc = MomentAccumulator(6, accumulate=accumulate)
    acc.add(x)
    assert torch.equal(x, keep)  # not handed over: untouched
    acc.add(x, consume=True)  # handed over: may be overwritten (|x| in place)
    m = acc.moment()
    assert not torch.equal(x, keep)
    assert m.count == 60
    for got, want in ((m.sum_xx, reference.sum_xx), (m.sum_x, reference.sum_x), (m.sum_abs, reference.sum_abs)):
        assert rel(got, 2 * want) <= 1e-12
