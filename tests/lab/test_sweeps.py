"""covsvd.lab.sweeps: prefix truncation errors equal functional_error at every rank and obey Eckart-Young; the
exact cond from one set of eigenvalues equals damp's; identity error stays at the storage rounding; an eps
sweep's reference, limits and modes behave as the algebra says.

Data: W with spread singular values and C = X^T X / n from anisotropic samples (as in test_orient.py), small.
"""

import math

import pytest
import torch
from conftest import make_W as _make_W
from conftest import random_orthogonal as _orth
from hypothesis import given, settings
from hypothesis import strategies as st

import covsvd
from covsvd import SecondMoment
from covsvd.algebra.damping import damp
from covsvd.algebra.measures import functional_error, principal_angles
from covsvd.algebra.orient import orient
from covsvd.lab.sweeps import damped_cond, eps_sweep, output_energy, truncation_errors

F64 = torch.float64
FAST = settings(max_examples=20, deadline=None)


def make_W(d_out, d_in, seed, spread=2.0):
    return _make_W(d_out, d_in, seed, spread)  # (d_out, d_in), two decades of singular values


def make_C(n, d_in, seed, cond_exp=4.0):
    """SecondMoment of (n, d_in) samples whose C spans ~cond_exp decades (rank-deficient when n < d_in)."""
    g = torch.Generator().manual_seed(seed + 1)
    scales = 10 ** (-cond_exp / 2 * torch.rand(d_in, generator=g, dtype=F64))
    X = (torch.randn(n, d_in, generator=g, dtype=F64) * scales) @ _orth(d_in, g) + 0.1
    return SecondMoment("full", X.T @ X, X.sum(0), X.abs().sum(0), n)


def product(U, S, P):
    return (U * S) @ P


@FAST
@given(d_out=st.integers(3, 14), d_in=st.integers(3, 14), seed=st.integers(0, 10_000),
       metric=st.sampled_from(["identity", "diag", "full", "corda"]),
       measure=st.sampled_from(["matrix", "diag", "none", "damped", "moment"]))
def test_prefix_errors_equal_functional_error_at_every_rank(d_out, d_in, seed, metric, measure):
    W = make_W(d_out, d_in, seed)
    C = make_C(3 * d_in, d_in, seed)
    k = min(d_out, d_in)
    o = orient(W, C, k, metric=metric, eps=1e-3)
    M = {"matrix": C.matrix(), "diag": C.diag(), "none": None, "damped": damp(C.matrix(), 0.1, solver="cholesky"),
         "moment": C}[measure]
    err = truncation_errors(W, o.U, o.S, o.P, M)
    assert err.shape == (k + 1,) and err.dtype == F64
    ref_M = C.matrix() if measure == "moment" else M
    for r in range(k + 1):
        ref = functional_error(W, product(o.U[:, :r], o.S[:r], o.P[:r]), ref_M)
        assert abs(float(err[r]) - ref) < 1e-6, (r, float(err[r]), ref)
    assert float(err[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(err[k]) < 1e-6  # full rank reproduces W: U_k spans W's column space
    # a precomputed output energy and a prefix of the factors give the same numbers
    head = truncation_errors(W, o.U[:, :2], o.S[:2], o.P[:2], M, total=output_energy(W, M))
    assert torch.allclose(head, err[: head.shape[0]], atol=1e-12)


def test_prefix_errors_do_not_assume_orthonormal_U():
    """Any factors (U not orthonormal, P arbitrary): still equal to the direct functional error."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(7, 9, generator=g, dtype=F64)
    U, S, P = torch.randn(7, 5, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64), torch.randn(5, 9, generator=g, dtype=F64)
    M = make_C(30, 9, 0).matrix()
    err = truncation_errors(W, U, S, P, M, ranks=[0, 2, 5])
    for i, r in enumerate([0, 2, 5]):
        assert float(err[i]) == pytest.approx(functional_error(W, product(U[:, :r], S[:r], P[:r]), M), rel=1e-9)


def test_full_metric_is_optimal_at_every_rank_under_its_own_metric():
    """Eckart-Young under M = C + eps I: full's prefix curve is below every other metric's, at every r."""
    W, C = make_W(10, 16, 1), make_C(12, 16, 1, cond_exp=6)  # n < d_in: C singular, eps makes M definite
    M = damp(C.matrix(), 1e-3, solver="eigh").matrix()
    curves = {m: truncation_errors(W, *orient(W, C, 10, metric=m, eps=1e-3)[:3], M)
              for m in ("identity", "diag", "full", "corda")}
    for m in ("identity", "diag", "corda"):
        # compare squared errors (what Eckart-Young minimises): at full rank both are rounding, ~1e-16, and
        # their square roots (~1e-8) would differ by more than any fixed tolerance on the errors themselves
        assert bool((curves["full"] ** 2 <= curves[m] ** 2 + 1e-12).all()), m
    assert float((curves["identity"] - curves["full"])[1:-1].max()) > 1e-3  # the test can fail


def test_truncation_errors_reject_bad_shapes():
    W = make_W(4, 6, 0)
    o = orient(W, None, 3, metric="identity")
    with pytest.raises(ValueError, match=r"U \(d_out, k\)"):
        truncation_errors(W, o.U.T, o.S, o.P)
    with pytest.raises(ValueError, match=r"expected \(6,\) or \(6, 6\)"):
        truncation_errors(W, o.U, o.S, o.P, torch.eye(5))
    with pytest.raises(ValueError, match="ranks"):
        truncation_errors(W, o.U, o.S, o.P, ranks=[4])


@FAST
@given(d=st.integers(2, 12), n=st.integers(1, 30), seed=st.integers(0, 10_000),
       eps=st.sampled_from([1e-9, 1e-6, 1e-3, 1.0, 1e2]), mode=st.sampled_from(["absolute", "relative"]))
def test_damped_cond_equals_damp(d, n, seed, eps, mode):
    C = make_C(n, d, seed).matrix()
    lam = torch.linalg.eigvalsh(C)
    got = damped_cond(lam, [eps], mode)[0]
    assert got == pytest.approx(damp(C, eps, mode, solver="eigh").cond, rel=1e-6)
    c = C.diagonal()
    assert damped_cond(c, [eps], mode)[0] == pytest.approx(damp(c, eps, mode).cond, rel=1e-12)


def test_damped_cond_is_infinite_without_eps_on_a_singular_C():
    C = make_C(2, 5, 0).matrix()  # rank 2
    lam = torch.linalg.eigvalsh(C)
    assert damped_cond(lam, [0.0], "absolute") == [math.inf]
    assert math.isfinite(damped_cond(lam, [1e-8], "absolute")[0])


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_identity_error_stays_at_fp32_rounding(storage):
    """W_res is formed from the rounded factors in fp32, so even bf16 factors reconstruct W to fp32 rounding."""
    W = make_W(12, 20, 2).float()
    C = make_C(8, 20, 2, cond_exp=8)  # badly conditioned: large P rows at small eps
    for eps in (1e-8, 1e-3, 1e2):
        o = orient(W, C, 6, metric="full", eps=eps, storage_dtype=storage)
        assert covsvd.identity_error(W, *o[:4], norm="fro") < 5e-7, (eps, covsvd.identity_error(W, *o[:4], norm="fro"))
    bad = orient(W, C, 6, metric="full", eps=1e-3, storage_dtype=storage)
    bad = bad._replace(W_res=bad.W_res + 1e-3)
    assert covsvd.identity_error(W, *bad[:4], norm="fro") > 1e-4  # the measure can fail


def test_eps_sweep_reference_limits_and_modes():
    W, C = make_W(10, 16, 4).float(), make_C(40, 16, 4, cond_exp=5)
    Ce = make_C(40, 16, 99, cond_exp=5)
    grid = [1e-8, 1e-4, 1e-1, 1e2, 1e6]
    df = eps_sweep(W, C, 4, grid, metric="full", C_eval=Ce, name="toy")
    assert df["eps_arg"].to_list() == grid and df["eps"].to_list() == grid
    first, last = df.row(0, named=True), df.row(-1, named=True)
    assert first["angle_p_max_deg"] < 1e-3 and first["angle_u_max_deg"] < 1e-3  # the reference itself
    assert last["angle_u_identity_max_deg"] < 0.1 and last["angle_p_identity_max_deg"] < 0.1  # eps -> inf: plain SVD
    assert first["angle_u_identity_max_deg"] > 1.0  # and the data metric really is a different basis
    mean_diag = float(C.diag().mean())
    assert df["eps_rel"].to_list() == pytest.approx([e / mean_diag for e in grid])
    Cm = C.matrix()
    for row in df.iter_rows(named=True):
        o = orient(W, C, 4, metric="full", eps=row["eps_arg"], eps_mode="absolute")  # eps_sweep's default mode
        B = product(o.U.double(), o.S.double(), o.P.double())
        assert row["error_cal"] == pytest.approx(functional_error(W, B, Cm), rel=1e-6)
        assert row["error_eval"] == pytest.approx(functional_error(W, B, Ce.matrix()), rel=1e-6)
        assert row["cond"] == pytest.approx(damp(Cm, row["eps_arg"], "absolute", solver="eigh").cond, rel=1e-6)
        assert row["cond_info"] <= row["cond"] * (1 + 1e-6)  # Lanczos: a lower bound (to rounding, ~u cond)
        assert row["p_row_norm_max"] == pytest.approx(float(o.P.double().norm(dim=1).max()), rel=1e-6)
        assert row["identity_error"] < 5e-7
        assert row["p_row_norm_max"] <= row["m_min"] ** -0.5 * (1 + 1e-6)  # M-orthonormal rows
    plain = orient(W, None, 4, metric="identity")
    B0 = product(plain.U.double(), plain.S.double(), plain.P.double())
    assert df["error_eval_plain"].to_list() == pytest.approx([functional_error(W, B0, Ce.matrix())] * len(grid), rel=1e-6)
    assert last["error_eval"] == pytest.approx(last["error_eval_plain"], rel=1e-3)  # eps = 1e6: plain SVD
    # relative mode at eps_rel is the same orientation as absolute mode at eps_rel * mean(diag C)
    rel = eps_sweep(W, C, 4, [1e-3], metric="full", eps_mode="relative")
    ab = orient(W, C, 4, metric="full", eps=1e-3 * mean_diag, eps_mode="absolute")
    ro = orient(W, C, 4, metric="full", eps=1e-3, eps_mode="relative")
    assert float(principal_angles(ab.P.T, ro.P.T).max()) < 1e-5
    assert rel["eps"][0] == pytest.approx(1e-3 * mean_diag) and rel["eps_rel"][0] == pytest.approx(1e-3)


def test_eps_sweep_diag_uses_the_diagonal_cond_and_rejects_identity():
    W, C = make_W(6, 9, 5).float(), make_C(30, 9, 5)
    df = eps_sweep(W, C, 3, [1e-6, 1.0], metric="diag")
    c = C.diag()
    assert df["cond"].to_list() == pytest.approx([damp(c, e, "absolute").cond for e in (1e-6, 1.0)])
    assert df["cond_method"].to_list() == ["exact", "exact"]
    assert df["error_eval"].is_nan().all()
    assert (df["p_row_norm_max"] <= df["m_min"] ** -0.5 * (1 + 1e-6)).all()  # rows of Vh diag(c + eps)^-1/2
    with pytest.raises(ValueError, match="identity"):
        eps_sweep(W, C, 3, [1e-3], metric="identity")
