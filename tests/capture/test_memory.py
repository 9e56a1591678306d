"""estimate_memory against the bytes a capture actually holds (the nbytes of its accumulators' sums)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_decoder
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layerwise import Toy
from torch import nn

import covsvd
from covsvd.capture.hooked import MomentCapture
from covsvd.capture.layerwise import AFTER, BEFORE, iter_block_moments
from covsvd.capture.memory import accumulator_bytes, estimate_memory


def held(moments) -> int:
    """Bytes of the distinct sums behind ``{name: SecondMoment}`` (shared accumulators once)."""
    distinct = {id(m): m for m in moments.values()}.values()
    return sum(t.nbytes for m in distinct for t in (m.sum_xx, m.sum_x, m.sum_abs))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 300), st.sampled_from(["full", "diag"]))
def test_accumulator_bytes_are_the_sums_nbytes(d_in, kind):
    assert accumulator_bytes(d_in, kind) == held({"m": covsvd.SecondMoment.zeros(d_in, kind)})


@pytest.mark.parametrize("kind", ["full", "diag"])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_estimate_equals_the_bytes_a_capture_holds(bert_tiny, make_batches, arch, kind):
    model = bert_tiny if arch == "bert" else tiny_decoder(arch, layers=2)
    est = estimate_memory(model, kind=kind)
    assert est.sharing.startswith("discovered")
    with MomentCapture(model, kind=kind) as cap:
        cap.add(make_batches([[9, 5]], seed=1)[0])
        live = sum(t.nbytes for a in cap.accs.values() for t in (a.sums.sum_xx, a.sums.sum_x, a.sums.sum_abs))
    assert est.total_bytes == live == held(cap.moments())
    assert sum(est.per_target.values()) == est.total_bytes
    if arch != "gpt2":  # q/k/v read one tensor (GPT-2 fuses them into c_attn)
        qkv = [n for n in est.per_target if n.endswith(("query", "q_proj", "key", "k_proj", "value", "v_proj"))]
        assert len(qkv) == 6 and sum(est.per_target[n] > 0 for n in qkv) == 2
        assert len(est.groups) < len(est.per_target)


def test_layerwise_peak_bounds_every_stage_and_names_each_block(make_batches):
    torch.manual_seed(0)
    model = Toy().eval()
    batches = make_batches([[5, 2, 7]], vocab=11, seed=4)
    est = estimate_memory(model, layerwise=True)
    assert est.sharing.startswith("none assumed")  # not a transformers model: no probe input, no sharing
    stages = {s: held(m) for s, m in iter_block_moments(model, batches, progress=False)}
    assert {s: b for s, b in stages.items() if s not in (BEFORE, AFTER)} == est.blocks
    assert stages[BEFORE] + stages[AFTER] == est.outside_bytes
    assert max(stages.values()) <= est.layerwise_peak_bytes == max(est.blocks.values()) + est.outside_bytes
    assert est.peak_bytes == est.layerwise_peak_bytes < est.total_bytes == sum(stages.values())
    text = str(est)
    assert "layerwise peak" in text and "layers.0" in text and "none assumed" in text


def test_default_model_estimate_and_its_text(default_model):
    model, _ = default_model
    est = estimate_memory(model)
    assert len(est.per_target) == 37 and len(est.groups) == 25  # q/k/v share per layer (6 x 4 + pooler)
    assert est.peak_bytes == est.total_bytes > est.layerwise_peak_bytes
    assert est.widest == 1536 and est.row_buffer_bytes(100) == 100 * 1536 * 8
    assert "37 targets in 25 accumulators" in str(est)


def test_layerwise_estimate_needs_blocks():
    flat = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    est = estimate_memory(flat)  # fine without layerwise: every accumulator outside blocks
    assert est.blocks == {} and est.outside_bytes == est.total_bytes == 2 * accumulator_bytes(3)
    with pytest.raises(ValueError, match="blocks="):
        estimate_memory(flat, layerwise=True)
    with pytest.raises(ValueError, match="kind"):
        estimate_memory(flat, kind="lowrank")
