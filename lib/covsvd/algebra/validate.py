"""The checks shared by :func:`covsvd.orient` and :func:`covsvd.attach_adapters`: one definition of what a valid
weight, rank, second moment and set of orientation options are, and of the errors that say so (each names the
layer and the fix).
"""

from __future__ import annotations

import torch

from ..capture.moments import SecondMoment
from ..util.checks import check_choice, check_count, check_finite, check_no_tf32, check_rank, check_weight
from .damping import EPS_MODES, SOLVERS, resolve_eps
from .svd import COMPONENTS, SVDS

#: The one-sided metrics: each needs at most the input moment C (module doc of :mod:`covsvd.algebra.orient`).
ONE_SIDED_METRICS = ("identity", "diag", "full", "corda", "asvd")
#: The metrics that also weigh the output side: they need an output moment G (``orient(..., output=G)``).
#: ``"two-sided"`` takes the input moment C full (the K-FAC optimum of docs/algebra.md) or diagonal, and G
#: full ``(d_out, d_out)`` or diagonal ``(d_out,)`` (FWSVD-style rows).
OUTPUT_METRICS = ("two-sided",)
#: Every metric of :func:`covsvd.orient` and of the entry points (attach, init, export, allocate).
METRICS = ONE_SIDED_METRICS + OUTPUT_METRICS
#: The same tuple as :data:`METRICS` (the name orient's checks use).
ORIENT_METRICS = METRICS
#: The metrics that need the full ``(d_in, d_in)`` second moment.
FULL_METRICS = ("full", "corda")
#: The dtypes orientation decomposes in (``compute_dtype=``).
COMPUTE_DTYPES = (torch.float64, torch.float32)
#: ``max |C - C^T| / max |C|`` accepted for a tensor C (it is then symmetrised).
SYMMETRY_TOL = 1e-5


def moment_parts(C, metric: str, r: int, W_shape: tuple[int, int], prefix: str = ""):
    """Validate a second moment for ``metric`` at rank ``r`` and return what orientation reads from it.

    Args:
        C: a :class:`~covsvd.SecondMoment`, a ``(d_in, d_in)`` tensor ``E[x x^T]``, a ``(d_in,)`` tensor
            ``E[x_i^2]`` (diag / identity only), or ``None`` (identity only).
        metric: one of :data:`ORIENT_METRICS`; W_shape: ``(d_out, d_in)`` of the weight; prefix: from :func:`where`.

    Returns:
        ``(matrix, diagonal, mean_abs, count)`` (each ``None`` when ``C`` does not provide it), tensors fp64
        for a SecondMoment, in C's own dtype for a tensor.

    Raises:
        ValueError: a shape that does not fit ``W``, fewer than ``r`` tokens, a diag moment for a full
            metric, NaN/inf, a non-symmetric matrix, a tensor for ``asvd`` (it needs ``E|x|``).
        TypeError: ``C`` of another type.
    """
    d_in = W_shape[1]
    if C is None:
        if metric != "identity":
            raise ValueError(f"{prefix}metric={metric!r} needs a second moment C; only metric='identity' "
                             "accepts C=None")
        return None, None, None, None
    if isinstance(C, SecondMoment):
        if C.d_in != d_in:
            raise ValueError(f"{prefix}W has shape {W_shape} (d_in={d_in}) but the SecondMoment has "
                             f"d_in={C.d_in}: moments from another layer or model")
        if metric != "identity" and C.count < r:
            raise ValueError(f"{prefix}the SecondMoment saw {C.count} real tokens, fewer than r={r}; add "
                             "calibration text (or lower r): C has rank < r, the extra directions would be arbitrary")
        for key in ("sum_xx", "sum_x", "sum_abs"):
            check_finite(getattr(C, key), f"SecondMoment.{key}", prefix)
        if metric in FULL_METRICS and C.kind != "full":
            raise ValueError(f"{prefix}metric={metric!r} needs the full (d_in, d_in) moment; this SecondMoment "
                             "was captured with kind='diag': capture with kind='full' or use metric='diag'")
        mat = C.matrix() if C.kind == "full" else None
        return mat, C.diag(), C.mean_abs(), C.count
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"{prefix}C is a {type(C).__name__}; expected covsvd.SecondMoment, a (d_in, d_in) "
                        "tensor or a (d_in,) tensor")
    if metric == "asvd":
        raise ValueError(f"{prefix}metric='asvd' needs E|x_i| (SecondMoment.mean_abs()); pass the "
                         "SecondMoment itself, not a tensor")
    C = C.detach()
    if C.dim() == 1:
        if metric in FULL_METRICS:
            raise ValueError(f"{prefix}metric={metric!r} needs the full (d_in, d_in) second moment; got a "
                             f"({C.shape[0]},) vector: pass E[x x^T] or use metric='diag'")
        if C.shape[0] != d_in:
            raise ValueError(f"{prefix}W has shape {W_shape} but C has shape {tuple(C.shape)}; "
                             f"expected ({d_in},)")
        check_finite(C, "C", prefix)
        return None, C, None, None
    if C.dim() != 2 or tuple(C.shape) != (d_in, d_in):
        raise ValueError(f"{prefix}W has shape {W_shape} but C has shape {tuple(C.shape)}; "
                         f"expected ({d_in}, {d_in}) (or ({d_in},) for a diagonal metric)")
    check_symmetric(C, "C", "the second moment E[x x^T]", prefix)
    return C, C.diagonal(), None, None


def check_symmetric(M: torch.Tensor, name: str, what: str, prefix: str = "") -> None:
    """Raise ``ValueError`` unless the square matrix ``M`` is finite and symmetric to :data:`SYMMETRY_TOL`
    (relative to ``max |M|``); ``what`` names what should be passed instead."""
    check_finite(M, name, prefix)
    scale = float(M.abs().max())
    asym = float((M - M.T).abs().max())
    if asym > SYMMETRY_TOL * scale:
        raise ValueError(f"{prefix}{name} is not symmetric (max |{name} - {name}^T| = {asym:.3g}, max |{name}| = "
                         f"{scale:.3g}); pass {what}")


def output_parts(G, metric: str, r: int, W_shape: tuple[int, int], eps_output: float, eps_mode: str,
                 prefix: str = ""):
    """Validate the output moment ``G = E[g g^T]`` of :func:`covsvd.orient` and return what orientation reads.

    Args:
        G: for ``metric="two-sided"``: a :class:`~covsvd.SecondMoment` of the layer's output gradients (from
            :func:`covsvd.capture_output_moments`; its ``d_in`` field is then the output width ``d_out``), a
            ``(d_out, d_out)`` symmetric tensor, or a ``(d_out,)`` diagonal ``E[g_i^2]``. For a one-sided metric:
            ``None``.
        metric, r, W_shape: as in :func:`moment_parts`; eps_output, eps_mode: the output side's damping.

    Returns:
        ``(matrix, diagonal, count)``: ``matrix`` ``(d_out, d_out)`` or ``None`` (a diagonal G), ``diagonal``
        ``(d_out,)`` or ``None`` (full G), ``count`` (SecondMoment only); all ``None`` for a one-sided metric.

    Raises:
        ValueError: ``output`` given for a one-sided metric or missing for a two-sided one; a G whose width is
            not ``d_out`` (an input moment or another layer's), fewer than ``r`` tokens, NaN/inf, a non-symmetric
            matrix, a bad ``eps_output``.
        TypeError: ``G`` of another type.
    """
    d_out = W_shape[0]
    if metric not in OUTPUT_METRICS:
        if G is not None:
            raise ValueError(f"{prefix}output= was given but metric={metric!r} weighs the input side only; use "
                             f"metric='two-sided' to weigh the output by G, or drop output=")
        return None, None, None
    resolve_eps(eps_output, eps_mode, 1.0)  # raises for a negative / non-finite eps_output
    if G is None:
        raise ValueError(f"{prefix}metric={metric!r} needs the output moment G of this layer: pass output= (from "
                         "covsvd.capture_output_moments(model, batches)), a (d_out, d_out) or a (d_out,) tensor")
    if isinstance(G, SecondMoment):
        if G.d_in != d_out:
            raise ValueError(f"{prefix}W has shape {W_shape} (d_out={d_out}) but the output moment has width "
                             f"{G.d_in}: pass the layer's output moment (capture_output_moments), not its input "
                             "moment or another layer's")
        if G.count < r:
            raise ValueError(f"{prefix}the output moment saw {G.count} token gradients, fewer than r={r}; add "
                             "calibration text (or lower r): G has rank < r")
        for key in ("sum_xx", "sum_x", "sum_abs"):
            check_finite(getattr(G, key), f"output SecondMoment.{key}", prefix)
        return (G.matrix() if G.kind == "full" else None), (G.diag() if G.kind == "diag" else None), G.count
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"{prefix}output is a {type(G).__name__}; expected covsvd.SecondMoment, a (d_out, d_out) "
                        "tensor or a (d_out,) tensor")
    G = G.detach()
    if G.dim() == 1:
        if G.shape[0] != d_out:
            raise ValueError(f"{prefix}W has shape {W_shape} but the diagonal output moment has shape "
                             f"{tuple(G.shape)}; expected ({d_out},)")
        check_finite(G, "output G", prefix)
        return None, G, None
    if G.dim() != 2 or tuple(G.shape) != (d_out, d_out):
        raise ValueError(f"{prefix}W has shape {W_shape} but the output moment G has shape {tuple(G.shape)}; "
                         f"expected ({d_out}, {d_out}) (or ({d_out},) for a diagonal G)")
    check_symmetric(G, "G", "the output second moment E[g g^T]", prefix)
    return G, None, None


def orient_options(W, r: int, metric: str, eps: float, eps_mode: str, components: str, solver: str,
                   compute_dtype: torch.dtype, storage_dtype: torch.dtype | None, svd: str, oversample: int,
                   power_iters: int, seed: int, prefix: str = "") -> torch.dtype:
    """Check every option of :func:`covsvd.orient` except the moment (:func:`moment_parts`); return the storage
    dtype (``storage_dtype``, or ``W.dtype`` when ``None``).

    Raises ``ValueError`` naming the option and the fix: an unknown metric / components / solver / eps_mode /
    svd; a negative or non-finite eps; a compute dtype other than float64 / float32; a non-floating storage
    dtype; a weight that is not a 2-D finite materialised float tensor; r outside ``[1, min(d_out, d_in)]``;
    ``oversample`` / ``power_iters`` / ``seed`` not non-negative ints; ``components="bottom"`` with
    ``svd="randomized"`` (a range finder finds the top directions only); and float32 products on a CUDA ``W``
    while TF32 matmuls are enabled (:func:`covsvd.util.checks.check_no_tf32`: the decompositions when
    ``compute_dtype`` is float32, the residual ``W - U S P`` whenever storage is not float64).
    """
    check_choice("metric", metric, ORIENT_METRICS, f"{prefix}unknown ")
    check_choice("components", components, COMPONENTS, prefix)
    check_choice("solver", solver, SOLVERS, prefix)
    check_choice("eps_mode", eps_mode, EPS_MODES, prefix)
    check_choice("svd", svd, SVDS, prefix)
    resolve_eps(eps, eps_mode, 1.0)  # raises for a negative / non-finite eps
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"{prefix}compute_dtype={compute_dtype}; decompositions run in float64 (default) or float32")
    d_out, d_in = check_weight(W, prefix)
    check_rank(r, d_out, d_in, prefix)
    storage = W.dtype if storage_dtype is None else storage_dtype
    if not (isinstance(storage, torch.dtype) and storage.is_floating_point):
        raise ValueError(f"{prefix}storage_dtype={storage_dtype} must be a floating torch dtype")
    for what, value in (("oversample", oversample), ("power_iters", power_iters), ("seed", seed)):
        check_count(what, value, 0, prefix)
    if svd == "randomized" and components == "bottom":
        raise ValueError(f"{prefix}components='bottom' needs the smallest singular directions of W T, which the "
                         "randomized range finder (svd='randomized') does not find: use svd='exact'")
    residual = torch.float64 if storage == torch.float64 else torch.float32
    check_no_tf32(W.device, (compute_dtype, residual), f"orient (W {tuple(W.shape)})",
                  "use compute_dtype=torch.float64 and storage_dtype=torch.float64", prefix)
    return storage
