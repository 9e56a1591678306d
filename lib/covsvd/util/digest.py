"""SHA-256 digests of tensors, models and batches: what files and caches are keyed and checked by.

Every function hashes exact bytes (no rounding), so equal digests mean equal inputs up to SHA-256 collisions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def _bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t`` (any dtype, any device), row-major."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 over ``key, dtype, shape, bytes`` of every tensor, keys sorted."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def sampled_digest(W: torch.Tensor, samples: int = 4096) -> str:
    """16 hex digits over ``W``'s shape, dtype and up to ``samples`` values at evenly spaced positions.

    O(samples) reads whatever the size: enough to tell a weight apart from another checkpoint's.
    """
    W = W.detach()
    flat = W.reshape(-1)
    n = flat.numel()
    idx = torch.linspace(0, n - 1, min(samples, n), dtype=torch.float64, device=flat.device).round().long()
    h = hashlib.sha256(f"{tuple(W.shape)}|{W.dtype}|".encode())
    h.update(_bytes(flat[idx]))
    return h.hexdigest()[:16]


def shapes_digest(model: nn.Module) -> str:
    """Hex SHA-256 over every parameter's name and shape (``"name:(d0, d1);"``): the structure, no values."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()


def state_digest(model: nn.Module) -> str:
    """Hex SHA-256 over every ``state_dict`` entry's name, dtype, shape and bytes (all the model's numbers)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(_bytes(t))
    return h.hexdigest()


def batches_digest(batches: Iterable) -> str:
    """Hex SHA-256 over every batch's keys (or positions) and tensors (dtype, shape, bytes); other values by repr."""
    h = hashlib.sha256()
    for b in batches:
        items = b.items() if isinstance(b, Mapping) else enumerate(b if isinstance(b, (tuple, list)) else [b])
        for k, v in items:
            h.update(str(k).encode())
            if isinstance(v, torch.Tensor):
                h.update(f"{v.dtype}{tuple(v.shape)}".encode())
                h.update(_bytes(v))
            else:
                h.update(repr(v).encode())
    return h.hexdigest()


def json_digest(obj, length: int = 64) -> str:
    """The first ``length`` hex digits of SHA-256 over ``obj`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]
