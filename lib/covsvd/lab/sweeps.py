"""Sweeps over rank and eps, for notebooks 02 (spectra) and 04 (eps sensitivity). fp64 throughout.

* :func:`truncation_errors`: the functional error ``||(W - U_r S_r P_r) M^{1/2}||_F / ||W M^{1/2}||_F`` of
  *every* prefix ``r = 0..k`` of one orientation, from one pass (no re-orientation per r).
* :func:`output_energy`: ``tr(W M W^T)``, the denominator of those errors (compute once, share across metrics).
* :func:`damped_cond`: the exact ``cond_2(M)``, ``M = C + eps I`` (eigenvalues clamped at 0, as in
  :func:`covsvd.algebra.damping.damp`), for many eps from one set of eigenvalues.
* :func:`eps_sweep`: :func:`covsvd.orient` at each eps of a grid, with the measures notebook 04 plots.

Prefix errors. With ``E_r = W - sum_{i<r} s_i u_i p_i`` and any PSD metric M::

    ||E_r M^{1/2}||_F^2 = tr(W M W^T) - 2 sum_{i<r} s_i u_i^T W M p_i^T + sum_{i,j<r} s_i s_j (u_i^T u_j)(p_i M p_j^T)

so one product ``P M`` ``(k, d_in)`` gives every r: the middle term is a cumulative sum, the last one the
leading ``r x r`` block sums of a ``(k, k)`` matrix. ``U^T U`` enters as computed (orthonormality is not
assumed). The price is cancellation: the squared error is a difference of numbers of size ``tr(W M W^T)``,
so a relative error below ~1e-7 (squared ~1e-14) is rounding; it is clamped at 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import polars as pl
import torch

from ..algebra.damping import Damped, resolve_eps
from ..algebra.measures import identity_error, metric_mul, principal_angles, quad
from ..algebra.orient import Oriented, orient
from ..capture.moments import SecondMoment

F64 = torch.float64
MetricLike = None | torch.Tensor | Damped | SecondMoment


def _data_metric(M: MetricLike, d: int, what: str) -> torch.Tensor | Damped | None:
    """``None``, a fp64 ``(d,)`` diagonal, a fp64 ``(d, d)`` matrix, or a Damped (full SecondMoment -> matrix)."""
    if M is None or isinstance(M, Damped):
        if isinstance(M, Damped) and M.d != d:
            raise ValueError(f"{what}: the Damped metric has d={M.d}, W has d_in={d}")
        return M
    if isinstance(M, SecondMoment):
        M = M.matrix() if M.kind == "full" else M.diag()
    if not isinstance(M, torch.Tensor):
        raise TypeError(f"{what}: M is a {type(M).__name__}; expected None, a (d_in,) or (d_in, d_in) tensor, "
                        "a Damped or a SecondMoment")
    if tuple(M.shape) not in ((d,), (d, d)):
        raise ValueError(f"{what}: M has shape {tuple(M.shape)}; expected ({d},) or ({d}, {d}) for d_in={d}")
    return M.detach().to(F64)


def _prefix_sq(W, U, S, P, M, total: float) -> torch.Tensor:
    """``||E_r M^{1/2}||_F^2`` for r = 0..k, ``(k + 1,)`` fp64 (module docstring); ``total = tr(W M W^T)``."""
    PM = metric_mul(P, M).to(F64)  # (k, d_in)
    cross = S * ((U.T @ W) * PM).sum(1)  # (k,) s_i u_i^T W M p_i^T
    Q = torch.outer(S, S) * (U.T @ U) * (PM @ P.T)  # (k, k) s_i s_j (u_i^T u_j)(p_i M p_j^T)
    block = Q.cumsum(0).cumsum(1).diagonal()  # (k,) sum of the leading (r x r) block, r = 1..k
    sq = total - 2 * cross.cumsum(0) + block  # (k,)
    return torch.cat([sq.new_tensor([total]), sq])


def _total(W: torch.Tensor, M) -> float:
    return float(quad(W, M))  # tr(W M W^T)


def output_energy(W: torch.Tensor, M: MetricLike = None) -> float:
    """``tr(W M W^T) = ||W M^{1/2}||_F^2`` in fp64: the layer's output energy ``E||W x||^2`` for inputs with
    second moment M (the denominator of every functional error). ``M`` as in :func:`truncation_errors`.
    Pass it as ``total=`` to :func:`truncation_errors` when several orientations of one W share one M."""
    return _total(W.detach().to(F64), _data_metric(M, W.shape[1], "output_energy"))


def truncation_errors(
    W: torch.Tensor,
    U: torch.Tensor,
    S: torch.Tensor,
    P: torch.Tensor,
    M: MetricLike = None,
    ranks: Sequence[int] | None = None,
    *,
    total: float | None = None,
) -> torch.Tensor:
    """Functional error of every prefix of one orientation: ``err[r] = ||(W - B_r) M^{1/2}||_F / ||W M^{1/2}||_F``
    with ``B_r = U[:, :r] diag(S[:r]) P[:r]``, for ``r = 0..k`` (or only ``ranks``). fp64, ``(len,)``.

    The same quantity as :func:`covsvd.algebra.measures.functional_error` (``err[0] = 1``), for all r from one
    product ``P M`` (module docstring; clamped at 0 below ~1e-7 relative). ``U (d_out, k)``, ``S (k,)``,
    ``P (k, d_in)``: e.g. an :func:`covsvd.orient` result at ``r = min(d_out, d_in)``, whose first r
    triplets are its rank-r result. ``M``: the data moment to measure under (``None`` = I, a ``(d_in,)``
    diagonal, a ``(d_in, d_in)`` matrix, a Damped, or a SecondMoment: its full matrix when it has one).
    ``total``: :func:`output_energy` ``(W, M)`` if already known (it costs a ``(d_out, d_in, d_in)``
    product; the prefix errors themselves cost a ``(k, d_in, d_in)`` one), else computed here.
    Pass only the first few triplets (``U[:, :r], S[:r], P[:r]``) when only small ranks are wanted.
    """
    d_out, d_in = W.shape
    k = S.shape[0]
    if tuple(U.shape) != (d_out, k) or tuple(P.shape) != (k, d_in):
        raise ValueError(f"truncation_errors: W {tuple(W.shape)} needs U (d_out, k), S (k,), P (k, d_in); got "
                         f"U {tuple(U.shape)}, S {tuple(S.shape)}, P {tuple(P.shape)}")
    M = _data_metric(M, d_in, "truncation_errors")
    W, U, S, P = (t.detach().to(F64) for t in (W, U, S, P))
    total = _total(W, M) if total is None else float(total)
    if not total > 0:
        raise ValueError(f"truncation_errors: ||W M^(1/2)||^2 = {total:g}; W is zero on the data of M")
    err = (_prefix_sq(W, U, S, P, M, total).clamp_min(0) / total).sqrt()  # (k + 1,)
    if ranks is None:
        return err
    idx = torch.as_tensor(list(ranks), dtype=torch.long)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) > k):
        raise ValueError(f"truncation_errors: ranks must lie in [0, {k}]; got {list(ranks)}")
    return err[idx]


def damped_cond(lam: torch.Tensor, eps_values: Sequence[float], eps_mode: str = "absolute") -> list[float]:
    """Exact ``cond_2(M)`` of ``M = C + eps I`` for each eps, from C's eigenvalues ``lam`` ``(d,)`` (or, for
    a diagonal metric, its diagonal ``c``): ``(max(lam, 0).max() + e) / (max(lam, 0).min() + e)``, the
    clamp-then-damp rule of :func:`covsvd.algebra.damping.damp` (``solver="eigh"``). fp64.

    ``e`` is the absolute eps (:func:`covsvd.algebra.damping.resolve_eps`; relative: ``eps * mean(diag C)``, and
    ``mean(diag C) = mean(lam)`` because the trace is the sum of the eigenvalues). ``inf`` where M is singular
    (``e = 0`` and C singular). Get ``lam`` once with ``torch.linalg.eigvalsh(C)``: one eigenvalue
    computation serves every eps.
    """
    lam = lam.detach().to(F64)
    if lam.dim() != 1:
        raise ValueError(f"damped_cond: lam has shape {tuple(lam.shape)}; pass C's eigenvalues (d,), "
                         "e.g. torch.linalg.eigvalsh(C)")
    mean_diag = float(lam.mean())
    lo, hi = float(lam.clamp_min(0).min()), float(lam.clamp_min(0).max())
    out = []
    for eps in eps_values:
        e = resolve_eps(eps, eps_mode, mean_diag)
        out.append((hi + e) / (lo + e) if lo + e > 0 else math.inf)
    return out


def _moment_matrix(C, what: str) -> torch.Tensor:
    """The fullest fp64 form of a data moment: its ``(d, d)`` matrix when it has one, else its diagonal."""
    if isinstance(C, SecondMoment):
        return C.matrix() if C.kind == "full" else C.diag()
    if isinstance(C, torch.Tensor) and C.dim() in (1, 2):
        return C.detach().to(F64)
    raise TypeError(f"eps_sweep: {what} is a {type(C).__name__}; expected a SecondMoment or a tensor")


def _angles_deg(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(principal_angles(X, Y))


def eps_sweep(
    W: torch.Tensor,
    C,
    r: int,
    eps_values: Sequence[float],
    *,
    metric: str = "full",
    eps_mode: str = "absolute",
    C_eval=None,
    storage_dtype: torch.dtype | None = None,
    solver: str = "cholesky",
    name: str | None = None,
) -> pl.DataFrame:
    """Orient ``W`` by ``metric`` at rank ``r`` for every eps in ``eps_values`` (``eps_mode``, default ``"absolute"``:
    the grid is in absolute units, unlike covsvd's relative default); one row each.

    Every orientation is :func:`covsvd.orient` with its defaults (fp64 decompositions, ``solver``, storage
    = ``W.dtype`` unless ``storage_dtype``). The *reference* is the least-damped orientation of the sweep
    (the smallest eps); *identity* is the plain SVD (``metric="identity"``), the limit ``eps -> inf``.

    Columns:
        ``name, metric, eps_mode, r``; ``eps_arg`` (as given), ``eps`` (the absolute eps used),
        ``eps_rel`` (``eps / mean(diag C)``); ``m_min``: the smallest eigenvalue of the damped metric M
        (``max(lam_min, 0) + eps``; NaN for asvd). Rows of P are M-orthonormal for ``full`` (and ``diag``),
        so ``||p_i|| <= m_min^{-1/2}``; for ``corda`` they are ``M^2``-orthonormal: ``||p_i|| <= 1 / m_min``;
        ``cond``: exact ``cond_2(M)`` (:func:`damped_cond`, one ``eigvalsh`` of C for the whole sweep);
        ``cond_info``, ``cond_method``: what ``orient`` reported (a Lanczos lower bound for cholesky);
        ``p_row_norm_max``: the largest row norm of P;
        ``angle_p_max_deg, angle_p_mean_deg``: principal angles (degrees, largest and mean) between the
        row space of P and that of the reference; ``angle_u_max_deg``: the same for the columns of U;
        ``angle_p_identity_max_deg, angle_u_identity_max_deg``: largest angles to the plain-SVD basis;
        ``error_cal``: functional error under the *undamped* calibration moment C (its full matrix when
        it has one); ``error_eval``: the same under ``C_eval`` (held-out; NaN when not given);
        ``error_cal_plain, error_eval_plain``: the same two for the plain SVD (the same in every row);
        ``rel_error_info``: ``orient``'s own ``info["rel_error"]`` (under ``C + eps I``; for ``diag`` and
        ``asvd`` given a SecondMoment, under ``diag(c) + eps``: they are oriented from ``C.to_diag()``, which
        gives the same factors and skips orient's full-matrix error);
        ``energy_kept``: ``info["energy_kept"]``; ``identity_error``: :func:`covsvd.identity_error` with ``norm="fro"``.

    Errors use :func:`truncation_errors` at rank r (the same value as ``functional_error``).
    """
    eps_values = sorted(float(e) for e in eps_values)
    if not eps_values:
        raise ValueError("eps_sweep: eps_values is empty")
    if metric == "identity":
        raise ValueError("eps_sweep: metric='identity' does not depend on eps; sweep 'diag', 'full', 'corda' "
                         "or 'asvd'")
    d_in = W.shape[1]
    Cm = _moment_matrix(C, "C")
    if Cm.shape[0] != d_in:
        raise ValueError(f"eps_sweep({name!r}): W has d_in={d_in} but C has shape {tuple(Cm.shape)}")
    if metric in ("diag", "asvd") or Cm.dim() == 1:
        lam_metric = Cm.diagonal() if Cm.dim() == 2 else Cm  # (d_in,) a diagonal metric's own eigenvalues
    else:
        lam_metric = torch.linalg.eigvalsh(Cm)  # (d_in,) fp64, once for the whole sweep
    if metric == "asvd":
        conds = [math.nan] * len(eps_values)  # its metric is (E|x|)^(2 alpha), not C: see info["cond"]
    else:
        conds = damped_cond(lam_metric, eps_values, eps_mode)
    mean_diag = float(lam_metric.mean()) if metric != "asvd" else math.nan
    lam_lo = float(lam_metric.clamp_min(0).min()) if metric != "asvd" else math.nan
    Ce = None if C_eval is None else _data_metric(_moment_matrix(C_eval, "C_eval"), d_in, f"eps_sweep({name!r})")
    Wd = W.detach().to(F64)
    tot_cal, tot_eval = _total(Wd, Cm), (None if Ce is None else _total(Wd, Ce))

    def err(o: Oriented, M, total) -> float:
        U, S, P = (t.detach().to(F64) for t in o[:3])
        return math.sqrt(max(float(_prefix_sq(Wd, U, S, P, M, total)[-1]), 0.0) / total)

    # diagonal metrics get the diagonal moment: orient would otherwise spend two (d_out, d_in, d_in) products
    # per eps on its info["rel_error"] under the full C, which error_cal below computes anyway
    C_orient = C.to_diag() if metric in ("diag", "asvd") and isinstance(C, SecondMoment) else C
    plain = orient(W, None, r, metric="identity", storage_dtype=storage_dtype, name=name)
    runs = [orient(W, C_orient, r, metric=metric, eps=e, eps_mode=eps_mode, solver=solver,
                   storage_dtype=storage_dtype, name=name) for e in eps_values]
    ref = runs[0]
    plain_cal = err(plain, Cm, tot_cal)
    plain_eval = err(plain, Ce, tot_eval) if Ce is not None else math.nan
    rows = []
    for e, o, cond in zip(eps_values, runs, conds, strict=True):
        a_p = _angles_deg(o.P.T, ref.P.T)
        rows.append(dict(
            name=name or "", metric=metric, eps_mode=eps_mode, r=r, eps_arg=e, eps=float(o.info["eps"]),
            eps_rel=float(o.info["eps"]) / mean_diag, m_min=lam_lo + float(o.info["eps"]), cond=cond,
            cond_info=float(o.info["cond"]),
            cond_method=o.info["cond_method"], p_row_norm_max=float(o.P.double().norm(dim=1).max()),
            angle_p_max_deg=float(a_p.max()), angle_p_mean_deg=float(a_p.mean()),
            angle_u_max_deg=float(_angles_deg(o.U, ref.U).max()),
            angle_p_identity_max_deg=float(_angles_deg(o.P.T, plain.P.T).max()),
            angle_u_identity_max_deg=float(_angles_deg(o.U, plain.U).max()),
            error_cal=err(o, Cm, tot_cal), error_eval=err(o, Ce, tot_eval) if Ce is not None else math.nan,
            error_cal_plain=plain_cal, error_eval_plain=plain_eval,
            rel_error_info=float(o.info["rel_error"]), energy_kept=float(o.info["energy_kept"]),
            identity_error=identity_error(W, *o[:4], norm="fro"),
        ))
    return pl.DataFrame(rows)
