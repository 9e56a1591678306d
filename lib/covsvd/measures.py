"""Two reusable measures for comparing orientations: the functional error under a metric, and the
principal angles between two subspaces. Pure tensors; both compute in fp64.
"""

from __future__ import annotations

import math

import torch

from .damping import Damped


def _quad(E: torch.Tensor, M: torch.Tensor | Damped | None) -> torch.Tensor:
    """``tr(E M E^T) = ||E M^{1/2}||_F^2`` for M a ``(d, d)`` matrix, a ``(d,)`` diagonal, a Damped, or I."""
    if M is None:
        return (E * E).sum()
    if isinstance(M, Damped):
        return M.quad(E.to(M.dtype))
    M = M.to(E.dtype)
    if M.dim() == 1:
        return (E * E * M).sum()
    return ((E @ M) * E).sum()


def functional_error(W: torch.Tensor, B: torch.Tensor, M: torch.Tensor | Damped | None = None) -> float:
    """``||(W - B) M^{1/2}||_F / ||W M^{1/2}||_F``, in fp64.

    For inputs x with second moment M, ``E||(W - B) x||^2 = ||(W - B) M^{1/2}||_F^2``: this is the relative
    RMS error of replacing ``W`` by ``B`` on that input distribution. ``M`` may be a ``(d_in, d_in)`` PSD
    matrix, a ``(d_in,)`` diagonal, a :class:`~covsvd.damping.Damped`, or ``None`` (identity: the plain
    relative Frobenius error). ``W``, ``B``: ``(d_out, d_in)``.
    """
    W = W.detach().double()
    E = W - B.detach().double()  # (d_out, d_in)
    if isinstance(M, Damped):
        M = M.matrix().double()
    num, den = _quad(E, M), _quad(W, M)
    return math.sqrt(max(float(num), 0.0) / float(den))


def principal_angles(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending, fp64) between the column spans of ``X (d, p)`` and ``Y (d, q)``.

    ``min(p, q)`` angles. Both bases are orthonormalised by QR first (so any spanning set works: pass
    ``P.T`` for the row space of P, ``U`` for a column space). Small angles come from sines and large ones
    from cosines (Knyazev & Argentati), so both ends are accurate to rounding, not to sqrt(rounding).
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"principal_angles needs (d, p) and (d, q) bases; got {tuple(X.shape)} and {tuple(Y.shape)}")
    Qx = torch.linalg.qr(X.detach().double()).Q  # (d, p)
    Qy = torch.linalg.qr(Y.detach().double()).Q  # (d, q)
    if Qy.shape[1] > Qx.shape[1]:
        Qx, Qy = Qy, Qx  # Y the smaller: its q angles are the ones defined
    cos = torch.linalg.svdvals(Qx.T @ Qy).clamp(-1, 1)  # (q,) descending -> angles ascending
    sin = torch.linalg.svdvals(Qy - Qx @ (Qx.T @ Qy)).flip(0).clamp(-1, 1)  # (q,) ascending
    return torch.where(cos * cos < 0.5, torch.arccos(cos), torch.arcsin(sin))
