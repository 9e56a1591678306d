"""The measures every comparison of orientations uses, each defined once. Pure tensors, fp64 throughout.

* :func:`metric_mul` and :func:`quad`: ``X M`` and ``tr(E M E^T) = ||E M^{1/2}||_F^2`` for any metric form
  (``None`` = I, a ``(d,)`` diagonal, a ``(d, d)`` matrix, a :class:`~covsvd.algebra.damping.Damped`).
* :func:`functional_error`: ``||(W - B) M^{1/2}||_F / ||W M^{1/2}||_F``, the relative RMS output error of
  replacing ``W`` by ``B`` on inputs with second moment M (docs/algebra.md, "Eckart-Young under the metric").
* :func:`identity_error`: how far stored factors ``W_res + U diag(S) P`` are from ``W``;
  :func:`max_relative_error` the ``max|X - ref| / max|ref|`` it (and the restore checks) report.
* :func:`principal_angles`: between two subspaces.
"""

from __future__ import annotations

import math

import torch

from .damping import Damped

F64 = torch.float64
MetricForm = None | torch.Tensor | Damped
NORMS = ("max", "fro")


def metric_mul(X: torch.Tensor, M: MetricForm) -> torch.Tensor:
    """``X M`` for ``X (k, d)``: ``M`` None (I), a ``(d,)`` diagonal (column broadcast), a ``(d, d)`` matrix, or a
    :class:`~covsvd.algebra.damping.Damped` (applied in its own dtype). Returns X's dtype for tensors, M's for a Damped."""
    if M is None:
        return X
    if isinstance(M, Damped):
        return M.mul(X.to(M.dtype))
    M = M.to(X.dtype)
    return X * M if M.dim() == 1 else X @ M


def quad(E: torch.Tensor, M: MetricForm) -> torch.Tensor:
    """``tr(E M E^T) = ||E M^{1/2}||_F^2`` for ``E (k, d)`` (a 0-d tensor; fp64 when E is fp64)."""
    EM = metric_mul(E, M)
    return (EM * E.to(EM.dtype)).sum()


def functional_error(W: torch.Tensor, B: torch.Tensor, M: MetricForm = None, *,
                     reference: float | None = None) -> float:
    """``||(W - B) M^{1/2}||_F / ||W M^{1/2}||_F``, in fp64.

    For inputs x with second moment M, ``E||(W - B) x||^2 = ||(W - B) M^{1/2}||_F^2``: this is the relative
    RMS error of replacing ``W`` by ``B`` on that input distribution. ``W``, ``B``: ``(d_out, d_in)``; ``M``
    as in :func:`metric_mul` (a Damped is densified in fp64). ``reference``: ``||W M^{1/2}||_F^2`` when the
    caller already has it (many ``B`` against one ``W`` and ``M``: :func:`functional_reference`), so it is not
    recomputed; the result is the same bit for bit. Raises ``ValueError`` for a ``reference`` that is not a finite
    positive number.
    """
    if reference is not None and not (isinstance(reference, (int, float)) and math.isfinite(reference) and reference > 0):
        raise ValueError(f"functional_error: reference={reference!r} must be ||W M^(1/2)||_F^2 > 0, a finite float "
                         "(functional_reference(W, M) computes it)")
    W = W.detach().to(F64)
    E = W - B.detach().to(F64)  # (d_out, d_in)
    M = _dense(M)
    denominator = float(quad(W, M)) if reference is None else float(reference)
    return math.sqrt(max(float(quad(E, M)), 0.0) / denominator)


def functional_reference(W: torch.Tensor, M: MetricForm = None) -> float:
    """``||W M^{1/2}||_F^2`` in fp64: the denominator (squared) of :func:`functional_error` for ``W`` and ``M``."""
    return float(quad(W.detach().to(F64), _dense(M)))


def _dense(M: MetricForm):
    if isinstance(M, Damped):
        return M.matrix().to(F64)
    return None if M is None else M.detach().to(F64)


def identity_error(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, W_res: torch.Tensor,
                   norm: str = "max") -> float:
    """How far the stored factors reproduce ``W``: ``max|W_res + U diag(S) P - W| / max|W|`` (``norm="max"``)
    or ``||W_res + U diag(S) P - W||_F / ||W||_F`` (``norm="fro"``).

    ``W (d_out, d_in)``, ``U (d_out, r)``, ``S (r,)``, ``P (r, d_in)``, ``W_res (d_out, d_in)``, any float dtypes
    (the stored ones); every tensor is upcast to fp64 and the product and sum are fp64, so the error measures
    what the stored tensors reproduce. Raises ``ValueError`` when the shapes do not fit.
    """
    if norm not in NORMS:
        raise ValueError(f"identity_error: norm={norm!r}; expected one of {NORMS}")
    W64 = W.detach().to(F64)
    if tuple(W_res.shape) != tuple(W64.shape) or U.shape[0] != W64.shape[0] or P.shape[-1] != W64.shape[1]:
        raise ValueError(f"identity_error: W {tuple(W.shape)}, U {tuple(U.shape)}, P {tuple(P.shape)}, "
                         f"W_res {tuple(W_res.shape)} do not fit W = W_res + U diag(S) P")
    hat = W_res.detach().to(F64) + (U.detach().to(F64) * S.detach().to(F64)) @ P.detach().to(F64)  # (d_out, d_in)
    if norm == "fro":
        return float((hat - W64).norm() / W64.norm())
    return max_relative_error(hat, W64)


def max_relative_error(X: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|X - ref| / max|ref|`` in fp64 (both upcast first; a zero ``ref`` divides by the smallest normal)."""
    ref = ref.detach().to(F64)
    scale = ref.abs().max().clamp_min(torch.finfo(F64).tiny)
    return float((X.detach().to(F64) - ref).abs().max() / scale)


def principal_angles(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending, fp64) between the column spans of ``X (d, p)`` and ``Y (d, q)``.

    ``min(p, q)`` angles. Both bases are orthonormalised by QR first (so any spanning set works: pass
    ``P.T`` for the row space of P, ``U`` for a column space). Small angles come from sines and large ones
    from cosines (Knyazev & Argentati), so both ends are accurate to rounding, not to sqrt(rounding).
    Raises ``ValueError`` unless both are 2-D with the same number of rows.
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"principal_angles needs (d, p) and (d, q) bases; got {tuple(X.shape)} and {tuple(Y.shape)}")
    Qx = torch.linalg.qr(X.detach().to(F64)).Q  # (d, p)
    Qy = torch.linalg.qr(Y.detach().to(F64)).Q  # (d, q)
    if Qy.shape[1] > Qx.shape[1]:
        Qx, Qy = Qy, Qx  # Y the smaller: its q angles are the ones defined
    cos = torch.linalg.svdvals(Qx.T @ Qy).clamp(-1, 1)  # (q,) descending -> angles ascending
    sin = torch.linalg.svdvals(Qy - Qx @ (Qx.T @ Qy)).flip(0).clamp(-1, 1)  # (q,) ascending
    return torch.where(cos * cos < 0.5, torch.arccos(cos), torch.arcsin(sin))
