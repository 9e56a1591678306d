"""Calibration sufficiency: was ``C`` estimated from enough tokens for the top-r basis to be a property of the
data rather than of the sample?

Two diagnostics, neither needing a reference moment:

* :func:`check_sufficient`: a moment of ``count < d_in`` real tokens is rank deficient (``rank C <= count``), so
  for the metrics that read the full ``C`` (``full``, ``corda``) the damping ``eps`` alone orders the
  directions no token has visited. It returns those layers and emits one
  :class:`InsufficientCalibrationWarning` naming them.
* Split-half stability (:func:`split_half`, from data; :func:`layer_angles` / :func:`basis_angles`, from
  moments): orient each weight by the moments of two disjoint halves of the calibration data and measure
  the principal angles (:func:`covsvd.principal_angles`) between the two top-r bases. If the basis has
  settled the angles are small; each half has half the tokens, so the basis oriented from all of them is
  closer to its limit than the halves are to each other. The halves are alternating batches, so a corpus
  sorted by topic still gives both halves every topic.

The last few of the r angles are large between any two estimates whenever the r-th and (r+1)-th singular
values of ``W M^{1/2}`` are nearly tied (a small change of C swaps them), so summarise by the median or the
leading angles, not the largest (notebooks/06_calibration.ipynb, section 4).

Pure tensors in :func:`basis_angles`; the model is only read (weights, and one capture pass over the batches in
:func:`split_half`). Orientation runs in fp64 (:func:`covsvd.orient` with ``storage_dtype=torch.float64``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..algebra.measures import principal_angles
from ..algebra.orient import orient
from ..algebra.validate import FULL_METRICS, METRICS, ONE_SIDED_METRICS, OUTPUT_METRICS
from ..capture.moments import SecondMoment
from ..capture.run import capture_moments
from ..data.targets import TargetSpec, weight_matrix
from ..util.checks import check_choice

__all__ = [
    "InsufficientCalibrationWarning",
    "basis_angles",
    "check_sufficient",
    "layer_angles",
    "split_half",
]

#: Which top-r basis :func:`basis_angles` compares: the rows of P (what an adapter reads) or the columns of U.
SIDES = ("input", "output")


class InsufficientCalibrationWarning(UserWarning):
    """A second moment saw fewer real tokens than its input width (``count < d_in``): ``C`` is rank deficient and
    ``eps`` alone chooses the directions the calibration never reached. Raise it as an error with
    ``warnings.simplefilter("error", covsvd.InsufficientCalibrationWarning)``."""


def check_sufficient(
    moments: SecondMoment | Mapping[str, SecondMoment],
    metric: str = "full",
    names: Iterable[str] | None = None,
    *,
    stacklevel: int = 2,
) -> dict[str, tuple[int, int]]:
    """``{name: (count, d_in)}`` of the layers whose full moment saw fewer real tokens than ``d_in``; one
    :class:`InsufficientCalibrationWarning` names them when there is any.

    Args:
        moments: a ``{name: SecondMoment}`` dict (:func:`covsvd.capture_moments`) or one ``SecondMoment``
            (reported under the name ``"moment"``).
        metric: the metric the moments will orient by. Only ``full``, ``corda`` and ``two-sided`` read the full
            matrix, so only they are checked; for ``diag``, ``asvd`` and ``identity`` nothing is reported (a diagonal
            moment has no rank to lose). Unknown metrics raise ``ValueError``.
        names: check only these layers (``KeyError`` for a name not in ``moments``).
        stacklevel: passed to ``warnings.warn`` (2: the caller's line).

    Moments of ``kind="diag"`` are skipped (:func:`covsvd.orient` refuses them for a full metric anyway).
    Raises ``TypeError`` for a value that is not a ``SecondMoment`` (a tensor has no token count).
    """
    check_choice("metric", metric, METRICS)
    if isinstance(moments, SecondMoment):
        moments = {"moment": moments}
    if names is None:
        names = list(moments)
    short: dict[str, tuple[int, int]] = {}
    for name in names:
        if name not in moments:
            raise KeyError(f"no moment for layer {name!r}; have {list(moments)[:5]}...")
        m = moments[name]
        if not isinstance(m, SecondMoment):
            raise TypeError(f"moments[{name!r}] is a {type(m).__name__}: check_sufficient reads the token count of a "
                            "covsvd.SecondMoment (covsvd.capture_moments); a tensor carries none")
        if metric in FULL_METRICS + OUTPUT_METRICS and m.kind == "full" and m.count < m.d_in:
            short[name] = (m.count, m.d_in)
    if short:
        name, (count, d_in) = next(iter(short.items()))
        widest = max(d for _, d in short.values())
        warnings.warn(
            f"{len(short)} layer(s) saw fewer real tokens than their input width, e.g. {name!r}: {count} tokens < "
            f"d_in = {d_in}. C = E[x x^T] then has rank <= {count}, so for metric={metric!r} the damping eps alone "
            f"orders the directions no token reached. Add calibration text: at least {widest} tokens per layer, "
            "and many times that for a stable top-r basis (covsvd.split_half measures it).",
            InsufficientCalibrationWarning,
            stacklevel=stacklevel,
        )
    return short


def basis_angles(
    W: torch.Tensor,
    C_a,
    C_b,
    r: int,
    metric: str = "full",
    *,
    side: str = "input",
    name: str | None = None,
    **orient_kwargs,
) -> torch.Tensor:
    """Principal angles ``(r,)`` (radians, ascending, fp64) between the top-r bases of ``W (d_out, d_in)``
    oriented by two second moments.

    Args:
        W: the weight, Linear convention (Conv1D: :func:`covsvd.weight_matrix`).
        C_a, C_b: anything :func:`covsvd.orient` accepts as ``C`` (a ``SecondMoment``, a ``(d_in, d_in)`` or
            ``(d_in,)`` tensor), e.g. the moments of two halves of the calibration data.
        r, metric: rank and metric of both orientations.
        side: ``"input"``: the row spaces of the two ``P_r`` (the input directions an adapter reads; the
            default); ``"output"``: the column spaces of the two ``U_r``.
        name: the layer, for error messages.
        orient_kwargs: further keywords of :func:`covsvd.orient` (``eps``, ``eps_mode``, ``solver``, ...),
            the same for both; ``storage_dtype`` is fp64 here and cannot be passed.

    Both orientations and the angles are computed in fp64. Raises what :func:`covsvd.orient` raises (a moment
    of fewer than ``r`` tokens, shapes that do not fit, ...) and ``ValueError`` for an unknown ``side``.
    """
    check_choice("side", side, SIDES)
    if "storage_dtype" in orient_kwargs:
        raise TypeError("basis_angles orients in fp64 (storage_dtype=torch.float64); do not pass storage_dtype")
    bases = []
    for C in (C_a, C_b):
        o = orient(W, C, r, metric, storage_dtype=torch.float64, name=name, **orient_kwargs)
        bases.append(o.P.T if side == "input" else o.U)  # (d_in, r) or (d_out, r)
    return principal_angles(*bases)


def layer_angles(
    model: nn.Module,
    moments_a: Mapping[str, SecondMoment],
    moments_b: Mapping[str, SecondMoment],
    r: int,
    metric: str = "full",
    *,
    names: Iterable[str] | None = None,
    side: str = "input",
    progress: bool = True,
    **orient_kwargs,
) -> dict[str, torch.Tensor]:
    """``{name: angles (r,) fp64 radians}``: :func:`basis_angles` for each layer of ``model`` between two sets of
    moments (e.g. two halves of the calibration data, captured separately).

    ``names``: the layers (default: those of ``moments_a``; each must be in both and be a Linear / Conv1D of
    ``model``, else ``KeyError``). Calls :func:`check_sufficient` on the smaller moment of each layer first
    (a warning, not an error). Other arguments as in :func:`basis_angles`; ``progress``: a tqdm bar over layers.
    """
    return _angles(model, moments_a, moments_b, r, metric, names, side, progress, 4, orient_kwargs)


def split_half(
    model: nn.Module,
    batches: Iterable,
    r: int,
    metric: str = "full",
    *,
    targets: TargetSpec = None,
    kind: str | None = None,
    side: str = "input",
    progress: bool = True,
    **orient_kwargs,
) -> dict[str, torch.Tensor]:
    """Split-half stability of the top-r bases: ``{name: angles (r,) fp64 radians, ascending}``.

    The batches are split into alternating halves (``batches[0::2]`` and ``batches[1::2]``), each captured
    with :func:`covsvd.capture_moments` (one forward pass over the data in all), and every target's weight is
    oriented by each half's moment (:func:`basis_angles`). Small angles mean the basis no longer depends on
    which tokens were drawn; a half has half the tokens, so the angles overstate how far the basis from all
    the batches is from its limit.

    Args:
        model: a transformers model (its weights are read, never changed).
        batches: at least two batches, as :func:`covsvd.capture_moments` takes them (materialised to a list).
        r, metric, side: as in :func:`basis_angles`.
        targets: which layers (:func:`covsvd.find_targets`; ``None``: every Linear / Conv1D).
        kind: the capture kind; default ``"full"`` for ``full`` / ``corda``, else ``"diag"`` (cheaper).
        progress: tqdm bars over batches and layers.
        orient_kwargs: ``eps``, ``eps_mode``, ``solver``, ... of :func:`covsvd.orient`.

    Warns :class:`InsufficientCalibrationWarning` when a half saw fewer tokens than a layer's ``d_in``
    (:func:`check_sufficient`). Raises ``ValueError`` for fewer than two batches (split them smaller, e.g.
    ``calibration_batches(..., batch_size=...)``) and what capture and orientation raise (e.g. a half with
    fewer than ``r`` tokens).
    """
    check_choice("metric", metric, ONE_SIDED_METRICS)  # two-sided would need an output moment per half too
    check_choice("side", side, SIDES)
    batches = list(batches)
    if len(batches) < 2:
        raise ValueError(f"split_half needs at least 2 batches to split into halves, got {len(batches)}; "
                         "make smaller batches (covsvd.calibration_batches(..., batch_size=...))")
    kind = kind if kind is not None else ("full" if metric in FULL_METRICS else "diag")
    halves = [capture_moments(model, batches[i::2], targets=targets, kind=kind, progress=progress) for i in (0, 1)]
    return _angles(model, *halves, r, metric, None, side, progress, 4, orient_kwargs)


def _angles(model, moments_a, moments_b, r, metric, names, side, progress, stacklevel, orient_kwargs):
    """The loop behind :func:`layer_angles` and :func:`split_half`; ``stacklevel`` points the warning at
    their caller. One-sided metrics only (a two-sided orientation would need an output moment per layer)."""
    from tqdm.auto import tqdm

    check_choice("metric", metric, ONE_SIDED_METRICS)
    check_choice("side", side, SIDES)
    names = list(moments_a) if names is None else list(names)
    missing = [n for n in names if n not in moments_a or n not in moments_b]
    if missing:
        raise KeyError(f"layers {missing[:3]} are missing from one of the two moment sets "
                       f"({len(moments_a)} and {len(moments_b)} layers): capture both with the same targets")
    smaller = {n: min(moments_a[n], moments_b[n], key=lambda m: m.count) for n in names}
    check_sufficient(smaller, metric, stacklevel=stacklevel)
    out: dict[str, torch.Tensor] = {}
    for n in tqdm(names, desc="split-half angles", unit="layer", disable=not progress):
        try:
            W = weight_matrix(model.get_submodule(n))  # (d_out, d_in)
        except AttributeError:
            raise KeyError(f"{type(model).__name__} has no module {n!r} (moments from another model?)") from None
        out[n] = basis_angles(W.detach(), moments_a[n], moments_b[n], r, metric, side=side, name=n, **orient_kwargs)
    return out
