"""What attaching or exporting did: :class:`AttachReport` (one row per layer and the settings of the call),
and the one definition of a layer's row and of a settings record (dtypes as strings), shared by
:func:`covsvd.attach_adapters`, :func:`covsvd.init_adapters` and :func:`covsvd.export_peft`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


def rank_str(r) -> str:
    """``"64"`` for one rank, ``"per layer 8..96"`` for a ``{name: r}`` dict (progress bars, reports)."""
    if isinstance(r, Mapping):
        return f"per layer {min(r.values())}..{max(r.values())}" if r else "per layer (none)"
    return str(r)


def plain(value):
    """``value`` as JSON: a torch dtype as its name (``"float32"``), a mapping's values likewise."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def settings_record(**settings) -> dict:
    """The settings of a call as JSON (dtypes as names): what reports and files record."""
    return {k: plain(v) for k, v in settings.items()}


def layer_row(name: str, W: torch.Tensor, r: int, metric: str, info: dict, identity_error: float, **extra) -> dict:
    """One report row: ``name, d_out, d_in, r, metric, eps`` (absolute, used), ``cond``, ``energy_kept``,
    ``rel_error`` (orient's ``info``), ``identity_error`` and ``extra``."""
    d_out, d_in = W.shape
    return dict(name=name, d_out=d_out, d_in=d_in, r=r, metric=metric, eps=info["eps"], cond=info["cond"],
                energy_kept=info["energy_kept"], rel_error=info["rel_error"], identity_error=identity_error, **extra)


@dataclass
class AttachReport:
    """What :func:`covsvd.attach_adapters` did: one row per layer, and the settings it was called with.

    Row keys (:func:`layer_row`): ``name, d_out, d_in, r, metric, eps`` (the absolute eps orient used), ``cond``
    (of the damped metric), ``energy_kept`` and ``rel_error`` (orient's functional truncation error),
    ``identity_error`` (``max|W_res + U S P - W| / max|W|``, fp64, from the stored tensors), ``restore_error``
    (the same for the weight :func:`covsvd.detach_adapters` will install, after rounding to the model's
    dtype), ``init_s`` (orient + build, seconds), ``trainable``. ``info[name]`` is orient's whole ``info``.
    """

    rows: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_polars(self):
        """The rows as a polars DataFrame (polars is a lab dependency, imported here only: ``import covsvd`` never
        loads it). Raises ``ImportError`` naming the extra when polars is missing."""
        try:
            import polars as pl
        except ImportError as e:
            raise ImportError("AttachReport.to_polars needs polars: pip install 'covsvd[lab]' "
                              "(or use report.rows, a list of dicts)") from e
        return pl.DataFrame(self.rows)

    @property
    def trainable(self) -> int:
        return sum(r["trainable"] for r in self.rows)

    def merge(self, part: AttachReport) -> None:
        """Append ``part``'s rows and info (its settings when this report has none yet)."""
        self.rows.extend(part.rows)
        self.info.update(part.info)
        if not self.settings:
            self.settings = dict(part.settings)

    def __str__(self) -> str:
        if not self.rows:
            return "AttachReport(no layers)"
        worst = max(r["identity_error"] for r in self.rows)
        init = sum(r["init_s"] for r in self.rows)
        return (f"AttachReport({len(self.rows)} layers, metric={self.settings.get('metric')}, "
                f"r={rank_str(self.settings.get('r'))}, rotate={self.settings.get('rotate')}, "
                f"trainable={self.trainable}, "
                f"max identity error {worst:.2e}, init {init:.2f} s)")
