"""covsvd.lab.compress: rank counting, one full-rank factorisation serving every truncation, the weight swap,
and the output measures (against independent brute-force computations)."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from covsvd import SecondMoment, capture_moments, find_targets, orient, weight_matrix
from covsvd.algebra.measures import functional_error
from covsvd.algebra.validate import (
    ONE_SIDED_METRICS as METRICS,  # factor() orients by C alone: no output moment
)
from covsvd.lab import compress as cz

FAST = settings(max_examples=25, deadline=None)
F64 = torch.float64


def sample(d_out, d_in, n, seed):
    """W (d_out, d_in) and a SecondMoment of n anisotropic, non-centred rows (n may be < d_in)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=F64) * torch.logspace(0, -2, d_in, dtype=F64)
    X = torch.randn(n, d_in, generator=g, dtype=F64) * torch.logspace(0, -1.5, d_in, dtype=F64) + 0.3
    return W, SecondMoment.from_rows(X)


# ------------------------------------------------------------------------------------------- ranks
@FAST
@given(d_out=st.integers(1, 5000), d_in=st.integers(1, 5000), keep=st.floats(1e-3, 1.0))
def test_rank_for_params_is_the_largest_rank_within_the_budget(d_out, d_in, keep):
    r = cz.rank_for(d_out, d_in, keep, count="params")
    k = min(d_out, d_in)
    assert 1 <= r <= k
    budget = keep * d_out * d_in * (1 + 1e-12)
    if r > 1:  # r = 1 may exceed a tiny budget (at least one component is kept)
        assert cz.factored_parameters(d_out, d_in, r) <= budget
    if r < k:
        assert cz.factored_parameters(d_out, d_in, r + 1) > keep * d_out * d_in * (1 - 1e-12)


@FAST
@given(d_out=st.integers(1, 5000), d_in=st.integers(1, 5000), keep=st.floats(1e-3, 1.0))
def test_rank_for_rank_counts_components(d_out, d_in, keep):
    r = cz.rank_for(d_out, d_in, keep, count="rank")
    k = min(d_out, d_in)
    assert max(1, math.floor(keep * k) - 1) <= r <= max(1, math.floor(keep * k + 1e-9))


def test_rank_for_known_values_and_errors():
    # SVD-LLM at 20% removed on a square 384 layer keeps rank 153 (40% of the rank), 1536x384: 245
    assert cz.rank_for(384, 384, 0.8) == 153 and cz.rank_for(1536, 384, 0.8) == 245
    assert cz.rank_for(384, 384, 0.6, count="rank") == 230  # no float truncation to 229
    assert cz.rank_for(384, 384, 1.0) == 192
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep"):
            cz.rank_for(10, 10, bad)
    with pytest.raises(ValueError, match="count"):
        cz.rank_for(10, 10, 0.5, count="bytes")


# -------------------------------------------------------------------------------- factor / truncate
@FAST
@given(d_out=st.integers(2, 12), d_in=st.integers(2, 12), n=st.integers(12, 40), seed=st.integers(0, 2**16),
       metric=st.sampled_from(METRICS), data=st.data())
def test_every_truncation_is_a_prefix_of_one_factorisation(d_out, d_in, n, seed, metric, data):
    W, m = sample(d_out, d_in, n, seed)
    k = min(d_out, d_in)
    r = data.draw(st.integers(1, k))
    o = cz.factor(W, m, metric)
    assert o.S.shape == (k,) and o.U.dtype == F64
    scale = float(W.norm())
    # keep the r largest == orient at rank r (same product U_r S_r P_r)
    top = orient(W, m, r, metric=metric)
    assert float((cz.keep_top(o, r) - (top.U * top.S) @ top.P).norm()) <= 1e-9 * scale
    # drop the r smallest == W_res of the "bottom" orientation (W minus its r smallest components)
    bottom = orient(W, m, r, metric=metric, components="bottom")
    assert float((cz.drop_bottom(o, r) - bottom.W_res).norm()) <= 1e-9 * scale
    assert float((cz.keep_top(o, k) - W).norm()) <= 1e-10 * scale
    assert float(cz.drop_bottom(o, k).norm()) == 0.0


@FAST
@given(seed=st.integers(0, 2**16), data=st.data())
def test_full_metric_truncation_is_best_under_the_data(seed, data):
    """Among the metrics, `full` gives the smallest functional error under the (damped) C it was oriented by,
    for keep and drop alike."""
    W, m = sample(9, 11, 30, seed)
    r = data.draw(st.integers(1, 8))
    M = m.matrix() + 1e-3 * torch.eye(11, dtype=F64)
    errs = {metric: functional_error(W, cz.keep_top(cz.factor(W, m, metric), r), M) for metric in METRICS}
    assert all(errs["full"] <= e * (1 + 1e-9) + 1e-12 for e in errs.values()), errs
    drops = {metric: functional_error(W, cz.drop_bottom(cz.factor(W, m, metric), r), M) for metric in METRICS}
    assert all(drops["full"] <= e * (1 + 1e-9) + 1e-12 for e in drops.values()), drops


def test_factor_rejects_components_and_bad_ranks():
    W, m = sample(5, 6, 20, 0)
    with pytest.raises(ValueError, match="keep_top"):
        cz.factor(W, m, "full", components="bottom")
    o = cz.factor(W, m, "diag", name="blk.0")
    for bad in (-1, 6, 2.0, True):
        with pytest.raises(ValueError, match="blk.0"):
            cz.keep_top(o, bad)
    with pytest.raises(ValueError, match="mode"):
        cz.truncated_weights({"a": o}, {"a": 1}, mode="top")
    with pytest.raises(ValueError, match="no rank"):
        cz.truncated_weights({"a": o}, {})


# ------------------------------------------------------------------------------------- model level
def test_factor_layers_and_swap_on_a_tiny_bert(bert_tiny, make_batches):
    model = copy.deepcopy(bert_tiny)
    batches = make_batches([[20, 15, 18], [17, 12]])  # >= 32 = k tokens: factor needs count >= k
    moments = capture_moments(model, batches, targets=r".*encoder.*", progress=False)
    factors = cz.factor_layers(model, moments, "full")
    assert list(factors) == find_targets(model, r".*encoder.*")
    with pytest.raises(ValueError, match="needs its second moment"):
        cz.factor_layers(model, {}, "diag", targets=r".*encoder.*")
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranks = {n: 3 for n in factors}
    weights = cz.truncated_weights(factors, ranks)
    name = next(iter(factors))
    module = model.get_submodule(name)
    x = torch.randn(4, module.in_features)
    with cz.swapped_weights(model, weights):
        got = module(x)
        assert torch.allclose(got, x @ weights[name].float().T + module.bias, atol=1e-5)
        s = torch.linalg.svdvals(module.weight.detach().double())
        assert float(s[3] / s[0]) <= 1e-6  # rank 3 to fp32 rounding
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
    with pytest.raises(RuntimeError, match="boom"), cz.swapped_weights(model, weights):
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n
    bad = dict(weights)
    bad[name] = bad[name][:, :-1]
    with pytest.raises(ValueError, match="shape"), cz.swapped_weights(model, bad):
        pass
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n]), n


def test_swap_handles_conv1d(gpt2_tiny):
    model = copy.deepcopy(gpt2_tiny)
    name = "h.0.mlp.c_fc"  # Conv1D stores W^T
    module = model.get_submodule(name)
    W = weight_matrix(module).detach()  # (d_out, d_in)
    B = torch.zeros_like(W)
    B[0, 1] = 2.5
    x = torch.randn(3, W.shape[1])
    before = module.weight.detach().clone()
    with cz.swapped_weights(model, {name: B}):
        assert torch.allclose(module(x), x @ B.T + module.bias, atol=1e-6)
    assert torch.equal(module.weight, before)


def brute_measures(model, ref_model, batches):
    """Independent: concatenate masked hidden states; mean-pool with an explicit loop per sequence."""
    errs, refs, cos = [], [], []
    with torch.no_grad():
        for b in batches:
            h = model(**b).last_hidden_state
            h0 = ref_model(**b).last_hidden_state
            for i in range(h.shape[0]):
                keep = b["attention_mask"][i].bool()
                errs.append(h[i][keep] - h0[i][keep])
                refs.append(h0[i][keep])
                cos.append(torch.nn.functional.cosine_similarity(h[i][keep].mean(0), h0[i][keep].mean(0), dim=0))
    e, r = torch.cat(errs).double(), torch.cat(refs).double()
    return float(e.norm() / r.norm()), torch.stack(cos).double()


def test_compare_outputs_matches_brute_force_and_ignores_padding(bert_tiny, make_batches):
    model = copy.deepcopy(bert_tiny)
    batches = make_batches([[19, 4, 16], [15, 8]], seed=3)
    ref = cz.reference_outputs(model, batches)
    assert ref.tokens == 19 + 4 + 16 + 15 + 8 and ref.pooled.shape == (5, 32)
    same = cz.compare_outputs(model, ref)
    assert same["hidden_rel_error"] == 0.0 and same["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    moments = capture_moments(model, batches, targets=r".*encoder.*", progress=False)
    factors = cz.factor_layers(model, moments, "diag")
    weights = cz.truncated_weights(factors, {n: 4 for n in factors})
    untouched = copy.deepcopy(model)
    with cz.swapped_weights(model, weights):
        got = cz.compare_outputs(model, ref)
        err, cos = brute_measures(model, untouched, batches)
    assert got["hidden_rel_error"] > 1e-3
    assert got["hidden_rel_error"] == pytest.approx(err, rel=1e-5)
    assert got["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert got["cosine_min"] == pytest.approx(float(cos.min()), abs=1e-5)
    # the same sequences with extra right padding: the same numbers (padding never counts)
    wider = [{"input_ids": torch.cat([b["input_ids"], torch.zeros(b["input_ids"].shape[0], 5, dtype=torch.long)], 1),
              "attention_mask": torch.cat([b["attention_mask"], torch.zeros(b["attention_mask"].shape[0], 5,
                                                                            dtype=torch.long)], 1)} for b in batches]
    ref_w = cz.reference_outputs(model, wider)
    with cz.swapped_weights(model, weights):
        got_w = cz.compare_outputs(model, ref_w)
    assert got_w["hidden_rel_error"] == pytest.approx(got["hidden_rel_error"], rel=1e-4)
    assert got_w["cosine_mean"] == pytest.approx(got["cosine_mean"], abs=1e-6)
    with pytest.raises(ValueError, match="no batches"):
        cz.reference_outputs(model, [])
