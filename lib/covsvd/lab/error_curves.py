"""The functional error of every rank prefix of one orientation, for the explorer (:mod:`covsvd.lab.explore`):
:func:`error_curve` (one-sided metrics, whose truncations are orthogonal projections of W) and
:func:`oblique_error_curve` (any factors: two-sided), with :func:`output_moment`. Pure fp64 tensor functions.
"""

from __future__ import annotations

import torch

from ..algebra.measures import metric_mul, quad

F64 = torch.float64




def output_moment(W: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``G = W C W^T`` ``(d_out, d_out)`` fp64: the second moment of the layer's output ``y = W x`` (``C``
    ``(d_in, d_in)`` or a ``(d_in,)`` diagonal)."""
    W64 = W.detach().to(F64)  # (d_out, d_in)
    return metric_mul(W64, C.detach().to(F64)) @ W64.T


def error_curve(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, C: torch.Tensor,
                G: torch.Tensor | None = None) -> torch.Tensor:
    """Functional error of every rank prefix of one orientation: ``(k + 1,)`` fp64, entry r for ``r = 0..k``.

    ``err_r = ||(W - U_r S_r P_r) C^{1/2}||_F / ||W C^{1/2}||_F`` with ``U (d_out, k)``, ``S (k,)``, ``P (k, d_in)``
    the factors of :func:`covsvd.orient` at rank ``k <= min(d_out, d_in)`` (any metric, ``components="top"``;
    ``err_k`` is 0 up to rounding only when ``k = min(d_out, d_in)``) and ``C`` the data moment,
    ``(d_in, d_in)`` or a ``(d_in,)`` diagonal. ``G``: :func:`output_moment` of ``(W, C)`` when already at hand
    (it does not depend on the orientation; used when ``d_out <= d_in``).

    Every metric's truncation is the orthogonal projection ``U_r S_r P_r = U_r U_r^T W`` (module doc of
    :mod:`covsvd.algebra.orient`), so with ``G = W C W^T`` the error energy is ``tr(G) - sum_{j<=r} u_j^T G u_j`` and one
    pass gives every r. The per-direction energies ``q_j = u_j^T G u_j`` are formed on the smaller side:
    ``u_j^T G u_j`` for ``d_out <= d_in``, else ``S_j^2 p_j^T C p_j`` (since ``U^T W = diag(S) P``); cost
    ``O(k min(d_out, d_in)^2 + d_out d_in min(d_out, d_in))``, against ``O(d_out d_in k)`` per rank for
    :func:`covsvd.lab.teaching.truncation_curve`. The tail sums are accumulated from the smallest ``q_j`` up,
    so small errors keep their relative precision. All in fp64. Raises ``ValueError`` when shapes do not fit.
    """
    W64 = W.detach().to(F64)  # (d_out, d_in)
    d_out, d_in = W64.shape
    k = S.shape[0]
    if U.shape != (d_out, k) or P.shape != (k, d_in) or C.shape not in ((d_in,), (d_in, d_in)):
        raise ValueError(f"error_curve: U {tuple(U.shape)}, S {tuple(S.shape)}, P {tuple(P.shape)}, C {tuple(C.shape)} "
                         f"do not fit W {(d_out, d_in)}")
    C64 = C.detach().to(F64)
    if d_out <= d_in:
        G = output_moment(W64, C64) if G is None else G.to(F64)  # (d_out, d_out) W C W^T
        Ut = U.detach().to(F64).T  # (k, d_out)
        q = ((Ut @ G) * Ut).sum(1)  # (k,) u_j^T G u_j
    else:
        P64 = P.detach().to(F64)  # (k, d_in)
        q = S.detach().to(F64) ** 2 * (metric_mul(P64, C64) * P64).sum(1)  # (k,) S_j^2 p_j^T C p_j
    total = float(quad(W64, C64)) if G is None else float(G.diagonal().sum())  # tr(W C W^T)
    q = q.clamp_min(0)
    tail = torch.cat([q.flip(0).cumsum(0).flip(0), q.new_zeros(1)])  # (k + 1,) sum_{j > r} q_j
    # energy outside span(U): the directions past k when k < min(d_out, d_in), else zero up to rounding
    tail += max(total - float(q.sum()), 0.0)
    return (tail / total).sqrt()


def oblique_error_curve(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor,
                        C: torch.Tensor) -> torch.Tensor:
    """:func:`error_curve` for factors whose truncation is *not* an orthogonal projection of W (two-sided: U is
    N-orthonormal, not orthonormal): ``(k + 1,)`` fp64, ``err_r = ||(W - U_r S_r P_r) C^{1/2}||_F / ||W C^{1/2}||_F``.

    Expands ``||E_r C^{1/2}||^2 = tr(W C W^T) - 2 sum_{j<r} s_j u_j^T W C p_j + sum_{i,j<r} s_i s_j (u_i^T u_j)
    (p_i^T C p_j)`` and takes every prefix from cumulative sums of the ``(k,)`` and ``(k, k)`` terms (fp64), so a
    squared error is exact to ~1e-16 of ``tr(W C W^T)`` (a difference: small errors lose relative precision).
    ``C``: ``(d_in, d_in)`` or a ``(d_in,)`` diagonal. Raises ``ValueError`` when shapes do not fit."""
    W64 = W.detach().to(F64)  # (d_out, d_in)
    d_out, d_in = W64.shape
    k = S.shape[0]
    if U.shape != (d_out, k) or P.shape != (k, d_in) or C.shape not in ((d_in,), (d_in, d_in)):
        raise ValueError(f"oblique_error_curve: U {tuple(U.shape)}, S {tuple(S.shape)}, P {tuple(P.shape)}, C "
                         f"{tuple(C.shape)} do not fit W {(d_out, d_in)}")
    C64, U64, S64, P64 = (t.detach().to(F64) for t in (C, U, S, P))
    PC = metric_mul(P64, C64)  # (k, d_in) rows p_j^T C
    total = float(quad(W64, C64))  # tr(W C W^T)
    cross = S64 * ((U64.T @ W64) * PC).sum(1)  # (k,) s_j u_j^T W C p_j
    Y = (S64[:, None] * S64[None, :]) * (U64.T @ U64) * (PC @ P64.T)  # (k, k)
    kept = Y.cumsum(0).cumsum(1).diagonal()  # (k,) sum_{i,j<=r-1}
    err2 = torch.cat([W64.new_full((1,), total), total - 2 * cross.cumsum(0) + kept])  # (k + 1,)
    return (err2.clamp_min(0) / total).sqrt()
