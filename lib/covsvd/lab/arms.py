"""The arms, seeds and settings of the local ablation sweep (:mod:`covsvd.lab.ablate`), and the words for what one
run did. Every setting that changes a row's numbers is in :class:`AblationConfig`, whose hash keys the rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .task import TaskConfig

TARGETS = r"encoder\.layer\.\d+\.output\.dense"
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
    Arm("two-sided", "two-sided", None, axis="metric"),  # G: probe output moments (covsvd.lab.ablate_output)
    Arm("rot-V", "identity", "V", axis="rotation"),
    Arm("rot-U", "identity", "U", axis="rotation"),
    Arm("rot-both", "identity", "both", axis="rotation"),
)}
DEFAULT_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class AblationConfig:
    """Every setting of a sweep that changes a row's numbers (the arm and seed aside).

    How the defaults were chosen (the time budget, and a pilot on the validation split, never on the held-out
    score) is written down with the pilot's numbers in docs/ablations.md.
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
