"""Layerwise capture on T5's encoder, whose blocks pass a relative position bias from block to block (the
first block computes it, the others receive it): the moments equal the default capture's."""

from __future__ import annotations

import pytest
import torch

import covsvd

TOL = 1e-12  # relative, fp64: the same products in the same order


def tiny_t5_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    return T5EncoderModel(config).eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_t5_encoder_layerwise_equals_the_default_capture(make_batches, side):
    model = tiny_t5_encoder()
    batches = make_batches([[9, 3, 12], [5, 16], [16, 16]], side=side, seed=2)
    default = covsvd.capture_moments(model, batches, progress=False)
    layered = covsvd.capture_moments(model, batches, progress=False, layerwise=True)
    assert list(layered) == list(default) and len(default) == 3 * 6  # q, k, v, o, wi, wo per block
    for name, m in default.items():
        got = layered[name]
        assert got.count == m.count, name
        for field in ("sum_xx", "sum_x", "sum_abs"):
            a, b = getattr(got, field), getattr(m, field)
            assert float((a - b).norm() / b.norm()) <= TOL, (name, field)
