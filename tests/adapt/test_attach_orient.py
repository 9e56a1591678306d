"""What attach installs is what orient computes: for every metric, the adapter's U, S, P and W_res are
:func:`covsvd.orient`'s, bit for bit (the same call on the same weight and moment), and the model's output
is unchanged at init."""

import pytest
import torch
from conftest import padded_batches, tiny_decoder

import covsvd


@pytest.fixture(scope="module")
def setup():
    model = tiny_decoder("llama", layers=1)
    batches = padded_batches([[11, 7, 12], [9]], vocab=97, seed=5)
    outputs = covsvd.capture_output_moments(model, batches, "probe", progress=False)  # for two-sided
    return model, batches, covsvd.capture_moments(model, batches, progress=False), outputs


@pytest.mark.parametrize("metric", covsvd.METRICS)
def test_attached_factors_are_orients(setup, metric):
    import copy

    base, batches, moments, outputs = setup
    two = metric == "two-sided"
    model = copy.deepcopy(base)
    covsvd.attach_adapters(model, moments, r=5, metric=metric, progress=False, output_moments=outputs if two else None)
    for name, adapter in covsvd.adapters(model).items():
        W = covsvd.weight_matrix(base.get_submodule(name)).detach()
        o = covsvd.orient(W, None if metric == "identity" else moments[name], 5, metric=metric,
                          storage_dtype=torch.float32, output=outputs[name] if two else None)
        for key in ("U", "S", "P", "W_res"):
            assert torch.equal(getattr(adapter, key), getattr(o, key)), (metric, name, key)
        assert adapter.config["metric"] == metric
    with torch.no_grad():
        got, want = model(**batches[0]).logits, base(**batches[0]).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5
