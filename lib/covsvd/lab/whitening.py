"""Cholesky whitening, written out for teaching (notebook 01). The production path is
:func:`covsvd.orient` (metric ``"full"``), which does the same with a cheaper SVD and checks.

With ``M = L L^T`` (Cholesky), ``E||(W - B) x||^2 = ||(W - B) L||_F^2`` for x with second moment M,
because ``L L^T = M`` is all the Frobenius norm sees. So the best rank-r ``B`` under M is the best
rank-r approximation of ``W L``, mapped back by ``L^{-1}``:

    W L = U S Vh   ->   B = U_r S_r Vh_r L^{-1} = U_r S_r P_r,   P_r = Vh_r L^{-1}.

``L`` and the symmetric root ``M^{1/2}`` differ by an orthogonal factor (``L = M^{1/2} G``), so ``W L`` and
``W M^{1/2}`` have the same U and S, and ``P_r`` is the same matrix either way.
"""

from __future__ import annotations

import torch


def whiten_cholesky(
    W: torch.Tensor, M: torch.Tensor, r: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``U_r (d_out, r), S_r (r,), P_r (r, d_in)``: the top-r orientation of ``W (d_out, d_in)`` under the
    positive definite ``M (d_in, d_in)`` by Cholesky whitening. Everything in ``dtype`` (fp64 default)."""
    W, M = W.detach().to(dtype), M.detach().to(dtype)
    L = torch.linalg.cholesky(M)  # (d_in, d_in) lower, M = L L^T
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)  # W L = U S Vh
    # P_r = Vh_r L^{-1}: solve P_r L = Vh_r (triangular), never form L^{-1}
    P = torch.linalg.solve_triangular(L, Vh[:r], upper=False, left=False)  # (r, d_in)
    return U[:, :r], S[:r], P
