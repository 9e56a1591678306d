"""Trained bounded-gain adapters as a plain peft LoRA on the *original* base, at rank r.

A trained :class:`~covsvd.BoundedGainLinear` computes ``W_res + U R_U^T diag(S_eff) R_V P`` where the original
weight is ``W = W_res + U diag(S) P`` (docs/algebra.md, "Bounded-gain adapter", "Rotation arms"). The change::

    delta = U (R_U^T diag(S_eff) R_V - diag(S)) P = U K P        K (r, r)  (BoundedGainLinear.delta_core)

lies in span(U) x rowspan(P), so it factors exactly at rank r (peft's PiSSA / OLoRA conversion, which knows
nothing of the structure, needs 2r). With the SVD ``K = Q_l diag(k) Q_r^T`` (fp64)::

    B = U Q_l diag(sqrt k)   (d_out, r)        A = diag(sqrt k) Q_r^T P   (r, d_in)        B A = U K P

formed in fp64 and rounded once to the adapter dtype (fp32; fp64 for an fp64 model). The adapter is written
by :mod:`covsvd.export.peft`'s writer (scaling 1, full-name targets, ``fan_in_fan_out`` for Conv1D).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..adapt.layer import BoundedGainLinear
from ..adapt.registry import adapters, attached_identity
from ..util.files import atomic_directory
from .peft_files import (
    adapter_dtype,
    check_peft_names,
    lora_config,
    model_mapping,
    write_lora_adapter,
    write_model_card,
)

__all__ = ["export_lora_delta"]


def delta_factors(m: BoundedGainLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (d_out, r), A (r, d_in))`` with ``B A = delta_weight(True) - delta_weight(False)`` (module doc)."""
    Ql, k, Qrh = torch.linalg.svd(m.delta_core())  # (r, r), (r,), (r, r) fp64
    root = k.sqrt()  # (r,)
    dtype = adapter_dtype(m.base_dtype)
    B = (m.U.detach().to(torch.float64) @ Ql) * root  # (d_out, r)
    A = root[:, None] * (Qrh @ m.P.detach().to(torch.float64))  # (r, d_in)
    return B.to(dtype), A.to(dtype)


def export_lora_delta(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write what training changed in ``model``'s covsvd adapters as a peft LoRA for the original base.

    ``path`` gets ``adapter_config.json`` and ``adapter_model.safetensors``: rank ``r`` per layer (the
    adapter's own), scaling 1, targets the adapted layers by full name. ``PeftModel.from_pretrained(original,
    path)`` computes the trained model (to fp32 rounding), and its ``merge_and_unload()`` installs
    ``W + B A``, the weight :func:`covsvd.detach_adapters` ``(merge=True)`` installs. ``base_model_name_or_path``
    is the original model's ``config._name_or_path`` when known (else ``None``). ``model`` is not changed.

    Raises ``ValueError`` when ``model`` carries no covsvd adapters or peft would match a layer name twice
    (:func:`covsvd.export.peft.check_peft_names`), ``FileExistsError`` when ``path`` exists and ``overwrite``
    is false; nothing is left half-written (:func:`covsvd.util.files.atomic_directory`).
    """
    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached: attach and train them first "
                         "(covsvd.attach_adapters), or export an initialisation with covsvd.export_peft")
    check_peft_names(model, list(found))
    factors = {name: delta_factors(m) for name, m in found.items()}
    conv1d = any(m.layout == "conv1d" for m in found.values())
    ident = attached_identity(model)
    base = ident.get("name_or_path") or None
    config = lora_config({n: m.r for n, m in found.items()}, conv1d, base, model_mapping(model))
    card = [
        "What training changed in covsvd bounded-gain adapters (`covsvd.export_lora_delta`), as a peft LoRA for",
        f"the **original** model ({ident['model_type']} `{base or type(model).__name__}`, weights fingerprint",
        f"`{ident['weights']}`): `PeftModel.from_pretrained(original, this_folder)` computes the trained model.",
        f"{len(found)} layers, rank per layer as attached, scaling 1.",
    ]

    def write(tmp: Path) -> None:
        write_lora_adapter(tmp, factors, config)
        write_model_card(tmp, "covsvd trained adapters (peft LoRA on the original model)", card)

    return atomic_directory(path, write, overwrite=overwrite)
