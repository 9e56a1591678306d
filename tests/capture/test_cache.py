"""cached_capture: a hit returns exactly what a fresh capture returns; anything that changes the moments changes the key."""

from __future__ import annotations

import copy

import pytest
import torch

import covsvd
from covsvd.capture.cache import cache_path
from covsvd.capture.options import CaptureOptions


def test_hit_equals_fresh_capture(bert_tiny, make_batches, tmp_path):
    batches = make_batches([[5, 3], [7, 2]])
    path = covsvd.capture.cache_path(bert_tiny, batches, cache_dir=tmp_path)
    assert not path.exists()
    first = covsvd.cached_capture(bert_tiny, batches, cache_dir=tmp_path, progress=False)
    assert path.is_file() and path.parent == tmp_path
    mtime = path.stat().st_mtime_ns
    again = covsvd.cached_capture(bert_tiny, batches, cache_dir=tmp_path, progress=False)
    assert path.stat().st_mtime_ns == mtime and list(tmp_path.iterdir()) == [path]  # a hit writes nothing
    fresh = covsvd.capture_moments(bert_tiny, batches, progress=False)
    assert set(again) == set(fresh)
    for name in fresh:
        assert again[name].count == fresh[name].count == first[name].count
        assert torch.equal(again[name].sum_xx, fresh[name].sum_xx)
    q, k = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"
    assert again[q] is again[k]  # sharing survives the round trip


def cache_key(model, batches, kind, targets, accumulate, token_mask=None):
    options = CaptureOptions(kind=kind, accumulate=accumulate, token_mask=token_mask)
    return cache_path(model, batches, targets, options, cache_dir=".").name


def test_key_changes_with_data_weights_kind_and_targets(bert_tiny, make_batches):
    batches = make_batches([[5, 3]])
    base = cache_key(bert_tiny, batches, "full", None, "float64")
    assert base == cache_key(bert_tiny, make_batches([[5, 3]]), "full", None, "float64")
    assert base != cache_key(bert_tiny, make_batches([[5, 3]], side="left"), "full", None, "float64")
    assert base != cache_key(bert_tiny, make_batches([[5, 3]], seed=1), "full", None, "float64")
    assert base != cache_key(bert_tiny, batches, "diag", None, "float64")
    assert base != cache_key(bert_tiny, batches, "full", r".*dense", "float64")
    assert base != cache_key(bert_tiny, batches, "full", None, "float32")
    assert base != cache_key(bert_tiny, batches, "full", None, "float64", token_mask="attention_mask")
    other = copy.deepcopy(bert_tiny)
    with torch.no_grad():
        other.encoder.layer[0].output.dense.weight[0, 0] += 1.0
    assert base != cache_key(other, batches, "full", None, "float64")


def test_predicate_targets_cannot_be_keyed(bert_tiny, make_batches, tmp_path):
    with pytest.raises(ValueError, match="predicate"):
        covsvd.cached_capture(bert_tiny, make_batches([[4]]), targets=lambda n, m: True, cache_dir=tmp_path)


def test_a_callable_token_mask_cannot_be_keyed(bert_tiny, make_batches, tmp_path):
    with pytest.raises(ValueError, match="callable token_mask"):
        covsvd.cached_capture(bert_tiny, make_batches([[4]]), token_mask=lambda b: b["attention_mask"] > 0,
                              cache_dir=tmp_path)
