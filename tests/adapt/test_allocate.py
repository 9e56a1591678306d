"""Per-layer ranks under a budget: the exact optimum against exhaustive search, the threshold rule, the spectra
against orient, the model-facing wrapper and its errors."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import covsvd
from covsvd.adapt.allocate import allocate_ranks, layer_spectra, metric_spectrum
from covsvd.algebra.budget import (
    allocation_cost,
    allocation_error,
    dropped_energy,
    optimal_ranks,
    rank_costs,
    threshold_ranks,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices: see conftest.one_thread

F64 = torch.float64


def spectrum_from_gammas(gammas) -> torch.Tensor:
    """Singular values whose normalised squares are ``gammas`` (descending)."""
    return torch.tensor(gammas, dtype=F64).sqrt()


def exhaustive(spectra, costs, budget, r_min, r_max):
    """The smallest summed dropped energy over every rank vector within the budget (brute force)."""
    names = list(spectra)
    ranges = [range(r_min, (spectra[n].numel() if r_max is None else r_max) + 1) for n in names]
    best = math.inf
    for rs in itertools.product(*ranges):
        ranks = dict(zip(names, rs, strict=True))
        if allocation_cost(ranks, costs) <= budget:
            best = min(best, allocation_error(ranks, spectra))
    return best


# ----------------------------------------------------------------------------------------------- pure part

values = st.one_of(st.just(0.0), st.floats(0.01, 10.0))  # zeros and ties make ties in the objective


@st.composite
def cases(draw):
    spectra, costs = {}, {}
    for i in range(3):
        k = draw(st.integers(1, 5))
        s = sorted(draw(st.lists(values, min_size=k, max_size=k)), reverse=True)
        if s[0] == 0.0:
            s[0] = 1.0  # a layer must have some energy
        spectra[f"layer{i}"] = torch.tensor(s, dtype=F64)
        costs[f"layer{i}"] = draw(st.integers(1, 7))
    r_min = draw(st.integers(0, 1))
    k_min = min(s.numel() for s in spectra.values())
    r_max = draw(st.one_of(st.none(), st.integers(r_min, k_min)))
    forced = r_min * sum(costs.values())
    budget = draw(st.integers(forced, forced + 40))
    return spectra, costs, budget, r_min, r_max


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_optimal_matches_exhaustive_search_on_three_layers(case):
    spectra, costs, budget, r_min, r_max = case
    ranks = optimal_ranks(spectra, costs, budget, r_min, r_max)
    assert list(ranks) == list(spectra)
    hi = {n: s.numel() if r_max is None else r_max for n, s in spectra.items()}
    assert all(r_min <= ranks[n] <= hi[n] for n in spectra)
    spent = allocation_cost(ranks, costs)
    assert spent <= budget  # the budget is respected
    assert all(ranks[n] == hi[n] or costs[n] > budget - spent for n in spectra)  # within one rank step of it
    assert allocation_error(ranks, spectra) <= exhaustive(spectra, costs, budget, r_min, r_max) + 1e-12


def test_greedy_by_ratio_is_not_enough_with_unequal_costs():
    # greedy by gamma / cost takes A's first rank (0.6 / 3 = 0.2 > 0.35 / 2) and then nothing fits in the 1
    # left; the optimum spends the 4 on two ranks of B: 0.7 of B's energy against 0.6 of A's
    spectra = {"A": spectrum_from_gammas([0.6, 0.4]), "B": spectrum_from_gammas([0.35, 0.35, 0.3])}
    ranks = optimal_ranks(spectra, {"A": 3, "B": 2}, budget=4, r_min=0)
    assert ranks == {"A": 0, "B": 2}
    assert allocation_error(ranks, spectra) == pytest.approx(1.0 + 0.3)


def test_equal_costs_take_the_largest_gammas():
    g = torch.Generator().manual_seed(0)
    spectra = {f"l{i}": torch.rand(6, generator=g, dtype=F64).sort(descending=True).values for i in range(4)}
    ranks = optimal_ranks(spectra, dict.fromkeys(spectra, 1), budget=9, r_min=0)
    gam = torch.cat([(s**2 / (s**2).sum()) for s in spectra.values()])
    assert sum(ranks.values()) == 9
    assert 4 - allocation_error(ranks, spectra) == pytest.approx(float(gam.sort(descending=True).values[:9].sum()))


def test_dropped_energy_and_costs():
    S = torch.tensor([3.0, 2.0, 1.0], dtype=F64)
    assert torch.allclose(dropped_energy(S), torch.tensor([14.0, 5.0, 1.0, 0.0], dtype=F64) / 14)
    assert rank_costs({"a": (4, 6), "b": (2, 3)}, "lora") == {"a": 10, "b": 5}
    assert rank_costs({"a": (4, 6)}, "gain") == {"a": 1}
    assert allocation_cost({"a": 3, "b": 2}, {"a": 10, "b": 5}) == 40


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=8), st.floats(0.05, 1.0))
def test_threshold_is_the_smallest_rank_reaching_the_energy(values, energy):
    s = torch.tensor(sorted(values, reverse=True), dtype=F64)
    if float(s[0]) == 0.0:
        s[0] = 1.0
    r = threshold_ranks({"l": s}, energy, r_min=0)["l"]
    kept = 1 - dropped_energy(s)  # (k + 1,)
    assert 1 <= r <= s.numel()
    assert kept[r] >= energy - 1e-12 or r == s.numel()
    assert r == 1 or kept[r - 1] < energy  # one rank less does not reach it


def test_threshold_clips_to_the_bounds():
    spectra = {"a": spectrum_from_gammas([0.97, 0.01, 0.01, 0.01]), "b": spectrum_from_gammas([0.25] * 4)}
    assert threshold_ranks(spectra, 0.9) == {"a": 1, "b": 4}
    assert threshold_ranks(spectra, 0.9, r_min=2, r_max=3) == {"a": 2, "b": 3}


@pytest.mark.parametrize("call, match", [
    (lambda sp: optimal_ranks(sp, {"a": 5, "b": 3}, budget=7, r_min=1), "below the 8 parameters"),
    (lambda sp: optimal_ranks(sp, {"a": 5, "b": 3}, budget=100, r_max=5), "layer 'b'.*beyond min"),
    (lambda sp: optimal_ranks(sp, {"a": 5}, budget=100), "layer 'b': cost per rank"),
    (lambda sp: optimal_ranks(sp, {"a": 5, "b": 3}, budget=-1), "budget"),
    (lambda sp: optimal_ranks(sp, {"a": 5, "b": 3}, budget=10, r_min=2, r_max=1), "r_max"),
    (lambda sp: optimal_ranks({**sp, "z": torch.zeros(3, dtype=F64)}, {"a": 1, "b": 1, "z": 1}, 10), "'z'.*zero"),
    (lambda sp: optimal_ranks({"u": torch.tensor([1.0, 2.0])}, {"u": 1}, 10), "'u'.*descending"),
    (lambda sp: threshold_ranks(sp, 1.5), "energy"),
    (lambda sp: rank_costs({"a": (2, 2)}, "dora"), "cost"),
])
def test_pure_errors(call, match):
    spectra = {"a": torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1], dtype=F64), "b": torch.tensor([2.0, 1.0, 0.5], dtype=F64)}
    with pytest.raises(ValueError, match=match):
        call(spectra)


# ----------------------------------------------------------------------------------------------- model part


@pytest.fixture(scope="module")
def bert_moments(bert_tiny):
    from conftest import padded_batches

    batches = padded_batches([[30, 24, 17, 30]] * 3, seed=3)  # 303 real tokens >= d_in of every layer
    # the encoder's 12 layers (the pooler sees one row per sequence: 12 < its k = 32)
    return covsvd.capture_moments(bert_tiny, batches, targets=r"encoder\..*", progress=False)


@pytest.mark.parametrize("metric", ["full", "diag", "corda", "identity"])
def test_spectrum_is_orients_and_its_dropped_energy_the_relative_error(bert_tiny, bert_moments, metric):
    name = "encoder.layer.1.output.dense"  # W (32, 64)
    W = covsvd.weight_matrix(bert_tiny.get_submodule(name)).detach()
    C = bert_moments[name]
    S = metric_spectrum(W, C, metric)
    assert S.dtype == F64 and S.shape == (32,)
    e = dropped_energy(S)
    for r in (1, 7, 31):
        o = covsvd.orient(W, C, r, metric=metric, storage_dtype=F64)
        assert torch.allclose(o.S, S[:r], rtol=1e-10, atol=0)
        assert 1 - e[r] == pytest.approx(o.info["energy_kept"], rel=1e-10)
        if metric == "full":  # the metric's dropped energy is the squared functional error under C + eps I
            assert float(e[r]) == pytest.approx(o.info["rel_error"] ** 2, rel=1e-9)


@pytest.mark.parametrize("cost", ["lora", "gain"])
def test_allocate_ranks_is_optimal_ranks_on_the_layer_spectra(bert_tiny, bert_moments, cost):
    shapes = {n: tuple(covsvd.weight_matrix(bert_tiny.get_submodule(n)).shape) for n in bert_moments}
    costs = rank_costs(shapes, cost)
    budget = allocation_cost(dict.fromkeys(shapes, 6), costs)  # what uniform r = 6 costs
    ranks = allocate_ranks(bert_tiny, bert_moments, budget, cost=cost, progress=False)
    spectra = layer_spectra(bert_tiny, bert_moments, progress=False)
    assert ranks == optimal_ranks(spectra, costs, budget)
    assert set(ranks) == set(bert_moments)
    assert allocation_cost(ranks, costs) <= budget
    assert allocation_error(ranks, spectra) <= allocation_error(dict.fromkeys(shapes, 6), spectra)
    # the dict attaches as it is: every layer at its own rank, identity at init
    model = copy.deepcopy(bert_tiny)
    report = covsvd.attach_adapters(model, bert_moments, r=ranks, metric="full", progress=False)
    assert {row["name"]: row["r"] for row in report.rows} == ranks
    if cost == "gain":
        assert report.trainable == sum(ranks.values()) == budget  # gain: one parameter per rank, all spent


def test_threshold_rule_and_its_budget_check(bert_tiny, bert_moments):
    ranks = allocate_ranks(bert_tiny, bert_moments, None, rule="threshold", energy=0.8, progress=False)
    spectra = layer_spectra(bert_tiny, bert_moments, progress=False)
    assert ranks == threshold_ranks(spectra, 0.8)
    costs = rank_costs({n: tuple(covsvd.weight_matrix(bert_tiny.get_submodule(n)).shape) for n in ranks})
    spent = allocation_cost(ranks, costs)
    assert allocate_ranks(bert_tiny, bert_moments, spent, rule="threshold", energy=0.8, progress=False) == ranks
    with pytest.raises(ValueError, match="over budget"):
        allocate_ranks(bert_tiny, bert_moments, spent - 1, rule="threshold", energy=0.8, progress=False)


QUERY, FFN_OUT = "encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=10), "below the"),
    (dict(r_max=40), r"layer 'encoder\.layer\.0\.attention\.self\.query'.*r=40 exceeds min\(d_out, d_in\)"),
    (dict(cost="dora"), "cost='dora'"),
    (dict(rule="best"), "rule='best'"),
    (dict(metric="pca"), "metric='pca'"),
    (dict(r_min=0), "r_min"),
    (dict(moments=None), "needs moments"),
    (dict(targets=[QUERY, FFN_OUT], drop=FFN_OUT), "'encoder.layer.1.output.dense'.*no entry"),
    (dict(few_tokens=True), "fewer than r=32"),
])
def test_model_errors(bert_tiny, bert_moments, kwargs, match):
    moments = dict(bert_moments)
    kwargs = dict(kwargs)
    if "drop" in kwargs:
        moments.pop(kwargs.pop("drop"))
    if kwargs.pop("few_tokens", False):
        name = next(iter(moments))
        moments[name] = copy.deepcopy(moments[name])
        moments[name].count = 20
    call = dict(moments=moments, budget=10**6, progress=False) | kwargs
    with pytest.raises(ValueError, match=match):
        allocate_ranks(bert_tiny, **call)


def test_default_model_beats_uniform_at_equal_budget(default_model):
    model, tok = default_model
    targets = r"encoder\.layer\.[05]\..*"  # two blocks, all six kinds: two cost classes (768 and 1920)
    batches = covsvd.calibration_batches(tok, seq_len=64, batch_size=8, max_tokens=1024)  # >= k = 384
    moments = covsvd.capture_moments(model, batches, targets=targets, progress=False)
    spectra = layer_spectra(model, moments, progress=False)
    costs = rank_costs({n: tuple(covsvd.weight_matrix(model.get_submodule(n)).shape) for n in spectra})
    for r in (16, 96):
        uniform = dict.fromkeys(spectra, r)
        budget = allocation_cost(uniform, costs)
        ranks = optimal_ranks(spectra, costs, budget)
        spent = allocation_cost(ranks, costs)
        assert budget - min(costs.values()) < spent <= budget
        assert allocation_error(ranks, spectra) < allocation_error(uniform, spectra)
