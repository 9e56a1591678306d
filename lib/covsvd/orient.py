"""Orientation: the rank-r factors ``U (d_out, r), S (r,), P (r, d_in)`` of a Linear weight under a metric,
and the exact residual ``W_res = W - U diag(S) P``. Pure tensors; nothing is mutated.

Every metric is one right factor ``T`` of the weight (DESIGN.md, "Orientation by a metric")::

    W T = U S Vh  (exact SVD, covsvd.thinsvd)     U_r, S_r, Vh_r = the r kept triplets     P_r = Vh_r T^{-1}

    identity  T = I                      P = Vh                      (PiSSA-style top-r)
    diag      T = diag(sqrt(c + eps))    P = Vh * (c + eps)^-1/2     (ASVD-style; c = diag C, column broadcast)
    asvd      T = diag(sqrt(s^2 + eps))  s = (E|x_i|)^alpha          (the ASVD paper's own scaling)
    full      T = F, F F^T = M           P = Vh F^{-1}               (whitening; Cholesky L or Q diag(sqrt lam))
    corda     T = M                      P = Vh M^{-1}               (the CorDA paper's svd(W C), as in peft)

with ``M = C + eps I`` (:mod:`covsvd.damping`). Because ``Vh_r = S_r^{-1} U_r^T W T``, every metric gives
``U_r S_r P_r = U_r U_r^T W``: the orthogonal projection of W onto an r-dimensional output subspace, which
metric chooses. ``full`` chooses the Eckart-Young optimum under M; ``corda`` is the optimum under ``M^2``
(its P rows are ``M^2``-orthonormal, not M-orthonormal), a different basis.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .damping import DEFAULT_EPS, EPS_MODES, SOLVERS, Damped, damp, resolve_eps
from .moments import SecondMoment
from .thinsvd import COMPONENTS, kept, truncated_svd

METRICS = ("identity", "diag", "full", "corda", "asvd")
_FULL = ("full", "corda")  # metrics that need the (d_in, d_in) matrix
_SYMMETRY_TOL = 1e-5  # max |C - C^T| / max |C| accepted (then symmetrised)


class Oriented(NamedTuple):
    """The result of :func:`orient`.

    ``U (d_out, r)``, ``S (r,)``, ``P (r, d_in)`` in the storage dtype; ``W_res (d_out, d_in)`` in fp32
    (fp64 when the storage dtype is fp64), formed from the *rounded* factors so that
    ``W_res + U diag(S) P == W`` to the rounding of that dtype ("bf16-tight"). ``info``: a plain dict,
    keys documented in :func:`orient`.
    """

    U: torch.Tensor
    S: torch.Tensor
    P: torch.Tensor
    W_res: torch.Tensor
    info: dict


def _where(name: str | None) -> str:
    return f"layer {name!r}: " if name else ""


def _check_finite(t: torch.Tensor, what: str, where: str) -> None:
    # One fp64 sum first (no (d, d) bool temporaries): any NaN/inf makes it NaN/inf. Only then count.
    if math.isfinite(float(t.detach().sum(dtype=torch.float64))):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{where}{what} {tuple(t.shape)} has {bad} non-finite entries (NaN/inf); "
                         "recapture the moments / check the weights")


def _moment_parts(C, metric: str, r: int, d_in: int, W_shape: tuple, where: str):
    """``(matrix or None, diagonal or None, mean_abs or None, count or None)`` from any accepted C."""
    if C is None:
        if metric != "identity":
            raise ValueError(f"{where}metric={metric!r} needs a second moment C; only metric='identity' "
                             "accepts C=None")
        return None, None, None, None
    if isinstance(C, SecondMoment):
        if C.d_in != d_in:
            raise ValueError(f"{where}W has shape {W_shape} (d_in={d_in}) but the SecondMoment has "
                             f"d_in={C.d_in}: moments from another layer or model")
        if metric != "identity" and C.count < r:
            raise ValueError(f"{where}the SecondMoment saw {C.count} real tokens, fewer than r={r}; add "
                             "calibration text (or lower r): C has rank < r, the extra directions would be arbitrary")
        for key in ("sum_xx", "sum_x", "sum_abs"):
            _check_finite(getattr(C, key), f"SecondMoment.{key}", where)
        mat = C.matrix() if C.kind == "full" else None
        if metric in _FULL and mat is None:
            raise ValueError(f"{where}metric={metric!r} needs the full (d_in, d_in) moment; this SecondMoment "
                             "was captured with kind='diag': capture with kind='full' or use metric='diag'")
        return mat, C.diag(), C.mean_abs(), C.count
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"{where}C is a {type(C).__name__}; expected covsvd.SecondMoment, a (d_in, d_in) "
                        "tensor or a (d_in,) tensor")
    if metric == "asvd":
        raise ValueError(f"{where}metric='asvd' needs E|x_i| (SecondMoment.mean_abs()); pass the "
                         "SecondMoment itself, not a tensor")
    C = C.detach()
    if C.dim() == 1:
        if metric in _FULL:
            raise ValueError(f"{where}metric={metric!r} needs the full (d_in, d_in) second moment; got a "
                             f"({C.shape[0]},) vector: pass E[x x^T] or use metric='diag'")
        if C.shape[0] != d_in:
            raise ValueError(f"{where}W has shape {W_shape} but C has shape {tuple(C.shape)}; "
                             f"expected ({d_in},)")
        _check_finite(C, "C", where)
        return None, C, None, None
    if C.dim() != 2 or tuple(C.shape) != (d_in, d_in):
        raise ValueError(f"{where}W has shape {W_shape} but C has shape {tuple(C.shape)}; "
                         f"expected ({d_in}, {d_in}) (or ({d_in},) for a diagonal metric)")
    _check_finite(C, "C", where)
    scale = float(C.abs().max())
    asym = float((C - C.T).abs().max())
    if asym > _SYMMETRY_TOL * scale:
        raise ValueError(f"{where}C is not symmetric (max |C - C^T| = {asym:.3g}, max |C| = {scale:.3g}); "
                         "pass the second moment E[x x^T]")
    return C, C.diagonal(), None, None


def orient(
    W: torch.Tensor,
    C,
    r: int,
    metric: str = "full",
    eps: float = DEFAULT_EPS,
    eps_mode: str = "absolute",
    components: str = "top",
    *,
    solver: str = "cholesky",
    alpha: float = 0.5,
    compute_dtype: torch.dtype = torch.float64,
    storage_dtype: torch.dtype | None = None,
    name: str | None = None,
) -> Oriented:
    """Orient ``W (d_out, d_in)`` by ``metric`` at rank ``r``: ``Oriented(U, S, P, W_res, info)``.

    Args:
        W: the weight, Linear convention ``(d_out, d_in)`` (Conv1D: use ``covsvd.weight_matrix``).
        C: a :class:`~covsvd.SecondMoment` (preferred: its ``count`` is checked against r and ``asvd``
            needs its ``mean_abs``), a ``(d_in, d_in)`` tensor ``E[x x^T]``, a ``(d_in,)`` diagonal
            ``E[x_i^2]`` (diag / identity only), or ``None`` (identity only).
        r: rank, ``1 <= r <= min(d_out, d_in)``.
        metric: ``"identity"``, ``"diag"``, ``"full"``, ``"corda"`` or ``"asvd"`` (module docstring).
        eps, eps_mode: damping ``M = C + eps I`` (``"relative"``: ``eps * mean(diag C)``; for ``asvd`` the
            diagonal damped is ``s^2`` and relative means ``eps * mean(s^2)``). Default 1e-3 absolute, see
            ``covsvd.damping.DEFAULT_EPS`` for why. For ``identity`` it only enters ``info["rel_error"]``.
        components: ``"top"`` keeps the r largest singular directions of ``W T``; ``"bottom"`` the r
            smallest (CorDA's knowledge-preserving mode), still in descending order.
        solver: ``"cholesky"`` (default; fast, no eigenvalue clamp, raises if ``C + eps I`` is not
            positive definite) or ``"eigh"`` (the definition: clamp C's eigenvalues at 0, then add eps;
            exact cond). Only ``full`` / ``corda`` factor a matrix; diagonal metrics clamp exactly.
        alpha: the ASVD exponent (``asvd`` only).
        compute_dtype: the dtype of every decomposition (Cholesky / eigh, QR, SVD, solves):
            **float64 by default**; float32 allowed (measured accuracy in bench/orient.py).
        storage_dtype: the dtype of the returned U, S, P (default: ``W.dtype``). ``W_res`` is formed in
            fp32 (fp64 if storage is fp64) from the factors *after* rounding to it.
        name: a layer name, used in error messages.

    ``info`` (a dict of Python scalars and strings):
        ``metric, components, solver, r, compute_dtype, storage_dtype, name``;
        ``eps``: the absolute eps added to the metric that oriented (``eps_mode``, ``eps_arg`` the input);
        ``cond``: cond_2 of that damped metric M (1.0 for identity); ``cond_method``: ``"exact"`` (diag,
        eigh) or ``"lanczos-16 (lower bound)"`` (cholesky; see ``Damped.cond``);
        ``clamped``: eigenvalues of C clamped at 0 (eigh / diag) or ``None`` (cholesky does not clamp);
        ``energy_kept``: ``sum S_r^2 / sum S^2`` of ``W T`` (the metric's own energy; for corda that is
        under ``M^2``); ``rel_error``: the functional truncation error
        ``||(W - U S P) M^{1/2}||_F / ||W M^{1/2}||_F`` with M the damped data moment you passed (the full
        C if you passed it, else its diagonal, else I), computed in ``compute_dtype`` before rounding;
        ``error_metric``: which M that was; ``count``: real tokens behind C (SecondMoment only).
    """
    where = _where(name)
    if metric not in METRICS:
        raise ValueError(f"{where}unknown metric={metric!r}; expected one of {METRICS}")
    if components not in COMPONENTS:
        raise ValueError(f"{where}components={components!r}; expected one of {COMPONENTS}")
    if solver not in SOLVERS:
        raise ValueError(f"{where}solver={solver!r}; expected one of {SOLVERS}")
    if eps_mode not in EPS_MODES:
        raise ValueError(f"{where}eps_mode={eps_mode!r}; expected one of {EPS_MODES}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{where}compute_dtype={compute_dtype}; decompositions run in float64 (default) or float32")
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{where}W must be a 2-D floating tensor (d_out, d_in); got "
                         f"{getattr(W, 'shape', type(W).__name__)}")
    d_out, d_in = W.shape
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(d_out, d_in):
        raise ValueError(f"{where}r={r!r} must be an int in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}] "
                         f"for W of shape {(d_out, d_in)}")
    storage = W.dtype if storage_dtype is None else storage_dtype
    if not storage.is_floating_point:
        raise ValueError(f"{where}storage_dtype={storage_dtype} must be a floating dtype")
    _check_finite(W, "W", where)
    mat, dg, mabs, count = _moment_parts(C, metric, r, d_in, (d_out, d_in), where)

    dt = compute_dtype
    with torch.no_grad():
        Wc = W.detach().to(dt)  # (d_out, d_in)
        dev = Wc.device
        to = dict(dtype=dt, device=dev)
        mat = None if mat is None else mat.to(**to)
        dg = None if dg is None else dg.to(**to)
        own: Damped | None = None
        if metric in _FULL:
            own = damp(mat, eps, eps_mode, solver=solver, dtype=dt, name=name)
        elif metric == "diag":
            own = damp(dg, eps, eps_mode, dtype=dt, name=name)
        elif metric == "asvd":
            own = damp(mabs.to(**to) ** (2 * alpha), eps, eps_mode, dtype=dt, name=name)

        # W T, its exact truncated SVD, and P = Vh_r T^{-1}
        if own is None:
            A = Wc
        elif metric == "corda":
            A = own.mul(Wc)  # (d_out, d_in) W M
        else:
            A = own.factor(Wc)  # (d_out, d_in) W F
        U, S_all, Vh = truncated_svd(A, r, components)  # (d_out, r), (k,), (r, d_in)
        sl = kept(S_all.shape[0], r, components)
        S = S_all[sl]  # (r,)
        if own is None:
            P = Vh
        elif metric == "corda":
            P = own.solve(Vh)  # (r, d_in) Vh M^{-1}
        else:
            P = own.factor_inv(Vh)  # (r, d_in) Vh F^{-1}

        S2 = S_all.double() ** 2
        drop = torch.ones_like(S2, dtype=torch.bool)
        drop[sl] = False
        total = float(S2.sum())
        energy = float(S2[sl].sum()) / total if total > 0 else float("nan")
        own_err = math.sqrt(float(S2[drop].sum()) / total) if total > 0 else float("nan")

        # the data metric for rel_error: the full C if given, else its diagonal, else I
        if metric == "full" or (metric == "diag" and mat is None) or (metric == "identity" and C is None):
            rel_error, error_metric = own_err, ("I" if own is None else ("C+eps I" if mat is not None else "diag(c)+eps"))
        else:
            e_eval = resolve_eps(eps, eps_mode, float(dg.mean()))
            E = Wc - (U * S) @ P  # (d_out, d_in)
            if mat is not None:
                quad = lambda X: float(((X @ mat) * X).sum() + e_eval * (X * X).sum())  # noqa: E731
                error_metric = "C+eps I"
            else:
                quad = lambda X: float((X * X * (dg.clamp_min(0) + e_eval)).sum())  # noqa: E731
                error_metric = "diag(c)+eps"
            rel_error = math.sqrt(max(quad(E), 0.0) / quad(Wc))

        # round to storage first, then the residual from the rounded factors (bf16-tight)
        Us, Ss, Ps = U.to(storage), S.to(storage), P.to(storage)
        rd = torch.float64 if storage == torch.float64 else torch.float32
        W_res = W.detach().to(rd) - (Us.to(rd) * Ss.to(rd)) @ Ps.to(rd)  # (d_out, d_in)

        if own is None:
            cond, cond_method, clamped, eps_used = 1.0, "exact", None, None
        else:
            cond, clamped, eps_used = own.cond, own.clamped, own.eps
            cond_method = "exact" if own.cond_exact else "lanczos-16 (lower bound)"
        if eps_used is None:  # identity: eps only entered rel_error
            eps_used = resolve_eps(eps, eps_mode, float(dg.mean())) if dg is not None else 0.0

    info = dict(
        metric=metric, components=components, solver=solver if metric in _FULL else "n/a", r=r,
        eps=eps_used, eps_mode=eps_mode, eps_arg=float(eps), cond=cond, cond_method=cond_method,
        clamped=clamped, energy_kept=energy, rel_error=rel_error, error_metric=error_metric,
        count=count, compute_dtype=str(dt).removeprefix("torch."),
        storage_dtype=str(storage).removeprefix("torch."), name=name,
    )
    if metric == "asvd":
        info["alpha"] = alpha
    return Oriented(Us, Ss, Ps, W_res, info)
