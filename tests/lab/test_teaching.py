"""The teaching helpers: the truncation curve is functional_error of the rank-k orientations, the identity
error measures what the stored tensors reproduce, the naive residual is looser than orient's bf16-tight one,
and the literal whitening foil agrees with orient where it is well posed and breaks where the library refuses.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from covsvd import SecondMoment, identity_error
from covsvd.algebra.damping import damp
from covsvd.algebra.measures import functional_error
from covsvd.algebra.orient import orient
from covsvd.lab.teaching import literal_eigh_whitening, store_factors, truncation_curve

F64 = torch.float64


def _case(seed: int, d_out: int, d_in: int, n: int, cond_exp: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=F64)
    scales = 10 ** (-cond_exp / 2 * torch.rand(d_in, generator=g, dtype=F64))
    X = torch.randn(n, d_in, generator=g, dtype=F64) * scales + 0.3  # uncentered
    return W, SecondMoment.from_rows(X)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(2, 9), d_in=st.integers(2, 9),
       metric=st.sampled_from(["identity", "diag", "full", "corda"]), m_kind=st.sampled_from(["full", "diag", "none"]))
def test_truncation_curve_is_functional_error_of_each_rank(seed, d_out, d_in, metric, m_kind):
    W, m = _case(seed, d_out, d_in, n=3 * d_in)
    k_max = min(d_out, d_in)
    o = orient(W, m, k_max, metric=metric, eps=1e-3, solver="eigh")
    M = {"full": m.matrix(), "diag": m.diag(), "none": None}[m_kind]
    ranks = list(range(k_max + 1))
    curve = truncation_curve(W, o.U, o.S, o.P, ranks, M)
    for k in ranks[1:]:
        ok = orient(W, m, k, metric=metric, eps=1e-3, solver="eigh")  # the rank-k orientation itself
        ref = functional_error(W, (ok.U * ok.S) @ ok.P, M)
        assert curve[k] == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert curve[0] == pytest.approx(1.0, abs=1e-12)  # B_0 = 0
    assert curve[k_max] < 1e-6  # full rank: W itself


def test_truncation_curve_accepts_a_damped_metric_and_checks_shapes():
    W, m = _case(1, 5, 7, n=40)
    o = orient(W, m, 4, metric="full", eps=1e-2, solver="eigh")
    D = damp(m.matrix(), 1e-2)
    a = truncation_curve(W, o.U, o.S, o.P, [1, 4], D)
    b = truncation_curve(W, o.U, o.S, o.P, [1, 4], D.matrix())
    assert torch.allclose(a, b, rtol=1e-12)
    # under its own damped metric, full's error is the tail energy of W M^{1/2}: sqrt(1 - energy_kept)
    assert float(a[1]) == pytest.approx(o.info["rel_error"], rel=1e-9)
    with pytest.raises(ValueError, match="outside"):
        truncation_curve(W, o.U, o.S, o.P, [5], None)
    with pytest.raises(ValueError, match="M has shape"):
        truncation_curve(W, o.U, o.S, o.P, [1], torch.eye(3, dtype=F64))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_store_factors_tight_is_orient_bit_for_bit_and_naive_is_looser(storage):
    W, m = _case(2, 48, 64, n=400)
    W = W.float()
    exact = orient(W, m, 16, metric="full", storage_dtype=torch.float64)  # unrounded factors
    lib = orient(W, m, 16, metric="full", storage_dtype=storage)  # rounding first, inside orient
    tight = store_factors(W, exact.U, exact.S, exact.P, storage, order="tight")
    for a, b in zip(tight, lib[:4], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    naive = store_factors(W, exact.U, exact.S, exact.P, storage, order="naive")
    assert all(torch.equal(a, b) for a, b in zip(naive[:3], tight[:3], strict=True))  # same rounded factors
    e_tight, e_naive = identity_error(W, *tight), identity_error(W, *naive)
    if storage in (torch.bfloat16, torch.float16):
        assert e_tight < 1e-6  # fp32 rounding of W_res only
        assert e_naive > 1e-5 and e_naive > 50 * e_tight  # the factors' rounding, not absorbed
    else:
        assert e_naive < 1e-5 and e_tight < 1e-5
    with pytest.raises(ValueError, match="do not fit"):
        identity_error(W, tight[0], tight[1], tight[2], tight[3][:, :3])
    with pytest.raises(ValueError, match="order"):
        store_factors(W, exact.U, exact.S, exact.P, storage, order="late")


def test_literal_whitening_matches_orient_when_well_posed_and_breaks_when_not():
    W, m = _case(3, 6, 8, n=80)
    U, S, P, lam = literal_eigh_whitening(W, m.matrix(), 3, eps=1e-3, dtype=F64)
    o = orient(W, m, 3, metric="full", eps=1e-3, eps_mode="absolute", solver="eigh")
    assert torch.allclose(S, o.S, rtol=1e-10)
    assert torch.allclose((U * S) @ P, (o.U * o.S) @ o.P, atol=1e-10)
    # a singular C (rank 2 < d_in): with the clamp and eps = 0, 1/sqrt(0) puts inf/NaN into P
    X = torch.randn(2, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    C = X.T @ X / 2
    C = C - 1e-12 * torch.eye(8, dtype=F64)  # a rounding-sized negative eigenvalue, as fp32 eigh produces
    _, _, P0, lam0 = literal_eigh_whitening(W, C, 2, eps=0.0, clamp=True, dtype=F64)
    assert float(lam0.min()) == 0.0 and not bool(torch.isfinite(P0).all())
    _, S1, P1, lam1 = literal_eigh_whitening(W, C, 2, eps=0.0, clamp=False, dtype=F64)
    assert float(lam1.min()) < 0 and bool(torch.isnan(S1).all()) and bool(torch.isnan(P1).all())


def test_whitening_teaching_form_equals_orient_full():
    """covsvd.lab.whitening (notebook 01's written-out Cholesky whitening) is orient's ``full`` metric."""
    from covsvd.lab.whitening import whiten_cholesky

    W, m = _case(3, 6, 8, n=80)
    M = m.matrix() + 1e-3 * torch.eye(8, dtype=F64)
    U, S, P = whiten_cholesky(W, M, 3)
    o = orient(W, m, 3, metric="full", eps=1e-3, eps_mode="absolute", storage_dtype=F64)
    torch.testing.assert_close(S, o.S, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close((U * S) @ P, (o.U * o.S) @ o.P, rtol=1e-9, atol=1e-12)
