"""Exact truncated SVD of a rectangular matrix, via a QR of its long side first.

For ``A`` ``(m, n)`` with ``n >> m`` (e.g. ``W M^{1/2}``, 1024 x 3584), ``A^T = Q R`` (Householder,
``torch.geqrf``), so ``A = R^T Q^T`` and the SVD of the small square ``R^T = U S Z^T`` gives
``A = U S (Q Z)^T``: the same U and S, and ``Vh_r = (Q Z_r)^T`` for the r kept rows only
(``torch.ormqr`` applies Q without forming it). This is the standard exact R-bidiagonalisation
preprocessing (LAPACK's gesdd does a version of it internally) and is backward stable: no Gram matrix
is formed, nothing is randomised. It wins because V is never formed in full: measured on 2 cores,
1024 x 3584 fp32 0.42 s vs 1.13 s for ``torch.linalg.svd(full_matrices=False)``, fp64 0.66 s vs 1.79 s.
Tall matrices are handled the same way with ``A = Q R``. Near-square ones go straight to
``torch.linalg.svd`` (the QR would not pay). Everything runs in ``A``'s dtype.
"""

from __future__ import annotations

import torch

#: Use the QR route when max(m, n) >= QR_RATIO * min(m, n) (measured faster from 1.5 on).
QR_RATIO = 1.5
COMPONENTS = ("top", "bottom")


def kept(k: int, r: int, components: str) -> slice:
    """Indices of the r kept singular values among k (descending): the first r or the last r."""
    if components not in COMPONENTS:
        raise ValueError(f"components={components!r}; expected one of {COMPONENTS}")
    return slice(0, r) if components == "top" else slice(k - r, k)


def truncated_svd(
    A: torch.Tensor, r: int, components: str = "top", method: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r (m, r), S (k,), Vh_r (r, n)`` with ``k = min(m, n)``: all singular values (descending), the
    singular vectors of the r kept ones (``components="top"``: the largest r; ``"bottom"``: the smallest
    r, still in descending order). ``method``: ``"auto"``, ``"qr"`` or ``"gesdd"`` (plain torch svd).
    """
    m, n = A.shape
    k = min(m, n)
    sl = kept(k, r, components)
    if method == "auto":
        method = "qr" if max(m, n) >= QR_RATIO * k else "gesdd"
    if method == "gesdd" or m == n:
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)  # (m, k), (k,), (k, n)
        return U[:, sl], S, Vh[sl]
    if method != "qr":
        raise ValueError(f"method={method!r}; expected 'auto', 'qr' or 'gesdd'")
    if n > m:  # wide: A^T (n, m) = Q R
        a, tau = torch.geqrf(A.T.contiguous())  # a (n, m): R above the diagonal, reflectors below
        R = a[:m].triu()  # (m, m)
        U, S, Zh = torch.linalg.svd(R.T)  # R^T = U S Zh
        pad = A.new_zeros(n, r)  # (n, r)
        pad[:m] = Zh[sl].T
        V_r = torch.ormqr(a, tau, pad)  # (n, r) = Q [Z_r; 0]
        return U[:, sl], S, V_r.T
    a, tau = torch.geqrf(A.contiguous())  # tall: A (m, n) = Q R
    R = a[:n].triu()  # (n, n)
    Y, S, Vh = torch.linalg.svd(R)  # R = Y S Vh
    pad = A.new_zeros(m, r)  # (m, r)
    pad[:n] = Y[:, sl]
    U_r = torch.ormqr(a, tau, pad)  # (m, r) = Q [Y_r; 0]
    return U_r, S, Vh[sl]
