"""Calibration files: .txt / .jsonl / .parquet read to the same texts and batches; bad files raise naming the
fix; instruction data counts only the text's tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import covsvd
from covsvd.data.textfiles import IGNORE_INDEX, prompt_batches, read_texts, text_batches

TEXTS = ["The first document.\n\nIts second paragraph.", "A second document, short.", "Third: tokens and more."]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(covsvd.data.default_model_path(), local_files_only=True)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def test_jsonl_and_parquet_give_the_same_texts_and_batches(tmp_path, tokenizer):
    jl = write_jsonl(tmp_path / "d.jsonl", [{"body": t, "id": i} for i, t in enumerate(TEXTS)] + [{"body": ""}])
    (tmp_path / "d.jsonl").write_text(jl.read_text() + "\n\n")  # blank lines are skipped
    pq = write_parquet(tmp_path / "d.parquet", {"body": [*TEXTS, None], "id": [0, 1, 2, 3]})
    assert read_texts(jl, "body") == read_texts(pq, "body") == TEXTS  # empty / null records dropped
    a, b = text_batches(tokenizer, jl, "body", seq_len=8), text_batches(tokenizer, pq, "body", seq_len=8)
    want = covsvd.calibration_batches(tokenizer, texts=TEXTS, split="all", seq_len=8)
    for got in (a, b):
        assert len(got) == len(want)
        for x, y in zip(got, want, strict=True):
            assert all(torch.equal(x[k], y[k]) for k in y)


def test_txt_is_one_document(tmp_path, tokenizer):
    path = tmp_path / "d.txt"
    path.write_text(TEXTS[0], encoding="utf-8")
    assert read_texts(path) == [TEXTS[0]]
    assert covsvd.count_tokens(text_batches(tokenizer, path)) == covsvd.count_tokens(
        covsvd.calibration_batches(tokenizer, texts=[TEXTS[0]], split="all"))


def test_bad_files_raise_naming_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_texts(tmp_path / "missing.jsonl")
    other = tmp_path / "d.csv"
    other.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unknown data format '\.csv'"):
        read_texts(other)
    no_field = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, {"content": "no text field"}])
    with pytest.raises(ValueError, match=r"line 2 has no field 'text'.*'content'.*--text-field"):
        read_texts(no_field)
    with pytest.raises(ValueError, match=r"no column 'text'.*\['content'\].*--text-field content"):
        read_texts(write_parquet(tmp_path / "f.parquet", {"content": ["x"]}))
    bad_json = tmp_path / "j.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_texts(bad_json)
    with pytest.raises(ValueError, match=r"line 1, field 'text' holds a int"):
        read_texts(write_jsonl(tmp_path / "n.jsonl", [{"text": 3}]))
    for name, content in [("e.txt", ""), ("e.jsonl", ""), ("w.txt", "  \n\n "), ("z.jsonl", '{"text": ""}\n')]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match="holds no text"):
            read_texts(tmp_path / name)


def test_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["x"]})
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install 'covsvd\[data\]'"):
        read_texts(path)


@settings(max_examples=15, deadline=None)
@given(records=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=6),
       seq_len=st.integers(4, 12), batch_size=st.integers(1, 4), side=st.sampled_from(["left", "right"]))
def test_prompt_batches_count_exactly_the_text_tokens(tmp_path_factory, tokenizer, records, seq_len, batch_size,
                                                      side):
    words = "alpha beta gamma delta epsilon zeta".split()
    rows = [{"q": " ".join(words[:p]), "text": " ".join(words[:t])} for p, t in records]
    path = write_jsonl(tmp_path_factory.mktemp("p") / "p.jsonl", rows)
    head = tokenizer("x")["input_ids"].index(tokenizer("x", add_special_tokens=False)["input_ids"][0])  # [CLS]
    want = []  # per kept record: (prompt ids incl. leading specials, text ids), as the function must build them
    for r in rows:
        if not r["text"]:
            continue
        p = tokenizer(r["q"], add_special_tokens=False)["input_ids"]
        t = tokenizer(r["text"], add_special_tokens=False)["input_ids"]
        want.append((head + len(p), t))
    if any(n >= seq_len for n, _ in want):
        with pytest.raises(ValueError, match="leaving no room"):
            prompt_batches(tokenizer, path, "q", seq_len=seq_len, batch_size=batch_size, padding_side=side)
        return
    if not want:
        with pytest.raises(ValueError, match="holds no text"):
            prompt_batches(tokenizer, path, "q", seq_len=seq_len)
        return
    batches = prompt_batches(tokenizer, path, "q", seq_len=seq_len, batch_size=batch_size, padding_side=side)
    got = [row for b in batches for row in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True)]
    assert len(got) == len(want)
    for (ids, mask, labels), (n_prompt, text) in zip(got, want, strict=True):
        kept = text[: seq_len - n_prompt]
        real = ids[mask.bool()]
        assert len(real) == n_prompt + len(kept) <= seq_len
        assert labels[labels != IGNORE_INDEX].tolist() == kept  # only the text counts, in order
        assert (labels[~mask.bool()] == IGNORE_INDEX).all()  # padding never counts
        assert real[n_prompt:].tolist() == kept
        first = int(mask.argmax()) if side == "left" else 0
        assert mask[first : first + len(real)].all()  # real tokens contiguous on the requested side
