"""The files peft reads: ``adapter_config.json``, ``adapter_model.safetensors`` and a model card, written
without importing peft (plain JSON and safetensors in peft's layout, peft 0.21).

How peft selects modules matters here. A name ``t`` in a ``target_modules`` *list* selects a module ``key``
when ``key == t`` or ``key.endswith("." + t)`` (peft ``check_target_module_exists``), and a ``rank_pattern`` /
``alpha_pattern`` key ``k`` applies when ``re.match(rf"(.*\\.)?({k})$", key)`` (peft ``get_pattern_key``: a
regex). So targets are written as full module names and pattern keys as ``re.escape(name)`` (``layer.1.x``
must not also match ``layer.11.x``); :func:`check_peft_names` refuses a model in which a full name would
still select a second module.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's prefix of every adapter tensor: ``PeftModel.base_model`` (the LoraModel) ``.model`` (the wrapped model).
PEFT_PREFIX = "base_model.model."


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter factors are stored in: fp32, or fp64 for an fp64 model (peft upcasts fp16 / bf16
    adapters to fp32 anyway, ``autocast_adapter_dtype``)."""
    return torch.promote_types(weight_dtype, torch.float32)


def check_peft_names(model: nn.Module, names: list[str]) -> None:
    """Raise ``ValueError`` unless each full name in ``names`` selects only its own module under peft's rule
    (``key == name`` or ``key.endswith("." + name)``, module docstring), checked over every module of ``model``."""
    wanted = set(names)
    for key, _ in model.named_modules():
        parts = key.split(".")
        for i in range(1, len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in wanted:
                raise ValueError(f"target {suffix!r} is also a suffix of module {key!r}: peft matches target names "
                                 f"by suffix, so its LoRA would attach to both; wrap the model so that names are "
                                 f"unique suffixes, or leave {suffix!r} out of targets")


def lora_config(ranks: Mapping[str, int], fan_in_fan_out: bool, base_model_name_or_path: str | None,
                auto_mapping: dict | None = None) -> dict:
    """A peft ``LoraConfig`` as JSON: full-name ``target_modules``, per-layer ``r`` with ``lora_alpha = r``
    (scaling 1; the most common rank is the default, the others go into ``rank_pattern`` / ``alpha_pattern``
    with :func:`re.escape`\\ d keys), no dropout, no bias, ``init_lora_weights=True`` (the default init,
    overwritten by the stored tensors on load)."""
    counts = Counter(ranks.values())
    default = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(n): r for n, r in ranks.items() if r != default}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "auto_mapping": auto_mapping,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "target_modules": list(ranks),
        "r": default,
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def write_lora_adapter(directory: Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       config: dict) -> None:
    """Write ``directory/adapter_config.json`` and ``directory/adapter_model.safetensors`` (tensors
    ``base_model.model.{name}.lora_A.weight`` = A ``(r, d_in)`` and ``...lora_B.weight`` = B ``(d_out, r)``)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (B, A) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.detach().contiguous().cpu()  # (r, d_in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.detach().contiguous().cpu()  # (d_out, r)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def model_mapping(model: nn.Module) -> dict:
    """peft's ``auto_mapping`` (class and module of the base model), so ``AutoPeftModel`` can load the base."""
    return {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}


def write_model_card(directory: Path, title: str, lines: list[str]) -> None:
    """``directory/README.md``: what the adapter is, which base it needs and how it was made (``lines``)."""
    text = "\n".join([f"# {title}", "", *lines, ""])
    (directory / "README.md").write_text(text)
