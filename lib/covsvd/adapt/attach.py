"""Attaching and detaching bounded-gain adapters on a model.

* :func:`attach_adapters`: the plan (:func:`covsvd.adapt.plan.plan_targets`: every target checked), then every
  target oriented (:func:`covsvd.orient`, pure tensors) and its adapter built, and only then all modules
  swapped in (:func:`covsvd.adapt.registry.install`). Any error leaves the model exactly as it was.
* :func:`detach_adapters` puts plain ``nn.Linear`` / ``Conv1D`` modules back with ``W = W_res + U S P``
  (or the trained, merged weight with ``merge=True``), each with the train/eval flag of the module it replaced.
* :func:`disable_adapters`: a context manager under which every adapter computes the original layer.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.measures import identity_error, max_relative_error
from ..algebra.orient import Oriented, orient
from ..algebra.rotation import a_limit, block_sizes
from ..data.targets import weight_matrix
from ..util.digest import sampled_digest
from .layer import BoundedGainLinear, rotate_arm
from .plan import Plan, Target, plan_targets
from .registry import adapters, install, release, set_module, training_flag
from .report import AttachReport, layer_row, plain, rank_str, settings_record
from .sufficiency import check_sufficient


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (after :func:`attach_adapters`: ``g`` and rotations)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable tensors (``g``, rotation ``theta``), for an optimizer."""
    return [p for m in adapters(model).values() for p in m.parameters()]


def adapter_options(coeff: float, rotate: str | None, block_size: int, max_angle: float,
                    dtype: torch.dtype | None) -> dict:
    """The checked settings of :class:`BoundedGainLinear` (and the factors' storage dtype, fp32 by default).
    Raises ``ValueError`` naming the option."""
    rotate = rotate_arm(rotate)
    a_limit(max_angle)
    block_sizes(1, block_size)  # checks block_size (each rank is checked against its layer by the plan)
    if not math.isfinite(float(coeff)):
        raise ValueError(f"coeff={coeff!r} must be finite")
    storage = torch.float32 if dtype is None else dtype
    if not (isinstance(storage, torch.dtype) and storage.is_floating_point):
        raise ValueError(f"dtype={dtype!r} must be a floating dtype (storage of U, S, P)")
    return dict(coeff=coeff, rotate=rotate, block_size=block_size, max_angle=max_angle, dtype=storage)


#: What every covsvd entry point passes to orient itself (never taken from ``**orient_kwargs``).
_SET_BY_CALLER = ("W", "C", "r", "metric", "eps", "eps_mode", "name", "output")


def check_orient_kwargs(kwargs: dict, where: str) -> None:
    """Raise ``TypeError`` before anything runs for a keyword :func:`covsvd.orient` does not take, naming the
    capture option it may be meant as (``capture={...}``) or orient's keywords."""
    import inspect

    from ..capture.options import CaptureOptions

    valid = [k for k in inspect.signature(orient).parameters if k not in _SET_BY_CALLER]
    unknown = sorted(set(kwargs) - set(valid))
    if not unknown:
        return
    capture = [k for k in unknown if k in CaptureOptions.__dataclass_fields__]
    hint = (f"{capture} are capture options: pass capture={{{capture[0]!r}: ...}}" if capture and
            where == "init_adapters" else f"orient's keywords are {valid}")
    raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}: {hint}")


def orient_target(t: Target, metric: str, eps: float, eps_mode: str, storage: torch.dtype,
                  **orient_kwargs) -> Oriented:
    """:func:`covsvd.orient` of one planned target (two-sided: ``output=`` its output moment, ``eps_output`` from
    ``orient_kwargs``); an error is re-raised naming the layer, its shape, the rank and the metric (``ValueError``
    stays ``ValueError``, anything else becomes ``RuntimeError``)."""
    try:
        return orient(t.W, t.moment, t.rank, metric=metric, eps=eps, eps_mode=eps_mode, name=t.name,
                      storage_dtype=storage, output=t.output, **orient_kwargs)
    except Exception as e:
        msg = f"orient failed for {t.where()}r={t.rank}, metric={metric!r}: {e}"
        raise (ValueError(msg) if isinstance(e, ValueError) else RuntimeError(msg)) from e


def build_adapter(t: Target, metric: str, eps: float, eps_mode: str, options: dict,
                  orient_kwargs: dict) -> tuple[BoundedGainLinear, dict, dict]:
    """Orient ``t`` and build its adapter: ``(adapter, report row, orient's info)``. Changes no module."""
    start = time.perf_counter()
    storage = options["dtype"]
    o = orient_target(t, metric, eps, eps_mode, storage, **orient_kwargs)
    info, dev = dict(o.info), t.W.device
    # eps: the absolute eps used (the pair reads on its own); eps_arg, eps_mode_arg: what was asked for
    config = dict(metric=metric, eps=info["eps"], eps_mode="absolute", eps_arg=info["eps_arg"], eps_mode_arg=eps_mode,
                  components=info["components"], storage=plain(storage),
                  base_digest=sampled_digest(t.module.weight))
    if "eps_output" in info:  # two-sided: the absolute damping of G used, and what was asked for
        config.update(eps_output=info["eps_output"], eps_output_arg=info["eps_output_arg"])
    adapter = BoundedGainLinear(
        o.U.to(dev), o.S.to(dev), o.P.to(dev), o.W_res.to(dev), getattr(t.module, "bias", None),
        coeff=options["coeff"], rotate=options["rotate"], block_size=options["block_size"],
        max_angle=options["max_angle"], layout=layout(t.module), base_dtype=t.W.dtype, config=config)
    ident = identity_error(t.W, adapter.U, adapter.S, adapter.P, adapter.W_res)
    restore = max_relative_error(adapter.dense_weight(trained=False), t.W)  # what detach will install
    adapter.config.update(identity_error=ident, restore_error=restore)
    row = layer_row(t.name, t.W, t.rank, metric, info, ident, restore_error=restore,
                    init_s=time.perf_counter() - start, trainable=sum(p.numel() for p in adapter.parameters()))
    return adapter, row, info


def layout(module: nn.Module) -> str:
    """``"linear"`` or ``"conv1d"``: which plain module a target is."""
    return "linear" if isinstance(module, nn.Linear) else "conv1d"


def build_adapters(plan: Plan, names: list[str], eps: float, eps_mode: str, options: dict, orient_kwargs: dict,
                   progress: bool) -> tuple[dict[str, BoundedGainLinear], AttachReport]:
    """Orient and build the adapters of ``names`` (planned, moments checked), none installed."""
    metric = plan.metric
    ranks = {n: plan.targets[n].rank for n in names}
    r = ranks if len(set(ranks.values())) != 1 else next(iter(ranks.values()))
    report = AttachReport(settings=settings_record(metric=metric, r=r, eps=eps, eps_mode=eps_mode, **options,
                                                   **orient_kwargs))
    built = {}
    bar = tqdm(names, desc=f"orient ({metric}, r={rank_str(report.settings['r'])})", disable=not progress,
               leave=False)
    for name in bar:
        built[name], row, info = build_adapter(plan.targets[name], metric, eps, eps_mode, options, orient_kwargs)
        report.rows.append(row)
        report.info[name] = info
    return built, report


def attach_adapters(
    model: nn.Module,
    moments: dict | None,
    r: int | dict[str, int],
    metric: str = "full",
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    coeff: float = 1.0,
    rotate: str | None = None,
    block_size: int = 4,
    max_angle: float = 0.5,
    dtype: torch.dtype | None = None,
    targets=None,
    progress: bool = True,
    *,
    check_weights: bool = True,
    output_moments: dict | None = None,
    **orient_kwargs,
) -> AttachReport:
    """Replace each target with a :class:`BoundedGainLinear` oriented by ``metric``; freeze the rest.

    Args:
        model: any module with ``nn.Linear`` / transformers ``Conv1D`` targets (no peft or other wrapped layers).
        moments: ``{module name: SecondMoment}`` from :func:`covsvd.capture_moments` (a ``(d_in, d_in)`` or
            ``(d_in,)`` tensor is accepted too, but carries no token count and no model identity). ``None`` is
            allowed for ``metric="identity"`` (PiSSA: the plain top-r SVD).
        r: rank kept per layer, ``1 <= r <= min(d_out, d_in)``: one int for every layer, or a ``{name: r}``
            dict (e.g. from :func:`covsvd.allocate_ranks`); its keys are then the default targets.
        metric, eps, eps_mode, **orient_kwargs: passed to :func:`covsvd.orient` (``components``, ``solver``,
            ``alpha``, ``compute_dtype``: every decomposition runs in fp64 by default). ``metric="full"`` is the
            default of every covsvd entry point: the Eckart-Young optimum of the layer's output error on the
            calibration data.
        coeff, rotate, block_size, max_angle: the adapter (:class:`BoundedGainLinear`).
        dtype: storage dtype of ``U, S, P`` (``None``: fp32, whatever the model's dtype). ``W_res`` is fp32
            (fp64 for fp64 storage), formed by orient from the *rounded* factors, so ``W_res + U S P``
            reproduces ``W`` to fp32 rounding even with bf16 factors.
        targets: a :func:`covsvd.find_targets` spec; default: the keys of ``r`` (a dict), else of ``moments``,
            else every Linear / Conv1D (``moments`` ``None``).
        progress: a tqdm bar over layers.
        check_weights: the moments must have been captured on this model's weights (their recorded
            fingerprint); ``False`` accepts moments of another checkpoint of the same architecture.
        output_moments: ``metric="two-sided"`` only (and required there): ``{name: SecondMoment}`` of each
            target's output gradients (:func:`covsvd.capture_output_moments`), checked like ``moments``
            (:func:`covsvd.adapt.plan.check_output_moments`); its damping is ``eps_output`` (an orient keyword).
            ``U`` is then ``G``-orthonormal, not orthonormal; the adapter and its guarantees are unchanged.

    Every target is checked before anything changes (:func:`covsvd.adapt.plan.plan_targets`); then all are
    oriented; only then are the modules swapped (each adapter takes its module's train/eval flag) and every
    non-adapter parameter frozen (the previous flags come back on :func:`detach_adapters`). On any error the
    model is untouched. One :class:`covsvd.InsufficientCalibrationWarning` names the layers whose full moment
    saw fewer tokens than ``d_in``.

    Returns:
        :class:`AttachReport`.
    """
    options = adapter_options(coeff, rotate, block_size, max_angle, dtype)
    check_orient_kwargs(orient_kwargs, "attach_adapters")
    plan = plan_targets(model, moments, r, metric, targets, check_weights=check_weights,
                        output_moments=output_moments)
    warn_insufficient(plan, stacklevel=3)
    built, report = build_adapters(plan, plan.names, eps, eps_mode, options, orient_kwargs, progress)
    report.settings["r"] = dict(plan.ranks) if isinstance(r, dict) else r
    install(model, built, plan.identity, plan.training)
    return report


def warn_insufficient(plan: Plan, names: list[str] | None = None, stacklevel: int = 3) -> None:
    """One :class:`covsvd.InsufficientCalibrationWarning` naming every planned layer whose moment is rank
    deficient (``count < d_in``)."""
    from ..capture.moments import SecondMoment

    held = {n: plan.targets[n].moment for n in (plan.names if names is None else names)}
    check_sufficient({n: m for n, m in held.items() if isinstance(m, SecondMoment)}, plan.metric,
                     stacklevel=stacklevel + 1)


def detach_adapters(model: nn.Module, merge: bool = False) -> dict[str, float]:
    """Replace every adapter by a plain ``nn.Linear`` / ``Conv1D``; restore the ``requires_grad`` flags and each
    module's train/eval flag.

    ``merge=False`` installs ``W = W_res + U S P`` (fp64 sum, rounded once to the model's dtype): the
    original weight up to rounding. ``merge=True`` installs the trained weight
    ``W_res + U_eff diag(S_eff) P_eff`` instead.

    Returns ``{name: error}``. With ``merge=False`` the error is ``max|W_restored - W_original| / max|W_original|``
    as measured at attach time by the identical computation (the original weight is not kept, so this
    is the deterministic reconstruction checked once, when both existed). With ``merge=True`` it is
    ``max|W_merged - W_restored| / max|W_restored|``: how far training moved the layer.
    """
    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached (nothing to detach)")
    out = {}
    for name, adapter in found.items():
        plain = adapter.to_plain(merge=merge)
        plain.train(training_flag(model, name, adapter.training))
        if merge:
            out[name] = max_relative_error(weight_matrix(plain), adapter.dense_weight(trained=False))
        else:
            out[name] = float(adapter.config.get("restore_error", float("nan")))
        set_module(model, name, plain)
    release(model)
    return out


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every adapter computes its original layer ``W_res + U diag(S) P`` (no gain, no
    rotation): the model's original outputs up to rounding, as peft's ``disable_adapter()``. Restored on exit,
    also after an error. Raises ``ValueError`` when ``model`` carries no covsvd adapters."""
    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached (nothing to disable)")
    before = {name: m.disabled for name, m in found.items()}
    for m in found.values():
        m.disabled = True
    try:
        yield model
    finally:
        for name, m in found.items():
            m.disabled = before[name]
