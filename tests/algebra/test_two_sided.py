"""The two-sided metric (docs/algebra.md, "The output side: a two-sided metric"): orient(..., metric="two-sided",
output=G) returns the rank-r optimum of ||N^{1/2} (W - B) M^{1/2}||_F, checked against a brute force built from
eigendecompositions; the residual identity stays exact; G = I reduces it to the full metric; relative damping
makes it invariant to the scale of G; and every misuse raises naming the layer and the fix.

Data as in test_orient.py: W with spread singular values; C and G from n anisotropic samples (n may be below
the width: only eps makes the damped moments definite).
"""

import math

import pytest
import torch
from conftest import make_W
from conftest import random_orthogonal as _orth

from covsvd import SecondMoment
from covsvd.algebra.measures import identity_error
from covsvd.algebra.orient import ORIENT_METRICS, orient

F64 = torch.float64
TOL = 1e-8  # the bound; fp64 rounding of these O(10) sized problems is ~1e-13 (cond <= 1e6)
pytestmark = pytest.mark.usefixtures("one_thread")


def samples(n, d, seed, cond_exp=3.0):
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (-cond_exp / 2 * torch.rand(d, generator=g, dtype=F64))
    return (torch.randn(n, d, generator=g, dtype=F64) * scales) @ _orth(d, g)  # (n, d)


def moment(X, kind="full"):
    sum_xx = X.T @ X if kind == "full" else (X * X).sum(0)
    return SecondMoment(kind, sum_xx, X.sum(0), X.abs().sum(0), X.shape[0])


def damped(A, eps):
    """Dense ``A + eps mean(diag A) I`` (relative eps), and its symmetric square root and inverse root, by eigh."""
    A = torch.diag(A) if A.dim() == 1 else A
    lam, Q = torch.linalg.eigh(A)
    lam = lam.clamp_min(0) + eps * float(A.diagonal().mean())
    return (Q * lam) @ Q.T, (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T


def brute(W, C, G, r, eps=1e-3, eps_output=1e-3):
    """``(B*, error of B*, ||N^{1/2} W M^{1/2}||_F, N^{1/2}, M^{1/2})``: the two-sided optimum from eigh."""
    _, Mh, Mih = damped(C, eps)
    _, Nh, Nih = damped(G, eps_output)
    A = Nh @ W @ Mh
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    B = Nih @ ((U[:, :r] * S[:r]) @ Vh[:r]) @ Mih
    return B, float(S[r:].pow(2).sum().sqrt()), float(A.norm()), Nh, Mh


def two_sided_norm(E, Nh, Mh):
    return float((Nh @ E @ Mh).norm())


def product(o):
    return (o.U * o.S) @ o.P  # (d_out, d_in)


CASES = [  # (d_out, d_in, n_in, n_out, seed)
    (12, 9, 40, 40, 0),
    (9, 12, 10, 30, 1),  # C rank-deficient (n < d_in): eps makes M definite
    (16, 10, 50, 12, 2),  # G rank-deficient (n < d_out)
    (20, 6, 30, 60, 3),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("solver", ["cholesky", "eigh"])
@pytest.mark.parametrize("kinds", [("full", "full"), ("full", "diag"), ("diag", "full"), ("diag", "diag")])
def test_two_sided_is_the_brute_force_optimum(case, solver, kinds):
    d_out, d_in, n_in, n_out, seed = case
    W = make_W(d_out, d_in, seed)
    X, Y = samples(n_in, d_in, seed + 10), samples(n_out, d_out, seed + 20) * 1e-3  # gradients: a small scale
    C, G = moment(X, kinds[0]), moment(Y, kinds[1])
    Cd = C.matrix() if kinds[0] == "full" else C.diag()
    Gd = G.matrix() if kinds[1] == "full" else G.diag()
    for r in sorted({1, min(d_out, d_in) // 2, min(d_out, d_in) - 1}):
        o = orient(W, C, r, metric="two-sided", output=G, solver=solver)
        B, err, total, Nh, Mh = brute(W, Cd, Gd, r)
        assert float((product(o) - B).norm() / B.norm()) <= TOL, r
        assert math.isclose(two_sided_norm(W - product(o), Nh, Mh), err, rel_tol=TOL, abs_tol=TOL * total)
        assert math.isclose(o.info["rel_error"], err / total, rel_tol=TOL, abs_tol=TOL)
        assert o.info["eps_output"] == pytest.approx(1e-3 * float(Gd.diagonal().mean() if Gd.dim() == 2 else Gd.mean()),
                                                     rel=1e-12)
        assert o.info["eps"] == pytest.approx(1e-3 * float(Cd.diagonal().mean() if Cd.dim() == 2 else Cd.mean()),
                                              rel=1e-12)
        assert o.info["count_output"] == n_out and o.info["count"] == n_in
        # U is N-orthonormal: U^T N U = I (the output analogue of P M P^T = I)
        N = Nh @ Nh
        assert torch.allclose(o.U.T @ N @ o.U, torch.eye(r, dtype=F64), atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_no_rank_r_matrix_does_better(seed):
    """Eckart-Young under the two-sided norm, against competitors: the input-only optima (full, diag, identity) and
    random rank-r matrices near B* never reach a lower two-sided error."""
    d_out, d_in, r = 10, 8, 3
    W = make_W(d_out, d_in, seed)
    C, G = moment(samples(30, d_in, seed + 1)), moment(samples(30, d_out, seed + 2))
    o = orient(W, C, r, metric="two-sided", output=G)
    _, err, _, Nh, Mh = brute(W, C.matrix(), G.matrix(), r)
    best = two_sided_norm(W - product(o), Nh, Mh)
    assert best == pytest.approx(err, rel=TOL)
    for metric in ("full", "diag", "identity"):
        assert two_sided_norm(W - product(orient(W, C, r, metric=metric)), Nh, Mh) >= best * (1 - 1e-12)
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        dU = 1e-2 * torch.randn(d_out, r, generator=g, dtype=F64)
        dP = 1e-2 * torch.randn(r, d_in, generator=g, dtype=F64)
        B = ((o.U + dU) * o.S) @ (o.P + dP)
        assert two_sided_norm(W - B, Nh, Mh) >= best * (1 - 1e-12)


@pytest.mark.parametrize("storage", [F64, torch.float32, torch.bfloat16])
def test_residual_identity_is_exact(storage):
    W = make_W(14, 10, 5).to(storage)
    C, G = moment(samples(40, 10, 6)), moment(samples(40, 14, 7))
    for svd in ("exact", "randomized"):
        o = orient(W, C, 4, metric="two-sided", output=G, svd=svd)
        assert o.U.dtype == o.S.dtype == o.P.dtype == storage
        rd = F64 if storage == F64 else torch.float32
        assert o.W_res.dtype == rd
        # W_res was formed from the rounded factors: the sum reproduces W to the residual dtype's rounding
        assert identity_error(W, o.U, o.S, o.P, o.W_res) <= 4 * torch.finfo(rd).eps


def test_identity_G_is_the_full_metric():
    """G = c I (any c > 0, relative eps): N^{1/2} is a multiple of I, so two-sided equals full exactly."""
    W = make_W(12, 9, 8)
    C = moment(samples(40, 9, 9))
    full = orient(W, C, 4, metric="full")
    for G in (torch.ones(12, dtype=F64), 3.7 * torch.eye(12, dtype=F64)):
        two = orient(W, C, 4, metric="two-sided", output=G)
        assert float((product(two) - product(full)).norm() / product(full).norm()) <= 1e-12
        assert two.info["rel_error"] == pytest.approx(full.info["rel_error"], rel=1e-12)


@pytest.mark.parametrize("a", [1e-6, 0.3, 1e4])
def test_relative_eps_makes_the_scale_of_G_irrelevant(a):
    W = make_W(10, 8, 11)
    C, Y = moment(samples(30, 8, 12)), samples(30, 10, 13)
    base = orient(W, C, 3, metric="two-sided", output=moment(Y))
    scaled = orient(W, C, 3, metric="two-sided", output=moment(Y * math.sqrt(a)))
    assert float((product(scaled) - product(base)).norm() / product(base).norm()) <= 1e-11
    assert scaled.info["eps_output"] == pytest.approx(a * base.info["eps_output"], rel=1e-12)


def test_two_sided_is_listed_and_reports_its_norm():
    assert "two-sided" in ORIENT_METRICS
    W = make_W(8, 6, 14)
    o = orient(W, moment(samples(20, 6, 15)), 2, metric="two-sided", output=moment(samples(20, 8, 16), "diag"))
    assert o.info["error_metric"] == "(diag(G)+eps_out) (x) (C+eps I)"
    assert o.info["solver"] == "cholesky" and o.info["cond_output_method"] == "exact"
    assert o.info["cond_output"] >= 1.0 and o.info["clamped_output"] == 0


def test_misuse_raises_naming_the_layer_and_fix():
    W = make_W(8, 6, 17)
    C, G = moment(samples(20, 6, 18)), moment(samples(20, 8, 19))
    with pytest.raises(ValueError, match=r"layer 'l'.*needs the output moment G.*capture_output_moments"):
        orient(W, C, 2, metric="two-sided", name="l")
    with pytest.raises(ValueError, match=r"layer 'l'.*output= was given but metric='full'.*metric='two-sided'"):
        orient(W, C, 2, metric="full", output=G, name="l")
    with pytest.raises(ValueError, match=r"layer 'l'.*d_out=8.*width 6.*not its input moment"):
        orient(W, C, 2, metric="two-sided", output=C, name="l")  # the input moment passed as G
    with pytest.raises(ValueError, match=r"output moment G has shape \(6, 6\); expected \(8, 8\)"):
        orient(W, C, 2, metric="two-sided", output=C.matrix())
    with pytest.raises(ValueError, match=r"diagonal output moment has shape \(6,\); expected \(8,\)"):
        orient(W, C, 2, metric="two-sided", output=C.diag())
    with pytest.raises(ValueError, match=r"saw 3 token gradients, fewer than r=4"):
        orient(W, C, 4, metric="two-sided", output=moment(samples(3, 8, 20)))
    asym = G.matrix().clone()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="G is not symmetric"):
        orient(W, C, 2, metric="two-sided", output=asym)
    with pytest.raises(ValueError, match="eps=-1"):
        orient(W, C, 2, metric="two-sided", output=G, eps_output=-1.0)
    with pytest.raises(TypeError, match="output is a list"):
        orient(W, C, 2, metric="two-sided", output=[1.0])
    with pytest.raises(ValueError, match="needs a second moment C"):
        orient(W, None, 2, metric="two-sided", output=G)
    bad = G.matrix().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        orient(W, C, 2, metric="two-sided", output=bad)
    neg = -torch.eye(8, dtype=F64)  # not PSD: Cholesky of G + eps I fails, and says how to fix it
    with pytest.raises(ValueError, match="not positive definite.*solver='eigh'"):
        orient(W, C, 2, metric="two-sided", output=neg, eps_output=1e-3, eps_mode="absolute")


def test_right_factor_refuses_two_sided_without_the_output_side():
    """A caller that factors only C for the two-sided metric (e.g. a spectrum for allocation) gets an error, never
    the input-only spectrum."""
    from covsvd.algebra.damping import damp
    from covsvd.algebra.orient import right_factor

    W = make_W(8, 6, 21)
    own = damp(moment(samples(20, 6, 22)).matrix())
    with pytest.raises(ValueError, match="needs the factored output moment"):
        right_factor(W, own, "two-sided")
