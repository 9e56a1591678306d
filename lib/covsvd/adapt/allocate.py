"""Per-layer ranks under a parameter budget: which layers get more of a fixed number of trainable parameters.

Every layer l has the singular values ``S_l`` (fp64, descending) of its metric's ``W T``
(:mod:`covsvd.algebra.orient`: ``T = M^{1/2}`` for ``full``, ``M`` for ``corda``, ``I`` for ``identity``, ...). Keeping
rank r drops the energy ``e_l(r) = sum_{i >= r} S_{l,i}^2 / sum_i S_{l,i}^2``: for ``full`` that is the
squared relative functional error ``||(W - U_r S_r P_r) M^{1/2}||_F^2 / ||W M^{1/2}||_F^2`` of the rank-r
orientation (docs/algebra.md, "Eckart-Young under the metric"; ``orient``'s ``info["rel_error"] ** 2``), for
the other metrics the same quantity under their own norm. A rank costs ``c_l`` parameters (:data:`COSTS`):
``"lora"`` ``d_in + d_out`` (a LoRA factor pair per rank), ``"gain"`` 1 (the bounded-gain adapter's ``g``).

Rules (:data:`RULES`): ``"optimal"`` (exact; the argument is in :mod:`covsvd.algebra.budget`), ``"threshold"``
(EVA-like) and ``"tolerance"`` (PGSVD-like: the smallest error tolerance common to every layer whose ranks fit the
budget), all pure functions of the spectra and costs in :mod:`covsvd.algebra.budget`. Objectives
(``objective=``): ``"relative"`` (the per-layer squared relative errors above) or ``"absolute"`` (their
unnormalised tails ``sum_{i >= r} S_{l,i}^2``: under ``metric="two-sided"`` the estimated change of the loss or
output, in the same units in every layer; docs/algebra.md, "The output side").

The pure part (spectra and costs in, ranks out; no modules): :func:`metric_spectrum`, :func:`dropped_energy`,
:func:`rank_costs`, :func:`optimal_ranks`, :func:`threshold_ranks`, :func:`allocation_cost`,
:func:`allocation_error`. The model-facing part: :func:`layer_spectra` and :func:`allocate_ranks`, whose
``{name: r}`` goes straight to ``covsvd.attach_adapters(model, moments, r=ranks)`` (or ``export_peft``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algebra.budget import (
    COSTS,
    OBJECTIVES,
    RULES,
    allocation_cost,
    check_rank_bounds,
    optimal_ranks,
    rank_costs,
    threshold_ranks,
    tolerance_ranks,
)
from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.orient import metric_factor, output_factor, right_factor
from ..algebra.validate import METRICS, moment_parts, output_parts
from ..util.checks import check_choice, check_count, check_weight, where
from .plan import plan_targets

F64 = torch.float64

__all__ = ["allocate_ranks", "layer_spectra", "metric_spectrum"]


# ------------------------------------------------------------------------------------------ spectra


def metric_spectrum(
    W: torch.Tensor,
    C,
    metric: str = "full",
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    *,
    solver: str = "cholesky",
    alpha: float = 0.5,
    name: str | None = None,
    output=None,
    eps_output: float = DEFAULT_EPS,
) -> torch.Tensor:
    """All ``k = min(d_out, d_in)`` singular values of ``W T`` for ``metric``, fp64, descending: ``(k,)``.

    The same ``W T`` :func:`covsvd.orient` decomposes (its :func:`~covsvd.algebra.orient.metric_factor`,
    :func:`~covsvd.algebra.orient.output_factor` and :func:`~covsvd.algebra.orient.right_factor`, every step in
    fp64), so ``S[:r]`` are orient's ``S`` at rank r; for ``two-sided`` that is ``K^T W F`` with ``K K^T = G +
    eps_output I`` (``output`` required there, refused otherwise). ``W (d_out, d_in)``, ``C``, ``output`` and the
    keyword arguments as in :func:`covsvd.orient`. Raises ``ValueError`` as orient does (a moment that does not
    fit, non-finite values, an unknown metric), naming ``name``.
    """
    prefix = where(name)
    check_choice("metric", metric, METRICS, f"{prefix}unknown ")
    d_out, d_in = check_weight(W, prefix)
    mat, dg, mabs, _ = moment_parts(C, metric, 1, (d_out, d_in), prefix)
    gmat, gdg, _ = output_parts(output, metric, 1, (d_out, d_in), eps_output, eps_mode, prefix)
    with torch.no_grad():
        mat, dg, mabs, gmat, gdg = (None if t is None else t.detach().to(F64) for t in (mat, dg, mabs, gmat, gdg))
        own = metric_factor(metric, mat, dg, mabs, eps, eps_mode, solver, alpha, F64, name)
        out = output_factor(gmat, gdg, eps_output, eps_mode, solver, F64, name)
        return torch.linalg.svdvals(right_factor(W.detach().to(F64), own, metric, out))  # (k,) fp64



# -------------------------------------------------------------------------------------- model-facing


def _checked_layers(model, moments, metric: str, targets, r_min: int, r_max: int | None,
                    check_weights: bool, output_moments=None) -> dict:
    """``{name: (W (d_out, d_in), C, G)}`` for every target, each checked before any decomposition runs
    (:func:`covsvd.adapt.plan.plan_targets` at rank ``r_max``, or each layer's ``k = min(d_out, d_in)``: the
    moments present, fitting, finite and holding enough tokens for the largest rank allowed; ``G`` the output
    moment, ``None`` for a one-sided metric)."""
    plan = plan_targets(model, moments, r_max, metric, targets, check_weights=check_weights,
                        output_moments=output_moments)
    for t in plan.targets.values():
        if r_min > min(t.shape):
            raise ValueError(f"{t.where()}r_min={r_min} beyond min(d_out, d_in) = {min(t.shape)}; lower r_min or "
                             "leave the layer out of targets")
    return {n: (t.W, t.moment, t.output) for n, t in plan.targets.items()}


def _spectra(layers: dict, metric: str, eps: float, eps_mode: str, solver: str, alpha: float,
             progress: bool, eps_output: float = DEFAULT_EPS) -> dict[str, torch.Tensor]:
    bar = tqdm(layers.items(), desc=f"spectra ({metric})", disable=not progress, leave=False)
    return {name: metric_spectrum(W, C, metric, eps, eps_mode, solver=solver, alpha=alpha, name=name, output=G,
                                  eps_output=eps_output)
            for name, (W, C, G) in bar}


def layer_spectra(
    model: nn.Module,
    moments: Mapping | None,
    metric: str = "full",
    *,
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    solver: str = "cholesky",
    alpha: float = 0.5,
    targets=None,
    progress: bool = True,
    check_weights: bool = True,
    output_moments: Mapping | None = None,
    eps_output: float = DEFAULT_EPS,
) -> dict[str, torch.Tensor]:
    """``{name: metric_spectrum(W, moments[name], metric, ...)}`` (``(k,)`` fp64, descending) for every target.

    ``targets``: a :func:`covsvd.find_targets` spec; default the keys of ``moments`` (every Linear / Conv1D
    for ``metric="identity"`` without moments). ``output_moments``, ``eps_output``: ``metric="two-sided"`` only
    (as :func:`covsvd.attach_adapters`). Every layer is validated before the first decomposition (as
    :func:`metric_spectrum` would, naming it); the model is only read. ``progress``: a tqdm bar over layers.
    """
    check_choice("metric", metric, METRICS, "unknown ")
    layers = _checked_layers(model, moments, metric, targets, 1, 1, check_weights, output_moments)
    return _spectra(layers, metric, eps, eps_mode, solver, alpha, progress, eps_output)


def allocate_ranks(
    model: nn.Module,
    moments: Mapping | None,
    budget: int | None,
    metric: str = "full",
    cost: str = "lora",
    r_min: int = 1,
    r_max: int | None = None,
    rule: str = "optimal",
    *,
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
    energy: float = 0.9,
    targets=None,
    solver: str = "cholesky",
    alpha: float = 0.5,
    progress: bool = True,
    check_weights: bool = True,
    objective: str = "relative",
    output_moments: Mapping | None = None,
    eps_output: float = DEFAULT_EPS,
) -> dict[str, int]:
    """``{name: r}`` for every target: how to spread ``budget`` trainable parameters over the layers.

    Args:
        model: any module with ``nn.Linear`` / transformers ``Conv1D`` targets (only read).
        moments: ``{name: SecondMoment}`` (:func:`covsvd.capture_moments`); ``None`` for ``metric="identity"``.
        budget: trainable parameters (an int); for ``rule="threshold"`` an upper bound that is checked, or
            ``None``.
        metric, eps, eps_mode, solver, alpha: the orientation whose spectrum is allocated over (as in
            :func:`covsvd.orient` / :func:`covsvd.attach_adapters`; decompositions in fp64).
        cost: ``"lora"`` (a rank costs ``d_in + d_out``) or ``"gain"`` (1: the bounded-gain adapter's ``g``).
        r_min, r_max: bounds on every layer's rank; ``r_min >= 1`` (an adapter needs a rank), ``r_max <= k``
            of every layer (``None``: each layer's ``k = min(d_out, d_in)``).
        rule: ``"optimal"`` (exact minimum of the summed objective within the budget), ``"threshold"``
            (smallest r keeping ``energy`` of each layer's spectrum; ``objective`` does not enter) or
            ``"tolerance"`` (the smallest common per-layer error tolerance whose ranks fit the budget); module
            docstring and :mod:`covsvd.algebra.budget`.
        targets: a :func:`covsvd.find_targets` spec (default: the keys of ``moments``).
        progress: a tqdm bar over layers.
        check_weights: the moments must come from this model's weights (the named override).
        objective: ``"relative"`` (each layer's squared relative error) or ``"absolute"`` (its unnormalised
            squared error: commensurable across layers under ``metric="two-sided"``).
        output_moments, eps_output: ``metric="two-sided"`` only (required there): the targets' output moments
            (:func:`covsvd.capture_output_moments`) and their damping, as in :func:`covsvd.attach_adapters`.

    A budget above what every layer at its largest rank costs is capped there. Every target is validated
    before any decomposition: its moments must exist, fit, be finite and hold at least ``r_max`` (or k) tokens,
    as :func:`covsvd.attach_adapters` will require of the ranks.

    Raises:
        ValueError: unknown ``cost`` / ``rule`` / ``metric`` / ``objective``; ``budget`` below what ``r_min``
            costs over all targets; ``r_max`` beyond a layer's ``min(d_out, d_in)`` (naming it); a threshold
            allocation over ``budget``; any moment problem (naming the layer and the fix).
    """
    check_choice("cost", cost, COSTS, "unknown ")
    check_choice("rule", rule, RULES, "unknown ")
    check_choice("metric", metric, METRICS, "unknown ")
    check_choice("objective", objective, OBJECTIVES, "unknown ")
    check_rank_bounds(r_min, r_max, 1)  # attach_adapters needs r >= 1 in every layer
    if rule != "threshold" or budget is not None:
        check_count("budget", budget, 0)
    layers = _checked_layers(model, moments, metric, targets, r_min, r_max, check_weights, output_moments)
    costs = rank_costs({n: tuple(W.shape) for n, (W, _, _) in layers.items()}, cost)
    if rule != "threshold":  # fail on the budget before the decompositions
        forced = r_min * sum(costs.values())
        if forced > budget:
            raise ValueError(f"budget={budget} is below the {forced} parameters that r_min={r_min} costs over "
                             f"{len(costs)} layers (cost={cost!r}); raise the budget or lower r_min")
        full = sum(costs[n] * (r_max or min(W.shape)) for n, (W, _, _) in layers.items())
        budget = min(budget, full)  # more than every layer at its largest rank buys nothing
    spectra = _spectra(layers, metric, eps, eps_mode, solver, alpha, progress, eps_output)
    if rule == "optimal":
        return optimal_ranks(spectra, costs, budget, r_min, r_max, objective=objective)
    if rule == "tolerance":
        return tolerance_ranks(spectra, costs, budget, r_min, r_max, objective=objective)
    ranks = threshold_ranks(spectra, energy, r_min, r_max)
    spent = allocation_cost(ranks, costs)
    if budget is not None and spent > budget:
        raise ValueError(f"rule='threshold' at energy={energy} needs {spent} parameters (cost={cost!r}), over "
                         f"budget={budget}; lower energy, raise the budget, or use rule='optimal'")
    return ranks
