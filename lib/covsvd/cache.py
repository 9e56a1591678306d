"""Capture once, reuse everywhere: ``cached_capture`` keys a moments file by exactly what produced it.

The key hashes the model's identity (parameter names and shapes) and a digest of its weights, the batch
contents (every ``input_ids`` / ``attention_mask`` byte), ``kind``, ``targets``, the accumulation precision
and the covsvd version. Any change to any of them is a different file, so a cache hit is the same
moments a fresh capture would give (fp64 sums, written and checked by :mod:`covsvd.io`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .capture import capture_moments
from .io import load_moments, save_moments
from .models import model_identity
from .moments import SecondMoment
from .targets import TargetSpec


def default_cache_dir() -> Path:
    """``$COVSVD_CACHE_DIR`` if set, else ``~/.cache/covsvd``."""
    env = os.environ.get("COVSVD_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "covsvd"


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _batches_digest(batches: list) -> str:
    h = hashlib.sha256()
    for b in batches:
        items = b.items() if isinstance(b, dict) else enumerate(b if isinstance(b, (tuple, list)) else [b])
        for k, v in items:
            h.update(str(k).encode())
            if isinstance(v, torch.Tensor):
                h.update(f"{v.dtype}{tuple(v.shape)}".encode())
                h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(v).encode())
    return h.hexdigest()


def cache_key(model: nn.Module, batches: list, kind: str, targets: TargetSpec, accumulate: str) -> str:
    from . import __version__

    if callable(targets) and not isinstance(targets, str):
        raise ValueError("cached_capture cannot key a predicate `targets`; pass names or a regex")
    spec = targets.pattern if hasattr(targets, "pattern") else targets
    spec = sorted(spec) if isinstance(spec, Iterable) and not isinstance(spec, str) else spec
    key = dict(model=model_identity(model), weights=_weights_digest(model), data=_batches_digest(batches),
               kind=kind, targets=spec, accumulate=accumulate, version=__version__)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def cached_capture(
    model: nn.Module,
    batches: Iterable,
    targets: TargetSpec = None,
    kind: str = "full",
    progress: bool = True,
    *,
    accumulate: str = "float64",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, SecondMoment]:
    """:func:`covsvd.capture_moments`, read from / written to ``cache_dir`` (default :func:`default_cache_dir`).

    ``batches`` is materialised into a list (it is hashed, then captured). Returns what
    ``capture_moments`` returns; ``cached_capture.last_path`` holds the file used.
    """
    batches = list(batches)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"moments-{cache_key(model, batches, kind, targets, accumulate)}.safetensors"
    cached_capture.last_path = path
    if path.is_file():
        return load_moments(path, model=model)
    moments = capture_moments(model, batches, targets=targets, kind=kind, progress=progress, accumulate=accumulate)
    directory.mkdir(parents=True, exist_ok=True)
    save_moments(path, moments, model=model)
    return moments


cached_capture.last_path = None
