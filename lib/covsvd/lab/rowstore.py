"""Results files of training runs: one tidy CSV row per key (the sweep's: config, arm, seed), appended atomically
under a lock, never duplicated, so an interrupted sweep resumes and two sweeps writing one file lose nothing.

The schema defaults to the ablation sweep's (:data:`COLUMNS`, keyed by :data:`KEY`); other run tables pass their
own ``columns`` and ``key`` (:mod:`covsvd.lab.task_runs`).
"""

from __future__ import annotations

import csv
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from ..util.files import atomic_write

# Tidy row schema. TIMING columns differ between two runs of the same key; everything else must not.
COLUMNS = (
    "arm", "axis", "metric", "rotate", "seed", "r", "steps", "lr", "coeff", "eps", "eps_mode",
    "docs_per_batch", "max_length", "trainable_params", "init_s", "train_s", "eval_s",
    "score_before", "score_after", "mrr_before", "mrr_after", "n_fixed", "n_broken", "outcome",
    "loss_start", "loss_end",
    "gain_norm", "gain_max", "rot_norm", "init_output_error", "identity_error",
    "n_eval", "n_train_passages", "calib_tokens", "threads", "config_hash", "model",
    "covsvd_version", "torch_version", "date", "source",
)
TIMING = ("init_s", "train_s", "eval_s", "date")
KEY = ("config_hash", "arm", "seed")


@contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path``'s folder, so two sweeps writing one file never lose each other's rows.

    The folder, not the file: the file is replaced on every write (a lock on it would guard a stale inode),
    and a lock file would litter the repository.
    """
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_rows(path: str | os.PathLike, columns: tuple[str, ...] = COLUMNS) -> list[dict[str, str]]:
    """The rows of a results CSV as strings (``[]`` when the file does not exist); raises ``ValueError`` unless
    the header is ``columns``."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        if header != tuple(columns):
            missing = [c for c in columns if c not in header]
            extra = [c for c in header if c not in columns]
            raise ValueError(f"{path} has another schema (missing {missing}, extra {extra}); it was written by "
                             "another covsvd version: pass a new --out, or move the old file away")
        return list(reader)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    return str(v)


def append_row(path: str | os.PathLike, row: dict, columns: tuple[str, ...] = COLUMNS,
               key: tuple[str, ...] = KEY) -> bool:
    """Append one row to ``path`` atomically: rewrite to a temp file in the same folder, fsync, ``os.replace``.

    Returns ``False`` (and writes nothing) when a row with the same ``key`` values (the sweep's: ``(config_hash,
    arm, seed)``) is already there, so a row is never duplicated. An interruption leaves either the old file or
    the new one. Raises ``ValueError`` when ``row``'s names are not ``columns``.
    """
    path = Path(path)
    if set(row) != set(columns):
        raise ValueError(f"row has columns {sorted(set(row) ^ set(columns))} out of the schema {columns}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        rows = read_rows(path, columns)
        values = tuple(_cell(row[k]) for k in key)
        if any(tuple(r[k] for k in key) == values for r in rows):
            return False
        rows.append({k: _cell(row[k]) for k in columns})

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
                w.writeheader()
                w.writerows(rows)
                fh.flush()
                os.fsync(fh.fileno())

        atomic_write(path, write)
    return True


def load_results(path: str | os.PathLike):
    """The results CSV as a polars DataFrame (typed: ints, floats, strings)."""
    import polars as pl

    path = Path(path)
    read_rows(path)  # schema check, clear error
    return pl.read_csv(path, infer_schema_length=None)
