"""The local ablation sweep: train the bounded-gain adapter on CPU, per arm and seed, and keep tidy rows.

    import covsvd.ablate as ab
    df = ab.ablate()                      # the full sweep -> data/ablations/local.csv (resumable)
    table = ab.summarize(ab.load_results("data/ablations/local.csv"))   # per-arm mean, 95% t-interval

What one row is. The default model (all-MiniLM-L6-v2) gets adapters on its six FFN output layers
(``encoder.layer.*.output.dense``, W 384 x 1536: the analogue of ``down_proj``), oriented by the arm's
metric from second moments captured on the *train* split, then only the adapters' gains (and rotations)
train for ``steps`` batches of the contrastive task of :mod:`covsvd.task`. The row records the held-out
retrieval score before (the untrained model) and after, the time of ``attach_adapters`` (orientation
included) and of training, the trainable parameter count, and how far the gains moved.

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
import csv
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .task import RetrievalTask, TaskConfig, embed, train_steps

TARGETS = r"encoder\.layer\.\d+\.output\.dense"
SOURCE = "local: covsvd ablate (CPU)"
DEFAULT_OUT = Path("data/ablations/local.csv")
DEFAULT_CACHE = Path("data/ablations/cache")
QUICK_OUT = DEFAULT_CACHE / "quick.csv"


@dataclass(frozen=True)
class Arm:
    """One arm: how the adapter is oriented (``metric``) and rotated; ``train=False`` is the baseline."""

    name: str
    metric: str | None
    rotate: str | None
    train: bool = True
    axis: str = ""  # "metric", "rotation", "both" (identity: the reference of both axes) or "baseline"


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("baseline", None, None, train=False, axis="baseline"),
    Arm("identity", "identity", None, axis="both"),
    Arm("diag", "diag", None, axis="metric"),
    Arm("full", "full", None, axis="metric"),
    Arm("corda", "corda", None, axis="metric"),
    Arm("rot-V", "identity", "V", axis="rotation"),
    Arm("rot-U", "identity", "U", axis="rotation"),
    Arm("rot-both", "identity", "both", axis="rotation"),
)}
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class AblationConfig:
    """Every setting of a sweep that changes a row's numbers (the arm and seed aside).

    How the defaults were chosen. ``steps`` x batch (30 x 16 documents x 2 passages, 64 tokens) and the
    16 prototype passages per document come from the time budget (the full sweep in ~20 min on 2 cores).
    ``lr`` and ``r`` from a pilot on the *validation* split (a part of train; ``--holdout validation``),
    never on the held-out score: identity arm, seed 0, 30 steps, accuracy change in points (MRR in
    brackets): lr 0.01 / 0.03 / 0.1 / 0.3 -> -0.5 (+0.3) / 0.0 (+1.0) / +2.8 (+3.2) / -1.9 (-0.2); the
    memory-of-prototypes loss at lr 0.03 / 0.1 / 0.3 -> +1.4 / +2.3 / +1.4 (no better, so the in-batch
    pair loss stays); r 32 / 64 / 128 at lr 0.1 -> -0.5 / +1.9 / +1.4. One seed each and a binomial SE
    of ~3.3 points on 215 validation queries: the pilot only rules out learning rates that barely move
    (<= 0.03) or overshoot (0.3); it does not rank r. ``coeff`` 1 and ``eps`` 1e-3 absolute (covsvd's
    default damping) were not tuned.
    """

    r: int = 64  # rank kept per layer (of min(384, 1536) = 384)
    coeff: float = 1.0  # S_eff = S * (1 + ELU(coeff * g))
    lr: float = 0.1  # Adam, constant
    steps: int = 30  # training batches per run (16 documents x 2 passages each)
    eps: float = 1e-3  # damping of the metric (full / corda / diag)
    eps_mode: str = "absolute"
    block_size: int = 4  # Cayley blocks (rotation arms)
    max_angle: float = 0.5  # radians
    calib_tokens: int = 32768  # real tokens of the train split captured for C (seq_len windows)
    calib_seq_len: int = 128
    targets: str = TARGETS
    task: TaskConfig = field(default_factory=lambda: TaskConfig(prototypes_per_doc=16))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["task"] = self.task.as_dict()
        return d

    def config_hash(self, model_fingerprint: str) -> str:
        """12 hex digits of SHA-256 over this config (JSON, sorted keys) and the model's key
        (:func:`model_key`: its structure and a digest of its weights)."""
        blob = json.dumps({"config": self.as_dict(), "model": model_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK_CONFIG = AblationConfig(
    r=8, lr=5e-2, steps=3, calib_tokens=4096,
    task=TaskConfig(max_length=32, docs_per_batch=4, prototypes_per_doc=1, max_queries=32, eval_batch_size=128),
)
QUICK_ARMS = ("baseline", "full", "rot-V")  # full: exercises capture, the cache and the heaviest init
QUICK_SEEDS = (0,)

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
# ``outcome`` of one run (see :func:`run_outcome`). "did not move": the run learned nothing at all;
# "no change": its trainables moved but the held-out accuracy did not.
OUTCOMES = ("untrained", "improved", "worse", "no change", "did not move")
LEARNED_NOTHING = ("did not move",)


def run_outcome(train: bool, score_before: float, score_after: float, gain_norm: float, rot_norm: float) -> str:
    """What one run did, in words (the ``outcome`` column, one of :data:`OUTCOMES`).

    ``"untrained"`` for the baseline; ``"did not move"`` when no trainable moved (gains and rotations all
    still zero: nothing was learned, whatever the score says); otherwise the held-out accuracy against the
    untrained model's: ``"improved"``, ``"worse"`` or ``"no change"``.
    """
    if not train:
        return "untrained"
    if gain_norm == 0.0 and rot_norm == 0.0:
        return "did not move"
    if score_after > score_before:
        return "improved"
    return "worse" if score_after < score_before else "no change"


# ------------------------------------------------------------------------------------------- row file


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


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a results CSV as strings (``[]`` when the file does not exist); checks the header."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = tuple(reader.fieldnames or ())
        if header != COLUMNS:
            missing = [c for c in COLUMNS if c not in header]
            extra = [c for c in header if c not in COLUMNS]
            raise ValueError(f"{path} has another schema (missing {missing}, extra {extra}); it was written by "
                             "another covsvd version: pass a new --out, or move the old file away")
        return list(reader)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    return str(v)


def append_row(path: str | os.PathLike, row: dict) -> bool:
    """Append one row to ``path`` atomically: rewrite to a temp file in the same folder, fsync, ``os.replace``.

    Returns ``False`` (and writes nothing) when a row with the same ``(config_hash, arm, seed)`` is already
    there, so a row is never duplicated. An interruption leaves either the old file or the new one.
    """
    path = Path(path)
    if set(row) != set(COLUMNS):
        raise ValueError(f"row has columns {sorted(set(row) ^ set(COLUMNS))} out of the schema (see COLUMNS)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        rows = read_rows(path)
        key = tuple(_cell(row[k]) for k in KEY)
        if any(tuple(r[k] for k in KEY) == key for r in rows):
            return False
        rows.append({k: _cell(row[k]) for k in COLUMNS})
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp would leave 0600
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, mode)
            with os.fdopen(fd, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
                w.writeheader()
                w.writerows(rows)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return True


def load_results(path: str | os.PathLike = DEFAULT_OUT):
    """The results CSV as a polars DataFrame (typed: ints, floats, strings)."""
    import polars as pl

    path = Path(path)
    read_rows(path)  # schema check, clear error
    return pl.read_csv(path, infer_schema_length=None)


# ------------------------------------------------------------------------------------------- summary


def t_cdf(x: float, dof: int) -> float:
    """CDF of Student's t with an integer ``dof >= 1`` at ``x``: the finite closed form (Abramowitz & Stegun
    26.7.3-4) in ``theta = atan(x / sqrt(dof))``, in Python floats (fp64). Exact up to rounding; no SciPy."""
    if dof < 1 or int(dof) != dof:
        raise ValueError(f"t_cdf needs an integer dof >= 1; got {dof}")
    theta = math.atan(x / math.sqrt(dof))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:  # odd: (2/pi) (theta + sin cos (1 + (2/3) cos^2 + (2*4)/(3*5) cos^4 + ...)), dof - 2 powers
        term, total = 1.0, 1.0 if dof > 1 else 0.0
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: sin (1 + (1/2) cos^2 + (1*3)/(2*4) cos^4 + ...), dof / 2 terms
        term, total = 1.0, 1.0
        for k in range(1, dof // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return 0.5 + 0.5 * a


def t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t with integer ``dof`` (``0.5 < p < 1``): bisection on :func:`t_cdf` to 1e-12."""
    if not 0.5 < p < 1 or dof < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and dof >= 1; got p={p}, dof={dof}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        hi *= 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, dof) < p else (lo, mid)
    return 0.5 * (lo + hi)


def t_interval(x: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """``{"n", "mean", "sd", "ci_low", "ci_high"}``: ``mean -/+ t_{(1+c)/2, n-1} sd / sqrt(n)``, fp64.

    ``sd`` is the sample standard deviation (n - 1); with one value the interval is NaN (never a fake one).
    """
    x = [float(v) for v in x]
    n = len(x)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(x) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in x) / (n - 1)) if n > 1 else float("nan")
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return dict(n=n, mean=mean, sd=sd, ci_low=mean - half, ci_high=mean + half)


def one_config(df, config_hash: str | None = None):
    """``(rows of one config, its hash)``: ``config_hash`` if given (ValueError if absent), else the only one
    (ValueError if the rows hold several: results of different settings are never pooled)."""
    import polars as pl

    hashes = sorted(df["config_hash"].unique().to_list())
    if config_hash is None:
        if len(hashes) != 1:
            raise ValueError(f"the rows come from {len(hashes)} configs {hashes}; pass config_hash=")
        config_hash = hashes[0]
    elif config_hash not in hashes:
        raise ValueError(f"config_hash={config_hash!r} is not in the rows (have {hashes})")
    return df.filter(pl.col("config_hash") == config_hash), config_hash


def summarize(df, score: str = "score_after", confidence: float = 0.95, config_hash: str | None = None):
    """Per-arm mean of ``score`` over seeds with a Student-t confidence interval (polars DataFrame).

    Columns: ``arm, axis, metric, rotate, n_seeds, mean, sd, ci_low, ci_high`` (``mean -/+ t_{(1+c)/2, n-1}
    sd / sqrt(n)``: the spread over *training seeds* only; NaN for one seed), ``before`` (the untrained
    score), ``delta`` (mean - before), ``binom_se`` (``sqrt(p (1 - p) / n_eval)`` at the mean: the
    sampling error of the held-out set, which seeds do not capture), ``n_eval``, ``n_improved`` (seeds
    whose run beat the untrained accuracy), ``n_fixed``, ``n_broken`` (queries gained / lost against the
    untrained model, summed over seeds: the paired, per-query view), ``trainable_params``, ``init_s``,
    ``train_s`` (means), ``gain_norm`` (mean), ``min_gain_norm``, ``verdict`` (:func:`arm_verdict`),
    ``config_hash``. Arms in :data:`ARMS` order.

    ``df`` may hold rows of several configs; then ``config_hash`` must say which (ValueError otherwise).
    """
    import polars as pl

    df, config_hash = one_config(df, config_hash)
    out = []
    order = {name: i for i, name in enumerate(ARMS)}
    for arm in sorted(df["arm"].unique().to_list(), key=lambda a: (order.get(a, len(order)), a)):
        d = df.filter(pl.col("arm") == arm)
        t = t_interval(d[score].cast(pl.Float64).to_list(), confidence)
        n_eval = int(d["n_eval"][0])
        before_col = "mrr_before" if score.startswith("mrr") else "score_before"
        before = float(d[before_col].cast(pl.Float64).mean())
        p = min(max(t["mean"], 0.0), 1.0)
        row = dict(
            arm=arm, axis=d["axis"][0], metric=d["metric"][0], rotate=d["rotate"][0], n_seeds=t["n"],
            mean=t["mean"], sd=t["sd"], ci_low=t["ci_low"], ci_high=t["ci_high"], before=before,
            delta=t["mean"] - before, binom_se=math.sqrt(p * (1 - p) / n_eval), n_eval=n_eval,
            n_improved=int((d["score_after"].cast(pl.Float64) > d["score_before"].cast(pl.Float64)).sum()),
            n_fixed=int(d["n_fixed"].sum()) if "n_fixed" in d.columns else 0,
            n_broken=int(d["n_broken"].sum()) if "n_broken" in d.columns else 0,
            trainable_params=int(d["trainable_params"][0]), init_s=float(d["init_s"].mean()),
            train_s=float(d["train_s"].mean()), gain_norm=float(d["gain_norm"].cast(pl.Float64).mean()),
            min_gain_norm=float(d["gain_norm"].cast(pl.Float64).min()), config_hash=config_hash,
        )
        row["verdict"] = arm_verdict(row, trained=ARMS[arm].train if arm in ARMS else True)
        out.append(row)
    return pl.DataFrame(out)


def arm_verdict(summary_row: dict, trained: bool = True) -> str:
    """One arm's result against the untrained model, in words (a :func:`summarize` row).

    ``"untrained reference"``; ``"learned nothing (gains did not move)"`` when some seed's gains stayed at
    zero; ``"no gain"`` when the mean is not above the untrained score; ``"above untrained (seed CI
    excludes it)"`` when the t-interval over seeds lies above it; else ``"above untrained within seed
    noise"``. The seeds' interval does not include the sampling of held-out queries (see ``binom_se``
    and ``n_fixed`` / ``n_broken``).
    """
    if not trained:
        return "untrained reference"
    if summary_row["min_gain_norm"] == 0.0:
        return "learned nothing (gains did not move)"
    if not summary_row["mean"] > summary_row["before"]:
        return "no gain"
    if summary_row["ci_low"] > summary_row["before"]:
        return "above untrained (seed CI excludes it)"
    return "above untrained within seed noise"


def paired_differences(df, a: str, b: str, score: str = "score_after", confidence: float = 0.95,
                       config_hash: str | None = None) -> dict:
    """Arm ``a`` minus arm ``b`` seed by seed (the same seed draws the same batches: a paired design).

    Returns ``{"a", "b", "score", "n", "mean", "sd", "ci_low", "ci_high", "seeds", "diffs", "n_positive"}``
    with the Student-t interval of the per-seed differences (:func:`t_interval`); only seeds both arms
    have count. ``config_hash`` as in :func:`summarize`.
    """
    import polars as pl

    df, config_hash = one_config(df, config_hash)
    va = dict(df.filter(pl.col("arm") == a).select("seed", score).rows())
    vb = dict(df.filter(pl.col("arm") == b).select("seed", score).rows())
    seeds = sorted(set(va) & set(vb))
    if not seeds:
        raise ValueError(f"arms {a!r} and {b!r} share no seed in config {config_hash} (have {sorted(va)} and "
                         f"{sorted(vb)})")
    diffs = [float(va[k]) - float(vb[k]) for k in seeds]
    return dict(a=a, b=b, score=score, **t_interval(diffs, confidence), seeds=seeds, diffs=diffs,
                n_positive=sum(d > 0 for d in diffs))


# ------------------------------------------------------------------------------------------- moments


def model_key(model) -> str:
    """What identifies a model's *numbers* for the row key and the moments cache: covsvd's structural
    fingerprint (parameter names and shapes) plus a SHA-256 of every state-dict tensor's bytes, so two
    checkpoints of one architecture (``--model PATH``) never share rows or cached moments. ~0.2 s for
    all-MiniLM-L6-v2 (90 MB)."""
    from ..models import model_identity

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"{model_identity(model)['fingerprint']}-{h.hexdigest()[:16]}"


def moments_for(model, tokenizer, config: AblationConfig, cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
                progress: bool = True) -> tuple[dict, dict]:
    """Full second moments of the targets' inputs on the train split, cached under ``cache_dir``.

    The cache file is ``{cache_dir}/ablate-{hash}.moments.safetensors``, the hash over the model
    (:func:`model_key`: structure and weights), the targets, and a SHA-256 of the calibration batches
    themselves (token ids and masks):
    a change of corpus, tokenizer or windowing gives a new file, never a stale one. Building the batches
    to hash them costs a tokenisation (about a second), not a forward pass. ``cache_dir=None`` disables it.
    Sums are accumulated in fp64 by :func:`covsvd.capture_moments`.
    Returns ``(moments, info)`` with ``info = {"path", "cached", "capture_s", "tokens"}``.
    """
    import covsvd

    t0 = time.perf_counter()
    batches = covsvd.calibration_batches(tokenizer, split="train", seq_len=config.calib_seq_len,
                                         max_tokens=config.calib_tokens)
    digest = hashlib.sha256()
    for b in batches:
        for k in ("input_ids", "attention_mask"):
            digest.update(b[k].to(torch.int64).contiguous().numpy().tobytes())
    blob = json.dumps(dict(model=model_key(model), batches=digest.hexdigest(),
                           targets=config.targets, kind="full", accumulate="float64"), sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:12]
    path = None if cache_dir is None else Path(cache_dir) / f"ablate-{key}.moments.safetensors"
    if path is not None and path.is_file():
        moments = covsvd.load_moments(path, model=model)
        cached = True
    else:
        moments = covsvd.capture_moments(model, batches, targets=config.targets, kind="full", progress=progress)
        cached = False
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            covsvd.save_moments(path, moments, model=model)
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
                 before_correct: torch.Tensor | None = None) -> dict:
    """Attach (timed), check the identity at init on ``probe``, train, evaluate. Returns the run's numbers.

    ``prototypes``: the untrained model's prototypes (the memory's start for ``loss="prototypes"``).
    ``before_correct``: the untrained model's per-query hits (Q,) bool, for ``n_fixed`` / ``n_broken``
    (queries this run gets right that the untrained model got wrong, and the reverse); ``None``: -1.

    ``base`` is never mutated: the run works on a deep copy (so rows do not depend on run order).
    """
    import covsvd

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    report = covsvd.attach_adapters(
        model, moments, r=config.r, metric=arm.metric, eps=config.eps, eps_mode=config.eps_mode,
        coeff=config.coeff, rotate=arm.rotate, block_size=config.block_size, max_angle=config.max_angle,
        targets=config.targets, progress=False)
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
            cores). Use every core when the sweep runs alone; on a machine other jobs are loading, 1 thread
            can be several times faster than 2 (OpenMP threads spin-wait: a 384 x 1536 SVD took 3 s on 2
            threads vs 0.06 s on 1 under a load of ~5 on 2 cores). The count is recorded in the ``threads``
            column (it can change the last bits of a row); the start line prints the load average.

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

    from ..models import model_identity

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
                                       on_step, before_correct=before["correct"])
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
