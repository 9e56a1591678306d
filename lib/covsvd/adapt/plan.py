"""The plan: which layers, with which weight, moment and rank, every one checked before anything runs.

:func:`plan_targets` is the first step of :func:`covsvd.attach_adapters`, :func:`covsvd.init_adapters`,
:func:`covsvd.export_peft` and :func:`covsvd.allocate_ranks`. It resolves the targets, then checks, for every
one of them and before any data runs or any module changes:

* the model holds no wrapped layers (peft's LoRA / tuner layers, or a layer that is another's ``base_layer``):
  covsvd decomposes plain weights, and a wrapped layer's weight is not what the model computes;
* the rank fits the layer (``1 <= r <= min(d_out, d_in)``);
* the weight is materialised, floating (not packed 4-bit / 8-bit storage) and finite;
* the layer is not an ``nn.MultiheadAttention.out_proj`` (MHA reads that weight directly) and its weight is
  not tied to another module's;
* the moment (when the metric needs one and it is given) fits the layer and the metric, and was captured
  on this model's weights (:func:`covsvd.data.fingerprint.check_same_model`; ``check_weights=False`` is the
  named override);
* for ``metric="two-sided"``, the output moment ``G`` (:func:`covsvd.capture_output_moments`) likewise: present,
  ``d_out`` wide, at least ``r`` token gradients, finite, captured on this model's weights; a one-sided metric
  given output moments raises (they would be ignored).

A :class:`Plan` keeps each target's original module, so that a failed attach or init puts back the very
objects it took out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..algebra.validate import FULL_METRICS, METRICS, OUTPUT_METRICS, moment_parts, output_parts
from ..capture.moments import SecondMoment
from ..data.fingerprint import check_same_model
from ..data.targets import find_targets, in_out_features, weight_matrix
from ..util.checks import check_choice, check_rank, check_weight
from .layer import BoundedGainLinear
from .quantized import check_not_quantized
from .registry import attached_identity


@dataclass
class Target:
    """One planned layer: ``W`` is ``(d_out, d_in)`` (a detached view of the module's weight, model dtype)."""

    name: str
    module: nn.Module
    W: torch.Tensor
    rank: int
    moment: object = None
    output: object = None  # two-sided: the output moment G (d_out wide); None for one-sided metrics
    training: bool = True  # the module's train/eval flag when planned (restored on the adapter)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.W.shape)

    def where(self) -> str:
        """``"layer 'name' (Linear W (d_out, d_in)): "``, the prefix of every error about this target."""
        return f"layer {self.name!r} ({shape_str(self.module)}): "


@dataclass
class Plan:
    """The checked targets of one call, in ``named_modules`` order, and the plain model's identity."""

    metric: str
    targets: dict[str, Target] = field(default_factory=dict)
    identity: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.targets)

    @property
    def ranks(self) -> dict[str, int]:
        return {n: t.rank for n, t in self.targets.items()}

    @property
    def training(self) -> dict[str, bool]:
        """Each target module's train/eval flag when it was planned."""
        return {n: t.training for n, t in self.targets.items()}


def shape_str(module: nn.Module) -> str:
    """``"Linear W (d_out, d_in)"``, for error messages."""
    d_out, d_in = in_out_features(module)
    return f"{type(module).__name__} W ({d_out}, {d_in})"


def check_unwrapped(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``model`` holds peft tuner layers or any layer wrapping a ``base_layer``."""
    for name, m in model.named_modules():
        wrapped = isinstance(getattr(m, "base_layer", None), nn.Module)
        if wrapped or type(m).__module__.startswith("peft.tuners"):
            raise ValueError(
                f"module {name!r} is a {type(m).__module__}.{type(m).__name__} (an adapter wrapping a base layer): "
                "covsvd decomposes plain weights. Pass the plain base model: the model before get_peft_model, or "
                "peft_model.merge_and_unload() (or .unload()) when its adapters are to be kept or dropped")


def layer_ranks(r, names: list[str]) -> dict[str, int]:
    """``{name: r}`` for every target from an int or a dict; raises naming missing / extra layers or bad ranks."""
    if isinstance(r, Mapping):
        missing = [n for n in names if n not in r]
        if missing:
            raise ValueError(f"r is a dict without an entry for {len(missing)} target layer(s): {missing[:5]}; "
                             "give every target a rank (with targets=None the dict's own layers are attached)")
        extra = [n for n in r if n not in names]
        if extra:
            raise ValueError(f"r has ranks for {len(extra)} layer(s) that are not targets: {extra[:5]}; drop "
                             "them from r or add them to targets")
        ranks = {n: r[n] for n in names}
    else:
        ranks = dict.fromkeys(names, r)
    for n, rn in ranks.items():
        if not isinstance(rn, int) or isinstance(rn, bool) or rn < 1:
            raise ValueError(f"layer {n!r}: r={rn!r} must be a positive int")
    return ranks


def resolve_targets(model: nn.Module, moments, r, metric: str, targets, deferred: bool = False) -> list[str]:
    """The target names: ``targets`` (a :func:`covsvd.find_targets` spec) when given, else the keys of ``r`` (a
    dict), else of ``moments``, else every Linear / Conv1D (``metric="identity"`` or ``deferred`` moments only).
    Raises ``ValueError`` when a chosen layer already carries a covsvd adapter."""
    if targets is None and isinstance(r, Mapping):
        targets = list(r)
    named = list(moments) if targets is None and moments else (
        [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple, set)) else [])
    attached = {n for n, m in model.named_modules() if isinstance(m, BoundedGainLinear)}
    done = [n for n in named if n in attached]
    if done:
        raise ValueError(f"layer(s) {done[:5]} already carry a covsvd adapter; detach_adapters(model) first "
                         "(or leave them out of targets)")
    if targets is not None:
        return find_targets(model, targets)
    if moments is not None:
        if not moments:
            raise ValueError("moments is empty: capture some targets first, or pass targets= with metric='identity'")
        return find_targets(model, list(moments))
    if metric != "identity" and not deferred:
        raise ValueError(f"metric={metric!r} needs moments (covsvd.capture_moments(model, batches)); "
                         "only metric='identity' can run without them")
    try:
        return find_targets(model, None)
    except ValueError:
        if attached:
            raise ValueError(f"every default target of {type(model).__name__} already carries a covsvd adapter "
                             f"({len(attached)} attached); detach_adapters(model) first") from None
        raise


def check_target(model: nn.Module, t: Target) -> None:
    """The structural checks of one target (module doc): rank, weight, MHA ``out_proj``. Changes nothing."""
    prefix = t.where()
    check_not_quantized(t.module, prefix)  # bitsandbytes Linear4bit / Linear8bitLt: packed storage
    check_rank(t.rank, *t.shape, prefix)
    check_weight(t.W, prefix)  # quantised (not floating) / meta / non-finite
    parent = t.name.rpartition(".")[0]
    if isinstance(model.get_submodule(parent) if parent else model, nn.MultiheadAttention):
        raise ValueError(f"{prefix}is the out_proj of an nn.MultiheadAttention, which reads out_proj.weight "
                         "directly: an adapter there would never run; leave it out of targets")


def check_tied(model: nn.Module, names: list[str]) -> None:
    """Raise ``ValueError`` naming the first target whose weight is shared with another module (tied)."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        module = model.get_submodule(name)
        shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(f"layer {name!r} ({shape_str(module)}) shares its weight with {shared} (tied "
                             "weights): an adapter would untie them; leave it out of targets "
                             "(e.g. targets=lambda n, m: n != " + repr(name) + ")")


def plan_targets(model: nn.Module, moments: Mapping | None, r, metric: str = "full", targets=None, *,
                 check_weights: bool = True, deferred: bool = False, output_moments: Mapping | None = None) -> Plan:
    """Resolve and check every target (module doc); returns the :class:`Plan`. Changes nothing.

    Args:
        model: the model (plain, or carrying covsvd adapters on other layers).
        moments: ``{name: SecondMoment}`` (or tensors); ``None`` for ``metric="identity"`` or ``deferred``.
        r: an int for every target, a ``{name: r}`` dict (its keys are then the default targets), or ``None``:
            each layer's full rank ``min(d_out, d_in)`` (what an allocation may reach).
        metric: one of :data:`covsvd.METRICS`.
        targets: a :func:`covsvd.find_targets` spec (default: the keys of ``r``, else of ``moments``).
        check_weights: moments must come from this model's weights (not only its architecture).
        deferred: the moments will be captured later (:func:`covsvd.init_adapters`): their checks wait for
            :func:`check_moments` (and :func:`check_output_moments`); everything else is checked now.
        output_moments: ``{name: SecondMoment}`` of the targets' output gradients
            (:func:`covsvd.capture_output_moments`), or ``(d_out, d_out)`` / ``(d_out,)`` tensors: required for
            ``metric="two-sided"`` (unless ``deferred``), refused for the one-sided metrics.

    Raises:
        ValueError: naming the layer, its shape and the fix (module doc).
    """
    check_choice("metric", metric, METRICS, "unknown ")
    if output_moments is not None and metric not in OUTPUT_METRICS:
        raise ValueError(f"output_moments were given but metric={metric!r} weighs the input side only: use "
                         "metric='two-sided' to weigh the outputs by them, or drop output_moments")
    check_unwrapped(model)
    names = resolve_targets(model, moments, r, metric, targets, deferred)
    if r is None:
        ranks = {n: min(in_out_features(model.get_submodule(n))) for n in names}
    else:
        ranks = layer_ranks(r, names)
    plan = Plan(metric, identity=attached_identity(model))
    for name in names:
        module = model.get_submodule(name)
        plan.targets[name] = t = Target(name, module, weight_matrix(module).detach(), ranks[name],
                                        training=module.training)
        check_target(model, t)
    check_tied(model, names)
    if not deferred:
        check_moments(plan, moments, check_weights=check_weights)
        check_output_moments(plan, output_moments, check_weights=check_weights)
    return plan


def check_moments(plan: Plan, moments: Mapping | None, names: list[str] | None = None, *,
                  check_weights: bool = True) -> None:
    """Check the moments of ``names`` (default: every target) for the plan's metric and store them on the
    targets: present unless the metric is ``identity``, fitting the layer and the metric
    (:func:`covsvd.algebra.validate.moment_parts`: shape, ``count >= r``, finite, kind), captured on the plan's
    model (a :class:`SecondMoment`'s recorded identity). Raises ``ValueError`` naming the layer and the fix."""
    metric = plan.metric
    for name in plan.names if names is None else names:
        t = plan.targets[name]
        C = None if metric == "identity" or moments is None else moments.get(name)
        if C is None and metric != "identity":
            raise ValueError(f"{t.where()}metric={metric!r} needs a second moment and moments has no entry for it; "
                             f"capture it (covsvd.capture_moments(model, batches, targets=[{name!r}, ...])) or "
                             "leave the layer out of targets")
        if isinstance(C, SecondMoment) and C.model is not None:
            check_same_model(C.model, plan.identity, f"{t.where()}its moment",
                             "capture the moments on this model (covsvd.capture_moments(model, batches))",
                             check_weights)
        if C is not None:
            moment_parts(C, metric, t.rank, t.shape, t.where())
        t.moment = C


def check_output_moments(plan: Plan, output_moments: Mapping | None, names: list[str] | None = None, *,
                         check_weights: bool = True) -> None:
    """For a two-sided plan: check the output moment of each of ``names`` (default: every target) and store it on
    the target (:func:`covsvd.algebra.validate.output_parts`: present, ``d_out`` wide, ``count >= r``, finite,
    symmetric), captured on the plan's model (a :class:`SecondMoment`'s recorded identity). A one-sided plan
    stores nothing. Raises ``ValueError`` naming the layer and the fix."""
    if plan.metric not in OUTPUT_METRICS:
        return
    for name in plan.names if names is None else names:
        t = plan.targets[name]
        G = None if output_moments is None else output_moments.get(name)
        if G is None:
            raise ValueError(f"{t.where()}metric={plan.metric!r} needs the layer's output moment and output_moments "
                             f"has {'no entry for it' if output_moments is not None else 'not been given'}: capture "
                             f"it (covsvd.capture_output_moments(model, batches, targets=[{name!r}, ...])) and pass "
                             "output_moments=, or leave the layer out of targets")
        if isinstance(G, SecondMoment) and G.model is not None:
            check_same_model(G.model, plan.identity, f"{t.where()}its output moment",
                             "capture the output moments on this model (covsvd.capture_output_moments(model, "
                             "batches))", check_weights)
        output_parts(G, plan.metric, t.rank, t.shape, 0.0, "absolute", t.where())  # eps_output is orient's check
        t.output = G


def capture_kind(metric: str, kind: str | None = None) -> str:
    """The capture kind a metric needs: ``"full"`` for the metrics that read the whole ``C`` (full, corda) and for
    ``two-sided`` (its optimum whitens the input by the full ``C``; an explicit ``kind="diag"`` is accepted there
    and gives the diagonal-C two-sided metric), else ``"diag"``; an explicit ``kind`` is checked against the
    metric (``ValueError`` for ``diag`` with full / corda)."""
    check_choice("metric", metric, METRICS, "unknown ")
    kind = kind or ("full" if metric in FULL_METRICS + OUTPUT_METRICS else "diag")
    if metric in FULL_METRICS and kind != "full":
        raise ValueError(f"metric={metric!r} needs the full (d_in, d_in) moments; kind={kind!r} keeps the diagonal "
                         "only: pass kind='full' (or kind=None)")
    return kind

