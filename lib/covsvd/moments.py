"""``SecondMoment``: the running sums behind ``C = E[x x^T]`` for one module's input.

Uncentered by design (DESIGN.md): the quantity that reconstruction under the real activation
distribution needs is ``E[x x^T]``, mean included. The mean and the per-channel mean of ``|x|`` are
kept too (O(d_in) each), so the centered covariance and the ASVD paper's statistic are one call away.

All sums are fp64. ``count`` is the number of real rows (tokens) summed; padding never enters.
Sums, not means, are stored so that two moments add exactly (``a + b``) and reduce across processes
with one ``all_reduce`` each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("full", "diag")


@dataclass
class SecondMoment:
    kind: str  # "full" keeps the (d_in, d_in) sum; "diag" only its diagonal
    sum_xx: torch.Tensor  # full: (d_in, d_in) sum of x x^T; diag: (d_in,) sum of x**2. fp64
    sum_x: torch.Tensor  # (d_in,) sum of x. fp64
    sum_abs: torch.Tensor  # (d_in,) sum of |x|. fp64
    count: int = 0  # real rows summed

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"SecondMoment kind={self.kind!r}; expected one of {KINDS}")
        d = self.sum_x.shape[0]
        want = (d, d) if self.kind == "full" else (d,)
        if tuple(self.sum_xx.shape) != want:
            raise ValueError(f"SecondMoment(kind={self.kind!r}) sum_xx has shape {tuple(self.sum_xx.shape)}; expected {want}")

    @classmethod
    def zeros(cls, d_in: int, kind: str = "full", device: torch.device | str | None = None) -> SecondMoment:
        shape = (d_in, d_in) if kind == "full" else (d_in,)
        z = dict(dtype=torch.float64, device=device)
        return cls(kind, torch.zeros(shape, **z), torch.zeros(d_in, **z), torch.zeros(d_in, **z), 0)

    @property
    def d_in(self) -> int:
        return self.sum_x.shape[0]

    def _need_rows(self) -> None:
        if self.count <= 0:
            raise ValueError(f"SecondMoment (d_in={self.d_in}) has seen no real tokens; capture on non-empty data first")

    def matrix(self) -> torch.Tensor:
        """``E[x x^T]``, ``(d_in, d_in)`` fp64 (kind ``"full"`` only)."""
        self._need_rows()
        if self.kind != "full":
            raise ValueError("this SecondMoment was captured with kind='diag': only .diag() is available; "
                             "capture with kind='full' for the full matrix")
        return self.sum_xx / self.count

    def diag(self) -> torch.Tensor:
        """``E[x_i^2]``, ``(d_in,)`` fp64."""
        self._need_rows()
        d = self.sum_xx.diagonal() if self.kind == "full" else self.sum_xx
        return d / self.count

    def mean(self) -> torch.Tensor:
        """``E[x]``, ``(d_in,)`` fp64."""
        self._need_rows()
        return self.sum_x / self.count

    def mean_abs(self) -> torch.Tensor:
        """``E[|x_i|]``, ``(d_in,)`` fp64: the ASVD paper's activation statistic."""
        self._need_rows()
        return self.sum_abs / self.count

    def covariance(self) -> torch.Tensor:
        """Centered covariance ``E[x x^T] - mu mu^T`` (full), or ``E[x^2] - mu^2`` (diag); fp64."""
        mu = self.mean()
        if self.kind == "full":
            return self.matrix() - torch.outer(mu, mu)
        return self.diag() - mu * mu

    def __add__(self, other: SecondMoment) -> SecondMoment:
        if not isinstance(other, SecondMoment):
            return NotImplemented
        if other.kind != self.kind or other.d_in != self.d_in:
            raise ValueError(
                f"cannot add SecondMoment(kind={self.kind}, d_in={self.d_in}) and "
                f"SecondMoment(kind={other.kind}, d_in={other.d_in})"
            )
        return SecondMoment(
            self.kind,
            self.sum_xx + other.sum_xx,
            self.sum_x + other.sum_x,
            self.sum_abs + other.sum_abs,
            self.count + other.count,
        )

    def __repr__(self) -> str:
        return f"SecondMoment(kind={self.kind!r}, d_in={self.d_in}, count={self.count})"
