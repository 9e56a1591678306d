"""Calibration text from files: ``.txt``, ``.jsonl`` and ``.parquet`` -> a list of texts -> token batches.

* ``.txt``: the whole file is one document (UTF-8);
* ``.jsonl``: one JSON object per line, the text under a field (``text_field``, default ``"text"``); blank
  lines are skipped;
* ``.parquet``: one row per document, the text in a string column. Reading it needs ``pyarrow`` (the
  optional ``data`` extra: ``pip install 'covsvd[data]'``), imported only when a parquet file is read.

:func:`read_texts` returns the texts; :func:`text_batches` turns a file into padded batches through
:func:`covsvd.calibration_batches` (every document cut into passages and token windows, none truncated).
Every check runs while reading, before anything is computed or written: a missing file, an unknown suffix,
a record without the text field, a non-string value or a file with no text raise ``ValueError`` /
``FileNotFoundError`` naming the file, the line or column, and the fix.

Instruction data (a prompt field beside the text field) becomes :func:`prompt_batches`: one sequence per
record, prompt then text, with ``labels`` ``(B, T)`` equal to ``input_ids`` on the text's tokens and -100 on
the prompt's and on padding, so ``capture_moments(..., token_mask="labels")`` counts only the text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .corpus import calibration_batches

SUFFIXES = (".txt", ".jsonl", ".parquet")
#: ``labels`` value of a token that does not count (the transformers / PyTorch cross-entropy convention).
IGNORE_INDEX = -100


def _fix(candidates: list[str]) -> str:
    """The fix for a missing field, suggesting the first field that holds text."""
    hint = f", e.g. --text-field {candidates[0]}" if candidates else ""
    return f"name the field with text_field= (CLI: --text-field){hint}"


def _check_value(value, path: Path, where: str, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}, field {field!r} holds a {type(value).__name__}, not text")
    return value


def _read_jsonl(path: Path, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg}); a .jsonl file holds one JSON "
                                 "object per line") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {n} is a JSON {type(record).__name__}, not an object with a "
                                 f"{fields[-1]!r} field")
            missing = [k for k in fields if k not in record]
            if missing:
                raise ValueError(f"{path}: the record on line {n} has no field {missing[0]!r} (its fields: "
                                 f"{list(record)[:10]}); {_fix([k for k, v in record.items() if isinstance(v, str)])}")
            rows.append(tuple(_check_value(record[k], path, f"line {n}", k) for k in fields))
    return rows


def _read_parquet(path: Path, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow, an optional dependency: pip install 'covsvd[data]' "
                          "(or convert the file to .jsonl)") from e
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable parquet file: {e}") from e
    missing = [k for k in fields if k not in schema.names]
    if missing:
        import pyarrow as pa

        texts = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        raise ValueError(f"{path} has no column {missing[0]!r} (its columns: {schema.names[:10]}); {_fix(texts)}")
    table = pq.read_table(path, columns=list(fields))
    columns = [table.column(k).to_pylist() for k in fields]
    return [tuple(_check_value(v, path, f"row {i}", k) for k, v in zip(fields, row, strict=True))
            for i, row in enumerate(zip(*columns, strict=True))]


def read_records(path: str | os.PathLike, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    """``[(value of each of fields), ...]`` for every record of a ``.jsonl`` or ``.parquet`` file.

    A ``None`` (JSON null, parquet null) stays ``None``. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for another suffix, a record or schema without one of ``fields`` (naming the line or the
    columns present), a non-string value, invalid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix == ".jsonl":
        return _read_jsonl(path, fields)
    if path.suffix == ".parquet":
        return _read_parquet(path, fields)
    raise ValueError(f"{path}: records with fields {list(fields)} are read from .jsonl or .parquet files, "
                     f"not {path.suffix or 'a file without a suffix'}")


def read_texts(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """The non-empty texts of a calibration file, in file order (see the module doc for the formats).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a suffix other than :data:`SUFFIXES`; a ``.jsonl`` record or a parquet schema without
            ``text_field`` (the message lists the fields present); a non-string value; no text at all
            (an empty file, or only empty / null values).
        ImportError: a ``.parquet`` file without ``pyarrow`` installed (names ``pip install 'covsvd[data]'``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; expected one of "
                         f"{SUFFIXES} (.jsonl / .parquet with a text field)")
    if path.suffix == ".txt":
        texts = [path.read_text(encoding="utf-8")]
    else:
        texts = [t for (t,) in read_records(path, (text_field,)) if t is not None]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text" + ("" if path.suffix == ".txt" else
                         f" (every {text_field!r} value is empty or null)") + ": pass a non-empty calibration file")
    return texts


def text_batches(tokenizer, path: str | os.PathLike, text_field: str = "text", **kwargs) -> list[dict[str, torch.Tensor]]:
    """:func:`covsvd.calibration_batches` over the texts of ``path`` (every passage, ``split="all"``).

    ``kwargs`` go to :func:`covsvd.calibration_batches` (``seq_len``, ``batch_size``, ``max_tokens``,
    ``padding_side``, ``sort_by_length``, ``split``). Raises as :func:`read_texts`.
    """
    kwargs.setdefault("split", "all")
    return calibration_batches(tokenizer, texts=read_texts(path, text_field), **kwargs)


def prompt_batches(
    tokenizer,
    path: str | os.PathLike,
    prompt_field: str,
    text_field: str = "text",
    seq_len: int = 128,
    batch_size: int = 16,
    max_tokens: int | None = None,
    padding_side: str | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Instruction data: ``[{"input_ids", "attention_mask", "labels"}, ...]``, each ``(B, T)`` int64.

    One sequence per record of a ``.jsonl`` / ``.parquet`` file: the tokenizer's leading special tokens, the
    prompt's tokens, then the text's, cut to ``seq_len`` (a record whose prompt leaves no room for text is
    refused, naming it). ``labels`` equals ``input_ids`` on the text's tokens and is :data:`IGNORE_INDEX`
    (-100) on the special tokens, the prompt and the padding; ``attention_mask`` is 1 on every real token,
    prompt included (the model attends to it). ``max_tokens`` counts text tokens (labels != -100), the
    ones a ``token_mask="labels"`` capture counts; ``None`` keeps every record.
    """
    from .corpus import pad_rows, padding, special_frame

    side, pad_id = padding(tokenizer, seq_len, batch_size, padding_side)
    head, _ = special_frame(tokenizer)
    rows: list[tuple[list[int], int]] = []  # (ids, number of leading ids that do not count)
    counted = 0
    for n, (prompt, text) in enumerate(read_records(path, (prompt_field, text_field))):
        if not text or not text.strip():
            continue
        p_ids = head + tokenizer(prompt or "", add_special_tokens=False, verbose=False)["input_ids"]
        t_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(p_ids) >= seq_len:
            raise ValueError(f"{path}: record {n} has a {prompt_field!r} of {len(p_ids)} tokens, leaving no room "
                             f"for its text in seq_len={seq_len}; raise seq_len or shorten the prompt")
        ids = (p_ids + t_ids)[:seq_len]
        rows.append((ids, len(p_ids)))
        counted += len(ids) - len(p_ids)
        if max_tokens is not None and counted >= max_tokens:
            break
    if not rows:
        raise ValueError(f"{path} holds no text under {text_field!r}: pass a non-empty calibration file")
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = pad_rows([ids for ids, _ in chunk], pad_id, side)  # input_ids, attention_mask (B, T)
        rank = batch["attention_mask"].cumsum(1)  # (B, T): 1-based position among the row's real tokens
        skip = torch.tensor([s for _, s in chunk])[:, None]  # (B, 1)
        keep = batch["attention_mask"].bool() & (rank > skip)  # (B, T): the text's tokens
        batch["labels"] = batch["input_ids"].masked_fill(~keep, IGNORE_INDEX)  # (B, T)
        out.append(batch)
    return out
