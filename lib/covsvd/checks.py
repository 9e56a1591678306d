"""Generic argument checks whose errors name the layer, the shape and the fix (no covsvd types here)."""

from __future__ import annotations

import math

import torch


def where(name: str | None) -> str:
    """The ``"layer 'name': "`` prefix of error messages (empty without a name)."""
    return f"layer {name!r}: " if name else ""


def check_choice(what: str, value, allowed: tuple, prefix: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{prefix}{what}={value!r}; expected one of {allowed}")


def check_finite(t: torch.Tensor, what: str, prefix: str = "") -> None:
    """Raise ``ValueError`` counting the NaN/inf entries of ``t`` (one fp64 sum first: no temporaries when clean)."""
    if math.isfinite(float(t.detach().sum(dtype=torch.float64))):
        return
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{prefix}{what} {tuple(t.shape)} has {bad} non-finite entries (NaN/inf); "
                         "recapture the moments / check the weights")


def check_rank(r, d_out: int, d_in: int, prefix: str = "") -> None:
    """Raise ``ValueError`` unless ``r`` is an int in ``[1, min(d_out, d_in)]``."""
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= min(d_out, d_in):
        raise ValueError(f"{prefix}r={r!r} must be an int in [1, min(d_out, d_in)] = [1, {min(d_out, d_in)}] "
                         f"for W of shape {(d_out, d_in)}")


def check_weight(W, prefix: str = "") -> tuple[int, int]:
    """``(d_out, d_in)`` of a 2-D, materialised, floating, finite weight; raises ``ValueError`` otherwise."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"{prefix}W must be a 2-D floating tensor (d_out, d_in); got "
                         f"{getattr(W, 'shape', type(W).__name__)} {getattr(W, 'dtype', '')}: quantised weights "
                         "are not supported, dequantise first")
    if W.is_meta:
        raise ValueError(f"{prefix}W {tuple(W.shape)} is on the meta device (not materialised): load the weights "
                         "first (e.g. from_pretrained without device_map='meta' / init_empty_weights)")
    check_finite(W, "W", prefix)
    return tuple(W.shape)
