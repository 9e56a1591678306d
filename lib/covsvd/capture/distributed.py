"""Summing captured moments across processes (``torch.distributed``): a sharded calibration set gives
the same result as one process.

Each process captures its own shard (``capture_moments(..., all_reduce=True)``, or capture and then call
:func:`all_reduce_moments`); the fp64 sums and the counts are ``all_reduce``'d (SUM). Works with any
backend that reduces fp64 tensors (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from collections.abc import Mapping

from .moments import SecondMoment


def _layout(moments: Mapping[str, SecondMoment]) -> list[tuple[str, str, int, int]]:
    """Per name: (name, kind, d_in, index of its distinct accumulator): must agree on every process."""
    index: dict[int, int] = {}
    return [(n, m.kind, m.d_in, index.setdefault(id(m), len(index))) for n, m in moments.items()]


def all_reduce_moments(moments: Mapping[str, SecondMoment], group=None) -> Mapping[str, SecondMoment]:
    """Sum ``{name: SecondMoment}`` over the processes of ``group``, in place; returns ``moments``.

    Shared accumulators (one object under several names) are reduced once. Raises ``ValueError`` when
    the processes hold different layers, kinds, shapes or sharing (checked with one ``all_gather_object``
    before any reduction, so a mismatch fails loudly instead of hanging or summing unrelated sums).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "all_reduce_moments needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group(...)) in every process"
        )
    layout = _layout(moments)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, layout, group=group)
    for rank, other in enumerate(gathered):
        if other != layout:
            diff = next((a, b) for a, b in zip(layout + [None], other + [None], strict=False) if a != b)
            raise ValueError(
                f"moments differ between processes (this rank vs rank {rank}): first difference "
                f"(name, kind, d_in, accumulator) {diff[0]} vs {diff[1]}; capture the same targets and kind everywhere"
            )
    done: set[int] = set()
    for m in moments.values():
        if id(m) not in done:
            done.add(id(m))
            m.all_reduce(group=group)
    return moments
