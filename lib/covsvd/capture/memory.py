"""How much memory capture's accumulators take, before a capture runs: :func:`estimate_memory`.

An accumulator holds fp64 sums (:class:`~covsvd.capture.moments.SecondMoment`): ``sum_xx`` (``d_in^2`` for
``kind="full"``, ``d_in`` for ``"diag"``), ``sum_x`` and ``sum_abs`` (``d_in`` each); :func:`accumulator_bytes`.
Targets that read one input tensor (q/k/v, gate/up) share one accumulator. Sharing is a property of the
forward, not of the modules, so it is *discovered* by one forward of 2 tokens with ``kind="diag"``
accumulators (O(d_in) each) when the model is a transformers model (``config.vocab_size``) with materialised
weights; otherwise (or when that forward fails) no sharing is assumed, an upper bound, and
:attr:`MemoryEstimate.sharing` says which.

Output moments (:func:`covsvd.capture_output_moments`, ``side="output"``): one accumulator per target over its
output width ``d_out`` (``sum_xx`` ``d_out^2`` or ``d_out``, plus two ``d_out`` sums), never shared, all at once
(the backward needs the whole model: no layerwise capture); the row buffer is ``tokens x widest d_out`` fp64.
The forward and backward's own activations are the model's, not the estimate's.

Besides the accumulators, capture holds per batch one row buffer of ``tokens x widest d_in`` in the Gram
product's dtype (:meth:`MemoryEstimate.row_buffer_bytes`), and layerwise capture the cached block outputs
(``tokens x hidden`` per batch, on ``offload``); neither depends on the targets, so neither is in the totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.targets import TargetSpec, find_targets, in_out_features
from ..util.checks import check_choice
from .gram import ACCUMULATE, gram_dtype
from .hooked import MomentCapture, module_device
from .layerwise import find_blocks
from .moments import KINDS
from .options import BlockSpec

#: Which moments :func:`estimate_memory` sizes: the inputs' (capture_moments) or the outputs' (capture_output_moments).
SIDES = ("input", "output")


def accumulator_bytes(d_in: int, kind: str = "full") -> int:
    """Bytes of one accumulator's fp64 sums: ``sum_xx`` (``d_in^2`` or ``d_in``) plus ``sum_x`` and ``sum_abs``."""
    check_choice("kind", kind, KINDS)
    return 8 * ((d_in * d_in if kind == "full" else d_in) + 2 * d_in)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


@dataclass
class MemoryEstimate:
    """Bytes of capture's accumulators (fp64 sums), per target and at the peak.

    Attributes:
        kind, accumulate, layerwise: the capture this estimates.
        per_target: ``{target: bytes}``; a shared accumulator counts under the first target reading it and 0
            under the others, so the values sum to :attr:`total_bytes`.
        groups: ``{first reader: [targets sharing that accumulator]}``.
        blocks: ``{block name: bytes of its targets' accumulators}`` (empty when no blocks were found and
            ``layerwise`` is off).
        outside_bytes: the accumulators of targets outside the blocks (all of them without blocks).
        sharing: how sharing was known (discovered by a forward, or none assumed and why).
        widest: the widest ``d_in`` (``d_out`` for output moments): the width of the per-batch row buffer.
        side: ``"input"`` (capture_moments) or ``"output"`` (capture_output_moments).
    """

    kind: str
    accumulate: str
    layerwise: bool
    per_target: dict[str, int]
    groups: dict[str, list[str]]
    blocks: dict[str, int] = field(default_factory=dict)
    outside_bytes: int = 0
    sharing: str = ""
    widest: int = 0
    side: str = "input"

    @property
    def total_bytes(self) -> int:
        """Every accumulator at once: what the default capture holds."""
        return sum(self.per_target.values())

    @property
    def layerwise_peak_bytes(self) -> int:
        """The largest block's accumulators plus those outside the blocks: a bound on what layerwise capture
        holds at once (the outside ones run with block 0 or in the tail pass, never with every block)."""
        return max(self.blocks.values(), default=0) + self.outside_bytes

    @property
    def peak_bytes(self) -> int:
        """What the estimated capture holds at once: :attr:`layerwise_peak_bytes` or :attr:`total_bytes`."""
        return self.layerwise_peak_bytes if self.layerwise else self.total_bytes

    def row_buffer_bytes(self, tokens: int) -> int:
        """The per-batch row buffer for ``tokens`` tokens per batch (``B*T``), in the Gram product's dtype."""
        return tokens * self.widest * gram_dtype(self.accumulate).itemsize

    def __str__(self) -> str:
        lines = [
            f"MemoryEstimate({self.side} moments, kind={self.kind}, fp64 sums, {self.accumulate} products; "
            f"sharing {self.sharing})",
            f"  {len(self.per_target)} targets in {len(self.groups)} accumulators: every one at once "
            f"{format_bytes(self.total_bytes)}",
        ]
        if self.blocks:
            big = max(self.blocks, key=self.blocks.__getitem__)
            lines.append(f"  layerwise peak {format_bytes(self.layerwise_peak_bytes)} = largest block ({big}) "
                         f"{format_bytes(self.blocks[big])} + outside the {len(self.blocks)} blocks "
                         f"{format_bytes(self.outside_bytes)}")
        lines.append(f"  this capture ({'layerwise' if self.layerwise else 'all at once'}): {format_bytes(self.peak_bytes)}"
                     f" + per batch a row buffer of tokens x {self.widest} x "
                     f"{gram_dtype(self.accumulate).itemsize} B")
        return "\n".join(lines)


def _leaders(model: nn.Module, names: list[str]) -> tuple[dict[str, str], str]:
    """``{target: first target reading its input}`` from one 2-token forward, and how it was found."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    alone = dict(zip(names, names, strict=True))
    if not isinstance(vocab, int) or vocab < 1:
        return alone, "none assumed (not a transformers model with config.vocab_size: no probe input)"
    if any(p.is_meta for p in model.parameters()):
        return alone, "none assumed (meta weights: no probe forward)"
    ids = torch.arange(1, 3).clamp(max=vocab - 1)[None].to(module_device(model))  # (1, 2) token ids
    try:
        with MomentCapture(model, names, kind="diag") as probe:
            probe.add(ids)
        leader = dict(probe.sharing.leader)
    except Exception as e:  # any failure of the probe leaves the upper bound, and says so
        return alone, f"none assumed (the 2-token probe forward failed: {type(e).__name__}: {e})"
    return leader, "discovered by a 2-token forward"


def estimate_memory(
    model: nn.Module,
    targets: TargetSpec = None,
    kind: str = "full",
    layerwise: bool = False,
    *,
    accumulate: str = "float64",
    blocks: BlockSpec = None,
    side: str = "input",
) -> MemoryEstimate:
    """The bytes of every accumulator :func:`covsvd.capture_moments` would hold, and the layerwise peak.

    Args:
        model, targets, kind, accumulate: as in :func:`covsvd.capture_moments`.
        layerwise: which capture :attr:`MemoryEstimate.peak_bytes` describes; with ``True`` the blocks must
            be found (:func:`covsvd.capture.layerwise.find_blocks`, ``blocks=`` as in capture) or it raises.
        blocks: where the blocks are (layerwise capture's ``blocks=``).
        side: ``"input"`` (:func:`covsvd.capture_moments`) or ``"output"`` (:func:`covsvd.capture_output_moments`:
            ``d_out``-sized accumulators, no sharing, no probe forward; ``layerwise`` and ``accumulate="float32"``
            raise, as that capture has neither).

    Nothing is allocated beyond one 2-token probe forward with O(d_in) accumulators (module doc); the
    estimate equals the summed ``nbytes`` of the sums a capture holds (with ``share_inputs=True``).
    """
    check_choice("kind", kind, KINDS)
    check_choice("accumulate", accumulate, ACCUMULATE)
    check_choice("side", side, SIDES)
    if side == "output" and (layerwise or accumulate != "float64"):
        raise ValueError("side='output': output moments are captured all at once (the backward needs the whole "
                         "model) with fp64 products; use layerwise=False and accumulate='float64'")
    names = find_targets(model, targets)
    try:
        found = [name for name, _ in find_blocks(model, blocks)]
    except ValueError:
        if layerwise:
            raise
        found = []
    modules = dict(model.named_modules())
    d_in = {n: in_out_features(modules[n])[1 if side == "input" else 0] for n in names}  # the accumulated width
    if side == "input":
        leader, how = _leaders(model, names)
    else:
        leader, how = dict(zip(names, names, strict=True)), "none (output moments: one accumulator per target)"
    per_target = {n: accumulator_bytes(d_in[n], kind) if leader[n] == n else 0 for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(leader[n], []).append(n)
    owner = {n: next((b for b in found if n.startswith(b + ".")), None) for n in names}
    per_block = {b: 0 for b in found}
    for n, nbytes in per_target.items():
        if owner[n] is not None:
            per_block[owner[n]] += nbytes
    outside = sum(nbytes for n, nbytes in per_target.items() if owner[n] is None)
    return MemoryEstimate(kind, accumulate, layerwise, per_target, groups, per_block, outside, how,
                          max(d_in.values()), side)
