"""The damped metric ``M = C + eps I`` and the few exact operations orientation needs from it.

``M`` is never inverted explicitly. :func:`damp` factors it once, in one of three forms, and
:class:`Damped` applies what is needed (``X F``, ``Y F^{-1}``, ``X M``, ``Y M^{-1}``, with ``F F^T = M``):

* ``"diag"`` (a ``(d,)`` vector c): ``m = clamp_min(c, 0) + eps``, ``F = diag(sqrt m)``. Exact clamp.
* ``"eigh"``: ``C = Q diag(lam) Q^T``, ``lam <- clamp_min(lam, 0) + eps`` (the definition, docs/algebra.md),
  ``F = Q diag(sqrt lam)``. ``cond(M)`` is exact. Costs an eigendecomposition (timings: bench/results/orient.md).
* ``"cholesky"``: ``M = C + eps I = L L^T``, ``F = L``. Much cheaper than eigh (bench/results/orient.md), but
  it does **not** clamp: it factors ``C + eps I`` as given. For a second moment summed as ``X^T X`` (every
  :class:`~covsvd.SecondMoment`) the negative eigenvalues of C are rounding, ``|lam| <~ d u ||C||``
  (``u`` the unit roundoff of the dtype), so ``C + eps I`` differs from the clamped M by at most that much.
  If C is materially indefinite the factorisation fails and :func:`damp` raises, naming the fix
  (raise eps, or ``solver="eigh"``); it never switches solver silently. ``cond(M)`` is a Lanczos
  estimate (:func:`lanczos_max`), see :attr:`Damped.cond`.

``F`` differs between solvers (``Q diag(sqrt lam)`` vs ``L``) by an orthogonal factor on the right
(``L = M^{1/2} G``, G orthogonal), so ``svd(W F)`` has the same U and S for both, and ``Vh F^{-1}`` is
the same P (docs/algebra.md, "Orientation by a metric").

**The default eps is relative** (:data:`DEFAULT_EPS` ``* mean(diag C)``, :data:`DEFAULT_EPS_MODE`), which makes
orientation invariant to the scale of the inputs: ``x -> a x`` gives ``C -> a^2 C`` and ``M -> a^2 M``, so U and
the row space of P do not change (S scales by a, P by 1/a, ``U S P`` not at all), and it bounds the metric on any
data: ``cond(M) <= 1 + d / eps`` (``lam_max <= tr C = d mean(diag C)``), and the M-orthonormal rows of P
(``full``, ``diag``) have ``||p_i|| <= (eps mean(diag C))^{-1/2}``.
An absolute eps means something different on every layer: LLM activation scales differ by orders of magnitude
between layers and models.

Every decomposition runs in ``dtype`` (fp64 by default). Lanczos keeps its tridiagonal in fp64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Default damping, relative: ``eps = DEFAULT_EPS * mean(diag C)`` (see the module docstring for why relative).
#: The value is measured in notebooks/04_eps.ipynb, section 4, on every input of the default model and on
#: LLM-like activations (outlier channels, massive activations, heavy-tailed spectra): the largest of
#: 1e-5 ... 1e-1 whose held-out functional error stays within 0.1% of the eps -> 0 limit on every input. A few
#: huge channels inflate mean(diag C), so a larger relative eps over-damps the bulk of an LLM-like spectrum
#: (1e-2 already breaks the 0.1%); 1e-3 keeps ``cond(M) <= 1 + 1000 d`` (comfortable in fp64, the default
#: compute dtype). The former default, 1e-3 absolute, is ``eps_mode="absolute"`` (the lab's recorded
#: ablations pin it).
DEFAULT_EPS = 1e-3
#: The default meaning of ``eps`` (see :func:`resolve_eps`).
DEFAULT_EPS_MODE = "relative"
EPS_MODES = ("absolute", "relative")
SOLVERS = ("cholesky", "eigh")
#: Lanczos steps for the cond(M) estimate on the Cholesky path (two runs: on M and on M^{-1}).
COND_STEPS = 16


def resolve_eps(eps: float, eps_mode: str, mean_diag: float) -> float:
    """The absolute eps: ``eps`` itself (``"absolute"``) or ``eps * mean(diag C)`` (``"relative"``).

    Raises ``ValueError`` for an unknown mode or an eps that is not a finite number ``>= 0``."""
    if eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode={eps_mode!r}; expected one of {EPS_MODES}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps={eps!r} must be a finite number >= 0")
    return float(eps) * (mean_diag if eps_mode == "relative" else 1.0)


def lanczos_max(apply, d: int, steps: int, like: torch.Tensor, seed: int = 0) -> float:
    """Largest Ritz value of a symmetric operator after ``min(steps, d)`` Lanczos steps.

    ``apply(v)`` maps a ``(d, 1)`` tensor (dtype/device of ``like``) to ``A v``. Full
    re-orthogonalisation (twice), fixed-seed start. The Ritz value lies inside the spectrum, so it
    never overstates ``lam_max(A)`` (up to rounding); with ``steps >= d`` it is exact. Tridiagonal in fp64.
    """
    k = min(steps, d)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(d, 1, generator=g, dtype=torch.float64).to(like)  # (d, 1)
    q = q / q.norm()
    basis = torch.empty(d, k, dtype=like.dtype, device=like.device)  # (d, k) orthonormal columns
    alpha, beta = [], []
    for j in range(k):
        basis[:, j : j + 1] = q
        w = apply(q)  # (d, 1)
        alpha.append(float((q * w).sum()))
        Qj = basis[:, : j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice: orthogonal to working precision
            w = w - Qj @ (Qj.T @ w)
        b = float(w.norm())
        if j == k - 1 or b <= 1e-12 * max(abs(a) for a in alpha):  # done, or an invariant subspace: exact
            break
        beta.append(b)
        q = w / b
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta[: len(alpha) - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T)[-1])


@dataclass(frozen=True)
class Damped:
    """``M = C + eps I`` in factored form (see the module docstring for the three kinds).

    Attributes:
        kind: ``"diag"``, ``"eigh"`` or ``"cholesky"``.
        eps: the absolute eps actually added.
        m: diag: the ``(d,)`` diagonal of M; eigh: the ``(d,)`` clamped, damped eigenvalues (ascending).
        Q: eigh: the ``(d, d)`` eigenvectors.
        L: cholesky: the lower ``(d, d)`` factor, ``M = L L^T``.
        C: cholesky: the symmetrised ``(d, d)`` C (for ``X M = X C + eps X``).
        clamped: eigh / diag: how many eigenvalues (diagonal entries) of C were below 0 and clamped;
            cholesky: ``None`` (no clamp, see module docstring).
    """

    kind: str
    eps: float
    m: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    L: torch.Tensor | None = None
    C: torch.Tensor | None = None
    clamped: int | None = None

    @property
    def d(self) -> int:
        return (self.m if self.m is not None else self.L).shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return (self.m if self.m is not None else self.L).dtype

    # ----------------------------------------------------------------- right multiplications, X (k, d)
    def factor(self, X: torch.Tensor) -> torch.Tensor:
        """``X F`` with ``F F^T = M`` (``F = diag(sqrt m)``, ``Q diag(sqrt lam)`` or ``L``)."""
        if self.kind == "diag":
            return X * self.m.sqrt()
        if self.kind == "eigh":
            return (X @ self.Q) * self.m.sqrt()
        return X @ self.L

    def factor_inv(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y F^{-1}`` (a triangular solve for cholesky; never an explicit inverse)."""
        if self.kind == "diag":
            return Y / self.m.sqrt()
        if self.kind == "eigh":
            return (Y / self.m.sqrt()) @ self.Q.T
        return torch.linalg.solve_triangular(self.L, Y, upper=False, left=False)  # X L = Y

    def mul(self, X: torch.Tensor) -> torch.Tensor:
        """``X M``."""
        if self.kind == "diag":
            return X * self.m
        if self.kind == "eigh":
            return ((X @ self.Q) * self.m) @ self.Q.T
        return X @ self.C + self.eps * X

    def solve(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y M^{-1}`` (two triangular solves for cholesky)."""
        if self.kind == "diag":
            return Y / self.m
        if self.kind == "eigh":
            return ((Y @ self.Q) / self.m) @ self.Q.T
        Z = torch.linalg.solve_triangular(self.L.T, Y, upper=True, left=False)  # Z L^T = Y
        return self.factor_inv(Z)  # Z L^{-1} = Y L^{-T} L^{-1} = Y M^{-1}

    # ----------------------------------------------------------------- dense forms (for notebooks)
    def matrix(self) -> torch.Tensor:
        """Dense ``M`` ``(d, d)``."""
        if self.kind == "diag":
            return torch.diag(self.m)
        if self.kind == "eigh":
            return (self.Q * self.m) @ self.Q.T
        return self.C + self.eps * torch.eye(self.d, dtype=self.C.dtype, device=self.C.device)

    def half(self) -> torch.Tensor:
        """Dense symmetric ``M^{1/2}`` (diag / eigh only: the Cholesky factor is not symmetric)."""
        self._need_spectrum("half()")
        if self.kind == "diag":
            return torch.diag(self.m.sqrt())
        return (self.Q * self.m.sqrt()) @ self.Q.T

    def inv_half(self) -> torch.Tensor:
        """Dense symmetric ``M^{-1/2}`` (diag / eigh only)."""
        self._need_spectrum("inv_half()")
        if self.kind == "diag":
            return torch.diag(self.m.rsqrt())
        return (self.Q * self.m.rsqrt()) @ self.Q.T

    def _need_spectrum(self, what: str) -> None:
        if self.kind == "cholesky":
            raise ValueError(f"Damped.{what} needs the eigendecomposition; this M was factored with "
                             "solver='cholesky' (F = L, not symmetric): call damp(..., solver='eigh')")

    # ----------------------------------------------------------------- condition number
    @property
    def cond_exact(self) -> bool:
        """True when :attr:`cond` is exact (diag, eigh, or Lanczos run to ``d`` steps)."""
        return self.kind != "cholesky" or self.d <= COND_STEPS

    @property
    def cond(self) -> float:
        """``cond_2(M) = lam_max / lam_min``: exact for diag / eigh. For cholesky, a Lanczos estimate:
        ``COND_STEPS`` steps on ``M`` (for lam_max, via ``C v + eps v``) and on ``M^{-1}`` (for 1/lam_min,
        via two triangular solves with L), single vectors, O(steps d^2). Ritz values lie inside the
        spectrum, so up to rounding the estimate never exceeds the true cond (a lower bound); it converges fastest when
        the extremes are isolated, which is the case that matters (an eps-floored null space)."""
        if self.kind != "cholesky":
            return float(self.m.max() / self.m.min())
        like = self.L
        hi = lanczos_max(lambda v: self.C @ v + self.eps * v, self.d, COND_STEPS, like, seed=0)
        inv_lo = lanczos_max(
            lambda v: torch.linalg.solve_triangular(
                self.L.T, torch.linalg.solve_triangular(self.L, v, upper=False), upper=True),
            self.d, COND_STEPS, like, seed=1)
        return hi * inv_lo


def _check_not_zero(C: torch.Tensor, e: float, eps_mode: str, where: str) -> None:
    """Raise ``ValueError`` for ``C = 0`` with nothing added (no damping can factor it): the fix that works."""
    if e > 0 or bool(C.any()):
        return
    cause = ("relative damping adds eps * mean(diag C) = 0" if eps_mode == "relative" else "eps = 0")
    raise ValueError(f"{where}C is zero (every counted input of the layer was 0: a dead or masked-out input) and "
                     f"{cause}, so M = C + eps I is zero: pass eps_mode='absolute' with eps > 0 (the metric is then "
                     "a multiple of the identity), or leave the layer out of targets")


def damp(
    C: torch.Tensor,
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    solver: str = "eigh",
    dtype: torch.dtype = torch.float64,
    name: str | None = None,
) -> Damped:
    """Factor ``M = C + eps I`` (after clamping C's eigenvalues at 0 for ``solver="eigh"``).

    Args:
        C: ``(d, d)`` symmetric PSD second moment, or a ``(d,)`` diagonal (then ``kind="diag"``; the solver
            is irrelevant and the clamp is exact).
        eps, eps_mode: ``"relative"`` (default): add ``eps * mean(diag C)`` (the mean of the diagonal vector
            for a diagonal C); ``"absolute"``: add ``eps``. ``Damped.eps`` is the absolute value added.
        solver: ``"eigh"`` (the definition: clamp, then damp; exact cond) or ``"cholesky"`` (no clamp,
            faster; raises if ``C + eps I`` is not positive definite in ``dtype``).
        dtype: the decomposition dtype (fp64 default; fp32 allowed).
        name: a layer name for error messages.

    Note :func:`covsvd.orient` defaults to ``solver="cholesky"``; this helper defaults to the defining
    ``"eigh"`` so that :meth:`Damped.half` / :meth:`Damped.inv_half` are available in notebooks.
    """
    where = f"layer {name!r}: " if name else ""
    if solver not in SOLVERS:
        raise ValueError(f"{where}solver={solver!r}; expected one of {SOLVERS}")
    C = C.detach().to(dtype)
    if C.dim() == 1:
        e = resolve_eps(eps, eps_mode, float(C.mean()))
        _check_not_zero(C, e, eps_mode, where)
        m = C.clamp_min(0) + e  # (d,)
        if not bool((m > 0).all()):
            dead = int((m <= 0).sum())
            raise ValueError(f"{where}diag(C) has {dead} zero channel(s) of {C.shape[0]} (inputs that never "
                             f"fire) and eps={e:g}: M is singular; use eps > 0")
        return Damped("diag", e, m=m, clamped=int((C < 0).sum()))
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"{where}C has shape {tuple(C.shape)}; expected (d, d) or (d,)")
    C = torch.add(C, C.T).mul_(0.5)  # (d, d) (C + C^T) / 2: exact symmetry (callers check it was symmetric)
    e = resolve_eps(eps, eps_mode, float(C.diagonal().mean()))
    _check_not_zero(C, e, eps_mode, where)
    if solver == "eigh":
        lam, Q = torch.linalg.eigh(C)  # (d,), (d, d) ascending
        clamped = int((lam < 0).sum())
        m = lam.clamp_min(0) + e
        if not bool(m[0] > 0):
            raise ValueError(f"{where}C is singular (smallest eigenvalue {float(lam[0]):.3g}) and eps={e:g}: "
                             "M = C + eps I is singular; use eps > 0")
        return Damped("eigh", e, m=m, Q=Q, clamped=clamped)
    M = C.clone()
    M.diagonal().add_(e)  # (d, d) C + eps I
    L, info = torch.linalg.cholesky_ex(M)  # (d, d) lower
    if int(info) != 0:
        raise ValueError(
            f"{where}C + eps I (d={C.shape[0]}, eps={e:g}, {str(dtype).removeprefix('torch.')}) is not positive "
            f"definite: Cholesky failed at column {int(info)}, so C has an eigenvalue at or below -eps (or "
            f"within rounding of it). Fix: raise eps (e.g. eps_mode='relative', eps=1e-3), compute in "
            f"float64, or pass solver='eigh', which clamps C's eigenvalues at 0 before adding eps.")
    return Damped("cholesky", e, L=L, C=C, clamped=None)
