"""The capture entry point: :func:`capture_moments`, a loop over :class:`~covsvd.capture.hooked.MomentCapture`
(every target hooked at once) or over :func:`~covsvd.capture.layerwise.iter_block_moments` (one block at a time)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from tqdm.auto import tqdm

from ..data.targets import TargetSpec
from .hooked import MomentCapture, batch_count
from .layerwise import capture_layerwise
from .moments import SecondMoment
from .options import CaptureOptions


def capture_moments(model: nn.Module, batches: Iterable, targets: TargetSpec = None, kind: str = "full",
                    progress: bool = True, **options) -> dict[str, SecondMoment]:
    """``{module name: SecondMoment}`` of the inputs of the target modules over ``batches``.

    Args:
        model: any ``nn.Module`` (a transformers model); run in eval mode under ``torch.no_grad()``; its
            train/eval flags and the grad mode are restored afterwards, and the hooks always removed.
        batches: an iterable (list, generator, ``DataLoader``) of dicts of model inputs (passed as
            ``**kwargs``), tuples/lists (passed positionally) or tensors of ``input_ids`` (every token real);
            moved to the model's device (that of its first parameter). Tokens where the batch's
            ``attention_mask`` is 0 never count. Layerwise capture iterates it once per block (a generator is
            first stored as a list).
        targets: see :func:`covsvd.find_targets` (``None``: every Linear and Conv1D but the output
            embeddings and modules tied to an embedding).
        kind: ``"full"`` (``(d_in, d_in)`` fp64 sums) or ``"diag"`` (``(d_in,)``).
        progress: a tqdm bar over batches (layerwise: over blocks).
        **options: the other fields of :class:`~covsvd.capture.options.CaptureOptions` (``accumulate``,
            ``share_inputs``, ``token_mask``, ``layerwise``, ``blocks``, ``offload``, ``all_reduce``, ``group``),
            all checked before any data runs.

    Returns:
        One entry per target name, in ``named_modules`` order; targets sharing an input map to the *same*
        ``SecondMoment`` object. ``count`` is the number of counted rows (real and selected tokens); each
        moment records :func:`covsvd.data.fingerprint.model_identity` of ``model``.

    Raises:
        ValueError: empty data, zero counted tokens for a target (also a token mask that selects nothing),
            a mask that fits no input, NaN/inf inputs (naming the module and batch), a bad option or
            ``targets``; layerwise: blocks not found (naming ``blocks=``).
        TypeError: an unknown option.
    """
    opts = CaptureOptions.make(kind=kind, **options)
    if opts.layerwise:
        return capture_layerwise(model, batches, targets, opts, progress)
    capture = MomentCapture(model, targets, **{k: getattr(opts, k) for k in ("kind", "accumulate", "share_inputs",
                                                                             "token_mask")})
    with capture:
        bar = tqdm(batches, total=batch_count(batches), desc="capture", unit="batch", disable=not progress)
        for batch in bar:
            capture.add(batch)
            if progress:
                bar.set_postfix(tokens=capture.tokens, refresh=False)
    return capture.moments(all_reduce=opts.all_reduce, group=opts.group)
