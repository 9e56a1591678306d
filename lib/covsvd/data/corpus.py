"""Calibration text: the embedded default corpus, a deterministic held-out split, and token batches.

The default corpus is the Python standard library's ``pydoc_data.topics`` (the language reference as
plain English, one document per topic), present on every machine with Python. Each document is cut into
passages of whole paragraphs; a passage is held out when a hash of ``(document, index)`` says so, so the
split is the same on every machine and does not move when other documents change.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "heldout", "all")
HELDOUT_PERCENT = 20  # of passages, by hash


@dataclass(frozen=True)
class Passage:
    """A run of whole paragraphs from one document. ``doc`` names the document (a pydoc topic)."""

    doc: str
    index: int
    text: str

    @property
    def split(self) -> str:
        h = zlib.crc32(f"{self.doc}\x00{self.index}".encode())
        return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def default_documents() -> dict[str, str]:
    """``{topic: text}`` from ``pydoc_data.topics``, in its own (sorted) order."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def _documents(texts: None | str | os.PathLike | Iterable[str] | dict[str, str]) -> dict[str, str]:
    if texts is None:
        return default_documents()
    if isinstance(texts, dict):
        docs = {str(k): str(v) for k, v in texts.items()}
    elif isinstance(texts, (str, os.PathLike)) and Path(texts).is_file():
        docs = {Path(texts).name: Path(texts).read_text(encoding="utf-8")}
    elif isinstance(texts, str):
        raise FileNotFoundError(
            f"texts={texts[:60]!r} is a string but not a file; pass a list of strings for literal text"
        )
    else:
        docs = {f"text{i}": str(t) for i, t in enumerate(texts)}
    docs = {k: v for k, v in docs.items() if v.strip()}
    if not docs:
        raise ValueError("the calibration texts are empty: pass non-empty strings or a non-empty file")
    return docs


def passages(
    texts: None | str | os.PathLike | Iterable[str] | dict[str, str] = None,
    split: str = "all",
    max_chars: int = 400,
) -> list[Passage]:
    """Cut documents into passages of whole paragraphs (about ``max_chars`` characters each).

    Args:
        texts: ``None`` (the default corpus), a list of strings (one document each), a ``{name: text}``
            dict, or a path to a UTF-8 text file (one document).
        split: ``"train"``, ``"heldout"`` (about 20% of passages, chosen by hash) or ``"all"``.
        max_chars: paragraphs are packed greedily up to this length; a longer paragraph stays whole.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {SPLITS}")
    out: list[Passage] = []
    for doc, text in _documents(texts).items():
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        chunk: list[str] = []
        index = 0
        for p in paragraphs:
            if chunk and sum(len(c) + 2 for c in chunk) + len(p) > max_chars:
                out.append(Passage(doc, index, "\n\n".join(chunk)))
                index += 1
                chunk = []
            chunk.append(p)
        if chunk:
            out.append(Passage(doc, index, "\n\n".join(chunk)))
    return [p for p in out if split == "all" or p.split == split]


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single sequence (BERT: [CLS] / [SEP])."""
    body = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(body) + 1):
        if full[i : i + len(body)] == body:
            return full[:i], full[i + len(body) :]
    raise ValueError(f"cannot locate the text inside the special tokens of {type(tokenizer).__name__}")


def _windows(tokenizer, text: str, seq_len: int) -> Iterator[list[int]]:
    """Token ids of ``text`` in windows of at most ``seq_len`` (special tokens included).

    The text is tokenised once and its ids are cut, so no token is lost or re-split at a window edge;
    each window gets the tokenizer's own special tokens around it.
    """
    head, tail = special_frame(tokenizer)
    body = seq_len - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room beside the tokenizer's special tokens")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    for start in range(0, len(ids), body):
        yield head + ids[start : start + body] + tail


def pad_rows(rows: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def padding(tokenizer, seq_len: int, batch_size: int, padding_side: str | None = None) -> tuple[str, int]:
    """``(side, pad_id)`` for batching with ``tokenizer``; raises ``ValueError`` for ``seq_len < 2``,
    ``batch_size < 1`` or a side other than ``"right"`` / ``"left"``. A tokenizer without a pad token (GPT-2
    style) pads with EOS (or 0): padding is masked out, so any id works."""
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 2 and >= 1")
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("right", "left"):
        raise ValueError(f"padding_side={side!r}; expected 'right' or 'left'")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return side, pad_id


def calibration_batches(
    tokenizer,
    texts: None | str | os.PathLike | Iterable[str] | dict[str, str] = None,
    split: str = "train",
    seq_len: int = 128,
    batch_size: int = 16,
    max_tokens: int | None = None,
    padding_side: str | None = None,
    sort_by_length: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised calibration batches: ``[{"input_ids": (B, T), "attention_mask": (B, T)}, ...]``.

    Every passage of ``split`` is tokenised in full and cut into windows of at most ``seq_len`` tokens
    (special tokens included), so no text is truncated away; windows are batched in corpus order and
    padded to the longest in their batch, on ``padding_side`` (the tokenizer's own by default). Padding is
    marked 0 in ``attention_mask``; capture never counts it.

    Args:
        max_tokens: stop once this many real tokens (mask == 1) are collected (the last batch is cut
            to the window that reaches it); ``None`` keeps everything.
        sort_by_length: batch windows of similar length together (stable sort, longest first), so
            batches carry almost no padding and a forward pass costs less. The tokens are the same, so
            the captured moments are the same (a sum does not depend on order) up to fp64 rounding.

    Returns a list, so the same batches can be passed over several times.
    """
    side, pad_id = padding(tokenizer, seq_len, batch_size, padding_side)
    rows: list[list[int]] = []
    total = 0
    for p in passages(texts, split=split):
        for w in _windows(tokenizer, p.text, seq_len):
            rows.append(w)
            total += len(w)
            if max_tokens is not None and total >= max_tokens:
                break
        if max_tokens is not None and total >= max_tokens:
            break
    if not rows:
        raise ValueError(f"no calibration text in split={split!r}")
    if sort_by_length:
        rows.sort(key=len, reverse=True)
    return [pad_rows(rows[i : i + batch_size], pad_id, side) for i in range(0, len(rows), batch_size)]


def count_tokens(batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """Real (unpadded) tokens in ``batches``."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches))
