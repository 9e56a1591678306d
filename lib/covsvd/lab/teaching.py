"""Small helpers for the teaching notebooks (01 algebra, 03 oblique P): measurements and deliberate foils.

Measurements (fp64, exact formulas, cheap enough to sweep):

* :func:`truncation_curve`: the functional error ``||(W - B_k) M^{1/2}||_F / ||W M^{1/2}||_F`` of every rank-k
  prefix ``B_k = U[:, :k] diag(S[:k]) P[:k]`` of one orientation, for many k at the cost of ~one
  :func:`covsvd.algebra.measures.functional_error` call (the same quadratic form, evaluated incrementally).

Foils (what the library does *not* do, kept here so notebooks can show why, never used by covsvd itself):

* :func:`store_factors` with ``order="naive"``: the residual formed from the *unrounded* factors, then the
  factors rounded to their storage dtype; the opposite order from :func:`covsvd.orient`'s "bf16-tight"
  residual (``order="tight"``, which reproduces orient bit for bit, so one fp64 orientation serves every
  storage dtype).
* :func:`literal_eigh_whitening`: the review request's whitening recipe written literally (``eigh`` in a
  chosen dtype, optional clamp, ``M^{+-1/2}`` as dense matrices), with no checks, so that NaN / inf / a
  noisy P can be shown. Use :func:`covsvd.orient` for real work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..algebra.damping import Damped
from ..algebra.measures import metric_mul

F64 = torch.float64


ORDERS = ("tight", "naive")


def store_factors(
    W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, storage_dtype: torch.dtype,
    order: str = "tight",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round unrounded factors to ``storage_dtype`` and form the residual, in either order.

    ``order="tight"`` is what :func:`covsvd.orient` does (bit for bit, checked in tests/test_teaching.py):
    round ``U, S, P`` first, then ``W_res = W - U_s diag(S_s) P_s`` from the *rounded* factors, product and
    difference in fp32 (fp64 when ``storage_dtype`` is fp64). ``order="naive"`` is the foil: ``W_res`` from
    the *unrounded* factors (same fp32 / fp64 arithmetic), then the factors rounded. With tight,
    ``W_res + U_s S_s P_s`` misses ``W`` only by the residual's own rounding; with naive it also misses it by
    the factors' rounding (~2^-9 relative per entry for bf16), which no later step removes.

    Pass the fp64 factors of ``orient(..., storage_dtype=torch.float64)`` so one orientation serves every
    storage dtype and both orders. Returns ``(U_s (d_out, r), S_s (r,), P_s (r, d_in), W_res (d_out, d_in))``.
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; expected one of {ORDERS}")
    rd = torch.float64 if storage_dtype == torch.float64 else torch.float32
    Us, Ss, Ps = U.to(storage_dtype), S.to(storage_dtype), P.to(storage_dtype)
    src = (Us, Ss, Ps) if order == "tight" else (U, S, P)
    W_res = W.detach().to(rd) - (src[0].to(rd) * src[1].to(rd)) @ src[2].to(rd)  # (d_out, d_in)
    return Us, Ss, Ps, W_res


def _metric_dense(M: torch.Tensor | Damped | None, d: int) -> torch.Tensor | None:
    if M is None:
        return None
    if isinstance(M, Damped):
        M = M.matrix()
    M = M.detach().to(F64)
    if M.dim() == 1:
        if M.shape[0] != d:
            raise ValueError(f"truncation_curve: the diagonal metric has {M.shape[0]} entries, W has d_in={d}")
        return M
    if tuple(M.shape) != (d, d):
        raise ValueError(f"truncation_curve: M has shape {tuple(M.shape)}; W needs ({d}, {d}) or ({d},)")
    return M


def truncation_curve(
    W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, ranks: Sequence[int],
    M: torch.Tensor | Damped | None = None,
) -> torch.Tensor:
    """Functional error of the rank-k prefixes of one orientation, for every ``k`` in ``ranks``: ``(len(ranks),)`` fp64.

    ``err_k = ||(W - B_k) M^{1/2}||_F / ||W M^{1/2}||_F`` with ``B_k = U[:, :k] diag(S[:k]) P[:k]``, i.e.
    :func:`covsvd.algebra.measures.functional_error` (``tr(E M E^T)`` as a sum of elementwise products, fp64) of each
    prefix. Because an orientation's top-k triplets are the first k of its top-r ones, ``B_k`` *is* the rank-k
    orientation (``orient(W, C, k)``), so one call to ``orient`` at the largest rank gives the whole curve.

    ``M``: ``(d_in, d_in)`` PSD matrix, ``(d_in,)`` diagonal, a :class:`~covsvd.algebra.damping.Damped`, or ``None`` (I).
    Cost: ``W M`` and ``P M`` once (``O((d_out + r) d_in^2)``), then ``O(d_out k d_in)`` per rank.
    """
    W64 = W.detach().to(F64)  # (d_out, d_in)
    d_out, d_in = W64.shape
    r = S.shape[0]
    if U.shape != (d_out, r) or P.shape != (r, d_in):
        raise ValueError(f"truncation_curve: U {tuple(U.shape)}, S {tuple(S.shape)}, P {tuple(P.shape)} do not "
                         f"fit W {(d_out, d_in)}")
    bad = [k for k in ranks if not 0 <= int(k) <= r]
    if bad:
        raise ValueError(f"truncation_curve: ranks {bad} outside [0, {r}] (the orientation has r={r})")
    M64 = _metric_dense(M, d_in)
    US = U.detach().to(F64) * S.detach().to(F64)  # (d_out, r)
    P64 = P.detach().to(F64)  # (r, d_in)
    WM, PM = metric_mul(W64, M64), metric_mul(P64, M64)  # (d_out, d_in), (r, d_in)
    den = float((WM * W64).sum())
    out = []
    for k in ranks:
        k = int(k)
        E = W64 - US[:, :k] @ P64[:k]  # (d_out, d_in)
        EM = WM - US[:, :k] @ PM[:k]  # (d_out, d_in) = E M
        out.append(max(float((EM * E).sum()), 0.0) / den)
    return torch.tensor(out, dtype=F64).sqrt()


def literal_eigh_whitening(
    W: torch.Tensor, C: torch.Tensor, r: int, eps: float = 0.0, clamp: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The review request's recipe, literally, with no safety net (a foil; use :func:`covsvd.orient`).

    In ``dtype``: ``lam, Q = eigh(C)``; ``lam <- clamp_min(lam, 0)`` if ``clamp``; ``lam <- lam + eps``;
    ``M^{1/2} = Q diag(sqrt lam) Q^T``, ``M^{-1/2} = Q diag(1 / sqrt lam) Q^T`` (dense);
    ``U, S, Vh = svd(W M^{1/2})``; ``P = Vh[:r] M^{-1/2}``. Nothing is checked: a negative ``lam`` gives NaN
    in ``M^{1/2}`` (then ``U, S, P`` are returned all-NaN, since torch's SVD refuses non-finite input), a zero
    one gives inf in ``M^{-1/2}`` and so in ``P``. Returns ``(U_r (d_out, r), S_r (r,), P_r (r, d_in), lam (d_in,))``,
    ``lam`` as used.
    """
    Wd, Cd = W.detach().to(dtype), C.detach().to(dtype)
    lam, Q = torch.linalg.eigh(Cd)  # (d,), (d, d)
    if clamp:
        lam = lam.clamp_min(0)
    lam = lam + eps
    half = (Q * lam.sqrt()) @ Q.T  # (d, d)
    inv_half = (Q * lam.rsqrt()) @ Q.T  # (d, d)
    A = Wd @ half  # (d_out, d)
    if not bool(torch.isfinite(A).all()):
        nan = float("nan")
        return (Wd.new_full((Wd.shape[0], r), nan), Wd.new_full((r,), nan), Wd.new_full((r, Wd.shape[1]), nan), lam)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :r], S[:r], Vh[:r] @ inv_half, lam
