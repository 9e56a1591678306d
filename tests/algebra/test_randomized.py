"""The randomized SVD route and the device / TF32 rules of orient.

``covsvd.algebra.svd.randomized_svd`` against the exact SVD: determinism for a seed, orthonormal factors,
``U^T A = S Vh``, exactness when the sketch spans the range, and the truncation error against the optimal tail
(the Halko-Martinsson-Tropp expectation bound without power iterations, near-optimal with two). Then
``orient(svd="randomized")``: the exact residual identity, honest diagnostics, option validation, and the
TF32 guard.
"""

import math
import subprocess
import sys

import pytest
import torch
from conftest import make_W, random_orthogonal
from hypothesis import given, settings
from hypothesis import strategies as st

from covsvd import SecondMoment
from covsvd.algebra.measures import functional_error, identity_error
from covsvd.algebra.orient import orient
from covsvd.algebra.svd import randomized_svd, truncated_svd
from covsvd.util import checks as checks_mod
from covsvd.util.checks import check_no_tf32

F64 = torch.float64
FAST = settings(max_examples=25, deadline=None)


def spectrum_matrix(m, n, s, seed):
    """``A (m, n)`` fp64 with singular values ``s`` (descending) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    k = len(s)
    return (random_orthogonal(m, g)[:, :k] * s) @ random_orthogonal(n, g)[:, :k].T


def decaying(k, kind):
    i = torch.arange(k, dtype=F64)
    return {"exp": torch.exp(-0.2 * i), "power1": (i + 1) ** -1.0, "power2": (i + 1) ** -2.0,
            "slow": (i + 1) ** -0.5}[kind]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def moment(X):
    return SecondMoment("full", X.T @ X, X.sum(0), X.abs().sum(0), X.shape[0])


def samples(n, d, seed, cond_exp=4.0):
    g = gen(seed + 7)
    scales = 10 ** (-cond_exp / 2 * torch.rand(d, generator=g, dtype=F64))
    return (torch.randn(n, d, generator=g, dtype=F64) * scales) @ random_orthogonal(d, g)


# ------------------------------------------------------------------------------------------ randomized_svd
@FAST
@given(m=st.integers(2, 40), n=st.integers(2, 40), seed=st.integers(0, 2**16), p=st.integers(0, 12),
       q=st.integers(0, 3))
def test_factors_are_orthonormal_and_project_A(m, n, seed, p, q):
    A = make_W(m, n, seed)
    r = 1 + seed % min(m, n)
    U, S, Vh = randomized_svd(A, r, p, q, gen(seed))
    l = min(r + p, m, n)
    assert U.shape == (m, r) and S.shape == (l,) and Vh.shape == (r, n)
    eye = torch.eye(r, dtype=F64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(Vh @ Vh.T, eye, rtol=0, atol=1e-12)
    torch.testing.assert_close(U.T @ A, S[:r, None] * Vh, rtol=0, atol=1e-12 * float(S[0]))  # U^T A = S Vh
    assert bool((S[:-1] >= S[1:]).all())
    exact = torch.linalg.svdvals(A)
    assert bool((S <= exact[:l] * (1 + 1e-12) + 1e-14).all())  # interlacing: never above A's own


def test_deterministic_for_a_seed_and_different_across_seeds():
    A = spectrum_matrix(60, 150, decaying(60, "power1"), 0)
    a = randomized_svd(A, 8, 10, 2, gen(3))
    b = randomized_svd(A, 8, 10, 2, gen(3))
    c = randomized_svd(A, 8, 10, 0, gen(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    d = randomized_svd(A, 8, 10, 2)  # generator=None: seed 0 on A's device
    assert all(torch.equal(x, y) for x, y in zip(d, randomized_svd(A, 8, 10, 2, gen(0)), strict=True))


@pytest.mark.parametrize("shape", [(30, 70), (70, 30), (40, 40)])
def test_a_sketch_spanning_the_range_is_the_exact_svd(shape):
    A = make_W(*shape, seed=1)
    k = min(shape)
    U, S, Vh = randomized_svd(A, 5, 10 * k, 0, gen(0))  # r + oversample clamped to min(m, n)
    U0, S0, Vh0 = truncated_svd(A, 5)
    assert S.shape == (k,)
    torch.testing.assert_close(S, S0, rtol=1e-12, atol=1e-14)
    assert float(((U * S[:5]) @ Vh - (U0 * S0[:5]) @ Vh0).norm()) <= 1e-12 * float(S0[0])


@pytest.mark.parametrize("kind", ["exp", "power1", "power2", "slow"])
@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_truncation_error_against_the_optimal_tail(kind, shape):
    """HMT 2011 Thm 10.5: E||A - Q Q^T A||_F^2 <= (1 + r/(p-1)) tail^2 without power iterations; the rank-r
    truncation adds at most tail^2 more (Pythagoras: its error splits into the part outside span Q and the
    truncation of Q^T A, whose singular values interlace below A's). With two QR-stabilised power iterations
    the error is within a few percent of the optimum."""
    m, n = shape
    s = decaying(min(shape), kind)
    for seed in range(3):
        A = spectrum_matrix(m, n, s, seed)
        for r, p in ((4, 6), (12, 10)):
            tail = float(s[r:].norm())  # the Eckart-Young optimum
            for q in (0, 2):
                U, S, Vh = randomized_svd(A, r, p, q, gen(seed))
                err = float((A - (U * S[:r]) @ Vh).norm())
                assert err >= tail * (1 - 1e-12)
                if q == 0:
                    assert err <= 2 * math.sqrt(2 + r / (p - 1)) * tail, (kind, shape, seed, r)
                else:
                    assert err <= 1.05 * tail, (kind, shape, seed, r, err / tail)
            S0 = torch.linalg.svdvals(A)[:r]
            assert float(((S[:r] - S0) / S0[0]).abs().max()) <= 0.05  # q = 2: singular values close too


def test_randomized_svd_validates():
    A = make_W(6, 9, 0)
    for kw, msg in ((dict(r=0), r"r=0 must be an int"), (dict(r=7), r"r=7"), (dict(r=2, oversample=-1), "oversample=-1"),
                    (dict(r=2, power_iters=1.5), "power_iters=1.5")):
        with pytest.raises(ValueError, match=msg):
            randomized_svd(A, **kw)


# ------------------------------------------------------------------------------------------ orient(svd="randomized")
@FAST
@given(d_out=st.integers(2, 24), d_in=st.integers(2, 24), seed=st.integers(0, 2**16),
       metric=st.sampled_from(["identity", "diag", "full", "corda", "asvd"]), p=st.integers(0, 8),
       storage=st.sampled_from([F64, torch.float32, torch.bfloat16]))
def test_residual_identity_is_exact_with_randomized(d_out, d_in, seed, metric, p, storage):
    W = make_W(d_out, d_in, seed)
    r = 1 + seed % min(d_out, d_in)
    m = moment(samples(3 * d_in, d_in, seed))
    o = orient(W, m, r, metric=metric, svd="randomized", oversample=p, storage_dtype=storage, seed=seed)
    assert o.U.dtype == storage and o.info["svd"] == "randomized" and o.info["sketch"] == min(r + p, d_out, d_in)
    tol = 1e-12 if storage == F64 else 1e-6  # the residual's own rounding (fp64 / fp32)
    assert identity_error(W, *o[:4], norm="fro") <= tol


@pytest.mark.parametrize("metric", ["full", "corda", "diag"])
def test_randomized_orient_is_near_exact_and_its_diagnostics_are_honest(metric):
    d_out, d_in, r = 64, 150, 12
    W = spectrum_matrix(d_out, d_in, decaying(d_out, "power1"), 2)
    m = moment(samples(600, d_in, 2))
    ex = orient(W, m, r, metric=metric, eps=1e-4)
    ra = orient(W, m, r, metric=metric, eps=1e-4, svd="randomized")
    M = m.matrix() + ex.info["eps"] * torch.eye(d_in, dtype=F64)  # the damped data moment of info["rel_error"]
    for o in (ex, ra):
        assert o.info["rel_error"] == pytest.approx(functional_error(W, (o.U * o.S) @ o.P, M), rel=1e-9)
    assert ex.info["rel_error"] * (1 - 1e-9) <= ra.info["rel_error"] <= 1.02 * ex.info["rel_error"]
    assert ra.info["energy_kept"] <= ex.info["energy_kept"] * (1 + 1e-12)
    if metric == "full":  # the metric's own energy is the data energy: kept + dropped = total
        assert ra.info["energy_kept"] == pytest.approx(1 - ra.info["rel_error"] ** 2, abs=1e-12)
    torch.testing.assert_close(ra.S, ex.S, rtol=2e-2, atol=0)
    assert ra.info["eps"] == ex.info["eps"] and ra.info["cond"] == ex.info["cond"]
    again = orient(W, m, r, metric=metric, eps=1e-4, svd="randomized")
    assert all(torch.equal(a, b) for a, b in zip(ra[:4], again[:4], strict=True))
    other = orient(W, m, r, metric=metric, eps=1e-4, svd="randomized", seed=1)
    assert not torch.equal(other.P, ra.P)
    assert ra.info["oversample"] == 10 and ra.info["power_iters"] == 2 and ra.info["seed"] == 0
    assert ex.info["svd"] == "exact" and "sketch" not in ex.info and ex.info["device"] == "cpu"


def test_orient_validates_the_svd_options():
    W, m = make_W(6, 9, 0), moment(samples(40, 9, 0))
    cases = [(dict(svd="lanczos"), r"svd='lanczos'; expected one of \('exact', 'randomized'\)"),
             (dict(svd="randomized", oversample=-2), "oversample=-2 must be an int >= 0"),
             (dict(svd="randomized", power_iters=2.0), "power_iters=2.0 must be an int"),
             (dict(svd="randomized", seed=True), "seed=True must be an int"),
             (dict(svd="randomized", components="bottom"), "components='bottom' .* use svd='exact'")]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            orient(W, m, 2, name="blk", **kw)
    with pytest.raises(TypeError):
        orient(W, m, 2, "full", 1e-3, "relative", "top", "cholesky")  # the new options are keyword-only


# ------------------------------------------------------------------------------------------ devices and TF32
def test_tf32_guard_raises_only_for_float32_on_cuda(monkeypatch):
    monkeypatch.setattr(checks_mod, "tf32_enabled", lambda: True)
    with pytest.raises(ValueError, match=r"layer 'x': orient .* TF32 .*fp32_precision = 'ieee'.*or use float64"):
        check_no_tf32(torch.device("cuda", 0), (F64, torch.float32), "orient", "use float64", "layer 'x': ")
    check_no_tf32("cpu", (torch.float32,), "orient", "")  # CPU: no TF32
    check_no_tf32("cuda", (F64,), "orient", "")  # fp64 products only
    monkeypatch.setattr(checks_mod, "tf32_enabled", lambda: False)
    check_no_tf32("cuda", (torch.float32,), "orient", "")


def test_tf32_enabled_reads_every_way_of_turning_it_on():
    """In a child process: the flags are global and the legacy and new torch APIs must not be mixed here."""
    code = ("import importlib.util, torch\n"  # checks.py alone (it imports only torch): no covsvd/transformers import
            f"spec = importlib.util.spec_from_file_location('checks', {checks_mod.__file__!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); on = mod.tf32_enabled\n"
            "m = torch.backends.cuda.matmul\n"
            "out = [on()]\n"
            "torch.set_float32_matmul_precision('high'); out.append(on())\n"
            "torch.set_float32_matmul_precision('highest'); out.append(on())\n"
            "m.allow_tf32 = True; out.append(on())\n"
            "m.fp32_precision = 'ieee'; out.append(on())\n"
            "torch.backends.fp32_precision = 'tf32'; m.fp32_precision = 'none'; out.append(on())\n"
            "print(out)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[False, True, False, True, False, True]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_orient_runs_on_the_weights_device():  # pragma: no cover - CPU machines
    W, m = make_W(48, 96, 3).float(), moment(samples(300, 96, 3))
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        for svd in ("exact", "randomized"):
            o = orient(W.cuda(), m, 8, svd=svd)
            assert all(t.device.type == "cuda" for t in o[:4]) and o.info["device"].startswith("cuda")
            assert identity_error(W, *(t.cpu() for t in o[:4])) <= 1e-6
            ref = orient(W, m, 8)
            assert functional_error(W, ((o.U * o.S) @ o.P).cpu(), m.matrix()) <= 1.01 * ref.info["rel_error"] + 1e-6
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        with pytest.raises(ValueError, match="TF32"):
            orient(W.cuda(), m, 8)
        orient(W.cuda().double(), m, 8)  # fp64 compute and storage: no fp32 product, no error
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
