"""The calibration corpus: deterministic disjoint splits, no token lost to windowing, padding on either side."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import covsvd
from covsvd.data.corpus import passages


def test_splits_are_deterministic_disjoint_and_cover_everything():
    train, held, every = passages(split="train"), passages(split="heldout"), passages(split="all")
    key = lambda p: (p.doc, p.index)  # noqa: E731
    assert {key(p) for p in train}.isdisjoint({key(p) for p in held})
    assert sorted(map(key, train + held)) == sorted(map(key, every))
    assert 0.1 < len(held) / len(every) < 0.3  # ~20% held out by hash
    assert [key(p) for p in passages(split="heldout")] == [key(p) for p in held]


def test_passages_keep_every_paragraph():
    text = "alpha beta\n\ngamma\n\n\n\ndelta " * 3
    ps = passages([text], max_chars=20)
    joined = "\n\n".join(p.text for p in ps)
    assert [w for w in joined.split()] == text.split()


def _real_ids(batches):
    out = Counter()
    for b in batches:
        out.update(b["input_ids"][b["attention_mask"].bool()].tolist())
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_windows_lose_no_token_and_pad_on_the_requested_side(default_model, side):
    _, tok = default_model
    long_text = " ".join(f"word{i}" for i in range(700))  # far beyond seq_len: must be windowed, not truncated
    batches = covsvd.calibration_batches(tok, texts=[long_text], split="all", seq_len=64, batch_size=4,
                                         padding_side=side)
    body = Counter(tok(long_text, add_special_tokens=False)["input_ids"])
    real = _real_ids(batches)
    specials = Counter({tok.cls_token_id: real[tok.cls_token_id], tok.sep_token_id: real[tok.sep_token_id]})
    assert real - specials == body  # every token of the text, exactly once
    for b in batches:
        assert b["input_ids"].shape[1] <= 64
        m = b["attention_mask"]
        edge = m[:, -1] if side == "right" else m[:, 0]
        assert bool((m.sum(1) == m.shape[1]).any())  # the longest row is full
        if bool((m == 0).any()):
            assert bool((edge == 0).any())  # padding sits on the requested side


def test_sort_by_length_keeps_the_tokens_and_drops_padding(default_model):
    _, tok = default_model
    plain = covsvd.calibration_batches(tok, split="heldout", max_tokens=6000)
    dense = covsvd.calibration_batches(tok, split="heldout", max_tokens=6000, sort_by_length=True)
    assert _real_ids(plain) == _real_ids(dense)
    slots = lambda bs: sum(b["input_ids"].numel() for b in bs)  # noqa: E731
    assert slots(dense) < slots(plain)


def test_max_tokens_stops_at_the_window_that_reaches_it(default_model):
    _, tok = default_model
    batches = covsvd.calibration_batches(tok, max_tokens=1000, seq_len=128)
    n = covsvd.count_tokens(batches)
    assert 1000 <= n < 1000 + 128


def test_bad_input_is_named(default_model, tmp_path):
    _, tok = default_model
    with pytest.raises(ValueError, match="split"):
        covsvd.calibration_batches(tok, split="test")
    with pytest.raises(ValueError, match="empty"):
        covsvd.calibration_batches(tok, texts=["", "  "])
    with pytest.raises(FileNotFoundError, match="not a file"):
        covsvd.calibration_batches(tok, texts="no/such/file.txt")
    with pytest.raises(ValueError, match="padding_side"):
        covsvd.calibration_batches(tok, padding_side="middle")
    f = tmp_path / "notes.txt"
    f.write_text("one paragraph.\n\nanother paragraph.")
    b = covsvd.calibration_batches(tok, texts=f, split="all")
    assert covsvd.count_tokens(b) > 0 and isinstance(b[0]["input_ids"], torch.Tensor)
