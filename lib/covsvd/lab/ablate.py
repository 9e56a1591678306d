"""The local ablation sweep: train the bounded-gain adapter on CPU, per arm and seed, and keep tidy rows.

    import covsvd.lab.ablate as ab
    df = ab.ablate()                      # the full sweep -> data/ablations/local.csv (resumable)
    table = ab.summarize(ab.load_results("data/ablations/local.csv"))   # per-arm mean, 95% t-interval

What one row is. The default model (all-MiniLM-L6-v2) gets adapters on its six FFN output layers
(``encoder.layer.*.output.dense``, W 384 x 1536: the analogue of ``down_proj``), oriented by the arm's
metric from second moments captured on the *train* split, then only the adapters' gains (and rotations)
train for ``steps`` batches of the contrastive task of :mod:`covsvd.lab.task`. The row records the held-out
retrieval score before (the untrained model) and after, the time of ``attach_adapters`` (orientation
included) and of training, the trainable parameter count, and how far the gains moved.

This module runs the sweep; the arms and settings are :mod:`covsvd.lab.arms`, the results file
:mod:`covsvd.lab.rowstore`, the summaries :mod:`covsvd.lab.stats` (all re-exported here).

Arms (:data:`ARMS`): the metric axis ``identity``, ``diag``, ``full``, ``corda`` (no rotation), the
rotation axis ``rot-V``, ``rot-U``, ``rot-both`` (metric identity; ``identity`` is their no-rotation
reference), and ``baseline`` (no adapter, no training: the untrained model's score).

Rows are keyed by ``(config_hash, arm, seed)``; the hash covers every setting that changes a result
(:class:`AblationConfig`, the task, the model's structure and weights: :func:`model_key`), so rows of
other settings or checkpoints can share the file and are never mixed up. A row is written (atomically,
under a lock) as soon as its run finishes; a restarted sweep skips the keys already present. The same
seed gives the same row (timing columns aside) for the same torch thread count (recorded per row: a
different count may split reductions differently and change the last bits).
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from ..capture.cache import cache_path, model_key
from .ablate_output import output_moments_for, unit_output
from .arms import (
    ARMS,
    DEFAULT_SEEDS,
    LEARNED_NOTHING,
    OUTCOMES,
    QUICK_ARMS,
    QUICK_CONFIG,
    QUICK_SEEDS,
    TARGETS,
    AblationConfig,
    Arm,
    run_outcome,
)
from .rowstore import COLUMNS, KEY, TIMING, append_row, read_rows
from .rowstore import load_results as _load_results
from .stats import arm_verdict, one_config, paired_differences, summarize, t_interval
from .task import RetrievalTask, embed, train_steps

__all__ = [
    "ARMS", "COLUMNS", "DEFAULT_OUT", "DEFAULT_SEEDS", "KEY", "LEARNED_NOTHING", "OUTCOMES", "QUICK_ARMS",
    "QUICK_CONFIG", "QUICK_SEEDS", "TARGETS", "TIMING", "AblationConfig", "Arm", "ablate", "append_row",
    "arm_verdict", "load_results", "model_key", "moments_for", "one_config", "paired_differences", "read_rows",
    "run_arm_seed", "run_outcome", "summarize", "t_interval",
]

SOURCE = "local: covsvd ablate (CPU)"
DEFAULT_OUT = Path("data/ablations/local.csv")
DEFAULT_CACHE = Path("data/ablations/cache")
QUICK_OUT = DEFAULT_CACHE / "quick.csv"


def load_results(path: str | os.PathLike = DEFAULT_OUT):
    """The results CSV as a polars DataFrame (typed); :func:`covsvd.lab.rowstore.load_results` at the default path."""
    return _load_results(path)


# ------------------------------------------------------------------------------------------- moments


def moments_for(model, tokenizer, config: AblationConfig, cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
                progress: bool = True) -> tuple[dict, dict]:
    """Full second moments of the targets' inputs on the train split, cached under ``cache_dir``.

    Through :func:`covsvd.cached_capture`: the file is keyed by the model (structure and every weight), the
    targets and the calibration batches themselves (token ids and masks), so a change of corpus, tokenizer or
    windowing gives a new file, never a stale one. ``cache_dir=None`` disables the cache. Sums are fp64.
    Returns ``(moments, info)`` with ``info = {"path", "cached", "capture_s", "tokens"}``.
    """
    import covsvd

    t0 = time.perf_counter()
    batches = covsvd.calibration_batches(tokenizer, split="train", seq_len=config.calib_seq_len,
                                         max_tokens=config.calib_tokens)
    if cache_dir is None:
        path, cached = None, False
        moments = covsvd.capture_moments(model, batches, targets=config.targets, kind="full", progress=progress)
    else:
        path = cache_path(model, batches, config.targets, cache_dir=cache_dir)
        cached = path.is_file()
        moments = covsvd.cached_capture(model, batches, targets=config.targets, kind="full", progress=progress,
                                        cache_dir=cache_dir)
    tokens = min(m.count for m in moments.values())
    return moments, dict(path=path, cached=cached, capture_s=time.perf_counter() - t0, tokens=tokens)


# ------------------------------------------------------------------------------------------- one run


def _norms(model) -> dict[str, float]:
    """L2 norm over every adapter's gain ``g`` (all layers together), its max |entry|, and the rotations' norm."""
    gains, rots = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (gains if name.endswith(".g") else rots).append(p.detach().reshape(-1))
    g = torch.cat(gains) if gains else torch.zeros(0)
    r = torch.cat(rots) if rots else torch.zeros(0)
    return dict(gain_norm=float(g.norm()), gain_max=float(g.abs().max()) if g.numel() else 0.0,
                rot_norm=float(r.norm()))


def run_arm_seed(base, task: RetrievalTask, moments: dict, arm: Arm, seed: int, config: AblationConfig,
                 probe: dict, z_probe: torch.Tensor, prototypes: torch.Tensor | None = None,
                 on_step: Callable[[int, float], None] | None = None,
                 before_correct: torch.Tensor | None = None, output_moments: dict | None = None) -> dict:
    """Attach (timed), check the identity at init on ``probe``, train, evaluate. Returns the run's numbers.

    ``prototypes``: the untrained model's prototypes (the memory's start for ``loss="prototypes"``).
    ``before_correct``: the untrained model's per-query hits (Q,) bool, for ``n_fixed`` / ``n_broken``
    (queries this run gets right that the untrained model got wrong, and the reverse); ``None``: -1.

    ``output_moments``: the targets' output moments, for the two-sided arm (:mod:`covsvd.lab.ablate_output`).

    ``base`` is never mutated: the run works on a deep copy (so rows do not depend on run order).
    """
    import covsvd

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    report = covsvd.attach_adapters(
        model, moments, r=config.r, metric=arm.metric, eps=config.eps, eps_mode=config.eps_mode,
        coeff=config.coeff, rotate=arm.rotate, block_size=config.block_size, max_angle=config.max_angle,
        targets=config.targets, progress=False,
        **(dict(output_moments=unit_output(output_moments), eps_output=config.eps) if arm.metric == "two-sided"
           else {}))
    init_s = time.perf_counter() - t0
    with torch.no_grad():
        init_err = float((embed(model, probe) - z_probe).abs().max())
    params = [p for p in model.parameters() if p.requires_grad]
    t1 = time.perf_counter()
    losses = train_steps(model, task, params, config.steps, config.lr, seed, on_step=on_step,
                         prototypes=prototypes)
    train_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    after = task.evaluate(model)
    eval_s = time.perf_counter() - t2
    q = max(1, math.ceil(len(losses) / 4))
    hits = after["correct"]  # (Q,) bool
    fixed = int((hits & ~before_correct).sum()) if before_correct is not None else -1
    broken = int((before_correct & ~hits).sum()) if before_correct is not None else -1
    return dict(
        trainable_params=sum(p.numel() for p in params), init_s=init_s, train_s=train_s, eval_s=eval_s,
        score_after=after["accuracy"], mrr_after=after["mrr"], n_fixed=fixed, n_broken=broken,
        loss_start=sum(losses[:q]) / q, loss_end=sum(losses[-q:]) / q, init_output_error=init_err,
        identity_error=max(r["identity_error"] for r in report.rows), **_norms(model))


# ------------------------------------------------------------------------------------------- the sweep


def ablate(
    arms: Sequence[str] | None = None,
    seeds: Iterable[int] = DEFAULT_SEEDS,
    out: str | os.PathLike | None = DEFAULT_OUT,
    config: AblationConfig | None = None,
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
    model_path: str | os.PathLike | None = None,
    progress: bool = True,
    hook: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = print,
    threads: int | None = None,
):
    """Run every (arm, seed) not yet in ``out`` and append its row; return this config's rows (polars).

    Args:
        arms: names from :data:`ARMS` (default: all of them, baseline first).
        seeds: training seeds (batch order); the init is seed-free (gains and rotations start at zero).
        out: the results CSV (created when missing; rows of other configs are kept and skipped).
            ``None``: keep rows in memory only (no resume).
        config: :class:`AblationConfig` (default: the full sweep's settings).
        cache_dir: where captured moments are cached (``None``: recapture every call).
        model_path: a local transformers checkpoint with ``encoder.layer.*.output.dense`` modules
            (default: the embedded all-MiniLM-L6-v2).
        progress: tqdm bars (capture, and one per arm over its seeds x steps).
        hook: ``hook(arm, seed, step)`` after every training step (tests use it to interrupt a sweep).
        log: where the one-line notes go (``None``: silent).
        threads: ``torch.set_num_threads`` for the sweep (restored afterwards); ``None`` keeps torch's (all
            cores). Use every core when the sweep runs alone, fewer on a loaded machine (docs/ablations.md).
            The count is recorded in the ``threads`` column (it can change the last bits of a row); the start
            line prints the load average.

    The model and task are built once; moments are captured once (or loaded from the cache) and reused
    by every arm. ``score_before`` is the untrained model's score, evaluated once per call and shared by
    every row (the adapters equal the original at init; ``init_output_error`` records the max |embedding
    difference| on a probe batch at init, per run, to show it). Each row's ``outcome`` says what the run
    did (:func:`run_outcome`); runs that learned nothing are listed in the closing lines, never hidden.
    The closing lines also give the total wall time, process CPU time, the setup's parts, each arm's wall
    time and the load average at start and end (for timing the sweep).
    """
    if threads is None:
        return _ablate(arms, seeds, out, config, cache_dir, model_path, progress, hook, log)
    if threads < 1:
        raise ValueError(f"threads={threads} must be >= 1 (or None for torch's default)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _ablate(arms, seeds, out, config, cache_dir, model_path, progress, hook, log)
    finally:
        torch.set_num_threads(previous)


def _ablate(arms, seeds, out, config, cache_dir, model_path, progress, hook, log):
    import polars as pl
    from tqdm import tqdm

    import covsvd

    from ..data.fingerprint import model_identity

    say = log or (lambda s: None)
    config = config or AblationConfig()
    arms = list(ARMS) if arms is None else list(arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds}: give at least one seed, each once")

    t_start, cpu_start = time.perf_counter(), _cpu_seconds()
    load_start = os.getloadavg()
    model, tokenizer = covsvd.load_default_model() if model_path is None else covsvd.load_model(model_path)
    for p in model.parameters():
        p.requires_grad_(False)
    ident = model_identity(model)
    chash = config.config_hash(model_key(model))  # structure and weights: another checkpoint, other rows
    setup = {"load model": time.perf_counter() - t_start}
    rows_mem: list[dict] = []
    done = {(r["arm"], int(r["seed"])) for r in (read_rows(out) if out is not None else [])
            if r["config_hash"] == chash}
    wanted = {(a, s) for a in arms for s in seeds}
    todo = [(a, s) for a in arms for s in seeds if (a, s) not in done]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    say(f"covsvd ablate: config {chash}, {len(arms)} arms x {len(seeds)} seeds, {len(done & wanted)} already in "
        f"{out}, {len(todo)} to run; torch threads {torch.get_num_threads()}, {cores} cores, load average "
        f"{load_start[0]:.2f} (1 min)")
    if todo and torch.get_num_threads() > 1 and load_start[0] > 0.5 * cores:
        say(f"note: the machine is already loaded (load {load_start[0]:.1f} on {cores} cores); with other jobs "
            "running, --threads 1 is often faster than several threads")

    if todo:
        t0 = time.perf_counter()
        task = RetrievalTask(tokenizer, config.task)
        desc = task.describe()
        setup["task"] = time.perf_counter() - t0
        need_moments = any(ARMS[a].train and ARMS[a].metric != "identity" for a, _ in todo)
        moments, minfo = (moments_for(model, tokenizer, config, cache_dir, progress) if need_moments
                          else (None, dict(capture_s=0.0, cached=False, tokens=0)))
        outputs = None
        if any(ARMS[a].metric == "two-sided" for a, _ in todo):
            outputs, oinfo = output_moments_for(model, tokenizer, config, cache_dir, progress)
            setup["output moments (cached)" if oinfo["cached"] else "output moments (captured)"] = oinfo["capture_s"]
        if need_moments:
            setup["moments (cached)" if minfo["cached"] else "moments (captured)"] = minfo["capture_s"]
            say(f"moments: {minfo['tokens']} train-split tokens, "
                f"{'loaded from' if minfo['cached'] else 'captured and cached in'} {minfo['path']} "
                f"({minfo['capture_s']:.1f} s)")
        t0 = time.perf_counter()
        before, prototypes = task.evaluate(model, return_prototypes=True)
        setup["untrained eval"] = time.perf_counter() - t0
        say(f"untrained score: accuracy {before['accuracy']:.4f}, MRR {before['mrr']:.4f} on {before['n_eval']} "
            f"{config.task.holdout} queries ({setup['untrained eval']:.1f} s; computed once, shared by every row)")
        probe = task.collate(task._query_ids[: min(16, len(task._query_ids))])
        with torch.no_grad():
            z_probe = embed(model, probe)

    common = dict(
        r=config.r, steps=config.steps, lr=config.lr, coeff=config.coeff, eps=config.eps, eps_mode=config.eps_mode,
        docs_per_batch=config.task.docs_per_batch, max_length=config.task.max_length, config_hash=chash,
        model=ident["name_or_path"], covsvd_version=covsvd.__version__,
        torch_version=torch.__version__.split("+")[0], threads=torch.get_num_threads(), source=SOURCE)
    arm_wall: dict[str, tuple[float, int]] = {}
    for arm_name in arms:
        seeds_left = [s for a, s in todo if a == arm_name]
        if not seeds_left:
            continue
        arm = ARMS[arm_name]
        t_arm = time.perf_counter()
        total = len(seeds_left) * (config.steps if arm.train else 1)
        with tqdm(total=total, desc=f"{arm_name:>9}", disable=not progress, unit="step") as bar:
            for seed in seeds_left:
                base_row = dict(common, arm=arm_name, axis=arm.axis, metric=arm.metric or "none",
                                rotate=arm.rotate or "none", seed=seed, score_before=before["accuracy"],
                                mrr_before=before["mrr"], n_eval=before["n_eval"],
                                n_train_passages=desc["n_train_passages"],
                                calib_tokens=minfo["tokens"] if arm.train and arm.metric != "identity" else 0,
                                date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
                if arm.train:
                    def on_step(step, loss, arm_name=arm_name, seed=seed):
                        bar.update(1)
                        bar.set_postfix(seed=seed, loss=f"{loss:.3f}")
                        if hook is not None:
                            hook(arm_name, seed, step)

                    res = run_arm_seed(model, task, moments, arm, seed, config, probe, z_probe, prototypes,
                                       on_step, before_correct=before["correct"], output_moments=outputs)
                else:
                    res = dict(trainable_params=0, init_s=0.0, train_s=0.0, eval_s=0.0,
                               score_after=before["accuracy"], mrr_after=before["mrr"], n_fixed=0, n_broken=0,
                               loss_start=float("nan"), loss_end=float("nan"), init_output_error=0.0,
                               identity_error=0.0, gain_norm=0.0, gain_max=0.0, rot_norm=0.0, steps=0)
                    bar.update(1)
                row = {**base_row, **res}
                row["outcome"] = run_outcome(arm.train, row["score_before"], row["score_after"], row["gain_norm"],
                                             row["rot_norm"])
                if out is not None:
                    append_row(out, row)
                rows_mem.append({k: row[k] for k in COLUMNS})
                bar.set_postfix(seed=seed, acc=f"{row['score_after']:.3f}", outcome=row["outcome"])
        arm_wall[arm_name] = (time.perf_counter() - t_arm, len(seeds_left))
    wall, cpu, load_end = time.perf_counter() - t_start, _cpu_seconds() - cpu_start, os.getloadavg()
    for line in _closing_lines(rows_mem, wall, cpu, setup, arm_wall, load_start, load_end, cores, out):
        say(line)
    if out is None:
        return pl.DataFrame(rows_mem)
    return load_results(out).filter(pl.col("config_hash") == chash)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _closing_lines(rows, wall, cpu, setup, arm_wall, load_start, load_end, cores, out) -> list[str]:
    """The sweep's closing report: timing (total, setup, per arm), load, and the runs that learned nothing."""
    lines = [f"covsvd ablate: done in {wall:.1f} s wall ({wall / 60:.1f} min), process CPU {cpu:.1f} s, "
             f"{len(rows)} runs" + (f" -> {out}" if out is not None else "")
             + f"; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end ({cores} cores)"]
    if setup:
        lines.append("  setup: " + ", ".join(f"{k} {v:.1f} s" for k, v in setup.items()))
    if arm_wall:
        lines.append("  per arm (wall, runs done now): " + ", ".join(
            f"{a} {t:.1f} s/{n}" for a, (t, n) in arm_wall.items()))
    trained = [r for r in rows if r["outcome"] != "untrained"]
    count = {o: sum(r["outcome"] == o for r in trained) for o in OUTCOMES[1:]}
    if trained:
        lines.append(f"  outcomes of the {len(trained)} trained runs: " + ", ".join(f"{o} {n}" for o, n in count.items()))
    for r in trained:  # every run that did not beat the untrained model is named, never hidden
        if r["outcome"] != "improved":
            tag = "LEARNED NOTHING" if r["outcome"] in LEARNED_NOTHING else "not improved"
            lines.append(f"  {tag}: {r['arm']} seed {r['seed']}: {r['outcome']} (accuracy {r['score_before']:.4f} "
                         f"-> {r['score_after']:.4f}, gain norm {r['gain_norm']:.3g})")
    return lines


# ------------------------------------------------------------------------------------------- CLI


def _print_summary(df) -> None:
    import polars as pl

    if df.is_empty():
        return
    s = summarize(df)
    with pl.Config(tbl_rows=50, tbl_cols=20, float_precision=4, tbl_width_chars=200, fmt_str_lengths=40):
        print(f"held-out accuracy per arm (mean over seeds, {100 * 0.95:.0f}% t-interval over seeds; before = "
              "untrained; fixed/broken = queries gained/lost vs untrained, summed over seeds):")
        print(s.select("arm", "n_seeds", "before", "mean", "ci_low", "ci_high", "binom_se", "delta", "n_improved",
                       "n_fixed", "n_broken", "trainable_params", "init_s", "train_s", "gain_norm", "verdict"))


def run_cli(args) -> int:
    quick = bool(args.quick)
    config = QUICK_CONFIG if quick else AblationConfig()
    changes = {k: getattr(args, k) for k in ("r", "coeff", "lr", "steps", "eps") if getattr(args, k) is not None}
    task_changes = {k: getattr(args, k) for k in ("docs_per_batch", "max_length") if getattr(args, k) is not None}
    if args.holdout is not None:
        task_changes["holdout"] = args.holdout
    if task_changes:
        changes["task"] = replace(config.task, **task_changes)
    config = replace(config, **changes)
    arms = args.arms or list(QUICK_ARMS if quick else ARMS)
    seeds = args.seeds if args.seeds is not None else list(QUICK_SEEDS if quick else DEFAULT_SEEDS)
    out = Path(args.out) if args.out else (QUICK_OUT if quick else DEFAULT_OUT)
    df = ablate(arms=arms, seeds=seeds, out=out, config=config, cache_dir=None if args.no_cache else args.cache_dir,
                model_path=args.model, progress=not args.no_progress, threads=args.threads)
    _print_summary(df)
    return 0


def register_cli(subparsers) -> None:
    """Add the ``ablate`` verb (``python -m covsvd ablate``; ``make ablations``, ``make ablations-quick``)."""
    p = subparsers.add_parser(
        "ablate",
        help="local CPU ablation sweep: train the bounded-gain adapter per arm and seed (resumable)",
        description="Fine-tune the bounded-gain adapter on the FFN output layers of the default model for the "
        "metric arms (identity, diag, full, corda), the rotation arms (rot-V, rot-U, rot-both) and an untrained "
        "baseline, several seeds each, on a held-out topic-retrieval task; append one tidy row per (arm, seed) "
        f"to --out (default {DEFAULT_OUT}). Finished rows are skipped on restart. --quick: "
        f"{len(QUICK_ARMS)} arms x 1 seed x {QUICK_CONFIG.steps} steps on a small eval, into {QUICK_OUT}.",
    )
    p.add_argument("--quick", action="store_true", help="tiny CI run (seconds)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), metavar="ARM", help=f"arms to run (of {list(ARMS)})")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="training seeds (default 0 1 2; quick 0)")
    p.add_argument("--out", default=None, metavar="CSV", help=f"results file (default {DEFAULT_OUT})")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), metavar="DIR", help="moments cache folder")
    p.add_argument("--no-cache", action="store_true", help="recapture moments, cache nothing")
    p.add_argument("--model", default=None, metavar="PATH", help="a local BERT-style checkpoint (default: embedded)")
    p.add_argument("--holdout", choices=("heldout", "validation"), default=None,
                   help="score on the held-out split (default) or a validation split of train (pilots)")
    for name, typ in (("r", int), ("coeff", float), ("lr", float), ("steps", int), ("eps", float),
                      ("docs-per-batch", int), ("max-length", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the config (changes the config hash)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (default: torch's, i.e. every core: right when the sweep runs alone; "
                   "1 can be several times faster on a machine other jobs load)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(run=run_cli)
