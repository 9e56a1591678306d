"""Exact truncated SVD of a rectangular matrix, via a QR of its long side first.

For ``A`` ``(m, n)`` with ``n >> m`` (e.g. ``W M^{1/2}``, 1024 x 3584), ``A^T = Q R`` (Householder,
``torch.geqrf``), so ``A = R^T Q^T`` and the SVD of the small square ``R^T = U S Z^T`` gives
``A = U S (Q Z)^T``: the same U and S, and ``Vh_r = (Q Z_r)^T`` for the r kept rows only
(``torch.ormqr`` applies Q without forming it). This is the standard exact R-bidiagonalisation
preprocessing (LAPACK's gesdd does a version of it internally) and is backward stable: no Gram matrix
is formed, nothing is randomised. It wins because V is never formed in full (timings against
``torch.linalg.svd(full_matrices=False)``: bench/orient.py, bench/results/orient.md).
Tall matrices are handled the same way with ``A = Q R``. Near-square ones go straight to
``torch.linalg.svd`` (the QR would not pay). Everything runs in ``A``'s dtype, on ``A``'s device.

:func:`randomized_svd` is the approximate alternative for large layers (Halko, Martinsson & Tropp 2011,
"Finding structure with randomness", Algorithms 4.4 and 5.1): a Gaussian sketch of ``r + oversample``
columns, ``power_iters`` subspace iterations with a QR after every product, then the exact SVD of the small
projected matrix. It finds only the top singular triplets, and only ``r + oversample`` singular values.
"""

from __future__ import annotations

import torch

from ..util.checks import check_count, check_rank

#: Use the QR route when max(m, n) >= QR_RATIO * min(m, n) (measured faster from 1.5 on).
QR_RATIO = 1.5
COMPONENTS = ("top", "bottom")
#: The SVD routes of :func:`covsvd.orient` (``svd=``).
SVDS = ("exact", "randomized")


def kept(k: int, r: int, components: str) -> slice:
    """Indices of the r kept singular values among k (descending): the first r or the last r."""
    if components not in COMPONENTS:
        raise ValueError(f"components={components!r}; expected one of {COMPONENTS}")
    return slice(0, r) if components == "top" else slice(k - r, k)


def truncated_svd(A: torch.Tensor, r: int, components: str = "top") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r (m, r), S (k,), Vh_r (r, n)`` with ``k = min(m, n)``: all singular values (descending), the
    singular vectors of the r kept ones (``components="top"``: the largest r; ``"bottom"``: the smallest
    r, still in descending order). A matrix at least ``QR_RATIO`` times longer than wide goes through
    :func:`qr_svd`; any other through ``torch.linalg.svd``. In ``A``'s dtype.
    """
    m, n = A.shape
    k = min(m, n)
    sl = kept(k, r, components)
    if m != n and max(m, n) >= QR_RATIO * k:
        return qr_svd(A, r, components)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)  # (m, k), (k,), (k, n)
    return U[:, sl], S, Vh[sl]


def qr_svd(A: torch.Tensor, r: int, components: str = "top") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`truncated_svd` of a non-square ``A`` through a QR first: the SVD of the ``(k, k)`` factor ``R``,
    the kept vectors of the long side applied through the Householder reflectors (``ormqr``), never forming
    ``Q``. Exact (an SVD of ``A``), in ``A``'s dtype."""
    m, n = A.shape
    k = min(m, n)
    sl = kept(k, r, components)
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


def randomized_svd(
    A: torch.Tensor, r: int, oversample: int = 10, power_iters: int = 2, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-r SVD of ``A (m, n)``: ``U_r (m, r), S (l,), Vh_r (r, n)``, ``l = min(r + oversample, m, n)``.

    The randomized range finder with subspace iteration (HMT 2011, Alg. 4.4 + 5.1), in ``A``'s dtype and on
    its device::

        Omega (n, l) ~ N(0, 1)           drawn from ``generator`` (on A's device)
        Q = qr(A Omega)                  (m, l) orthonormal
        repeat power_iters:  Z = qr(A^T Q),  Q = qr(A Z)     (re-orthonormalised after every product, so the
                                                             small singular values are not lost to rounding)
        B = Q^T A = Ub S Vh              (l, n): exact SVD (truncated_svd)
        U_r = Q Ub_r

    ``U_r`` has orthonormal columns and ``Vh_r`` orthonormal rows, and ``U_r^T A = diag(S_r) Vh_r`` exactly (to
    rounding), so ``U_r S_r Vh_r = U_r U_r^T A`` is an orthogonal projection of A and
    ``||A - U_r S_r Vh_r||_F^2 = ||A||_F^2 - sum(S_r^2)``. ``S`` holds the l singular values of B, descending:
    each is at most the matching singular value of A (interlacing), and only these l are known.
    ``l`` is clamped to ``min(m, n)`` (then the sketch spans A's whole range and the result is exact SVD).
    Deterministic for a given generator state, dtype and device (the Gaussian stream differs between CPU and
    CUDA generators). ``generator=None``: a fresh one seeded 0 on A's device.

    Raises ``ValueError`` for ``r`` outside ``[1, min(m, n)]``, a negative ``oversample`` / ``power_iters``,
    or a generator on another device than ``A``.
    """
    m, n = A.shape
    k = min(m, n)
    check_rank(r, m, n, "randomized_svd: ")
    for what, v in (("oversample", oversample), ("power_iters", power_iters)):
        check_count(what, v, 0, "randomized_svd: ")
    if generator is None:
        generator = torch.Generator(device=A.device).manual_seed(0)
    if torch.device(generator.device).type != A.device.type:
        raise ValueError(f"randomized_svd: the generator is on {generator.device} but A {tuple(A.shape)} is on "
                         f"{A.device}: create it there, torch.Generator(device=A.device).manual_seed(seed)")
    l = min(r + oversample, k)
    omega = torch.randn(n, l, generator=generator, dtype=A.dtype, device=A.device)  # (n, l)
    Q = torch.linalg.qr(A @ omega).Q  # (m, l)
    for _ in range(power_iters):
        Z = torch.linalg.qr(A.T @ Q).Q  # (n, l)
        Q = torch.linalg.qr(A @ Z).Q  # (m, l)
    Ub, S, Vh = truncated_svd(Q.T @ A, r)  # B = Q^T A (l, n): Ub (l, r), S (l,), Vh (r, n)
    return Q @ Ub, S, Vh  # (m, r), (l,), (r, n)
