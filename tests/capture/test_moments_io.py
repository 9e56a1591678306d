"""save_moments / load_moments: exact round trip, sharing kept, atomic writes, clear errors."""

from __future__ import annotations

import pytest
import torch

import covsvd
from covsvd.capture.files import read_metadata


@pytest.fixture(scope="module")
def captured(bert_tiny, make_batches):
    return covsvd.capture_moments(bert_tiny, make_batches([[6, 3, 8], [2, 5]]), progress=False)


def test_round_trip_is_exact_and_keeps_sharing(tmp_path, bert_tiny, captured):
    path = covsvd.save_moments(captured, tmp_path / "m.safetensors")
    loaded = covsvd.load_moments(path, model=bert_tiny)
    assert list(loaded) == list(captured)
    for name, m in captured.items():
        got = loaded[name]
        assert (got.kind, got.count, got.accumulate, got.model) == (m.kind, m.count, m.accumulate, m.model)
        for field in ("sum_xx", "sum_x", "sum_abs"):
            assert torch.equal(getattr(got, field), getattr(m, field))
    q, k = "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key"
    assert loaded[q] is loaded[k]
    meta = read_metadata(path)
    assert meta["model"] == covsvd.data.model_identity(bert_tiny)
    assert meta["kind"] == "full" and meta["dtype"] == "float64" and meta["covsvd_version"] == covsvd.__version__
    assert meta["tokens"] == captured[q].count == 24
    assert len(meta["groups"]) == 9  # shared accumulators stored once
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left


def test_diag_round_trip(tmp_path, bert_tiny, make_batches):
    diag = covsvd.capture_moments(bert_tiny, make_batches([[4, 2]]), kind="diag", progress=False)
    loaded = covsvd.load_moments(covsvd.save_moments(diag, tmp_path / "d.safetensors"))
    assert all(torch.equal(loaded[n].sum_xx, diag[n].sum_xx) and loaded[n].kind == "diag" for n in diag)


def test_other_model_is_refused(tmp_path, captured, gpt2_tiny):
    path = covsvd.save_moments(captured, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="different model"):
        covsvd.load_moments(path, model=gpt2_tiny)
    with pytest.raises(ValueError, match="different model"):
        covsvd.save_moments(captured, tmp_path / "x.safetensors", model=gpt2_tiny)


def test_moments_of_other_weights_are_refused_unless_asked(tmp_path, captured, bert_tiny):
    """A fine-tune has the base's architecture: only the weights fingerprint tells them apart."""
    import copy

    path = covsvd.save_moments(captured, tmp_path / "m.safetensors", model=bert_tiny)
    tuned = copy.deepcopy(bert_tiny)
    with torch.no_grad():
        for p in tuned.parameters():
            p.mul_(1.01)
    with pytest.raises(ValueError, match="other weights of the same architecture.*check_weights=False"):
        covsvd.load_moments(path, model=tuned)
    loaded = covsvd.load_moments(path, model=tuned, check_weights=False)  # the named override
    assert sorted(loaded) == sorted(captured)
    with pytest.raises(ValueError, match="other weights"):
        covsvd.save_moments(captured, tmp_path / "t.safetensors", model=tuned)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        covsvd.save_moments(captured, path)


def test_corrupt_truncated_and_foreign_files_raise(tmp_path, captured):
    from safetensors.torch import save_file

    path = covsvd.save_moments(captured, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    flipped = tmp_path / "flipped.safetensors"
    data[-9] ^= 0xFF  # a byte of tensor data
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        covsvd.load_moments(flipped)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        covsvd.load_moments(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        covsvd.load_moments(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not a covsvd moments file"):
        covsvd.load_moments(foreign)
    with pytest.raises(FileNotFoundError):
        covsvd.load_moments(tmp_path / "missing.safetensors")


def test_failed_write_keeps_the_old_file(tmp_path, captured, monkeypatch):
    import safetensors.torch

    path = covsvd.save_moments(captured, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        covsvd.save_moments(captured, path, overwrite=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_hand_made_moments_save_without_identity(tmp_path, bert_tiny):
    m = covsvd.SecondMoment.from_rows(torch.randn(5, 3))
    path = covsvd.save_moments({"x": m}, tmp_path / "h.safetensors")
    assert read_metadata(path)["model"] is None
    assert covsvd.load_moments(path)["x"].count == 5
    with pytest.raises(ValueError, match="no model identity"):
        covsvd.load_moments(path, model=bert_tiny)
    with pytest.raises(ValueError, match="empty"):
        covsvd.save_moments({}, tmp_path / "e.safetensors")
