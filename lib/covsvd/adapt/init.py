"""Streaming initialisation: capture a block's moments, orient, attach, free them (:func:`init_adapters`).

With ``layerwise=True`` a whole model's full-C init holds one block's moments at a time (plus those of the
few targets outside the blocks, attached last): :func:`covsvd.capture.layerwise.iter_block_moments` yields each block's
moments as the block finishes, :func:`covsvd.attach_adapters` attaches that block's targets, and the moments
are dropped. The result is the adapters ``capture_moments`` + ``attach_adapters`` give: every block's inputs
come from the block outputs cached while the model was still plain (the layerwise module doc), so attaching
block ``i`` never changes what block ``i + 1`` sees (not even by the rounding of ``W_res + U S P``).

``moments_dir``: each finished block's moments are written there (:func:`covsvd.save_moments`, atomic) before
they are used, one file per block; a rerun finds them, checks they belong to this model, these targets and
this kind, and skips capturing those blocks (they still run, to feed the next). It assumes the same data and
token mask as the interrupted run (those are not recorded). Targets outside the blocks are recaptured.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from ..algebra.validate import FULL_METRICS, METRICS
from ..capture.files import load_moments, read_metadata, save_moments
from ..capture.hooked import capture_moments
from ..capture.layerwise import AFTER, BEFORE, find_blocks, iter_block_moments
from ..capture.moments import SecondMoment
from ..capture.rows import TokenMaskSpec
from ..data.targets import TargetSpec, find_targets
from ..util.checks import check_choice
from .attach import (
    AttachReport,
    adapters,
    attach_adapters,
    attached_identity,
    detach_adapters,
    layer_ranks,
    set_module,
)

#: Keyword arguments of :func:`init_adapters` that go to the capture; every other one goes to attach_adapters.
CAPTURE_OPTIONS = ("accumulate", "share_inputs", "blocks", "offload", "all_reduce", "group")


def _stage_file(directory: Path, index: int, stage: str) -> Path:
    return directory / f"{index:04d}-{stage}.moments.safetensors"


def _load_checked(path: Path, identity: dict, kind: str, names: list[str]) -> dict[str, SecondMoment]:
    """The moments saved at ``path``; ``ValueError`` unless they are ``kind`` moments of exactly ``names`` of the
    model with ``identity`` (the plain model's: blocks attached meanwhile change the model's own identity)."""
    meta = read_metadata(path)
    if (meta["model"] or {}).get("fingerprint") != identity["fingerprint"]:
        raise ValueError(f"{path} holds moments of a different model: file {meta['model']}, model {identity}; "
                         "delete it, or pass another moments_dir")
    moments = load_moments(path)
    if sorted(moments) != sorted(names) or meta["kind"] != kind:
        raise ValueError(f"{path} holds kind={meta['kind']!r} moments of {sorted(moments)[:3]}..., not kind="
                         f"{kind!r} moments of the targets {names[:3]}...: delete it, or pass another moments_dir")
    return moments


def _reuser(directory: Path, identity: dict, kind: str, order: dict[str, int]):
    """``reuse(block, names)`` for :func:`iter_block_moments`: a block's saved moments, checked, or ``None``."""

    def reuse(block: str, names: list[str]) -> dict[str, SecondMoment] | None:
        path = _stage_file(directory, order[block], block)
        return _load_checked(path, identity, kind, names) if path.is_file() else None

    return reuse


def init_adapters(
    model: nn.Module,
    batches: Iterable,
    r: int | dict[str, int],
    metric: str = "full",
    *,
    layerwise: bool = True,
    targets: TargetSpec = None,
    kind: str | None = None,
    token_mask: TokenMaskSpec = None,
    moments_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **attach_kwargs,
) -> AttachReport:
    """Capture, orient and attach covsvd adapters on ``model``, one block at a time by default.

    Args:
        model, batches: as in :func:`covsvd.capture_moments` (``metric="identity"`` reads no data).
        r: rank per layer: an int, or ``{name: r}`` with an entry for every target (as attach_adapters).
        metric: as in :func:`covsvd.attach_adapters` (default ``"full"``).
        layerwise: ``True``: capture a block, attach it, free its moments (one block's moments alive);
            ``False``: ``capture_moments`` then ``attach_adapters``, every moment alive at once.
        targets: a :func:`covsvd.find_targets` spec (default: every Linear / Conv1D but the output embeddings
            and modules tied to embeddings).
        kind: the capture kind; ``None``: ``"full"`` for the metrics that need C (full, corda), else ``"diag"``.
        token_mask: as in :func:`covsvd.capture_moments`.
        moments_dir: a directory for each block's moments (``layerwise=False``: one file of all of them);
            existing files are reused (module doc).
        progress: a bar over blocks (orient bars off).
        **attach_kwargs: ``accumulate``, ``share_inputs``, ``blocks``, ``offload``, ``all_reduce`` and ``group``
            go to the capture (:data:`CAPTURE_OPTIONS`; with ``all_reduce`` every process of a sharded run
            attaches the same adapters); the rest (``eps``, ``rotate``, ``dtype`` ...) to
            :func:`covsvd.attach_adapters`.

    Returns:
        One :class:`covsvd.AttachReport` over every layer (its rows in attach order: blocks, then the targets
        outside them).

    Raises:
        ValueError: as capture_moments and attach_adapters (``metric``, ``kind`` and ``r`` checked before any
        data runs); a ``moments_dir`` file of another model, kind or target list. When anything fails after
        some blocks were attached, this call's adapters are detached again (:func:`covsvd.detach_adapters`:
        each weight back as ``W_res + U S P``, i.e. as it was up to rounding) before the error propagates.
    """
    capture_kw = {k: attach_kwargs.pop(k) for k in CAPTURE_OPTIONS if k in attach_kwargs}
    check_choice("metric", metric, METRICS)
    kind = kind or ("full" if metric in FULL_METRICS else "diag")
    if metric in FULL_METRICS and kind != "full":
        raise ValueError(f"metric={metric!r} needs the full (d_in, d_in) moments; kind={kind!r} keeps the diagonal "
                         "only: pass kind='full' (or kind=None)")
    names = find_targets(model, targets)
    ranks = layer_ranks(r, names)  # a bad r raises before any data runs
    if metric == "identity":
        return attach_adapters(model, None, r, "identity", targets=names, progress=progress, **attach_kwargs)

    def attach(moments: dict[str, SecondMoment]) -> AttachReport:
        part = list(moments)
        rank = {n: ranks[n] for n in part} if isinstance(r, dict) else r
        return attach_adapters(model, moments, rank, metric, targets=part, progress=False, **attach_kwargs)

    directory = Path(moments_dir) if moments_dir is not None else None
    identity = attached_identity(model)  # of the plain model: the moments' tag, whatever is attached meanwhile
    if not layerwise:
        path = directory / "moments.safetensors" if directory is not None else None
        if path is not None and path.is_file():
            moments = _load_checked(path, identity, kind, names)
        else:
            moments = capture_moments(model, batches, names, kind, progress, token_mask=token_mask, **capture_kw)
            if path is not None:
                save_moments(path, moments, model=model)
        return attach_adapters(model, moments, r, metric, targets=names, progress=progress, **attach_kwargs)

    order = {b: k for k, (b, _) in enumerate(find_blocks(model, capture_kw.get("blocks")))}  # block -> file index
    reuse = _reuser(directory, identity, kind, order) if directory is not None else None
    before = set(adapters(model))
    report = AttachReport()
    outside: dict[str, SecondMoment] = {}
    stages = iter_block_moments(model, batches, names, kind, progress, token_mask=token_mask, reuse=reuse,
                                **capture_kw)
    try:
        for stage, moments in stages:
            for m in moments.values():
                m.model = identity
            if stage in (BEFORE, AFTER):
                outside.update(moments)  # attached last: no forward of this call may see their adapters
                continue
            path = _stage_file(directory, order[stage], stage) if directory is not None else None
            if path is not None and not path.is_file():
                save_moments(path, moments)
            _merge(report, attach(moments))
            del moments
        if outside:
            _merge(report, attach(outside))
    except BaseException:
        stages.close()
        _undo(model, before)
        raise
    report.settings["r"] = r
    report.settings["layerwise"] = True
    return report


def _merge(report: AttachReport, part: AttachReport) -> None:
    report.rows.extend(part.rows)
    report.info.update(part.info)
    if not report.settings:
        report.settings = dict(part.settings)


def _undo(model: nn.Module, before: set[str]) -> None:
    """Remove the adapters attached since ``before`` was taken (all of them: ``detach_adapters``)."""
    added = [n for n in adapters(model) if n not in before]
    if not added:
        return
    if not before:
        detach_adapters(model)
        return
    for name in added:
        set_module(model, name, adapters(model)[name].to_plain(merge=False))
