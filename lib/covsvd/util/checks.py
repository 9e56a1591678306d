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
    m = min(d_out, d_in)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= m:
        bound = f"r={r!r} must be an int in [1, min(d_out, d_in)] = [1, {m}] for W of shape {(d_out, d_in)}"
        if isinstance(r, int) and not isinstance(r, bool) and r > m:
            raise ValueError(f"{prefix}r={r} exceeds min(d_out, d_in) ({bound}); lower r or leave the layer out "
                             "of targets")
        raise ValueError(f"{prefix}{bound}")


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


def check_count(what: str, value, minimum: int = 0, prefix: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{prefix}{what}={value!r} must be an int >= {minimum}")


def tf32_enabled() -> bool:
    """Whether CUDA float32 matmuls may run in TF32 (a 10-bit mantissa) under the current torch settings.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (``"tf32"`` = on; it reflects the legacy
    ``allow_tf32`` flag, ``torch.backends.fp32_precision`` and ``torch.set_float32_matmul_precision`` too) where
    this torch has it, else the legacy ``allow_tf32``. Never changes a setting (reading the legacy flag after the
    new API was used raises in recent torch, so the new one is read first).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if isinstance(precision, str):
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def check_no_tf32(device: torch.device | str, dtypes, what: str, fix: str, prefix: str = "") -> None:
    """Raise ``ValueError`` when float32 products in ``dtypes`` would run on a CUDA ``device`` with TF32 enabled.

    covsvd never computes silently in TF32 and never flips the global flag for the caller: the error names
    the setting and the fix (turn TF32 off around the call, or ``fix``, e.g. compute in float64). CPU and
    float64-only work pass.
    """
    if torch.device(device).type != "cuda" or torch.float32 not in tuple(dtypes) or not tf32_enabled():
        return
    raise ValueError(
        f"{prefix}{what} computes float32 matrix products on {device}, and TF32 matmuls are enabled "
        "(torch.backends.cuda.matmul.fp32_precision == 'tf32', e.g. via allow_tf32 = True or "
        "torch.set_float32_matmul_precision('high')): they would silently run with a 10-bit mantissa. Fix: "
        "set torch.backends.cuda.matmul.fp32_precision = 'ieee' (legacy: allow_tf32 = False) for the call, "
        f"or {fix}")
