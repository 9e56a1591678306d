"""Training runs of the retrieval task kept in a CSV, so a notebook re-executes without retraining the runs it
already has (notebook 08's uniform and allocated arms).

One run: attach adapters of the arm's ranks to a copy of the model (:func:`covsvd.attach_adapters`, gains only,
the metric's top-r basis), train the gains (:func:`covsvd.lab.task.train_steps`) and score the held-out queries
(:meth:`RetrievalTask.evaluate`). Its row is keyed by ``(key, arm, seed)``: :func:`runs_key` hashes what the run is
made from (the base model's structure and weights, the calibration tokens the moments came from, every arm's ranks,
the metric, the training and task settings), so rows of other inputs share the file and are never mixed up. The
key is built from inputs, not from the adapted models' values, whose last bits follow the machine's BLAS: a row is
the run's result to rounding on any machine, bit for bit on one with the same torch thread count (recorded per
row, as the sweep does: :mod:`covsvd.lab.ablate`).

Rows are written through :mod:`covsvd.lab.rowstore` (atomic, under a lock, never duplicated); floats are stored
with ``repr`` and read back exactly, so a stored run gives the same numbers as the run that wrote it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from ..capture.cache import model_key
from ..cli.checks import CLIError, check_output
from ..util.digest import batches_digest, json_digest
from .arms import AblationConfig
from .rowstore import append_row, read_rows
from .task import RetrievalTask, train_steps

__all__ = ["COLUMNS", "KEY", "runs_key", "task_runs"]

COLUMNS = ("key", "arm", "seed", "trainable", "steps", "accuracy", "mrr", "losses", "correct", "threads",
           "torch_version", "covsvd_version", "train_s", "eval_s", "date")
KEY = ("key", "arm", "seed")
METRIC = "full"


def runs_key(model: nn.Module, calibration: Sequence[dict], ranks: Mapping[str, int | Mapping[str, int]],
             config: AblationConfig) -> str:
    """12 hex digits over the inputs of the runs (module docstring): ``model_key(model)``, the calibration
    batches' bytes, ``ranks`` per arm, the metric and ``config`` (training and task settings)."""
    arms = {arm: (int(r) if isinstance(r, int) else {n: int(k) for n, k in sorted(r.items())})
            for arm, r in ranks.items()}
    return json_digest(dict(model=model_key(model), calibration=batches_digest(calibration), arms=arms,
                            metric=METRIC, config=config.as_dict()), 12)


def _stored(row: dict[str, str], path) -> dict:
    """A stored row as a run; raises ``ValueError`` naming ``path`` and the row when a field does not parse."""
    try:
        if not row["losses"] or set(row["correct"]) - {"0", "1"}:
            raise ValueError("no losses, or per-query hits other than 0/1")
        return dict(arm=row["arm"], seed=int(row["seed"]), trainable=int(row["trainable"]),
                    accuracy=float(row["accuracy"]), mrr=float(row["mrr"]),
                    losses=[float(v) for v in row["losses"].split()],
                    correct=torch.tensor([c == "1" for c in row["correct"]]), stored=True)
    except ValueError as e:
        raise ValueError(f"{path}: the stored run (arm {row['arm']!r}, seed {row['seed']}) does not parse ({e}); "
                         "delete that row (or the file) to train it again") from None


def task_runs(model: nn.Module, moments: Mapping, calibration: Sequence[dict],
              ranks: Mapping[str, int | Mapping[str, int]], task: RetrievalTask, config: AblationConfig,
              seeds: Sequence[int], *, path: str | os.PathLike | None = None, progress: bool = False):
    """Train and score every ``(seed, arm)``, reading the runs ``path`` already holds for these inputs.

    Args:
        model: the base model (never modified; each run trains a deep copy of the arm's adapted model).
        moments: the targets' full second moments (:class:`covsvd.SecondMoment`), captured from ``calibration``.
        calibration: the batches the moments were captured from (hashed into the key, not run).
        ranks: ``{arm: r}``, ``r`` an int for every target or ``{target: rank}`` (the targets are ``moments``').
        task, config: the task, and the training settings (``config.steps``, ``lr``, ``eps``, ``eps_mode``,
            ``coeff``); both are in the key.
        seeds: training seeds (batch order); the init is seed-free.
        path: the runs CSV (created when missing; rows of other keys are kept). ``None``: nothing is read or
            written.

    Returns ``(reports, runs)``: ``reports[arm]`` the :class:`covsvd.AdapterReport` of the arm's attach, and one
    dict per run in ``seeds x ranks`` order with ``arm, seed, trainable, accuracy, mrr``, ``losses`` (every
    step's training loss), ``correct`` ((Q,) bool: which held-out queries retrieved their own document first)
    and ``stored`` (read from ``path`` rather than trained). Raises ``ValueError`` before any run for an empty
    ``ranks`` or ``seeds``, a repeated seed, a ``path`` with another schema or a stored row that does not parse,
    and when runs are missing from a ``path`` whose folder cannot be written.
    """
    import covsvd

    seeds = [int(s) for s in seeds]
    if not ranks or not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"task_runs needs at least one arm and distinct seeds; got arms {list(ranks)}, seeds {seeds}")
    key = runs_key(model, calibration, ranks, config)
    done = {(r["arm"], int(r["seed"])): _stored(r, path)
            for r in (read_rows(path, COLUMNS) if path is not None else []) if r["key"] == key}
    todo = [(s, a) for s in seeds for a in ranks]
    if path is not None and any((a, s) not in done for s, a in todo):
        try:  # a run's row could not be written: refuse before training
            check_output(path, "path", reuse=True)
        except CLIError as e:
            raise ValueError(f"task_runs: {e}") from None
    targets = list(moments)
    attached, reports = {}, {}
    for arm, r in ranks.items():  # attach is seed-free: once per arm, copied per run
        attached[arm] = copy.deepcopy(model)
        reports[arm] = covsvd.attach_adapters(attached[arm], moments, r=r, metric=METRIC, eps=config.eps,
                                              eps_mode=config.eps_mode, coeff=config.coeff, targets=targets,
                                              progress=False)
    runs = []
    for seed, arm in tqdm(todo, desc="task runs", disable=not progress, unit="run"):
        if (arm, seed) in done:
            runs.append(done[arm, seed])
            continue
        m = copy.deepcopy(attached[arm])
        params = [p for p in m.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        losses = train_steps(m, task, params, config.steps, config.lr, seed)
        t1 = time.perf_counter()
        after = task.evaluate(m)
        run = dict(arm=arm, seed=seed, trainable=sum(p.numel() for p in params), accuracy=after["accuracy"],
                   mrr=after["mrr"], losses=losses, correct=after["correct"], stored=False)
        runs.append(run)
        del m
        if path is not None:
            append_row(path, dict(
                key=key, arm=arm, seed=seed, trainable=run["trainable"], steps=config.steps,
                accuracy=run["accuracy"], mrr=run["mrr"], losses=" ".join(repr(v) for v in losses),
                correct="".join("1" if c else "0" for c in after["correct"].tolist()),
                threads=torch.get_num_threads(), torch_version=torch.__version__.split("+")[0],
                covsvd_version=covsvd.__version__, train_s=t1 - t0, eval_s=time.perf_counter() - t1,
                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")), COLUMNS, KEY)
    return reports, runs
