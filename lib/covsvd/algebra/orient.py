"""Orientation: the rank-r factors ``U (d_out, r), S (r,), P (r, d_in)`` of a Linear weight under a metric,
and the exact residual ``W_res = W - U diag(S) P``. Pure tensors; nothing is mutated.

Every metric is one right factor ``T`` of the weight (docs/algebra.md, "Orientation by a metric")::

    W T = U S Vh  (covsvd.algebra.svd: exact, or randomized)     U_r, S_r, Vh_r = the r kept triplets     P_r = Vh_r T^{-1}

    identity  T = I                      P = Vh                      (PiSSA-style top-r)
    diag      T = diag(sqrt(c + eps))    P = Vh * (c + eps)^-1/2     (ASVD-style; c = diag C, column broadcast)
    asvd      T = diag(sqrt(s^2 + eps))  s = (E|x_i|)^alpha          (the ASVD paper's own scaling)
    full      T = F, F F^T = M           P = Vh F^{-1}               (whitening; Cholesky L or Q diag(sqrt lam))
    corda     T = M                      P = Vh M^{-1}               (the CorDA paper's svd(W C), as in peft)

with ``M = C + eps I`` (:mod:`covsvd.algebra.damping`). Because ``Vh_r = S_r^{-1} U_r^T W T``, every one-sided
metric gives ``U_r S_r P_r = U_r U_r^T W``: the orthogonal projection of W onto an r-dimensional output subspace,
which metric chooses. ``full`` chooses the Eckart-Young optimum under M; ``corda`` is the optimum under ``M^2``
(its P rows are ``M^2``-orthonormal, not M-orthonormal), a different basis.

``two-sided`` (docs/algebra.md, "The output side: a two-sided metric") adds a left factor ``K``, ``K K^T = N``
with ``N = G + eps_output I`` the damped output moment::

    K^T W T = U' S Vh     U_r = K^{-T} U'_r  (triangular solve)     P_r = Vh_r T^{-1}

so ``U_r S_r P_r = N^{-1/2} [N^{1/2} W M^{1/2}]_r M^{-1/2}``, the rank-r optimum of ``||N^{1/2} (W - B) M^{1/2}||_F``
(``T`` as for ``full``, or ``diag`` when C is diagonal; ``K`` likewise for G). U is then N-orthonormal
(``U^T N U = I``), not orthonormal, and ``U S P`` is no longer an orthogonal projection of W.

The steps, each a pure function below: validate (:func:`covsvd.algebra.validate.orient_options`,
:func:`covsvd.algebra.validate.moment_parts`, :func:`covsvd.algebra.validate.output_parts`) -> :func:`metric_factor`
(and :func:`output_factor`) -> :func:`right_factor` -> :func:`decompose` -> :func:`back_factor` (and
:func:`front_factor`) -> :func:`residual` -> :func:`diagnostics`. Everything runs on ``W``'s device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..util.checks import where
from .damping import DEFAULT_EPS, DEFAULT_EPS_MODE, Damped, damp, resolve_eps
from .measures import quad
from .svd import kept, randomized_svd, truncated_svd
from .validate import (
    FULL_METRICS,
    METRICS,
    ORIENT_METRICS,
    OUTPUT_METRICS,
    moment_parts,
    orient_options,
    output_parts,
)

__all__ = ["METRICS", "ORIENT_METRICS", "OUTPUT_METRICS", "Oriented", "orient"]


class Oriented(NamedTuple):
    """The result of :func:`orient`.

    ``U (d_out, r)``, ``S (r,)``, ``P (r, d_in)`` in the storage dtype; ``W_res (d_out, d_in)`` in fp32
    (fp64 when the storage dtype is fp64), formed from the *rounded* factors so that
    ``W_res + U diag(S) P == W`` to the rounding of that dtype ("bf16-tight"). All on ``W``'s device.
    ``info``: a plain dict, keys documented in :func:`orient`.
    """

    U: torch.Tensor
    S: torch.Tensor
    P: torch.Tensor
    W_res: torch.Tensor
    info: dict


class Energy(NamedTuple):
    """Squared Frobenius norms (fp64 floats) of ``A = W T`` and of what the kept triplets leave out of it."""

    total: float  # ||A||_F^2
    dropped: float  # ||A - U_r diag(S_r) Vh_r||_F^2


def orient(
    W: torch.Tensor,
    C,
    r: int,
    metric: str = "full",
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    components: str = "top",
    *,
    solver: str = "cholesky",
    alpha: float = 0.5,
    compute_dtype: torch.dtype = torch.float64,
    storage_dtype: torch.dtype | None = None,
    svd: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    name: str | None = None,
    output=None,
    eps_output: float = DEFAULT_EPS,
) -> Oriented:
    """Orient ``W (d_out, d_in)`` by ``metric`` at rank ``r``: ``Oriented(U, S, P, W_res, info)``, on W's device.

    Args:
        W: the weight, Linear convention ``(d_out, d_in)`` (Conv1D: use ``covsvd.weight_matrix``).
        C: a :class:`~covsvd.SecondMoment` (preferred: its ``count`` is checked against r and ``asvd``
            needs its ``mean_abs``), a ``(d_in, d_in)`` tensor ``E[x x^T]``, a ``(d_in,)`` diagonal
            ``E[x_i^2]`` (diag / identity only), or ``None`` (identity only). Moved to W's device.
        r: rank, ``1 <= r <= min(d_out, d_in)``.
        metric: ``"identity"``, ``"diag"``, ``"full"``, ``"corda"``, ``"asvd"`` or ``"two-sided"`` (module
            docstring; two-sided needs ``output``, and C full or diagonal).
        eps, eps_mode: damping ``M = C + eps I``; ``"relative"`` adds ``eps * mean(diag C)``, ``"absolute"``
            adds ``eps`` (for ``asvd`` the diagonal damped is ``s^2``, relative to ``mean(s^2)``). Default
            ``covsvd.DEFAULT_EPS`` relative (see ``covsvd.algebra.damping`` for why): scaling the inputs x by any
            ``a > 0`` then leaves U, the row space of P and ``U S P`` unchanged (S scales by a, P by 1/a).
            For ``identity`` eps only enters ``info["rel_error"]``.
        components: ``"top"`` keeps the r largest singular directions of ``W T``; ``"bottom"`` the r
            smallest (CorDA's knowledge-preserving mode; exact SVD only), still in descending order.
        solver: ``"cholesky"`` (default; fast, no eigenvalue clamp, raises if ``C + eps I`` is not
            positive definite) or ``"eigh"`` (the definition: clamp C's eigenvalues at 0, then add eps;
            exact cond). Only ``full`` / ``corda`` factor a matrix; diagonal metrics clamp exactly.
        alpha: the ASVD exponent (``asvd`` only).
        compute_dtype: the dtype of every decomposition (Cholesky / eigh, QR, SVD, solves):
            **float64 by default**; float32 allowed (measured accuracy in bench/orient.py).
        storage_dtype: the dtype of the returned U, S, P (default: ``W.dtype``). ``W_res`` is formed in
            fp32 (fp64 if storage is fp64) from the factors *after* rounding to it.
        svd: ``"exact"`` (default; :func:`covsvd.algebra.svd.truncated_svd`) or ``"randomized"``
            (:func:`covsvd.algebra.svd.randomized_svd`, top components only): a sketch of ``r + oversample``
            columns (clamped to ``min(d_out, d_in)``), ``power_iters`` QR-stabilised subspace iterations,
            Gaussian test matrix from a ``torch.Generator`` on W's device seeded with ``seed``:
            deterministic for a seed on a given device. The residual identity is exact either way (W_res is
            formed from the factors returned); only the optimality of the truncation is approximate.
        name: a layer name, used in error messages.
        output: two-sided only: the output moment ``G = E[g g^T]`` of the layer (a SecondMoment from
            :func:`covsvd.capture_output_moments`, a ``(d_out, d_out)`` tensor, or a ``(d_out,)`` diagonal);
            ``None`` for one-sided metrics (validated by :func:`covsvd.algebra.validate.output_parts`).
        eps_output: the damping ``N = G + eps_output I`` of the output side, in ``eps_mode`` (relative:
            ``eps_output * mean(diag G)``); factored by ``solver`` like C.

    Raises:
        ValueError: a bad option or moment (:func:`covsvd.algebra.validate.orient_options`,
            :func:`covsvd.algebra.validate.moment_parts`), ``C + eps I`` not positive definite for ``solver="cholesky"``
            (:func:`covsvd.algebra.damping.damp`), or float32 products on CUDA with TF32 enabled (never run silently).

    ``info`` (a dict of Python scalars and strings):
        ``metric, components, solver, r, compute_dtype, storage_dtype, device, name``;
        ``eps``: the absolute eps added to the metric that oriented, ``eps_mode`` the mode that produced it
        from ``eps_arg`` (the input); ``cond``: cond_2 of that damped metric M (1.0 for identity);
        ``cond_method``: ``"exact"`` (diag, eigh) or ``"lanczos-16 (lower bound)"`` (cholesky; see
        ``Damped.cond``); ``clamped``: eigenvalues of C clamped at 0 (eigh / diag) or ``None`` (cholesky does
        not clamp); ``svd``: the route, and for ``"randomized"`` also ``oversample, power_iters, seed`` and
        ``sketch`` (the columns actually drawn);
        ``energy_kept``: ``sum S_r^2 / ||W T||_F^2`` (the metric's own energy; for corda that is under
        ``M^2``). ``||W T||_F^2`` is computed directly, so with a randomized SVD (where only the top
        ``sketch`` singular values are known) this is still the energy the returned factors keep;
        ``rel_error``: the functional truncation error ``||(W - U S P) M^{1/2}||_F / ||W M^{1/2}||_F`` of the
        returned factors with M the damped data moment you passed (the full C if you passed it, else its
        diagonal, else I), computed in ``compute_dtype`` before rounding; ``error_metric``: which M that was;
        ``count``: real tokens behind C (SecondMoment only).
        Two-sided also: ``eps_output`` (the absolute value added to G), ``eps_output_arg``, ``cond_output``,
        ``cond_output_method``, ``clamped_output``, ``count_output``; ``energy_kept`` and ``rel_error`` are then
        under the two-sided norm, ``||N^{1/2} (W - U S P) M^{1/2}||_F / ||N^{1/2} W M^{1/2}||_F``.
    """
    prefix = where(name)
    storage = orient_options(W, r, metric, eps, eps_mode, components, solver, compute_dtype, storage_dtype, svd,
                             oversample, power_iters, seed, prefix)
    mat, dg, mabs, count = moment_parts(C, metric, r, tuple(W.shape), prefix)
    gmat, gdg, gcount = output_parts(output, metric, r, tuple(W.shape), eps_output, eps_mode, prefix)
    with torch.no_grad():
        Wc = W.detach().to(compute_dtype)  # (d_out, d_in)
        mat, dg, mabs, gmat, gdg = (None if t is None else t.to(dtype=compute_dtype, device=Wc.device)
                                    for t in (mat, dg, mabs, gmat, gdg))
        own = metric_factor(metric, mat, dg, mabs, eps, eps_mode, solver, alpha, compute_dtype, name)
        out = output_factor(gmat, gdg, eps_output, eps_mode, solver, compute_dtype, name)  # None: one-sided
        U, S, Vh, energy, sketch = decompose(right_factor(Wc, own, metric, out), r, components, svd, oversample,
                                             power_iters, seed)  # (d_out, r), (r,), (r, d_in)
        P = back_factor(Vh, own, metric)  # (r, d_in) Vh_r T^{-1}
        U = front_factor(U, out)  # (d_out, r) K^{-T} U'_r
        Us, Ss, Ps, W_res = residual(W, U, S, P, storage)
        info = diagnostics(Wc, U, S, P, energy, own, mat, dg, C is None, metric, eps, eps_mode)
    if out is not None:
        info.update(output_diagnostics(out, info["error_metric"]), eps_output_arg=float(eps_output),
                    count_output=gcount)
    two_sided_solver = metric in OUTPUT_METRICS and (mat is not None or gmat is not None)
    info.update(metric=metric, components=components,
                solver=solver if metric in FULL_METRICS or two_sided_solver else "n/a", r=r,
                eps_mode=eps_mode, eps_arg=float(eps), count=count, svd=svd,
                compute_dtype=str(compute_dtype).removeprefix("torch."),
                storage_dtype=str(storage).removeprefix("torch."), device=str(W.device), name=name)
    if svd == "randomized":
        info.update(oversample=oversample, power_iters=power_iters, seed=seed, sketch=sketch)
    if metric == "asvd":
        info["alpha"] = alpha
    return Oriented(Us, Ss, Ps, W_res, info)


def metric_factor(metric: str, mat, dg, mabs, eps: float, eps_mode: str, solver: str, alpha: float,
                  dtype: torch.dtype, name: str | None) -> Damped | None:
    """The damped metric ``M`` of ``metric`` in factored form (``None`` for identity): full / corda factor
    ``C + eps I``, diag ``diag(c) + eps``, asvd ``diag((E|x|)^(2 alpha)) + eps``; two-sided the input side,
    ``C + eps I`` (full C) or ``diag(c) + eps`` (diagonal C). Tensors already in ``dtype``."""
    if metric in FULL_METRICS or (metric in OUTPUT_METRICS and mat is not None):
        return damp(mat, eps, eps_mode, solver=solver, dtype=dtype, name=name)
    if metric == "diag" or metric in OUTPUT_METRICS:
        return damp(dg, eps, eps_mode, dtype=dtype, name=name)
    if metric == "asvd":
        return damp(mabs ** (2 * alpha), eps, eps_mode, dtype=dtype, name=name)
    return None


def output_factor(gmat, gdg, eps_output: float, eps_mode: str, solver: str, dtype: torch.dtype,
                  name: str | None) -> Damped | None:
    """The damped output moment ``N = G + eps_output I`` in factored form (``N = K K^T``): ``solver`` for a full
    ``(d_out, d_out)`` G, exact for a ``(d_out,)`` diagonal; ``None`` for a one-sided metric (both ``None``)."""
    if gmat is not None:
        return damp(gmat, eps_output, eps_mode, solver=solver, dtype=dtype, name=name)
    if gdg is not None:
        return damp(gdg, eps_output, eps_mode, dtype=dtype, name=name)
    return None


def right_factor(W: torch.Tensor, own: Damped | None, metric: str, out: Damped | None = None) -> torch.Tensor:
    """``W T`` ``(d_out, d_in)``: ``W`` (identity), ``W M`` (corda) or ``W F`` with ``F F^T = M`` (the rest);
    two-sided ``K^T W F`` with ``K K^T = N`` (``out``, required: raises ``ValueError`` without it, so a caller that
    forgot the output side never gets the input-only spectrum)."""
    if metric in OUTPUT_METRICS:
        if out is None:
            raise ValueError(f"metric={metric!r} needs the factored output moment (output_factor); got none")
        return out.factor(own.factor(W).T).T  # (K^T (W F)) = ((W F)^T K)^T
    if own is None:
        return W
    return own.mul(W) if metric == "corda" else own.factor(W)


def decompose(A: torch.Tensor, r: int, components: str, svd: str, oversample: int, power_iters: int, seed: int):
    """``(U_r (m, r), S_r (r,), Vh_r (r, n), energy, known)`` of ``A = W T`` ``(m, n)``, in A's dtype, on A's device.

    ``svd="exact"``: :func:`~covsvd.algebra.svd.truncated_svd`, the r triplets of ``components``; ``energy.dropped``
    sums the other squared singular values. ``svd="randomized"``: :func:`~covsvd.algebra.svd.randomized_svd` (top
    only), Gaussian sketch from a generator on A's device seeded with ``seed``; only its singular values are
    known, so ``energy`` is measured on A itself: ``total = ||A||_F^2`` and ``dropped = ||A - U_r S_r Vh_r||_F^2``
    (fp64 sums), the error of the factors returned rather than the optimal tail. ``known``: how many singular
    values of A were computed (``min(m, n)`` for exact, the sketch size for randomized).
    """
    f64 = torch.float64
    if svd == "exact":
        U, S_all, Vh = truncated_svd(A, r, components)  # (m, r), (k,), (r, n)
        sl = kept(S_all.shape[0], r, components)
        S2 = S_all.to(f64) ** 2  # (k,)
        drop = torch.ones_like(S2, dtype=torch.bool)
        drop[sl] = False
        return U, S_all[sl], Vh, Energy(float(S2.sum()), float(S2[drop].sum())), S_all.shape[0]
    generator = torch.Generator(device=A.device).manual_seed(seed)
    U, S_known, Vh = randomized_svd(A, r, oversample, power_iters, generator)  # (m, r), (l,), (r, n)
    S = S_known[:r]
    total = float(torch.linalg.vector_norm(A, dtype=f64) ** 2)
    dropped = float(torch.linalg.vector_norm(A - (U * S) @ Vh, dtype=f64) ** 2)  # (m, n) temporary
    return U, S, Vh, Energy(total, dropped), S_known.shape[0]


def back_factor(Vh: torch.Tensor, own: Damped | None, metric: str) -> torch.Tensor:
    """``P = Vh T^{-1}`` ``(r, d_in)``: solves, never an explicit inverse."""
    if own is None:
        return Vh
    return own.solve(Vh) if metric == "corda" else own.factor_inv(Vh)


def front_factor(U: torch.Tensor, out: Damped | None) -> torch.Tensor:
    """``U = K^{-T} U'`` ``(d_out, r)`` for two-sided (a triangular solve, never an inverse); ``U'`` itself otherwise."""
    if out is None:
        return U
    return out.factor_inv(U.T).T  # (U'^T K^{-1})^T = K^{-T} U'


def residual(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, storage: torch.dtype):
    """``(U_s, S_s, P_s, W_res)``: the factors rounded to ``storage`` first, then ``W_res = W - U_s diag(S_s) P_s``
    from the rounded factors in fp32 (fp64 for fp64 storage): "bf16-tight", ``W_res + U_s S_s P_s == W`` to the
    residual's own rounding."""
    Us, Ss, Ps = U.to(storage), S.to(storage), P.to(storage)
    rd = torch.float64 if storage == torch.float64 else torch.float32
    W_res = W.detach().to(rd) - (Us.to(rd) * Ss.to(rd)) @ Ps.to(rd)  # (d_out, d_in)
    return Us, Ss, Ps, W_res


def diagnostics(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, energy: Energy,
                own: Damped | None, mat, dg, no_moment: bool, metric: str, eps: float, eps_mode: str) -> dict:
    """``eps, cond, cond_method, clamped, energy_kept, rel_error, error_metric`` of one orientation (see
    :func:`orient`). ``W (d_out, d_in)`` in the compute dtype; ``U, S, P`` the unrounded kept factors; ``energy``
    from :func:`decompose`. ``rel_error`` is measured under the data moment passed (full C, else its diagonal,
    else I), damped by the same eps rule, in ``W``'s (the compute) dtype, before rounding."""
    total = energy.total
    energy_kept = float((S.to(torch.float64) ** 2).sum()) / total if total > 0 else float("nan")
    own_err = math.sqrt(energy.dropped / total) if total > 0 else float("nan")
    if metric in ("full", *OUTPUT_METRICS) or (metric == "diag" and mat is None) or (metric == "identity" and no_moment):
        # the metric that oriented is the data metric: its dropped energy is the functional error
        rel_error = own_err
        error_metric = "I" if own is None else ("C+eps I" if mat is not None else "diag(c)+eps")
    else:
        e_eval = resolve_eps(eps, eps_mode, float(dg.mean()))
        E = W - (U * S) @ P  # (d_out, d_in)
        data = mat if mat is not None else dg.clamp_min(0)
        error_metric = "C+eps I" if mat is not None else "diag(c)+eps"
        num = float(quad(E, data)) + e_eval * float(quad(E, None))
        den = float(quad(W, data)) + e_eval * float(quad(W, None))
        rel_error = math.sqrt(max(num, 0.0) / den)
    if own is None:  # identity: eps only entered rel_error
        cond, cond_method, clamped = 1.0, "exact", None
        eps_used = resolve_eps(eps, eps_mode, float(dg.mean())) if dg is not None else 0.0
    else:
        cond, clamped, eps_used = own.cond, own.clamped, own.eps
        cond_method = "exact" if own.cond_exact else "lanczos-16 (lower bound)"
    return dict(eps=eps_used, cond=cond, cond_method=cond_method, clamped=clamped, energy_kept=energy_kept,
                rel_error=rel_error, error_metric=error_metric)


def output_diagnostics(out: Damped, input_metric: str) -> dict:
    """The two-sided keys of ``info`` (see :func:`orient`): the output side's damping and conditioning, and the
    name of the norm ``rel_error`` is measured in."""
    left = "G+eps_out I" if out.kind != "diag" else "diag(G)+eps_out"
    return dict(eps_output=out.eps, cond_output=out.cond, clamped_output=out.clamped,
                cond_output_method="exact" if out.cond_exact else "lanczos-16 (lower bound)",
                error_metric=f"({left}) (x) ({input_metric})")
