"""How to capture: the one definition of the capture options, shared by :func:`covsvd.capture_moments`,
:func:`covsvd.iter_block_moments`, the moments cache key, :func:`covsvd.init_adapters` and the CLI.

Every option is checked when a :class:`CaptureOptions` is made, so a bad value raises before any data runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..util.checks import check_choice
from .gram import ACCUMULATE
from .moments import KINDS
from .rows import TokenMaskSpec, mask_key

#: ``blocks=`` of layerwise capture: ``None`` (found), a dotted path to the block list, or block names in order.
BlockSpec = None | str | Iterable[str]


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture computes and how it runs.

    Attributes:
        kind: ``"full"`` (``(d_in, d_in)`` sums) or ``"diag"`` (``(d_in,)``).
        accumulate: precision of each batch's Gram product, added into fp64 sums: ``"float64"`` (default:
            equals fp64 brute force to ~1e-15) or ``"float32"`` (fp32 GEMM, ~1e-7 relative; it loses the small
            eigenvalues, bench/results/capture.md). On CUDA with TF32 matmuls enabled ``"float32"`` raises.
        share_inputs: targets reading the same input tensor share one accumulator (one product).
        token_mask: which tokens count besides padding: ``None`` (every real token), ``"labels"`` (the batch's
            ``labels != -100``), another batch key (a bool / 0-1 ``(B, T)`` tensor), or ``f(batch) -> (B, T)``
            bool. A key read as the mask is not passed to the forward.
        layerwise: run the data through one transformer block at a time (:mod:`covsvd.capture.layerwise`):
            only one block's accumulators exist at a time; equal to the default capture to fp64 rounding.
        blocks: layerwise only: where the blocks are (``None``: found; a dotted path such as
            ``"model.layers"``; or block module names in call order).
        offload: layerwise only: where cached block outputs and finished moments wait (``"cpu"``; ``None``:
            they stay on the device). A CUDA device must exist.
        all_reduce: sum the moments over the processes of ``group`` (``torch.distributed``) before returning.
        group: the process group of ``all_reduce`` (``None``: the default group).

    Raises ``ValueError`` (``TypeError`` for a token mask of another type) naming the option and the fix.
    """

    kind: str = "full"
    accumulate: str = "float64"
    share_inputs: bool = True
    token_mask: TokenMaskSpec = None
    layerwise: bool = False
    blocks: BlockSpec = None
    offload: torch.device | str | None = "cpu"
    all_reduce: bool = False
    group: object = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("accumulate", self.accumulate, ACCUMULATE)
        mask_key(self.token_mask)
        if self.offload is not None:
            try:
                device = torch.device(self.offload)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"offload={self.offload!r} is not a device; pass 'cpu', 'cuda:0' or None") from e
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"offload={self.offload!r} but CUDA is not available here; pass offload='cpu' "
                                 "(the default) or None")
        if self.blocks is not None and not isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", tuple(self.blocks))

    @classmethod
    def make(cls, options: CaptureOptions | Mapping | None = None, **overrides) -> CaptureOptions:
        """``options`` (a :class:`CaptureOptions`, a dict of its fields or ``None``) with ``overrides`` applied.

        Raises ``TypeError`` naming the valid options for an unknown keyword.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        base = dataclasses.asdict(options) if isinstance(options, CaptureOptions) else dict(options or {})
        unknown = sorted((set(base) | set(overrides)) - fields)
        if unknown:
            raise TypeError(f"unknown capture option(s) {unknown}; the options are {sorted(fields)}")
        return cls(**{**base, **overrides})

    def kwargs(self, *drop: str) -> dict:
        """The fields as keyword arguments of :func:`covsvd.capture_moments` (without the names in ``drop``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in drop}

    def key(self) -> dict:
        """What changes the captured numbers, as JSON (the cache key). Raises ``ValueError`` for a callable
        ``token_mask`` (a function cannot be keyed)."""
        if callable(self.token_mask):
            raise ValueError("a callable token_mask cannot key a cache; pass a batch key such as 'labels'")
        return dict(kind=self.kind, accumulate=self.accumulate, token_mask=self.token_mask)
