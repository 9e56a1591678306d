"""covsvd orientations as a peft LoRA adapter on a residual base (:func:`export_peft`).

Every target ``W (d_out, d_in)`` splits exactly (docs/algebra.md, "Orientation by a metric")::

    W = W_res + B A      B = U_r diag(sqrt S_r)  (d_out, r)      A = diag(sqrt S_r) P_r  (r, d_in)

for every metric (for an oblique metric P_r's rows are not orthonormal; the split is exact all the same).
``path/base/`` is the model with each target's weight replaced by ``W_res`` (a transformers checkpoint),
``path/adapter/`` a peft LoRA (:mod:`covsvd.export.peft_files`) with ``lora_A = A``, ``lora_B = B`` and scaling
1 (``lora_alpha = r`` per layer), and its model card. ``PeftModel.from_pretrained(base, adapter)`` then computes
``x W_res^T + (x A^T) B^T``: the original model, to fp32 rounding.

``W_res`` is the residual of the factors *as stored*: ``B`` and ``A`` are formed in fp64 and rounded once to
the adapter dtype (fp32, or fp64 for an fp64 model), then ``W_res = W - B A`` is formed in fp64 from those
rounded factors and rounded once to the model's dtype, so the only error left is the rounding of ``W_res``
and of peft's own forward.

The adapter completes ``path/base``, not the original model: on the original it would add ``B A`` a second
time. Its ``base_model_name_or_path`` is ``path/base`` as ``path`` was given (a relative path stays relative, so
nothing of the machine's directory layout is written, and ``AutoPeftModel`` finds the base from the same
working directory), its model card says which base it needs, and ``path/covsvd.json`` records the original
model's identity (its weights fingerprint included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapt.attach import check_orient_kwargs, orient_target
from ..adapt.plan import Plan, plan_targets
from ..adapt.registry import adapters
from ..adapt.report import layer_row, rank_str, settings_record
from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.measures import identity_error
from ..data.targets import Conv1D
from ..util.files import atomic_directory
from ..version import __version__
from .peft_files import (
    adapter_dtype,
    check_peft_names,
    lora_config,
    model_mapping,
    write_lora_adapter,
    write_model_card,
)
from .qlora import check_quantizable, qlora_options, write_qlora

__all__ = ["export_peft"]

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


def check_exportable(model: nn.Module, tokenizer, orient_kwargs: dict) -> None:
    """Raise ``ValueError`` unless ``model`` can be saved as a residual base: a plain (not quantized)
    transformers ``PreTrainedModel`` without covsvd adapters; and the options fit an export."""
    from transformers import PreTrainedModel

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
                         "formed in the weights' own floating dtype, never from packed 4-bit / 8-bit storage: load the "
                         "model unquantized and pass export_peft(..., quantize='nf4') for a 4-bit base")
    if "storage_dtype" in orient_kwargs:
        raise ValueError("export_peft stores the LoRA factors in fp32 (fp64 for an fp64 model), as peft runs them; "
                         "storage_dtype cannot be chosen")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise ValueError(f"tokenizer is a {type(tokenizer).__name__} without save_pretrained; pass a transformers "
                         "tokenizer or None")


def _card(model: nn.Module, plan: Plan, settings: dict) -> list[str]:
    ident = plan.identity
    return [
        "A peft LoRA adapter written by covsvd (`covsvd.export_peft`). It completes the **residual base** in",
        "`../base` (each target's weight is `W - B A` there): load it onto that base, never onto the original",
        f"model ({ident['model_type']} `{ident['name_or_path'] or type(model).__name__}`), where it would add",
        "`B A` a second time.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModel  # the Auto class of the original model",
        'model = PeftModel.from_pretrained(AutoModel.from_pretrained("EXPORT/base"), "EXPORT/adapter")',
        "```",
        "",
        f"- covsvd {__version__}; metric `{settings['metric']}`, r `{rank_str(settings['r'])}`, eps "
        f"`{settings['eps']}` ({settings['eps_mode']}); {len(plan.names)} target layers.",
        f"- original model weights fingerprint `{ident['weights']}` (architecture `{ident['fingerprint']}`);"
        " `../covsvd.json` has every layer's diagnostics.",
    ]


def export_peft(model: nn.Module, moments, path: str | os.PathLike, r, metric: str = "full", *,
                eps: float = DEFAULT_EPS, eps_mode: str = DEFAULT_EPS_MODE, targets=None, tokenizer=None,
                overwrite: bool = False, progress: bool = True, check_weights: bool = True,
                output_moments=None, quantize=None, loftq_iters: int = 0, double_quant: bool = False,
                quant_start: str = "oriented", **orient_kwargs) -> Path:
    """Write a covsvd initialisation as ``path/base/`` (a transformers checkpoint holding ``W_res``) and
    ``path/adapter/`` (a peft LoRA holding ``B A = U_r diag(S_r) P_r``, and a model card); returns ``path``.

    ``PeftModel.from_pretrained(AutoModelX.from_pretrained(path / "base"), path / "adapter")`` computes the
    original model (to fp32 rounding for an fp32 model; a bf16 model's ``W_res`` is rounded to bf16).
    ``path/covsvd.json`` records the settings, the model identity, per layer orient's diagnostics and the
    stored split's ``identity_error``. ``model`` itself is not changed.
    ``fan_in_fan_out`` is set when any target is a Conv1D.

    Args:
        model: a transformers ``PreTrainedModel`` (saved with ``save_pretrained``) with ``nn.Linear`` /
            ``Conv1D`` targets, no covsvd adapters and no peft layers.
        moments: ``{module name: SecondMoment}`` (:func:`covsvd.capture_moments` on this model) or ``None``
            (``metric="identity"`` only).
        path: the output directory.
        r: rank per target, an int or a ``{name: r}`` dict (then its keys are the default targets).
        metric, eps, eps_mode, **orient_kwargs: :func:`covsvd.orient` (decompositions in fp64 by default).
            ``storage_dtype`` is not accepted: the factors are stored as :func:`adapter_dtype`.
        targets: a :func:`covsvd.find_targets` spec; default: the keys of ``r`` (a dict), else of ``moments``,
            else every Linear / Conv1D (identity).
        tokenizer: saved into ``path/base`` when given (anything with ``save_pretrained``).
        overwrite: replace an existing ``path`` (only once the new one is complete).
        progress: a tqdm bar over layers.
        check_weights: the moments must come from this model's weights (the named override).
        output_moments: ``metric="two-sided"`` only (required there): ``{name: SecondMoment}`` from
            :func:`covsvd.capture_output_moments` on this model, damped by ``eps_output`` (an orient keyword).
            ``B``'s columns are then not orthogonal; the split ``W = W_res + B A`` is exact all the same.
        quantize, loftq_iters, double_quant, quant_start: a 4-bit base (:mod:`covsvd.export.qlora`): ``quantize``
            ``"nf4"`` / ``"fp4"`` (or a ``FourBit``) writes ``path/base`` as a pre-quantized bitsandbytes
            checkpoint of ``Q = quant(W - B A)`` per :func:`covsvd.quantize_residual` (``iters=loftq_iters``,
            ``start=quant_start``, the best iterate under the metric); base + adapter computes
            ``dequant(Q) + B A``. ``None`` (default): the floating residual base above. Not with
            ``metric="two-sided"`` (the quantized residual is fitted under one-sided metrics).

    Raises:
        ValueError (naming the layer, its shape and the fix), before anything is computed or written:
            every check of :func:`covsvd.adapt.plan.plan_targets`; a model that is not a plain
            ``PreTrainedModel`` (:func:`check_exportable`); a target name peft would match twice.
        FileExistsError: ``path`` exists and ``overwrite`` is false (``path`` is left untouched).
        On any error while orienting or writing nothing is left at ``path``.
    """
    check_exportable(model, tokenizer, orient_kwargs)
    check_orient_kwargs({k: v for k, v in orient_kwargs.items() if k != "storage_dtype"}, "export_peft")
    quant = qlora_options(quantize, loftq_iters, double_quant, quant_start)
    if quant is not None and metric == "two-sided":
        raise ValueError("export_peft(quantize=...) fits the quantized residual under a one-sided metric; "
                         "metric='two-sided' with a 4-bit base is not supported: pass metric='full' (or export "
                         "without quantize)")
    plan = plan_targets(model, moments, r, metric, targets, check_weights=check_weights,
                        output_moments=output_moments)
    check_peft_names(model, plan.names)
    if quant is not None:
        check_quantizable(model, plan)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another path")
    conv1d = any(isinstance(t.module, Conv1D) for t in plan.targets.values())
    config = lora_config(plan.ranks, conv1d, str(path / "base"), model_mapping(model))
    settings = settings_record(metric=metric, r=r if isinstance(r, int) else plan.ranks, eps=eps, eps_mode=eps_mode,
                               **orient_kwargs)
    if quant is not None:
        settings.update(quantize=quant.kind, double_quant=quant.double_quant, loftq_iters=loftq_iters,
                        quant_start=quant_start)
        return atomic_directory(path, lambda tmp: write_qlora(tmp, model, plan, quant, config, settings, tokenizer, eps,
                                                              eps_mode, orient_kwargs, progress), overwrite=overwrite)

    def write(tmp: Path) -> None:
        state = model.state_dict()  # references; the targets' entries are replaced below, the model is not
        factors, rows = {}, []
        bar = tqdm(plan.names, desc=f"export peft ({metric}, r={rank_str(r)})", disable=not progress, leave=False)
        for name in bar:
            t = plan.targets[name]
            o = orient_target(t, metric, eps, eps_mode, torch.float64, **orient_kwargs)
            B, A, W_res = lora_split(t.W, o.U, o.S, o.P)
            factors[name] = (B, A)
            state[f"{name}.weight"] = W_res.T.contiguous() if isinstance(t.module, Conv1D) else W_res
            ones = torch.ones(t.rank, dtype=B.dtype, device=B.device)
            rows.append(layer_row(name, t.W, t.rank, metric, o.info, identity_error(t.W, B, ones, A, W_res)))
        model.save_pretrained(tmp / "base", state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "base")
        write_lora_adapter(tmp / "adapter", factors, config)
        write_model_card(tmp / "adapter", "covsvd initialisation (peft LoRA on a residual base)",
                         _card(model, plan, settings))
        record = dict(format="covsvd.peft_export", covsvd_version=__version__, model=plan.identity,
                      settings=settings, layers=rows)
        (tmp / "covsvd.json").write_text(json.dumps(record, indent=2) + "\n")

    return atomic_directory(path, write, overwrite=overwrite)
