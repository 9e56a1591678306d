"""Streaming initialisation: capture a block's moments, orient, attach, free them (:func:`init_adapters`).

Every target is planned and checked before any data runs (:func:`covsvd.adapt.plan.plan_targets`). With the
default layerwise capture a whole model's full-C init holds one block's moments at a time (plus those of the
few targets outside the blocks, attached last): :func:`covsvd.iter_block_moments` yields each block's
moments as the block finishes, that block's adapters are built and installed, and the moments dropped. The
result is the adapters ``capture_moments`` + ``attach_adapters`` give: every block's inputs come from the
block outputs cached while the model was still plain (:mod:`covsvd.capture.layerwise`), so attaching block
``i`` never changes what block ``i + 1`` sees.

``moments_dir``: each finished block's moments are written there (:func:`covsvd.save_moments`, atomic) before
they are used, one file per block; a rerun finds them, checks they belong to this model's weights, these
targets and this kind, and skips capturing those blocks (they still run, to feed the next). It assumes the
same data and token mask as the interrupted run (those are not recorded). Targets outside the blocks are
recaptured.

``metric="two-sided"``: the output moments ``G`` (:func:`covsvd.capture_output_moments`, mode ``output_mode``,
``kind="full"``, the capture's ``token_mask``) are captured first, on the plain model, over all of ``batches``
(a backward through the whole model per batch), unless ``output_moments=`` gives them; then the input side
streams as above. Every target's ``G`` is held for the whole call: ``8 * sum_l d_out_l^2`` bytes (fp64 sums) on
top of the layerwise capture's own memory. ``batches`` is then read twice, so it must be re-iterable (a list,
not a generator).

On any error or interrupt, every module this call replaced is put back (the very objects) with the
``requires_grad`` flags: the model is as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE, resolve_eps
from ..algebra.validate import OUTPUT_METRICS
from ..capture.files import load_moments, read_metadata, save_moments
from ..capture.layerwise import AFTER, BEFORE, find_blocks, iter_block_moments
from ..capture.moments import SecondMoment
from ..capture.options import CaptureOptions
from ..capture.output import MODES, capture_output_moments
from ..capture.run import capture_moments
from ..data.fingerprint import check_same_model
from ..data.targets import TargetSpec
from ..util.checks import check_choice
from .attach import adapter_options, build_adapters, check_orient_kwargs, warn_insufficient
from .plan import Plan, capture_kind, check_moments, check_output_moments, plan_targets
from .registry import install, restore
from .report import AttachReport

#: Keyword arguments of :func:`init_adapters` that configure the adapter (the rest go to :func:`covsvd.orient`).
ADAPTER_OPTIONS = ("coeff", "rotate", "block_size", "max_angle", "dtype")


def _stage_file(directory: Path, index: int, stage: str) -> Path:
    return directory / f"{index:04d}-{stage}.moments.safetensors"


def _load_checked(path: Path, plan: Plan, kind: str, names: list[str], check_weights: bool
                  ) -> dict[str, SecondMoment]:
    """The moments saved at ``path``; ``ValueError`` unless they are ``kind`` moments of exactly ``names``,
    captured on the plan's model (its identity from before any adapter was attached)."""
    meta = read_metadata(path)
    check_same_model(meta["model"], plan.identity, f"the moments in {path}",
                     "delete the file, or pass another moments_dir", check_weights)
    moments = load_moments(path)
    if sorted(moments) != sorted(names) or meta["kind"] != kind:
        raise ValueError(f"{path} holds kind={meta['kind']!r} moments of {sorted(moments)[:3]}..., not kind="
                         f"{kind!r} moments of the targets {names[:3]}...: delete it, or pass another moments_dir")
    return moments


def _capture_options(capture, metric: str) -> CaptureOptions:
    """A :class:`CaptureOptions` is used as it is (its kind checked against the metric); a dict (or ``None``)
    gets init's defaults for the fields it leaves out: ``layerwise=True`` and the kind the metric needs
    (:func:`covsvd.adapt.plan.capture_kind`)."""
    if isinstance(capture, CaptureOptions):
        capture_kind(metric, capture.kind)
        return capture
    fields = dict(capture or {})
    fields.setdefault("layerwise", True)
    fields["kind"] = capture_kind(metric, fields.get("kind"))
    return CaptureOptions.make(fields)


def init_adapters(model: nn.Module, batches: Iterable, r: int | dict[str, int], metric: str = "full", *,
                  targets: TargetSpec = None, capture: CaptureOptions | Mapping | None = None,
                  moments_dir: str | os.PathLike | None = None, progress: bool = True, check_weights: bool = True,
                  eps: float = DEFAULT_EPS, eps_mode: str = DEFAULT_EPS_MODE, output_moments: Mapping | None = None,
                  output_mode: str = "probe", **kwargs) -> AttachReport:
    """Capture, orient and attach covsvd adapters on ``model``, one block at a time by default.

    Args:
        model, batches: as in :func:`covsvd.capture_moments` (``metric="identity"`` reads no data).
        r: rank per layer: an int, or ``{name: r}`` with an entry for every target (as attach_adapters).
        metric: as in :func:`covsvd.attach_adapters` (default ``"full"``).
        targets: a :func:`covsvd.find_targets` spec (default: every Linear / Conv1D but the output embeddings
            and modules tied to embeddings).
        capture: the capture's options: a dict of :class:`~covsvd.capture.options.CaptureOptions` fields (e.g.
            ``{"token_mask": "labels"}``), completed by init's defaults ``layerwise=True`` (capture a block,
            attach it, free its moments) and the kind the metric needs (``"full"`` for full / corda / two-sided, else
            ``"diag"``); or a ``CaptureOptions``, used as it is.
        moments_dir: a directory for each block's moments (non-layerwise: one file of all of them); existing
            files are reused (module doc).
        progress: a bar over blocks (orient bars off).
        check_weights: reused moment files (and given output moments) must come from this model's weights.
        output_moments: ``metric="two-sided"`` only: the targets' output moments (as in
            :func:`covsvd.attach_adapters`); ``None`` captures them first (module doc).
        output_mode: the mode of that capture, ``"probe"`` (default: no labels, any model) or ``"fisher"``
            (the batches' ``labels``); see :func:`covsvd.capture_output_moments`.
        eps, eps_mode, **kwargs: ``coeff``, ``rotate``, ``block_size``, ``max_angle``, ``dtype`` configure the
            adapter (:func:`covsvd.attach_adapters`); the rest go to :func:`covsvd.orient`.

    Returns:
        One :class:`covsvd.AttachReport` over every layer (rows in attach order: blocks, then the targets
        outside them).

    Raises:
        ValueError: every target's checks (rank, weight, wrapped or tied layers), the metric, the capture options
            and ``r`` fail before any data runs; then as capture_moments and attach_adapters; a
            ``moments_dir`` file of another model, weights, kind or target list. On any error the model is left
            as it was (module doc).
    """
    defaults = dict(coeff=1.0, rotate=None, block_size=4, max_angle=0.5, dtype=None)
    options = adapter_options(**defaults | {k: kwargs.pop(k) for k in ADAPTER_OPTIONS if k in kwargs})
    check_orient_kwargs(kwargs, "init_adapters")
    opts = _capture_options(capture, metric)
    plan = plan_targets(model, None, r, metric, targets, deferred=metric != "identity",
                        output_moments=output_moments)
    if metric in OUTPUT_METRICS:
        batches = _output_side(model, batches, plan, opts, output_moments, output_mode, progress, check_weights,
                               eps_mode, kwargs)
    directory = Path(moments_dir) if moments_dir is not None else None
    originals: dict[str, nn.Module] = {}
    report = AttachReport()

    def attach(moments: dict | None, names: list[str]) -> None:
        check_moments(plan, moments, names, check_weights=check_weights)
        warn_insufficient(plan, names, stacklevel=4)
        built, part = build_adapters(plan, names, eps, eps_mode, options, kwargs, progress and metric == "identity")
        originals.update(install(model, built, plan.identity, plan.training))
        report.merge(part)

    try:
        if metric == "identity":
            attach(None, plan.names)
        elif not opts.layerwise:
            attach(_all_moments(model, batches, plan, opts, directory, progress, check_weights), plan.names)
        else:
            _layerwise(model, batches, plan, opts, directory, progress, check_weights, attach)
    except BaseException:
        restore(model, originals)
        raise
    report.settings.update(r=dict(plan.ranks) if isinstance(r, Mapping) else r, layerwise=opts.layerwise)
    return report


def _output_side(model, batches, plan: Plan, opts: CaptureOptions, output_moments, output_mode: str,
                 progress: bool, check_weights: bool, eps_mode: str, orient_kwargs: dict):
    """Two-sided: check ``output_mode`` and ``eps_output``, capture the output moments when not given (the
    batches must be re-iterable: ``ValueError`` for an iterator), check them and store them on the plan's
    targets. Returns ``batches`` for the input side."""
    check_choice("output_mode", output_mode, MODES)
    resolve_eps(orient_kwargs.get("eps_output", DEFAULT_EPS), eps_mode, 1.0)  # raises for a bad eps_output
    if output_moments is None:
        if iter(batches) is batches:
            raise ValueError("metric='two-sided' reads batches twice (output moments, then input moments): pass "
                             "a list (or another re-iterable), not an iterator or generator")
        output_moments = capture_output_moments(model, batches, output_mode, plan.names, "full",
                                                token_mask=opts.token_mask, progress=progress)
    check_output_moments(plan, output_moments, check_weights=check_weights)
    return batches


def _all_moments(model, batches, plan: Plan, opts: CaptureOptions, directory: Path | None, progress: bool,
                 check_weights: bool) -> dict[str, SecondMoment]:
    """Every target's moments at once, from ``directory / "moments.safetensors"`` when it exists."""
    path = directory / "moments.safetensors" if directory is not None else None
    if path is not None and path.is_file():
        return _load_checked(path, plan, opts.kind, plan.names, check_weights)
    moments = capture_moments(model, batches, plan.names, progress=progress, **opts.kwargs())
    if path is not None:
        save_moments(moments, path, model=model)
    return moments


def _layerwise(model, batches, plan: Plan, opts: CaptureOptions, directory: Path | None, progress: bool,
               check_weights: bool, attach) -> None:
    """Capture block by block (:func:`covsvd.iter_block_moments`), attaching each block as it finishes and the
    targets outside the blocks last (no forward of this call may see their adapters)."""
    order = {b: k for k, (b, _) in enumerate(find_blocks(model, opts.blocks))}  # block -> file index

    def reuse(block: str, names: list[str]) -> dict[str, SecondMoment] | None:
        path = _stage_file(directory, order[block], block)
        return _load_checked(path, plan, opts.kind, names, check_weights) if path.is_file() else None

    outside: dict[str, SecondMoment] = {}
    stages = iter_block_moments(model, batches, plan.names, opts.kind, progress,
                                reuse=reuse if directory is not None else None, **opts.kwargs("kind", "layerwise"))
    try:
        for stage, moments in stages:
            for m in moments.values():
                m.model = plan.identity
            if stage in (BEFORE, AFTER):
                outside.update(moments)
                continue
            path = _stage_file(directory, order[stage], stage) if directory is not None else None
            if path is not None and not path.is_file():
                save_moments(moments, path)
            attach(moments, list(moments))
            del moments
        if outside:
            attach(outside, list(outside))
    finally:
        stages.close()
