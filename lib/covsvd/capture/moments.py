"""``SecondMoment``: the running sums behind ``C = E[x x^T]`` for one module's input, and the
:class:`MomentAccumulator` that streams rows into them.

Uncentered by design (docs/algebra.md, "Second moment"): the quantity that reconstruction under the real
activation distribution needs is ``E[x x^T]``, mean included. The mean and the per-channel mean of ``|x|`` are
kept too (O(d_in) each), so the centered covariance and the ASVD paper's statistic are one call away.

All stored sums are fp64. ``count`` is the number of real rows (tokens) summed; padding never enters.
Sums, not means, are stored so that two moments add exactly (``a + b``) and reduce across processes
with one ``all_reduce`` each (:meth:`SecondMoment.all_reduce`).

Streaming: :class:`MomentAccumulator` adds batches of rows ``x`` ``(N, d_in)`` into O(d_in^2) (full) or
O(d_in) (diag) memory, whatever the number of rows. Its per-batch Gram product ``x^T x`` (:mod:`covsvd.capture.gram`)
is computed in one of two precisions (``accumulate=``):

* ``"float64"`` (the default): rows are cast to fp64 and multiplied in fp64. Equals fp64 brute force
  (``X^T X / n`` over every stored row) to summation-order rounding, ~1e-15 relative.
* ``"float32"``: the per-batch product is an fp32 GEMM (rows cast to fp32), added into the fp64
  running sum: ~1e-7 relative, and the smallest eigenvalues lose much more (bench/results/capture.md), which
  matters because orientation whitens with ``C^{-1/2}``. Never a half-precision product: bf16 / fp16 rows are
  cast up first.

The O(d_in) sums (``x`` and ``|x|``) are fp64 in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..util.checks import check_choice
from .gram import (
    ACCUMULATE,
    add_column_sums_,
    add_gram_upper_,
    gram_block,
    gram_dtype,
    mirror_lower_,
    square_sums,
)

KINDS = ("full", "diag")


@dataclass(eq=False)
class SecondMoment:
    """Sums behind ``E[x x^T]``, ``E[x]`` and ``E[|x|]`` for one input; fp64 throughout.

    Attributes:
        kind: ``"full"`` keeps the ``(d_in, d_in)`` sum; ``"diag"`` only its diagonal.
        sum_xx: full: ``(d_in, d_in)`` sum of ``x x^T``; diag: ``(d_in,)`` sum of ``x**2``. fp64.
        sum_x: ``(d_in,)`` sum of ``x``. fp64.
        sum_abs: ``(d_in,)`` sum of ``|x|``. fp64.
        count: real rows summed.
        model: :func:`covsvd.model_identity` of the model it was captured from (``None`` if unknown).
        accumulate: precision of the per-batch Gram products (``"float64"`` or ``"float32"``, see the module doc).
    """

    kind: str
    sum_xx: torch.Tensor
    sum_x: torch.Tensor
    sum_abs: torch.Tensor
    count: int = 0
    model: dict | None = None
    accumulate: str = "float64"

    def __post_init__(self) -> None:
        check_choice("SecondMoment kind", self.kind, KINDS)
        check_choice("SecondMoment accumulate", self.accumulate, ACCUMULATE)
        d = self.sum_x.shape[0]
        want = (d, d) if self.kind == "full" else (d,)
        if tuple(self.sum_xx.shape) != want:
            raise ValueError(
                f"SecondMoment(kind={self.kind!r}) sum_xx has shape {tuple(self.sum_xx.shape)}; expected {want}"
            )
        for name in ("sum_xx", "sum_x", "sum_abs"):
            if getattr(self, name).dtype != torch.float64:
                raise ValueError(f"SecondMoment.{name} is {getattr(self, name).dtype}; the sums are fp64")
        self.count = int(self.count)

    @classmethod
    def zeros(cls, d_in: int, kind: str = "full", device: torch.device | str | None = None) -> SecondMoment:
        check_choice("kind", kind, KINDS)
        shape = (d_in, d_in) if kind == "full" else (d_in,)
        z = dict(dtype=torch.float64, device=device)
        return cls(kind, torch.zeros(shape, **z), torch.zeros(d_in, **z), torch.zeros(d_in, **z), 0)

    @classmethod
    def from_rows(cls, x: torch.Tensor, kind: str = "full", accumulate: str = "float64") -> SecondMoment:
        """The moment of the rows of ``x`` ``(N, d_in)`` (every row counts), computed as in capture."""
        acc = MomentAccumulator(x.shape[-1], kind=kind, accumulate=accumulate, device=x.device)
        acc.add(x)
        return acc.moment()

    @property
    def d_in(self) -> int:
        return self.sum_x.shape[0]

    def _need_rows(self) -> None:
        if self.count <= 0:
            raise ValueError(
                f"SecondMoment (d_in={self.d_in}) has seen no real tokens; capture on non-empty data first"
            )

    def matrix(self) -> torch.Tensor:
        """``E[x x^T]``, ``(d_in, d_in)`` fp64 (kind ``"full"`` only)."""
        self._need_rows()
        if self.kind != "full":
            raise ValueError(
                "this SecondMoment was captured with kind='diag': only .diag() is available; "
                "capture with kind='full' for the full matrix"
            )
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

    def to_diag(self) -> SecondMoment:
        """The ``"diag"`` kind of this moment (same counts; a full moment's diagonal)."""
        if self.kind == "diag":
            return self
        return SecondMoment(
            "diag",
            self.sum_xx.diagonal().clone(),
            self.sum_x.clone(),
            self.sum_abs.clone(),
            self.count,
            self.model,
            self.accumulate,
        )

    def to(self, device: torch.device | str) -> SecondMoment:
        """A copy of the sums on ``device`` (fp64 kept)."""
        return SecondMoment(
            self.kind,
            self.sum_xx.to(device),
            self.sum_x.to(device),
            self.sum_abs.to(device),
            self.count,
            self.model,
            self.accumulate,
        )

    def _combined_meta(self, other: SecondMoment) -> tuple[dict | None, str]:
        if self.model is not None and other.model is not None and self.model != other.model:
            raise ValueError(
                f"cannot add moments of different models: {self.model} and {other.model}"
            )
        accumulate = "float64" if self.accumulate == other.accumulate == "float64" else "float32"
        return (self.model if self.model is not None else other.model), accumulate

    def __add__(self, other: SecondMoment) -> SecondMoment:
        if not isinstance(other, SecondMoment):
            return NotImplemented
        if other.kind != self.kind or other.d_in != self.d_in:
            raise ValueError(
                f"cannot add SecondMoment(kind={self.kind}, d_in={self.d_in}) and "
                f"SecondMoment(kind={other.kind}, d_in={other.d_in})"
            )
        model, accumulate = self._combined_meta(other)
        return SecondMoment(
            self.kind,
            self.sum_xx + other.sum_xx,
            self.sum_x + other.sum_x,
            self.sum_abs + other.sum_abs,
            self.count + other.count,
            model,
            accumulate,
        )

    def all_reduce(self, group=None) -> SecondMoment:
        """Sum the sums and counts over the processes of ``group`` (``torch.distributed``), in place; returns self.

        Two collectives: ``sum_xx``, then ``[sum_x, sum_abs, count]`` packed in one fp64 vector (counts are
        exact in fp64 below 2**53). Every process must hold a moment of the same kind and ``d_in``;
        :func:`covsvd.capture.distributed.all_reduce_moments` checks that for a whole ``{name: SecondMoment}`` dict.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "SecondMoment.all_reduce needs torch.distributed to be initialised "
                "(torch.distributed.init_process_group(...)) in every process"
            )
        dist.all_reduce(self.sum_xx, group=group)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum_x.device)
        packed = torch.cat([self.sum_x, self.sum_abs, count])  # (2 d_in + 1,)
        dist.all_reduce(packed, group=group)
        d = self.d_in
        self.sum_x.copy_(packed[:d])
        self.sum_abs.copy_(packed[d : 2 * d])
        self.count = int(packed[-1].item())
        return self

    def __repr__(self) -> str:
        return f"SecondMoment(kind={self.kind!r}, d_in={self.d_in}, count={self.count})"


class MomentAccumulator:
    """Streaming sums for one input: O(d_in^2) memory (full) or O(d_in) (diag), whatever the rows seen.

    ``add(x)`` takes ``(N, d_in)`` rows (any float dtype, any device); ``moment()`` returns the
    :class:`SecondMoment` (mirroring the upper block triangle once). Precision: see the module doc.
    """

    def __init__(
        self,
        d_in: int,
        kind: str = "full",
        accumulate: str = "float64",
        device: torch.device | str | None = None,
        block: int | None = None,
    ) -> None:
        check_choice("kind", kind, KINDS)
        check_choice("accumulate", accumulate, ACCUMULATE)
        self.kind, self.accumulate, self.d_in = kind, accumulate, d_in
        self.block = block or gram_block(d_in)  # the Gram product's panel width (see gram_block)
        self.sums: SecondMoment | None = SecondMoment.zeros(d_in, kind, device=device)
        self.sums.accumulate = accumulate
        self.dtype = gram_dtype(accumulate)
        self.ones = torch.ones(0, dtype=torch.float64, device=device)  # reused by add_column_sums_

    def add(self, x: torch.Tensor, *, consume: bool = False) -> None:
        """Add the rows of ``x`` ``(N, d_in)``; every row counts.

        ``consume=True``: ``x`` is a temporary the caller hands over, and may be overwritten (its ``|x|`` is
        taken in place when it is already in the GEMM dtype), which saves one ``(N, d_in)`` buffer.
        """
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected rows of shape (N, {self.d_in}); got {tuple(x.shape)}")
        s = self._open()
        xc = x.to(self.dtype)  # (N, d_in) in the GEMM precision
        if self.ones.shape[0] < xc.shape[0]:
            self.ones = xc.new_ones(xc.shape[0], dtype=torch.float64)
        add_column_sums_(s.sum_x, xc, self.ones)
        if self.kind == "full":
            add_gram_upper_(s.sum_xx, xc, self.block)
        else:
            s.sum_xx += square_sums(xc)
        # |x| last: in place on a copy that is ours (the cast's, or one handed over), else a new tensor
        add_column_sums_(s.sum_abs, xc.abs_() if consume or xc is not x else xc.abs(), self.ones)
        s.count += xc.shape[0]

    def finite(self) -> torch.Tensor:
        """0-d bool tensor: no NaN/inf has entered the sums (checked on ``sum_x`` and the diagonal; no sync)."""
        s = self._open()
        diag = s.sum_xx.diagonal() if self.kind == "full" else s.sum_xx
        return torch.isfinite(s.sum_x).all() & torch.isfinite(diag).all()

    def moment(self, model: dict | None = None) -> SecondMoment:
        """The accumulated :class:`SecondMoment`; finishes the accumulator.

        The sums are handed over without a copy (the lower blocks mirrored in place, once); a later
        ``add`` raises.
        """
        s = self._open()
        self.sums = None
        if self.kind == "full":
            mirror_lower_(s.sum_xx, self.block)
        s.model = model
        return s

    def _open(self) -> SecondMoment:
        if self.sums is None:
            raise RuntimeError("this accumulator has already returned its moment; start a new one")
        return self.sums
