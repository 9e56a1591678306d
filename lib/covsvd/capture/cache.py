"""Capture once, reuse everywhere: :func:`cached_capture` keys a moments file by exactly what produced it.

The key (:func:`cache_path`) hashes the model's identity (parameter names and shapes) and every number of its
state dict, the batch contents (every tensor's bytes), ``kind``, ``targets``, the accumulation precision and
the covsvd version. Any change to any of them is a different file, so a cache hit is the same moments a fresh
capture would give (fp64 sums, written atomically and checked on load by :mod:`covsvd.capture.files`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from torch import nn

from ..data.targets import TargetSpec
from ..util.digest import batches_digest, json_digest, shapes_digest, state_digest
from ..version import __version__
from .files import load_moments, save_moments
from .moments import SecondMoment
from .options import CaptureOptions
from .run import capture_moments


def default_cache_dir() -> Path:
    """``$COVSVD_CACHE_DIR`` if set, else ``~/.cache/covsvd``."""
    env = os.environ.get("COVSVD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "covsvd"


def model_key(model: nn.Module) -> str:
    """What identifies a model's *numbers* in cache and sweep keys: 16 hex digits over its parameters' names and
    shapes (:func:`covsvd.util.digest.shapes_digest`) and 16 over every state-dict tensor
    (:func:`covsvd.util.digest.state_digest`), so two checkpoints of one architecture never share a key. The
    formula is kept fixed: a change would orphan every cached file and every stored sweep row."""
    return f"{shapes_digest(model)[:16]}-{state_digest(model)[:16]}"


def _targets_spec(targets: TargetSpec):
    if callable(targets) and not isinstance(targets, str):
        raise ValueError("cached_capture cannot key a predicate `targets`; pass names or a regex")
    spec = targets.pattern if hasattr(targets, "pattern") else targets
    return sorted(spec) if isinstance(spec, Iterable) and not isinstance(spec, str) else spec


def cache_path(model: nn.Module, batches: Sequence, targets: TargetSpec = None,
               options: CaptureOptions | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The file :func:`cached_capture` reads or writes for these arguments (it need not exist): keyed by
    :func:`model_key`, the batches' bytes, ``targets``, :meth:`CaptureOptions.key` and the covsvd version."""
    options = options or CaptureOptions()
    key = dict(model=model_key(model), data=batches_digest(batches), targets=_targets_spec(targets),
               version=__version__, **options.key())
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return directory / f"moments-{json_digest(key, 24)}.safetensors"


def cached_capture(model: nn.Module, batches: Iterable, targets: TargetSpec = None, kind: str = "full",
                   progress: bool = True, *, cache_dir: str | os.PathLike | None = None,
                   **options) -> dict[str, SecondMoment]:
    """:func:`covsvd.capture_moments` (same arguments and options), read from / written to :func:`cache_path`
    (``cache_dir`` default :func:`default_cache_dir`).

    ``batches`` is materialised into a list (it is hashed, then captured). Returns what ``capture_moments``
    returns. Raises ``ValueError`` for a predicate ``targets`` or a callable ``token_mask`` (a function cannot
    be keyed).
    """
    opts = CaptureOptions.make(kind=kind, **options)
    batches = list(batches)
    path = cache_path(model, batches, targets, opts, cache_dir)
    if path.is_file():
        return load_moments(path, model=model)
    moments = capture_moments(model, batches, targets, progress=progress,
                              **opts.kwargs())
    save_moments(moments, path, model=model, overwrite=True)
    return moments
