"""Quantized layers (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) as targets: refused.

A quantized layer's ``weight`` is packed storage (4-bit: ``uint8 (d_out d_in / 2, 1)``, two codes a byte, with
per-block statistics beside it), not the ``(d_out, d_in)`` matrix the layer computes with; decomposing it
would orient garbage and the residual could not be written back into it. :func:`check_not_quantized` names such
a target and the two ways to a 4-bit adapter start. Nothing here imports bitsandbytes.
"""

from __future__ import annotations

from torch import nn

__all__ = ["check_not_quantized", "quantized_layer"]

_PACKED = ("Params4bit", "Int8Params")


def quantized_layer(module: nn.Module) -> str | None:
    """A description of ``module``'s quantized storage (``"bitsandbytes Linear4bit (nf4, blocksize 64)"``), or
    ``None`` for any other module (a bitsandbytes class or a ``Params4bit`` / ``Int8Params`` weight is quantized).
    Reads class names and the weight's ``quant_state``; changes nothing."""
    weight = getattr(module, "weight", None)
    cls = type(module)
    if type(weight).__name__ not in _PACKED and cls.__module__.split(".")[0] != "bitsandbytes":
        return None  # a plain non-floating weight gets the weight check's own message
    library = cls.__module__.split(".")[0]
    state = getattr(weight, "quant_state", None)
    if state is None:
        return f"{library} {cls.__name__} ({getattr(weight, 'dtype', '?')} storage)"
    nested = ", double quantization" if getattr(state, "nested", False) else ""
    return f"{library} {cls.__name__} ({state.quant_type}, blocksize {state.blocksize}{nested})"


def check_not_quantized(module: nn.Module, prefix: str) -> None:
    """Raise ``ValueError`` (``prefix`` names the layer) when ``module`` holds quantized storage."""
    kind = quantized_layer(module)
    if kind is None:
        return
    raise ValueError(
        f"{prefix}is a {kind}: its weight is quantized storage (codes and scales, not the matrix the layer "
        "computes with), which covsvd never decomposes. For a "
        "4-bit base with a covsvd adapter, load the model unquantized and call covsvd.export_peft(model, moments, "
        "path, r, quantize='nf4') (the residual is quantized after the decomposition, LoftQ with loftq_iters=); "
        "to adapt the quantized weights themselves, dequantize first (transformers: model.dequantize())")
