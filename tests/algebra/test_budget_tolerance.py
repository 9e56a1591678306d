"""The absolute objective and the tolerance rule of covsvd.algebra.budget, against exhaustive enumeration:
optimal_ranks(objective="absolute") is the exact minimum of the summed unnormalised errors; tolerance_ranks is the
minimax allocation (the smallest max_l e_l(r_l) within the budget) with the componentwise smallest ranks; relative
ranks ignore a per-layer rescaling of the spectra and absolute ranks do not."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from covsvd.algebra.budget import (
    allocation_cost,
    allocation_error,
    allocation_tolerance,
    dropped_energy,
    optimal_ranks,
    ranks_at_tolerance,
    tolerance_ranks,
)

F64 = torch.float64
FAST = settings(max_examples=40, deadline=None, derandomize=True)  # the same examples on every run


def spectra_from(draw_vals):
    return {n: torch.tensor(sorted(v, reverse=True), dtype=F64) for n, v in draw_vals.items()}


@st.composite
def problems(draw):
    """2-3 layers, k <= 5 singular values each spread over 4 decades, costs 1-4, a budget between the forced
    minimum and everything."""
    n = draw(st.integers(2, 3))
    spectra, costs = {}, {}
    for i in range(n):
        k = draw(st.integers(1, 5))
        vals = draw(st.lists(st.integers(-8, 8), min_size=k, max_size=k))
        spectra[f"l{i}"] = torch.tensor(sorted((10 ** (v / 4) for v in vals), reverse=True), dtype=F64)
        costs[f"l{i}"] = draw(st.integers(1, 4))
    r_min = draw(st.integers(0, 1))
    r_max = draw(st.one_of(st.none(), st.integers(r_min + 1, 5)))
    r_max = None if r_max is not None and r_max > min(s.numel() for s in spectra.values()) else r_max
    forced = r_min * sum(costs.values())
    full = sum((r_max or s.numel()) * costs[k] for k, s in spectra.items())
    budget = draw(st.integers(forced, full))
    return spectra, costs, budget, r_min, r_max


def feasible(spectra, costs, budget, r_min, r_max):
    ranges = [range(r_min, (r_max or s.numel()) + 1) for s in spectra.values()]
    for combo in itertools.product(*ranges):
        ranks = dict(zip(spectra, combo, strict=True))
        if allocation_cost(ranks, costs) <= budget:
            yield ranks


@given(p=problems())
@example(p=({"a": torch.tensor([1.0, 1.0], dtype=F64), "b": torch.tensor([1.0, 1.0], dtype=F64)},
            {"a": 1, "b": 1}, 3, 0, None))  # ties between layers
@FAST
def test_absolute_optimum_is_the_exhaustive_minimum(p):
    spectra, costs, budget, r_min, r_max = p
    ranks = optimal_ranks(spectra, costs, budget, r_min, r_max, objective="absolute")
    assert allocation_cost(ranks, costs) <= budget
    best = min(allocation_error(r, spectra, "absolute") for r in feasible(spectra, costs, budget, r_min, r_max))
    got = allocation_error(ranks, spectra, "absolute")
    assert got <= best * (1 + 1e-12) + 1e-300  # fp64 sums of <= 15 non-negative terms


@given(p=problems())
@example(p=({"a": torch.tensor([2.0, 1.0, 0.5], dtype=F64), "b": torch.tensor([3.0, 0.1], dtype=F64)},
            {"a": 2, "b": 3}, 5, 1, None))
@example(p=({"l0": torch.tensor([1.0], dtype=F64), "l1": torch.tensor([1.0, 1.0], dtype=F64)},
            {"l0": 1, "l1": 3}, 4, 0, 1))  # a layer clipped at r_max by tau* (then tau* < the minimax value)
@FAST
def test_tolerance_rule_is_the_minimax_allocation_with_smallest_ranks(p):
    spectra, costs, budget, r_min, r_max = p
    for objective in ("relative", "absolute"):
        ranks = tolerance_ranks(spectra, costs, budget, r_min, r_max, objective=objective)
        assert allocation_cost(ranks, costs) <= budget
        drops = {n: dropped_energy(S, objective) for n, S in spectra.items()}
        hi = {n: r_max or S.numel() for n, S in spectra.items()}
        # tau* by its definition, a linear scan: the smallest candidate whose ranks fit the budget
        candidates = sorted({float(v) for n in spectra for v in drops[n][r_min : hi[n] + 1]})
        tau = next(t for t in candidates
                   if allocation_cost(ranks_at_tolerance(spectra, t, r_min, r_max, objective), costs) <= budget)
        # the rule's ranks are those of tau*: every layer meets it or is clipped at r_max
        assert ranks == ranks_at_tolerance(spectra, tau, r_min, r_max, objective)
        options = list(feasible(spectra, costs, budget, r_min, r_max))

        def worst(r, drops=drops):
            return max(float(drops[n][v]) for n, v in r.items())

        minimax = min(worst(r) for r in options)
        assert tau <= minimax  # any allocation within the budget has some layer at or above tau*
        if all(float(drops[n][r]) <= tau for n, r in ranks.items()):  # no layer clipped at r_max by tau*
            assert worst(ranks) == minimax == tau == allocation_tolerance(ranks, spectra, objective)
            for r in options:  # and no allocation meeting it uses fewer ranks in any layer
                if worst(r) <= minimax:
                    assert all(ranks[n] <= r[n] for n in r), (ranks, r)


def test_relative_ranks_ignore_a_rescaled_layer_and_absolute_ranks_do_not():
    base = {"a": torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64), "b": torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64)}
    scaled = {"a": base["a"] * 10.0, "b": base["b"]}
    costs = {"a": 1, "b": 1}
    for rule in (optimal_ranks, tolerance_ranks):
        assert rule(base, costs, 4, 0, None) == rule(scaled, costs, 4, 0, None)
        assert rule(scaled, costs, 4, 0, None, objective="absolute") == {"a": 4, "b": 0}  # the loud layer takes all
    # absolute errors in the objective's own units: the tail sums of S^2
    e = dropped_energy(base["a"], "absolute")
    assert e.tolist() == pytest.approx([14.25, 5.25, 1.25, 0.25, 0.0], rel=1e-15)
    assert allocation_error({"a": 1, "b": 2}, base, "absolute") == pytest.approx(5.25 + 1.25, rel=1e-15)


def test_absolute_accepts_a_zero_spectrum_and_relative_does_not():
    spectra = {"a": torch.zeros(3, dtype=F64), "b": torch.tensor([1.0, 0.1, 0.01], dtype=F64)}
    assert optimal_ranks(spectra, {"a": 1, "b": 1}, 3, 0, None, objective="absolute") == {"a": 0, "b": 3}
    assert tolerance_ranks(spectra, {"a": 1, "b": 1}, 3, 0, None, objective="absolute") == {"a": 0, "b": 3}
    with pytest.raises(ValueError, match="all 3 singular values are 0"):
        tolerance_ranks(spectra, {"a": 1, "b": 1}, 3, 0, None)


def test_tolerance_errors():
    spectra = {"a": torch.tensor([2.0, 1.0], dtype=F64), "b": torch.tensor([1.0, 0.5], dtype=F64)}
    with pytest.raises(ValueError, match="budget=1 is below the 2 parameters that r_min=1 costs"):
        tolerance_ranks(spectra, {"a": 1, "b": 1}, 1)
    with pytest.raises(ValueError, match="objective='squared'"):
        tolerance_ranks(spectra, {"a": 1, "b": 1}, 3, objective="squared")
    with pytest.raises(ValueError, match="tolerance=-1"):
        ranks_at_tolerance(spectra, -1)
    with pytest.raises(ValueError, match="tolerance=inf"):
        ranks_at_tolerance(spectra, math.inf)
    assert ranks_at_tolerance(spectra, 0.0, r_min=0) == {"a": 2, "b": 2}
    assert ranks_at_tolerance(spectra, 1.0, r_min=0) == {"a": 0, "b": 0}
