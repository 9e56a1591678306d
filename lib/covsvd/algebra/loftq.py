"""A quantized base plus an oriented low-rank adapter: ``W ~ dequant(Q) + U diag(S) P``.

The iterates (``F = U diag(S) P``, the rank-r factors; ``orient(A)`` = :func:`covsvd.orient` of ``A`` under
the metric, its optimal rank-r approximation in ``||. T||_F``; ``quant`` = the quantizer of
:mod:`covsvd.algebra.quant`)::

    iterate 0     start="oriented":  F_0 = orient(W)     Q_0 = quant(W - F_0)     (QPiSSA, under any metric)
                  start="zero":      F_0 = 0             Q_0 = quant(W)           (QLoRA: the adapter starts at 0)
    iterate j>=1  Q_j = quant(W - F_{j-1})   (for j = 1 that is Q_0 itself: nothing is re-quantized)
                  F_j = orient(W - dequant(Q_j))

so iteration j re-quantizes what the current factors leave, then re-orients on what the base leaves. With
``start="zero"`` and ``metric="identity"``, iterate k is peft's ``loftq_init(W, num_bits=4, reduced_rank=r,
num_iter=k)`` step for step (it quantizes W, takes the rank-r SVD of ``W - dequant(Q)``, re-quantizes
``W - L R``, ...; it returns its k-th pair): ``quantize_residual(..., start="zero", iters=k, keep="last")``.

**The objective** ("the error under the metric") is ``||(W - dequant(Q) - F) T||_F / ||W T||_F`` with ``T`` the
metric's right factor (:mod:`covsvd.algebra.orient`): identity: plain Frobenius; diag: ``diag(c) + eps``;
full: ``C + eps I`` (the functional error: the relative RMS output error on inputs with that second
moment); corda: ``(C + eps I)^2``; asvd: its own scaling. Every orient step minimises it for the Q it is
given (exact SVD), so iterate 1 is never worse than iterate 0; a re-quantization step may raise it (the
quantizer rounds elementwise, blind to the metric). ``keep="best"`` returns the iterate with the smallest
objective (the earliest on ties), hence never worse than iterate 0; ``keep="last"`` iterate ``iters``;
``keep="all"`` the best as well, with every iterate kept beside it (``QuantizedResidual.history``: memory for
``iters + 1`` bases and factor sets).

Dtypes: the decompositions run in ``compute_dtype`` (float64 by default, as :func:`covsvd.orient`); the
factors are rounded to ``storage_dtype`` (default ``W.dtype``) and the quantizer input ``W - F`` is formed in
``compute_dtype`` from the *rounded* factors, then rounded to ``base_dtype`` (default ``W.dtype``: the dtype
the base is stored in, since bitsandbytes quantizes the stored values); ``W - dequant(Q)`` and the errors are
formed in ``compute_dtype``, the norms summed in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..util.checks import check_choice, check_count, where
from .damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from .orient import back_factor, decompose, front_factor, metric_factor, output_factor, right_factor
from .quant import FOUR_BIT_DTYPES, Quantized, Quantizer, quantizer
from .validate import moment_parts, orient_options, output_parts

__all__ = ["QuantizedResidual", "quantize_residual"]

STARTS = ("oriented", "zero")
KEEPS = ("best", "last", "all")
F64 = torch.float64


class QuantizedResidual(NamedTuple):
    """The result of :func:`quantize_residual`.

    ``U (d_out, r)``, ``S (r,)``, ``P (r, d_in)``: the kept iterate's factors in the storage dtype (zeros
    for iterate 0 of ``start="zero"``); ``base``: its :class:`~covsvd.algebra.quant.Quantized` base
    (``base.dequantize()`` is what a loaded bitsandbytes layer computes with); ``source``: the ``(d_out, d_in)``
    tensor in the base dtype that ``base`` quantizes, ``W - U' S' P'`` with the factors of the iterate *before*
    (iterate 0: its own factors; zero for ``start="zero"``), so not ``W - U S P`` after iteration 2: a checkpoint
    whose weight is ``source`` loads (re-quantized by bitsandbytes) into exactly ``base``; ``errors``: the objective
    (module docstring) of iterates ``0 .. iters``; ``fro_errors``: ``||W - dequant(Q) - F||_F / ||W||_F`` of
    each; ``best``: the index of the returned iterate; ``bits``: the base's bits per parameter
    (:attr:`Quantized.bits`); ``info``: a dict (keys in :func:`quantize_residual`); ``history``: with
    ``keep="all"``, every iterate's ``(U, S, P, base)`` in order (empty otherwise).
    """

    U: torch.Tensor
    S: torch.Tensor
    P: torch.Tensor
    base: Quantized
    source: torch.Tensor
    errors: tuple
    fro_errors: tuple
    best: int
    bits: float
    info: dict
    history: tuple = ()

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``dequant(Q) + U diag(S) P`` ``(d_out, d_in)`` in ``dtype`` (summed in ``dtype``)."""
        return self.base.dequantize().to(dtype) + (self.U.to(dtype) * self.S.to(dtype)) @ self.P.to(dtype)


def quantize_residual(
    W: torch.Tensor,
    C,
    r: int,
    metric: str = "full",
    quant: str | Quantizer = "nf4",
    iters: int = 0,
    *,
    start: str = "oriented",
    keep: str = "best",
    blocksize: int = 64,
    double_quant: bool = False,
    base_dtype: torch.dtype | None = None,
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    components: str = "top",
    solver: str = "cholesky",
    alpha: float = 0.5,
    compute_dtype: torch.dtype = torch.float64,
    storage_dtype: torch.dtype | None = None,
    svd: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    name: str | None = None,
    output=None,
    eps_output: float = DEFAULT_EPS,
) -> QuantizedResidual:
    """Quantize ``W (d_out, d_in)`` around rank-``r`` factors oriented by ``metric`` (module docstring).

    Args:
        W, C, r, metric: as :func:`covsvd.orient` (``C`` may be ``None`` for ``metric="identity"``).
        quant: ``"nf4"`` (default), ``"fp4"``, ``"int8"`` or a :class:`~covsvd.algebra.quant.Quantizer`;
            ``blocksize`` / ``double_quant`` configure the 4-bit ones (:func:`~covsvd.algebra.quant.quantizer`).
        iters: alternations after iterate 0 (``int >= 0``); start, keep: module docstring.
        base_dtype: the dtype the base is quantized (stored) in; default ``W.dtype``. float32 / bfloat16 /
            float16 for the 4-bit kinds.
        eps, eps_mode, components, solver, alpha, compute_dtype, storage_dtype, svd, oversample,
        power_iters, seed, name, output, eps_output: as :func:`covsvd.orient` (the metric, and for
        ``metric="two-sided"`` the output moment ``output``, are factored once and reused by every iterate; the
        objective is then the two-sided error ``||N^{1/2} E M^{1/2}||_F``). With ``svd="randomized"`` an orient step is near-optimal only, so the iterate-1 guarantee
        holds to that approximation (``keep="best"`` still never returns worse than iterate 0).

    Raises:
        ValueError: everything :func:`covsvd.orient` refuses (before anything runs), an unknown ``quant`` /
            ``start`` / ``keep``, ``iters`` not an int >= 0, a bad ``blocksize``, a ``base_dtype`` the
            quantizer does not take. ImportError: bitsandbytes missing (names the extra).

    ``info``: ``metric, quant, iters, start, keep, r, eps`` (absolute), ``eps_mode, compute_dtype,
    storage_dtype, base_dtype, svd, name``; ``quantizations`` (quantizer calls made); ``adapter_params``
    (``r (d_out + d_in)``: LoRA's ``B A``; ``S`` folds into them) and ``adapter_bits`` (``16 *
    adapter_params / (d_out d_in)``: the adapter's bits per weight parameter in 16-bit storage).
    """
    prefix = where(name)
    storage = orient_options(W, r, metric, eps, eps_mode, components, solver, compute_dtype, storage_dtype, svd,
                             oversample, power_iters, seed, prefix)
    mat, dg, mabs, _ = moment_parts(C, metric, r, tuple(W.shape), prefix)
    gmat, gdg, _ = output_parts(output, metric, r, tuple(W.shape), eps_output, eps_mode, prefix)
    check_count("iters", iters, 0, prefix)
    check_choice("start", start, STARTS, prefix)
    check_choice("keep", keep, KEEPS, prefix)
    qz = quantizer(quant, blocksize=blocksize, double_quant=double_quant)
    base = W.dtype if base_dtype is None else base_dtype
    if qz.name in ("nf4", "fp4") and base not in FOUR_BIT_DTYPES:
        raise ValueError(f"{prefix}base_dtype={base}: {qz.name} quantizes float32 / bfloat16 / float16 (the dtype "
                         f"the base is stored in); W {tuple(W.shape)} is {W.dtype}: pass base_dtype=")
    with torch.no_grad():
        Wc = W.detach().to(compute_dtype)  # (d_out, d_in)
        mat, dg, mabs, gmat, gdg = (None if t is None else t.to(dtype=compute_dtype, device=Wc.device)
                                    for t in (mat, dg, mabs, gmat, gdg))
        own = metric_factor(metric, mat, dg, mabs, eps, eps_mode, solver, alpha, compute_dtype, name)
        out = output_factor(gmat, gdg, eps_output, eps_mode, solver, compute_dtype, name)  # None: one-sided
        step = _Step(Wc, (own, out), metric, r, components, svd, oversample, power_iters, seed, storage, base, qz,
                     name)
        return _iterate(step, iters, start, keep, dict(
            metric=metric, quant=qz.name, iters=iters, start=start, keep=keep, r=r,
            eps=0.0 if own is None else own.eps, eps_output=None if out is None else out.eps, eps_mode=eps_mode,
            svd=svd, name=name,
            compute_dtype=str(compute_dtype).removeprefix("torch."),
            storage_dtype=str(storage).removeprefix("torch."), base_dtype=str(base).removeprefix("torch."),
            adapter_params=r * (W.shape[0] + W.shape[1]),
            adapter_bits=16.0 * r * (W.shape[0] + W.shape[1]) / (W.shape[0] * W.shape[1])))


class _Step:
    """The two half steps and the objective, with the metric factored once. Tensors in the compute dtype."""

    def __init__(self, Wc, factors, metric, r, components, svd, oversample, power_iters, seed, storage, base, qz,
                 name):
        (self.own, self.out), self.Wc, self.metric, self.r = factors, Wc, metric, r
        self.svd_args = (r, components, svd, oversample, power_iters, seed)
        self.storage, self.base, self.qz, self.name = storage, base, qz, name
        self.quantizations = 0
        self.norm_T = _fro(right_factor(Wc, self.own, metric, self.out))  # ||W T||_F (two-sided: ||K^T W F||_F)
        self.norm_W = _fro(Wc)

    def orient(self, A: torch.Tensor):
        """Rounded ``(U (d_out, r), S (r,), P (r, d_in))`` of the optimal rank-r ``A`` under the metric."""
        U, S, Vh, _, _ = decompose(right_factor(A, self.own, self.metric, self.out), *self.svd_args)
        P = back_factor(Vh, self.own, self.metric)
        U = front_factor(U, self.out)
        return U.to(self.storage), S.to(self.storage), P.to(self.storage)

    def zero(self):
        d_out, d_in = self.Wc.shape
        z = self.Wc.new_zeros
        return z(d_out, self.r).to(self.storage), z(self.r).to(self.storage), z(self.r, d_in).to(self.storage)

    def product(self, f) -> torch.Tensor:
        """``U diag(S) P`` of rounded factors, in the compute dtype."""
        U, S, P = (t.to(self.Wc.dtype) for t in f)
        return (U * S) @ P

    def quantize(self, f) -> tuple[Quantized, torch.Tensor, torch.Tensor]:
        """``Q = quant(X)``, ``dequant(Q)`` in the compute dtype, and ``X = W - U S P`` rounded to the base dtype."""
        self.quantizations += 1
        X = (self.Wc - self.product(f)).to(self.base)  # (d_out, d_in)
        q = self.qz.quantize(X, name=self.name)
        return q, q.dequantize().to(self.Wc.dtype), X

    def errors(self, deq: torch.Tensor, f) -> tuple[float, float]:
        """(objective, relative Frobenius) of ``W - dequant(Q) - U S P``."""
        E = self.Wc - deq - self.product(f)  # (d_out, d_in)
        num_T = _fro(right_factor(E, self.own, self.metric, self.out))
        return _ratio(num_T, self.norm_T), _ratio(_fro(E), self.norm_W)


def _iterate(step: _Step, iters: int, start: str, keep: str, info: dict) -> QuantizedResidual:
    """Run iterates ``0 .. iters`` (module docstring) and return the kept one."""
    f = step.orient(step.Wc) if start == "oriented" else step.zero()
    q, deq, X = step.quantize(f)
    errs = [step.errors(deq, f)]
    kept = (0, f, q, X)
    history = [(*f, q)] if keep == "all" else []
    for j in range(1, iters + 1):
        if j > 1:
            q, deq, X = step.quantize(f)
        f = step.orient(step.Wc - deq)
        errs.append(step.errors(deq, f))
        if keep == "all":
            history.append((*f, q))
        if keep == "last" or errs[j][0] < errs[kept[0]][0]:
            kept = (j, f, q, X)
    best, (U, S, P), q, X = kept
    info.update(quantizations=step.quantizations)
    return QuantizedResidual(U, S, P, q, X, tuple(e for e, _ in errs), tuple(e for _, e in errs), best, q.bits,
                             info, tuple(history))


def _fro(A: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(A, dtype=F64))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
