"""covsvd.lab.quantized: the notebook-11 helpers agree with quantize_residual and functional_error."""

from __future__ import annotations

import pytest
import torch

from covsvd import SecondMoment, functional_error
from covsvd.lab import quantized as qz

pytest.importorskip("bitsandbytes")
F64 = torch.float64


def test_layer_runs_and_rows():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g) / 40**0.5
    m = SecondMoment.from_rows(torch.randn(200, 40, generator=g, dtype=F64) * torch.logspace(0, -1, 40, dtype=F64))
    runs = qz.layer_runs(W, m, 3, 2)
    assert set(runs) == set(qz.RUNS) and len(runs["diag", "oriented"].history) == 1
    for res in runs.values():
        assert torch.equal(qz.iterate_weight(res, res.best), res.weight())
    M = qz.damped_matrix(m)
    e = 1e-3 * float(m.matrix().diagonal().mean())
    assert torch.allclose(M, m.matrix() + e * torch.eye(40, dtype=F64), rtol=0, atol=1e-15)
    rows = qz.layer_rows("L", W, runs, M, M)
    assert len(rows) == sum(len(r.history) for r in runs.values())
    full = [r for r in rows if (r["metric"], r["start"]) == ("full", "oriented")]
    assert [r["objective"] for r in full] == pytest.approx([r["cal_error"] for r in full], rel=1e-9)
    B = qz.iterate_weight(runs["identity", "zero"], 2, F64)
    row = next(r for r in rows if (r["metric"], r["start"], r["k"]) == ("identity", "zero", 2))
    assert row["held_error"] == functional_error(W, B, M)
    assert next(r for r in rows if r["start"] == "zero" and r["k"] == 0)["adapter_params"] == 0


def test_random_decoder_is_deterministic():
    a, b = qz.random_decoder(3, vocab_size=50), qz.random_decoder(3, vocab_size=50)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not any(p.requires_grad for p in a.parameters())
