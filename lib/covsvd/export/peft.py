"""covsvd orientations as a peft LoRA adapter on a residual base, and the files peft reads.

:func:`export_peft` splits every target ``W (d_out, d_in)`` exactly (docs/algebra.md, "Orientation by a metric")::

    W = W_res + B A      B = U_r diag(sqrt S_r)  (d_out, r)      A = diag(sqrt S_r) P_r  (r, d_in)

for every metric (for an oblique metric P_r's rows are not orthonormal; the split is exact all the same) and
writes ``path/base/`` (the model with each target's weight replaced by ``W_res``: a transformers checkpoint) and
``path/adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``: a peft LoRA with ``lora_A = A``,
``lora_B = B`` and scaling 1, ``lora_alpha = r`` per layer). ``PeftModel.from_pretrained(base, adapter)`` then
computes ``x W_res^T + (x A^T) B^T``: the original model, to fp32 rounding.

``W_res`` is the residual of the factors *as stored*: ``B`` and ``A`` are formed in fp64 and rounded once to
the adapter dtype (fp32, or fp64 for an fp64 model), then ``W_res = W - B A`` is formed in fp64 from those
rounded factors and rounded once to the model's dtype, so the only error left is the rounding of ``W_res``
and of peft's own forward.

No peft import: the adapter is plain JSON and safetensors, in peft's layout (peft 0.21). How peft selects
modules matters here. A name ``t`` in a ``target_modules`` *list* selects a module ``key`` when
``key == t`` or ``key.endswith("." + t)`` (peft ``check_target_module_exists``), and a ``rank_pattern`` /
``alpha_pattern`` key ``k`` applies when ``re.match(rf"(.*\\.)?({k})$", key)`` (peft ``get_pattern_key``: a
regex). So targets are written as full module names and pattern keys as ``re.escape(name)`` (``layer.1.x``
must not also match ``layer.11.x``); :func:`check_peft_names` refuses a model in which a full name would
still select a second module.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapt.attach import adapters, check_target, check_tied, layer_ranks, rank_str, resolve_targets
from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.measures import identity_error
from ..algebra.orient import orient
from ..algebra.validate import METRICS
from ..capture.moments import SecondMoment
from ..data.models import model_identity
from ..data.targets import Conv1D, weight_matrix
from ..util.checks import check_choice
from ..util.files import atomic_directory
from ..version import __version__

__all__ = ["export_peft"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's prefix of every adapter tensor: ``PeftModel.base_model`` (the LoraModel) ``.model`` (the wrapped model).
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------- the peft files


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


# --------------------------------------------------------------------------------------- validation


def check_moments_model(model: nn.Module, moments, names: list[str]) -> None:
    """Raise ``ValueError`` when a target's :class:`SecondMoment` records another model's fingerprint."""
    here = model_identity(model)
    for name in names:
        C = moments.get(name) if moments else None
        there = C.model if isinstance(C, SecondMoment) else None
        if there and there.get("fingerprint") not in (None, here["fingerprint"]):
            raise ValueError(
                f"moments[{name!r}] was captured on another model ({there.get('model_type')} "
                f"{there.get('name_or_path')!r}, fingerprint {there.get('fingerprint')}); this one is "
                f"{here['model_type']} {here['name_or_path']!r} (fingerprint {here['fingerprint']}): capture the "
                "moments on this model (covsvd.capture_moments(model, batches))")


# --------------------------------------------------------------------------------------- export


def lora_split(W: torch.Tensor, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor):
    """``(B, A, W_res)`` with ``W = W_res + B A`` (module docstring): ``B = U diag(sqrt S)`` ``(d_out, r)`` and
    ``A = diag(sqrt S) P`` ``(r, d_in)`` formed in fp64 and rounded once to :func:`adapter_dtype`; ``W_res``
    ``(d_out, d_in)`` formed in fp64 from those rounded factors and rounded once to ``W.dtype``."""
    dtype = adapter_dtype(W.dtype)
    root = S.to(torch.float64).sqrt()  # (r,)
    B = (U.to(torch.float64) * root).to(dtype)  # (d_out, r)
    A = (root[:, None] * P.to(torch.float64)).to(dtype)  # (r, d_in)
    W_res = (W.detach().to(torch.float64) - B.to(torch.float64) @ A.to(torch.float64)).to(W.dtype)
    return B, A, W_res


def export_peft(model: nn.Module, moments, path: str | os.PathLike, r, metric: str = "full", *,
                eps: float = DEFAULT_EPS, eps_mode: str = DEFAULT_EPS_MODE, targets=None, tokenizer=None,
                overwrite: bool = False, progress: bool = True, **orient_kwargs) -> Path:
    """Write a covsvd initialisation as ``path/base/`` (a transformers checkpoint holding ``W_res``) and
    ``path/adapter/`` (a peft LoRA holding ``B A = U_r diag(S_r) P_r``); returns ``path``.

    ``PeftModel.from_pretrained(AutoModelX.from_pretrained(path / "base"), path / "adapter")`` computes the
    original model (to fp32 rounding for an fp32 model; a bf16 model's ``W_res`` is rounded to bf16); the
    adapter's ``base_model_name_or_path`` is ``path/base`` (absolute), so ``AutoPeftModel`` finds it too.
    ``path/covsvd.json`` records the settings, the model identity and per layer orient's diagnostics and the
    stored split's ``identity_error``. ``model`` itself is not changed. ``fan_in_fan_out`` is set when any
    target is a Conv1D (peft sets it per layer on load, with a warning, should Linear and Conv1D targets mix).

    Args:
        model: a transformers ``PreTrainedModel`` (saved with ``save_pretrained``) with ``nn.Linear`` /
            ``Conv1D`` targets and no covsvd adapters attached.
        moments: ``{module name: SecondMoment}`` (:func:`covsvd.capture_moments` on this model) or ``None``
            (``metric="identity"`` only).
        path: the output directory.
        r: rank per target, an int or a ``{name: r}`` dict (then its keys are the default targets).
        metric, eps, eps_mode, **orient_kwargs: :func:`covsvd.orient` (``components``, ``solver``, ``alpha``,
            ``compute_dtype``; decompositions in fp64 by default). ``storage_dtype`` is not accepted: the
            factors are stored as :func:`adapter_dtype`.
        targets: a :func:`covsvd.find_targets` spec; default: the keys of ``r`` (a dict), else of ``moments``,
            else every Linear / Conv1D (identity).
        tokenizer: saved into ``path/base`` when given (anything with ``save_pretrained``).
        overwrite: replace an existing ``path`` (only once the new one is complete).
        progress: a tqdm bar over layers.

    Raises:
        ValueError (naming the layer, its shape and the fix), before anything is computed or written:
            an unknown metric; a model that is not a ``PreTrainedModel``, is quantized (``hf_quantizer``) or
            carries covsvd adapters; a bad ``r``; a quantised / meta / non-finite weight; an
            ``nn.MultiheadAttention.out_proj`` target (MHA reads the weight directly: a LoRA there never runs);
            missing or unfit moments; moments captured on another model (their fingerprint); tied weights; a
            target name peft would match twice (:func:`check_peft_names`).
        FileExistsError: ``path`` exists and ``overwrite`` is false (``path`` is left untouched).
        On any error while orienting or writing nothing is left at ``path`` (:func:`covsvd.util.files.atomic_directory`).
    """
    from transformers import PreTrainedModel

    check_choice("metric", metric, METRICS)
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"export_peft needs a transformers PreTrainedModel (the base is saved with save_pretrained); "
                         f"got {type(model).__name__}")
    if adapters(model):
        raise ValueError(f"{type(model).__name__} carries covsvd adapters: export the plain model "
                         "(covsvd.detach_adapters(model) first), or convert the trained adapters with "
                         "covsvd.export_lora_delta(model, path)")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        raise ValueError(f"{type(model).__name__} is quantized ({getattr(method, 'value', method)}): W_res must be "
                         "formed and saved in the weights' own floating dtype; export from the unquantized model "
                         "and quantize path/base afterwards")
    if "storage_dtype" in orient_kwargs:
        raise ValueError("export_peft stores the LoRA factors in fp32 (fp64 for an fp64 model), as peft runs them; "
                         "storage_dtype cannot be chosen")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"tokenizer is a {type(tokenizer).__name__} without save_pretrained; pass a transformers "
                         "tokenizer or None")
    if isinstance(r, Mapping) and targets is None:
        targets = list(r)
    names = resolve_targets(model, moments, metric, targets)
    ranks = layer_ranks(r, names)
    moment = {n: (moments.get(n) if moments else None) for n in names}
    check_moments_model(model, moments, names)
    for name in names:
        check_target(model, name, ranks[name], moment[name], metric)
    check_tied(model, names)
    check_peft_names(model, names)

    path = Path(path)
    modules = {n: model.get_submodule(n) for n in names}
    conv1d = any(isinstance(m, Conv1D) for m in modules.values())
    config = lora_config(ranks, conv1d, str(path.resolve() / "base"), model_mapping(model))

    def write(tmp: Path) -> None:
        state = model.state_dict()  # references; the targets' entries are replaced below, the model is not
        factors, rows = {}, []
        bar = tqdm(names, desc=f"export peft ({metric}, r={rank_str(r)})", disable=not progress, leave=False)
        for name in bar:
            module, k = modules[name], ranks[name]
            W = weight_matrix(module).detach()  # (d_out, d_in)
            o = orient(W, moment[name], k, metric=metric, eps=eps, eps_mode=eps_mode, name=name,
                       storage_dtype=torch.float64, **orient_kwargs)
            B, A, W_res = lora_split(W, o.U, o.S, o.P)
            factors[name] = (B, A)
            state[f"{name}.weight"] = W_res.T.contiguous() if isinstance(module, Conv1D) else W_res
            ones = torch.ones(k, dtype=B.dtype, device=B.device)
            rows.append(dict(name=name, d_out=W.shape[0], d_in=W.shape[1], r=k, eps=o.info["eps"],
                             cond=o.info["cond"], energy_kept=o.info["energy_kept"], rel_error=o.info["rel_error"],
                             identity_error=identity_error(W, B, ones, A, W_res)))
        model.save_pretrained(tmp / "base", state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "base")
        write_lora_adapter(tmp / "adapter", factors, config)
        settings = dict(metric=metric, r=r if isinstance(r, int) else dict(ranks), eps=eps, eps_mode=eps_mode,
                        **{k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
                           for k, v in orient_kwargs.items()})
        record = dict(format="covsvd.export.peft", covsvd_version=__version__, model=model_identity(model),
                      settings=settings, layers=rows)
        (tmp / "covsvd.json").write_text(json.dumps(record, indent=2) + "\n")

    return atomic_directory(path, write, overwrite=overwrite)
