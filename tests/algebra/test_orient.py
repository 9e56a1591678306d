"""Orientation algebra as properties: exact residual, Eckart-Young under the metric,
diag as the diagonal case of full, eps changes the basis but never the identity, M-orthonormal P, the
Cholesky teaching form, the exact QR-first SVD, the Lanczos cond estimate, and the validation errors. The
default (relative) eps makes orientation invariant to the scale of the inputs; absolute does not.

Data: W with spread singular values; C = X^T X / n from n samples x = z diag(scales) R (R orthogonal,
scales log-spread over ``cond_exp`` decades), as a SecondMoment, so every metric (asvd included) sees the
same C. n may be below d_in (rank-deficient C: only eps makes M definite).
"""

import math

import pytest
import torch
from conftest import make_W
from conftest import random_orthogonal as _orth
from hypothesis import example, given, settings
from hypothesis import strategies as st

from covsvd import SecondMoment
from covsvd.algebra.damping import COND_STEPS, DEFAULT_EPS, DEFAULT_EPS_MODE, damp, lanczos_max
from covsvd.algebra.measures import functional_error, principal_angles
from covsvd.algebra.orient import orient
from covsvd.algebra.svd import qr_svd
from covsvd.algebra.validate import ONE_SIDED_METRICS as METRICS  # two-sided: tests/algebra/test_two_sided.py

FAST = settings(max_examples=30, deadline=None)
F64 = torch.float64
ABS = "absolute"  # the tests that build M = C + eps I by hand pass eps as the absolute value




def make_X(n, d_in, seed, cond_exp=3.0, mean=0.0):
    """(n, d_in) anisotropic samples: z diag(scales) R, scales over cond_exp/2 decades (C over cond_exp)."""
    g = torch.Generator().manual_seed(seed + 1)
    scales = 10 ** (-cond_exp / 2 * torch.rand(d_in, generator=g, dtype=F64))
    return (torch.randn(n, d_in, generator=g, dtype=F64) * scales) @ _orth(d_in, g) + mean


def moment(X, kind="full"):
    sum_xx = X.T @ X if kind == "full" else (X * X).sum(0)
    return SecondMoment(kind, sum_xx, X.sum(0), X.abs().sum(0), X.shape[0])


def product(o):
    return (o.U * o.S) @ o.P  # (d_out, d_in)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@st.composite
def cases(draw):
    d_out, d_in = draw(st.integers(2, 14)), draw(st.integers(2, 14))
    r = draw(st.integers(1, min(d_out, d_in)))
    n = draw(st.integers(max(r, 2), 3 * d_in))  # n < d_in: rank-deficient C
    return dict(d_out=d_out, d_in=d_in, r=r, n=n, seed=draw(st.integers(0, 2**16)),
                cond_exp=draw(st.floats(0.0, 6.0)))


def setup(c):
    W = make_W(c["d_out"], c["d_in"], c["seed"])
    X = make_X(c["n"], c["d_in"], c["seed"], c["cond_exp"])
    return W, X, moment(X)


def damped_M(C, eps):
    return C + eps * torch.eye(C.shape[0], dtype=C.dtype)


# ------------------------------------------------------------------------------------------ 1. exact residual
@FAST
@given(c=cases(), metric=st.sampled_from(METRICS), comp=st.sampled_from(["top", "bottom"]),
       solver=st.sampled_from(["cholesky", "eigh"]), eps=st.sampled_from([1e-8, 1e-4, 1e-2, 1.0]),
       eps_mode=st.sampled_from(["absolute", "relative"]))
def test_residual_is_exact_for_every_metric_rank_eps(c, metric, comp, solver, eps, eps_mode):
    W, X, m = setup(c)
    o = orient(W, m, c["r"], metric=metric, eps=eps, eps_mode=eps_mode, components=comp, solver=solver)
    assert o.U.shape == (c["d_out"], c["r"]) and o.S.shape == (c["r"],) and o.P.shape == (c["r"], c["d_in"])
    assert o.W_res.dtype == F64
    assert rel(o.W_res + product(o), W) <= 1e-12
    assert bool((o.S[:-1] >= o.S[1:]).all())  # descending, also for "bottom"


def test_bf16_tight_residual_beats_the_naive_one():
    W = make_W(48, 64, 0).float()
    m = moment(make_X(300, 64, 0))
    o = orient(W, m, 16, metric="full", storage_dtype=torch.bfloat16)
    assert o.U.dtype == o.S.dtype == o.P.dtype == torch.bfloat16 and o.W_res.dtype == torch.float32
    rounded = (o.U.float() * o.S.float()) @ o.P.float()
    tight = rel(o.W_res + rounded, W.float())
    o64 = orient(W.double(), m, 16, metric="full")  # the unrounded factors
    naive = rel((W.double() - product(o64)).float() + rounded, W.float())
    assert tight <= 1e-6  # fp32 rounding of the subtraction only
    assert naive >= 100 * tight  # bf16 rounding of the factors, uncompensated


# ------------------------------------------------------------------------------------------ 2. Eckart-Young
@FAST
@given(c=cases(), eps=st.sampled_from([1e-6, 1e-3, 1e-1]), seed=st.integers(0, 2**16))
def test_full_reaches_the_eckart_young_bound_and_nothing_beats_it(c, eps, seed):
    W, X, m = setup(c)
    r, C = c["r"], m.matrix()
    M = damped_M(C, eps)
    lam, Q = torch.linalg.eigh(M)
    Mh = (Q * lam.sqrt()) @ Q.T  # independent M^{1/2} (no clamp needed: C = X^T X / n is PSD)
    s = torch.linalg.svdvals(W @ Mh)
    bound = math.sqrt(float((s[r:] ** 2).sum() / (s**2).sum()))
    full = orient(W, m, r, metric="full", eps=eps, eps_mode=ABS)
    assert functional_error(W, product(full), M) == pytest.approx(bound, rel=1e-7, abs=1e-9)
    assert full.info["rel_error"] == pytest.approx(bound, rel=1e-7, abs=1e-9)
    floor = bound * (1 - 1e-7) - 1e-9
    for metric in ("identity", "diag", "corda", "asvd"):
        assert functional_error(W, product(orient(W, m, r, metric=metric, eps=eps, eps_mode=ABS)), M) >= floor, metric
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(c["d_out"], r, generator=g, dtype=F64) @ torch.randn(r, c["d_in"], generator=g, dtype=F64)
    near = (full.U * full.S) @ (full.P + 1e-3 * torch.randn(r, c["d_in"], generator=g, dtype=F64))  # rank r
    for B in (rand, near, torch.zeros_like(W)):
        assert functional_error(W, B, M) >= floor


@FAST
@given(c=cases(), metric=st.sampled_from(METRICS), comp=st.sampled_from(["top", "bottom"]))
def test_info_rel_error_is_the_functional_error_under_the_damped_C(c, metric, comp):
    W, X, m = setup(c)
    o = orient(W, m, c["r"], metric=metric, eps=1e-3, eps_mode=ABS, components=comp)
    M = damped_M(m.matrix(), 1e-3)
    assert o.info["rel_error"] == pytest.approx(functional_error(W, product(o), M), rel=1e-6, abs=1e-9)
    if metric == "full" and comp == "top":
        assert o.info["energy_kept"] == pytest.approx(1 - o.info["rel_error"] ** 2, abs=1e-9)


def test_functional_error_is_the_expected_output_error_on_the_samples():
    W, X = make_W(7, 9, 3), make_X(50, 9, 3, mean=0.5)  # uncentered on purpose
    B = product(orient(W, None, 3, metric="identity"))
    C = X.T @ X / X.shape[0]
    expect = math.sqrt(float(((X @ (W - B).T) ** 2).sum() / ((X @ W.T) ** 2).sum()))
    assert functional_error(W, B, C) == pytest.approx(expect, rel=1e-12)
    assert functional_error(W, B, None) == pytest.approx(float((W - B).norm() / W.norm()), rel=1e-12)


# ------------------------------------------------------------------------------------------ 3. diag == full on diagonal C
@FAST
@given(c=cases(), eps=st.sampled_from([1e-6, 1e-2]), comp=st.sampled_from(["top", "bottom"]))
@example(c=dict(d_out=2, d_in=7, r=1, n=7, seed=52552, cond_exp=3.0), eps=1e-2, comp="top")
@example(c=dict(d_out=2, d_in=7, r=1, n=7, seed=400, cond_exp=3.0), eps=1e-2, comp="top")
def test_diag_equals_full_on_a_diagonal_C(c, eps, comp):
    W = make_W(c["d_out"], c["d_in"], c["seed"])
    g = torch.Generator().manual_seed(c["seed"])
    cvec = 10 ** (-c["cond_exp"] * torch.rand(c["d_in"], generator=g, dtype=F64))
    full = orient(W, torch.diag(cvec), c["r"], metric="full", eps=eps, components=comp)
    diag = orient(W, cvec, c["r"], metric="diag", eps=eps, components=comp)
    diag_of_full = orient(W, torch.diag(cvec), c["r"], metric="diag", eps=eps, components=comp)
    torch.testing.assert_close(diag.S, full.S, rtol=1e-9, atol=1e-12)
    assert rel(product(diag), product(full)) <= 1e-8 or float(product(full).norm()) < 1e-12
    # the same computation, but the relative eps reads mean(diag C) from a strided view of the matrix and from
    # the vector: the sums may round differently (4.4e-16 seen), so equal to fp64 rounding, not bit for bit
    torch.testing.assert_close(diag_of_full.P, diag.P, rtol=1e-13, atol=1e-13 * float(diag.P.abs().max()))


def test_column_broadcast_equals_the_matmul_with_diag_sqrt_c():
    for seed in range(10):
        W, c = make_W(13, 17, seed), torch.rand(17, generator=torch.Generator().manual_seed(seed), dtype=F64)
        assert torch.equal(W * c.sqrt(), W @ torch.diag(c.sqrt()))  # bitwise: every sum has one nonzero term
        assert torch.equal(damp(c, eps=0.0).factor(W), W * c.sqrt())


# ------------------------------------------------------------------------------------------ 4. eps and M-orthonormality
@FAST
@given(c=cases(), solver=st.sampled_from(["cholesky", "eigh"]), eps=st.sampled_from([1e-6, 1e-3, 1e-1]),
       comp=st.sampled_from(["top", "bottom"]))
def test_rows_of_P_are_M_orthonormal(c, solver, eps, comp):
    W, X, m = setup(c)
    r, eye = c["r"], torch.eye(c["r"], dtype=F64)
    M = damped_M(m.matrix(), eps)
    cond = float(torch.linalg.cond(M))
    tol = 1e-12 * max(1.0, cond)
    o = orient(W, m, r, metric="full", eps=eps, eps_mode=ABS, solver=solver, components=comp)
    assert float((o.P @ M @ o.P.T - eye).abs().max()) <= tol
    d = orient(W, m, r, metric="diag", eps=eps, eps_mode=ABS, components=comp)
    assert float((d.P @ torch.diag(m.diag() + eps) @ d.P.T - eye).abs().max()) <= 1e-10
    a = orient(W, m, r, metric="asvd", eps=eps, eps_mode=ABS, components=comp)
    assert float((a.P @ torch.diag(m.mean_abs() + eps) @ a.P.T - eye).abs().max()) <= 1e-10  # s^2 = E|x| at alpha 1/2
    i = orient(W, None, r, metric="identity", components=comp)
    assert float((i.P @ i.P.T - eye).abs().max()) <= 1e-12
    if cond <= 1e4:  # corda is the full metric of M^2: its P rows are M^2-orthonormal (error ~ u cond^2)
        k = orient(W, m, r, metric="corda", eps=eps, eps_mode=ABS, solver=solver, components=comp)
        assert float((k.P @ M @ M @ k.P.T - eye).abs().max()) <= 1e-13 * cond**2 + 1e-10


def test_corda_is_full_under_M_squared():
    W, X = make_W(9, 12, 1), make_X(60, 12, 1, cond_exp=2)
    C, eps = X.T @ X / 60, 1e-2
    M = damped_M(C, eps)
    k = orient(W, C, 4, metric="corda", eps=eps, eps_mode=ABS)
    f = orient(W, M @ M, 4, metric="full", eps=0.0)
    torch.testing.assert_close(k.S, f.S, rtol=1e-9, atol=0)
    assert rel(product(k), product(f)) <= 1e-9


def test_eps_changes_the_basis_never_the_identity():
    W, m = make_W(10, 16, 5), moment(make_X(80, 16, 5, cond_exp=6))
    small, large = (orient(W, m, 4, metric="full", eps=e, eps_mode=ABS) for e in (1e-8, 1e-1))
    for o in (small, large):
        assert rel(o.W_res + product(o), W) <= 1e-13
    angles = principal_angles(small.P.T, large.P.T)
    assert float(angles.max()) > 1e-2  # a different input basis ...
    assert small.info["eps"] == 1e-8 and large.info["eps"] == 1e-1
    rel_mode = orient(W, m, 4, metric="full", eps=1e-2, eps_mode="relative")
    assert rel_mode.info["eps"] == pytest.approx(1e-2 * float(m.diag().mean()), rel=1e-12)


# ------------------------------------------------------------------------------------------ the default eps: relative
#: x -> a x scales the metric M by this power of a under relative eps: C (full, diag) by a^2, M^2 (corda's T = M,
#: so W T) by a^4, asvd's s^2 = E|x| (alpha 1/2) by a; identity not at all. S scales by the square root.
M_POWER = {"identity": 0, "diag": 2, "full": 2, "corda": 4, "asvd": 1}


@FAST
@given(c=cases(), metric=st.sampled_from(METRICS), a=st.sampled_from([1e-2, 0.3, 7.0, 1e3]),
       solver=st.sampled_from(["cholesky", "eigh"]))
def test_the_default_eps_makes_orientation_scale_invariant(c, metric, a, solver):
    W, X, m = setup(c)
    r = c["r"]
    one = orient(W, m, r, metric=metric, solver=solver)
    scaled = orient(W, moment(a * X), r, metric=metric, solver=solver)
    k = a ** (M_POWER[metric] / 2)  # S scales by k, P by 1/k
    torch.testing.assert_close(scaled.S, k * one.S, rtol=1e-9, atol=1e-12 * k * float(one.S[0]))
    if metric != "identity":
        assert scaled.info["eps"] == pytest.approx(one.info["eps"] * a ** (1 if metric == "asvd" else 2), rel=1e-9)
    if metric in ("identity", "full") and r < min(W.shape):  # U, P's row space and U S P: unique given a gap at r
        T = damp(m.matrix(), one.info["eps"], ABS, solver="eigh").half() if metric == "full" else None
        s_all = torch.linalg.svdvals(W if T is None else W @ T)
        if float(s_all[r - 1] - s_all[r]) > 1e-3 * float(s_all[0]):
            assert rel(product(scaled), product(one)) <= 1e-7
            assert float(principal_angles(scaled.P.T, one.P.T).max()) <= 1e-6
            assert float(principal_angles(scaled.U, one.U).max()) <= 1e-6


def test_an_absolute_eps_is_a_relative_one_that_moves_with_the_scale():
    W, X = make_W(10, 16, 5), make_X(80, 16, 5, cond_exp=4)
    m = moment(X)
    for a in (1e-2, 1e2):
        scaled = orient(W, moment(a * X), 4, metric="full", eps=1e-3, eps_mode=ABS)
        same = orient(W, m, 4, metric="full", eps=1e-3 / a**2, eps_mode=ABS)  # a^2 C + e I = a^2 (C + e/a^2 I)
        assert rel(product(scaled), product(same)) <= 1e-9
        base = orient(W, m, 4, metric="full", eps=1e-3, eps_mode=ABS)
        assert float(principal_angles(scaled.P.T, base.P.T).max()) > 1e-2  # a different basis at another scale


@FAST
@given(c=cases(), eps=st.sampled_from([1e-5, 1e-3, 1e-1]), metric=st.sampled_from(["full", "diag"]))
def test_relative_eps_bounds_cond_and_the_rows_of_P(c, eps, metric):
    """lam_max(C) <= tr C = d mean(diag C), so cond(M) <= 1 + d / eps; and P M P^T = I gives
    ||p_i|| <= lam_min(M)^(-1/2) <= (eps mean(diag C))^(-1/2), whatever the data."""
    W, X, m = setup(c)
    o = orient(W, m, c["r"], metric=metric, eps=eps, solver="eigh")
    assert o.info["cond"] <= (1 + c["d_in"] / eps) * (1 + 1e-9)
    assert float(o.P.norm(dim=1).max()) <= (eps * float(m.diag().mean())) ** -0.5 * (1 + 1e-9)


# ------------------------------------------------------------------------------------------ 5. Cholesky form == full
@FAST
@given(c=cases(), eps=st.sampled_from([1e-6, 1e-3, 1e-1]))
def test_cholesky_form_and_both_solvers_equal_full(c, eps):
    W, X, m = setup(c)
    r, M = c["r"], damped_M(m.matrix(), eps)
    L = torch.linalg.cholesky(M)  # the Cholesky form written out: svd(W L), P = Vh_r L^{-1}
    U_all, S_all, Vh_all = torch.linalg.svd(W @ L, full_matrices=False)
    U, S = U_all[:, :r], S_all[:r]
    P = torch.linalg.solve_triangular(L, Vh_all[:r], upper=False, left=False)
    for solver in ("cholesky", "eigh"):
        o = orient(W, m, r, metric="full", eps=eps, eps_mode=ABS, solver=solver)
        torch.testing.assert_close(o.S, S, rtol=1e-9, atol=1e-14)
        s_all = torch.linalg.svdvals(W @ torch.linalg.cholesky(M))
        gap = float(s_all[r - 1] - s_all[r]) if r < len(s_all) else float(s_all[0])
        if gap > 1e-6 * float(s_all[0]):  # the rank-r product is unique only with a gap at r
            assert rel(product(o), (U * S) @ P) <= 1e-9 * float(s_all[0]) / gap


def test_dense_eigh_route_of_design_md_agrees():
    W, m = make_W(20, 30, 2), moment(make_X(100, 30, 2, cond_exp=5))
    eps = 1e-4
    d = damp(m.matrix(), eps, solver="eigh")
    U, S, Vh = torch.linalg.svd(W @ d.half(), full_matrices=False)
    P = Vh[:6] @ d.inv_half()
    o = orient(W, m, 6, metric="full", eps=eps)
    assert rel(product(o), (U[:, :6] * S[:6]) @ P) <= 1e-10
    torch.testing.assert_close(d.half() @ d.half(), d.matrix(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d.half() @ d.inv_half(), torch.eye(30, dtype=F64), rtol=0, atol=1e-9)


def test_solve_and_factor_inverse_are_inverses_for_every_kind():
    X = make_X(40, 25, 4, cond_exp=4)
    C = X.T @ X / 40
    Y = torch.randn(3, 25, dtype=F64)
    for d in (damp(C, 1e-3, solver="eigh"), damp(C, 1e-3, solver="cholesky"), damp(C.diagonal(), 1e-3)):
        torch.testing.assert_close(d.solve(d.mul(Y)), Y, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(d.factor_inv(d.factor(Y)), Y, rtol=1e-8, atol=1e-10)
        F = d.factor(torch.eye(25, dtype=F64))
        torch.testing.assert_close(F @ F.T, d.matrix(), rtol=1e-10, atol=1e-12)  # F F^T = M


# ------------------------------------------------------------------------------------------ the exact SVD route
@FAST
@given(m=st.integers(1, 30), n=st.integers(1, 30), seed=st.integers(0, 2**16), comp=st.sampled_from(["top", "bottom"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_qr_first_svd_is_an_exact_svd(m, n, seed, comp, dtype):
    A = make_W(m, n, seed).to(dtype)
    k = min(m, n)
    r = 1 + seed % k
    U, S, Vh = qr_svd(A, r, comp)
    S0 = torch.linalg.svdvals(A.double())
    u = 1e-13 if dtype == F64 else 1e-5
    torch.testing.assert_close(S.double(), S0, rtol=0, atol=u * float(S0[0]))
    eye = torch.eye(r, dtype=dtype)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=10 * u)
    torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=10 * u)
    sl = slice(0, r) if comp == "top" else slice(k - r, k)
    torch.testing.assert_close(U.T @ A @ Vh.T, torch.diag(S[sl]), rtol=0, atol=10 * u * float(S0[0]))


# ------------------------------------------------------------------------------------------ cond estimate
@FAST
@given(d=st.integers(COND_STEPS + 1, 90), cond_exp=st.floats(0.5, 7.0), seed=st.integers(0, 2**16))
def test_lanczos_cond_is_a_close_lower_bound(d, cond_exp, seed):
    X = make_X(2 * d, d, seed, cond_exp)
    C = X.T @ X / (2 * d)
    exact = damp(C, 1e-6, solver="eigh").cond
    est = damp(C, 1e-6, solver="cholesky")
    assert not est.cond_exact
    assert exact / 2 <= est.cond <= exact * (1 + 1e-8)


def test_lanczos_is_exact_on_small_operators():
    A = torch.diag(torch.arange(1.0, 9.0, dtype=F64))
    assert lanczos_max(lambda v: A @ v, 8, 20, A) == pytest.approx(8.0, rel=1e-12)


# ------------------------------------------------------------------------------------------ asvd
def test_asvd_is_diag_with_mean_abs_statistic():
    W, m = make_W(8, 11, 6), moment(make_X(70, 11, 6, mean=0.3))
    for alpha in (0.5, 1.0):
        a = orient(W, m, 3, metric="asvd", alpha=alpha, eps=1e-4)
        d = orient(W, m.mean_abs() ** (2 * alpha), 3, metric="diag", eps=1e-4)
        torch.testing.assert_close(a.P, d.P, rtol=0, atol=0)
        assert a.info["alpha"] == alpha


def test_asvd_alpha_one_equals_diag_on_constant_magnitude_data():
    g = torch.Generator().manual_seed(0)
    amp = torch.rand(11, generator=g, dtype=F64) + 0.1
    X = torch.where(torch.rand(200, 11, generator=g, dtype=F64) < 0.5, -1.0, 1.0) * amp  # |x_i| = amp_i
    W, m = make_W(8, 11, 7), moment(X)
    a, d = orient(W, m, 4, metric="asvd", alpha=1.0, eps=1e-6), orient(W, m, 4, metric="diag", eps=1e-6)
    torch.testing.assert_close(a.S, d.S, rtol=1e-12, atol=0)
    assert rel(product(a), product(d)) <= 1e-11


# ------------------------------------------------------------------------------------------ helpers
def test_principal_angles_known_and_tiny():
    for t in (1e-10, 1e-4, 0.3, math.pi / 2):
        X = torch.tensor([[1.0, 0], [0, 1], [0, 0]], dtype=F64)
        Y = torch.tensor([[1.0, 0], [0, math.cos(t)], [0, math.sin(t)]], dtype=F64) * 3  # not orthonormal
        ang = principal_angles(X, Y)
        assert float(ang[0]) == pytest.approx(0.0, abs=1e-15)
        assert float(ang[1]) == pytest.approx(t, rel=1e-9)
    assert principal_angles(torch.eye(5, dtype=F64)[:, :2], torch.eye(5, dtype=F64)[:, :3]).shape == (2,)


def test_info_reports_what_was_used():
    W, m = make_W(6, 9, 0), moment(make_X(40, 9, 0))
    o = orient(W, m, 2, metric="full", solver="eigh", name="blk.0")
    C = m.matrix()
    e = DEFAULT_EPS * float(C.diagonal().mean())  # the default is relative
    assert DEFAULT_EPS_MODE == "relative" and o.info["eps_mode"] == "relative" and o.info["eps_arg"] == DEFAULT_EPS
    assert o.info["eps"] == pytest.approx(e, rel=1e-12) and damp(C).eps == pytest.approx(e, rel=1e-12)
    assert o.info["cond"] == pytest.approx(float(torch.linalg.cond(C + e * torch.eye(9, dtype=F64))), rel=1e-8)
    assert o.info["cond_method"] == "exact" and o.info["clamped"] == 0 and o.info["count"] == 40
    assert o.info["name"] == "blk.0" and o.info["compute_dtype"] == "float64" and o.info["svd"] == "exact"
    a = orient(W, m, 2, metric="full", eps=1e-3, eps_mode=ABS)
    assert a.info["eps"] == 1e-3 and a.info["eps_mode"] == ABS
    assert orient(W, m, 2, metric="full").info["clamped"] is None  # cholesky does not clamp


def test_fp32_compute_matches_fp64():
    W, m = make_W(40, 90, 8, spread=1.0), moment(make_X(400, 90, 8, cond_exp=3))
    a = orient(W, m, 8, metric="full", compute_dtype=torch.float32)
    b = orient(W, m, 8, metric="full")
    assert a.info["compute_dtype"] == "float32" and a.U.dtype == F64  # storage follows W
    assert rel(product(a), product(b)) <= 1e-4


# ------------------------------------------------------------------------------------------ validation
def test_clear_errors():
    W, m = make_W(6, 9, 0), moment(make_X(40, 9, 0))
    with pytest.raises(ValueError, match=r"r=0 must be an int in \[1, min"):
        orient(W, m, 0)
    with pytest.raises(ValueError, match=r"r=7 .*\[1, 6\]"):
        orient(W, m, 7)
    with pytest.raises(ValueError, match=r"layer 'x.y': W has shape \(6, 9\) but C has shape \(8, 8\)"):
        orient(W, torch.eye(8, dtype=F64), 2, name="x.y")
    with pytest.raises(ValueError, match=r"W has shape \(6, 9\) .* d_in=5"):
        orient(W, moment(make_X(40, 5, 0)), 2)
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W .* non-finite"):
        orient(bad, m, 2)
    Cb = m.matrix().clone()
    Cb[1, 2] = Cb[2, 1] = float("inf")
    with pytest.raises(ValueError, match="C .* non-finite"):
        orient(W, Cb, 2)
    with pytest.raises(ValueError, match=r"saw 3 real tokens, fewer than r=4; add calibration text"):
        orient(W, moment(make_X(3, 9, 0)), 4)
    with pytest.raises(ValueError, match="unknown metric='whiten'"):
        orient(W, m, 2, metric="whiten")
    for metric in ("full", "corda"):
        with pytest.raises(ValueError, match=r"needs the full \(d_in, d_in\) second moment; got a \(9,\) vector"):
            orient(W, m.diag(), 2, metric=metric)
        with pytest.raises(ValueError, match="kind='diag'"):
            orient(W, moment(make_X(40, 9, 0), kind="diag"), 2, metric=metric)
    with pytest.raises(ValueError, match="only metric='identity' accepts C=None"):
        orient(W, None, 2, metric="diag")
    with pytest.raises(ValueError, match="pass the SecondMoment itself"):
        orient(W, m.matrix(), 2, metric="asvd")
    with pytest.raises(ValueError, match="not symmetric"):
        orient(W, m.matrix() + torch.triu(torch.ones(9, 9, dtype=F64), 1), 2)
    with pytest.raises(ValueError, match="eps=-1"):
        orient(W, m, 2, eps=-1)
    with pytest.raises(ValueError, match="1 zero channel"):
        orient(W, torch.ones(9, dtype=F64).index_fill(0, torch.tensor([4]), 0.0), 2, metric="diag", eps=0.0)


def test_indefinite_C_raises_for_cholesky_and_is_clamped_by_eigh():
    W = make_W(6, 9, 0)
    Q = _orth(9, torch.Generator().manual_seed(0))
    lam = torch.linspace(-0.5, 1.0, 9, dtype=F64)
    C = (Q * lam) @ Q.T  # materially indefinite
    with pytest.raises(ValueError, match=r"layer 'q': C \+ eps I .* not positive definite.*solver='eigh'"):
        orient(W, C, 2, eps=1e-3, eps_mode=ABS, name="q")
    o = orient(W, C, 2, eps=1e-3, eps_mode=ABS, solver="eigh")
    assert o.info["clamped"] == int((lam < 0).sum())
    Mc = (Q * (lam.clamp_min(0) + 1e-3)) @ Q.T  # the clamped M of docs/algebra.md ("Damping")
    assert float((o.P @ Mc @ o.P.T - torch.eye(2, dtype=F64)).abs().max()) <= 1e-9
    assert rel(o.W_res + product(o), W) <= 1e-13


@pytest.mark.parametrize("metric", ["full", "diag", "corda"])
@pytest.mark.parametrize("solver", ["cholesky", "eigh"])
def test_a_zero_input_names_the_fix_that_works(metric, solver):
    """An all-zero layer input: relative damping adds nothing, so the error must not suggest it (nor eigh,
    which cannot factor zero either); the fix it names, absolute eps, works."""
    W, zero = make_W(5, 4, 0), torch.zeros(4, 4, dtype=F64)
    C = zero if metric != "diag" else torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="layer 'z': C is zero.*eps_mode='absolute' with eps > 0"):
        orient(W, C, 2, metric, solver=solver, name="z")
    o = orient(W, C, 2, metric, eps=1e-3, eps_mode="absolute", solver=solver)
    assert float((o.W_res + (o.U * o.S) @ o.P - W).abs().max()) <= 1e-12
