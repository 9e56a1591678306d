"""A covsvd initialisation on a 4-bit base: ``covsvd.export_peft(..., quantize="nf4", loftq_iters=k)``.

Every target ``W (d_out, d_in)`` gets :func:`covsvd.quantize_residual` (the metric's factors, the quantized base
``Q`` and the iterate kept: the best under the metric)::

    W ~ dequant(Q) + B A      B = U diag(sqrt S)  (d_out, r)      A = diag(sqrt S) P  (r, d_in)

``B`` and ``A`` are formed in fp64 and rounded once to the adapter dtype (fp32; fp64 for an fp64 model: refused,
bitsandbytes quantizes fp32 / bf16 / fp16 only).

``path/base/`` is a **pre-quantized** bitsandbytes checkpoint written by transformers itself: each target's
quantizer input (``QuantizedResidual.source``, in the model's dtype; transposed back for a ``Conv1D``) is saved
with the rest of the model into a scratch checkpoint, loaded with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=..., bnb_4bit_compute_dtype=model dtype)`` (transformers
quantizes every ``nn.Linear`` / ``Conv1D`` it converts: the non-target ones from their own weights, as QLoRA
does) and saved with ``save_pretrained``. Before anything lands at ``path`` the stored codes and statistics of
every target are read back from the written files and compared with ``Q`` bit for bit (``RuntimeError``
otherwise), so the base computes ``dequant(Q)`` exactly.

Why pre-quantized and not the residual in floating point: a floating checkpoint is quantized by whoever loads
it, with the dtype and settings they pick (a bf16 load of an fp32 residual, fp4 for nf4, no quantization at
all), and each of those silently gives another model. The pre-quantized base carries its
``quantization_config`` in ``config.json``: transformers loads it in 4-bit with exactly these codes whatever
``quantization_config`` or ``dtype`` is passed (it warns that the checkpoint's own config is used); with the
``quantization_config`` removed from ``config.json`` the packed ``(d_out d_in / 2, 1)`` weights do not fit the
``(d_out, d_in)`` Linear and loading fails. Dequantizing it (``model.dequantize()``) gives ``dequant(Q)``: the
same model.

``path/adapter/`` is the peft LoRA (``fan_in_fan_out`` false: every target of the 4-bit base is a ``Linear4bit``
holding ``(d_out, d_in)``, GPT-2's ``Conv1D`` included), its model card saying the base is 4-bit and how to
load it; ``path/covsvd.json`` records the quantizer settings and per layer every iterate's error under the
metric and in Frobenius norm, the iterate kept, the bits per parameter, and the functional error at the
layer's output on the calibration moment when a full moment is given.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapt.plan import Plan
from ..adapt.report import layer_row, plain, rank_str
from ..algebra.loftq import STARTS, quantize_residual
from ..algebra.measures import functional_error, identity_error
from ..algebra.quant import FOUR_BIT_DTYPES, FourBit
from ..capture.moments import SecondMoment
from ..data.targets import Conv1D
from ..util.checks import check_choice, check_count
from ..version import __version__
from .peft_files import adapter_dtype, write_lora_adapter, write_model_card

__all__ = ["check_quantizable", "qlora_options", "write_qlora"]

F64 = torch.float64


def qlora_options(quantize, loftq_iters, double_quant, quant_start) -> FourBit | None:
    """The checked quantizer of an export (``None``: no quantization). ``quantize``: ``None``, ``"nf4"``,
    ``"fp4"`` or a :class:`~covsvd.algebra.quant.FourBit` with ``blocksize=64`` (then ``double_quant`` must be
    left false: the object carries it). Raises ``ValueError`` naming the option and the fix, ``ImportError`` when
    bitsandbytes or accelerate (transformers' 4-bit loader needs both) is missing."""
    if quantize is None:
        if loftq_iters != 0 or double_quant is not False or quant_start != "oriented":
            raise ValueError("loftq_iters / double_quant / quant_start configure a 4-bit base: pass quantize='nf4' "
                             "(or 'fp4') with them, or leave them at their defaults")
        return None
    if isinstance(quantize, FourBit):
        if double_quant is not False:
            raise ValueError("quantize is a FourBit: set double_quant on it (FourBit('nf4', double_quant=True)), "
                             "not as export_peft's keyword")
        quant = quantize
    elif isinstance(quantize, str):
        check_choice("quantize", quantize, ("nf4", "fp4"), "export_peft: ")
        quant = FourBit(quantize, 64, double_quant)
    else:
        raise ValueError(f"quantize={quantize!r}; expected None, 'nf4', 'fp4' or a covsvd.algebra.FourBit "
                         "(transformers loads 4-bit bitsandbytes bases; int8 bases are not exported)")
    quant.config()  # blocksize 64: what transformers' BitsAndBytesConfig quantizes with
    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"export_peft(quantize=...) needs {' and '.join(missing)} (transformers' 4-bit loader): "
                          "pip install 'covsvd[quant]' (or pip install bitsandbytes accelerate)")
    check_count("loftq_iters", loftq_iters, 0, "export_peft: ")
    check_choice("quant_start", quant_start, STARTS, "export_peft: ")
    if quant_start == "zero" and loftq_iters == 0:
        raise ValueError("quant_start='zero' with loftq_iters=0 is a zero adapter (B = A = 0), which LoRA cannot "
                         "train (both gradients vanish): use loftq_iters >= 1 (LoftQ) or quant_start='oriented'")
    return quant


def _not_converted(model: nn.Module) -> list[str]:
    """The module-name patterns transformers' bitsandbytes quantizer leaves in floating point (its default skips:
    output embeddings, tied and last modules, plus ``_keep_in_fp32_modules``)."""
    from transformers.quantizers.base import HfQuantizer

    return HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))


def check_quantizable(model: nn.Module, plan: Plan) -> None:
    """Raise ``ValueError`` (naming the layer and the fix) unless every target is a module transformers quantizes
    to ``Linear4bit`` on load (an exact ``nn.Linear`` or a ``Conv1D``, not among its skipped modules) and the
    weights are fp32 / bf16 / fp16. Changes nothing."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    skipped = _not_converted(model)
    for t in plan.targets.values():
        if t.W.dtype not in FOUR_BIT_DTYPES:
            raise ValueError(f"{t.where()}weights are {t.W.dtype}; bitsandbytes quantizes fp32 / bf16 / fp16 only: "
                             "cast the model (model.to(torch.float32)) before export_peft(quantize=...)")
        if not (type(t.module) is nn.Linear or isinstance(t.module, Conv1D)):
            raise ValueError(f"{t.where()}is a {type(t.module).__name__}, which transformers does not quantize "
                             "(only exact nn.Linear and Conv1D): leave it out of targets")
        if not should_convert_module(t.name, skipped):
            raise ValueError(f"{t.where()}transformers keeps it in floating point when loading in 4-bit (its "
                             "output-embedding / tied / fp32 modules): a 4-bit base would not hold its residual; "
                             "leave it out of targets")


def _split(U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, dtype: torch.dtype):
    """``(B (d_out, r), A (r, d_in))``: ``U diag(sqrt S)`` and ``diag(sqrt S) P`` in fp64, rounded once to ``dtype``."""
    root = S.to(F64).sqrt()  # (r,)
    return (U.to(F64) * root).to(dtype), (root[:, None] * P.to(F64)).to(dtype)


def _output_error(W: torch.Tensor, hat: torch.Tensor, moment) -> float | None:
    """``||(W - hat) C^{1/2}||_F / ||W C^{1/2}||_F`` (fp64) on the undamped calibration moment, when it is full."""
    if isinstance(moment, SecondMoment) and moment.kind == "full":
        return functional_error(W, hat, moment.matrix())
    if isinstance(moment, torch.Tensor) and moment.dim() == 2:
        return functional_error(W, hat, moment)
    return None


def _quantize_targets(plan: Plan, quant: FourBit, iters: int, start: str, eps: float, eps_mode: str,
                      orient_kwargs: dict, progress: bool):
    """``(sources {name: (d_out, d_in) model dtype}, factors {name: (B, A)}, bases {name: Quantized}, rows)``."""
    sources, factors, bases, rows = {}, {}, {}, []
    bar = tqdm(plan.names, desc=f"quantize residual ({plan.metric}, {quant.kind}, iters={iters})",
               disable=not progress, leave=False)
    for name in bar:
        t = plan.targets[name]
        dtype = adapter_dtype(t.W.dtype)
        try:
            res = quantize_residual(t.W, t.moment, t.rank, plan.metric, quant, iters, start=start, keep="best",
                                    eps=eps, eps_mode=eps_mode, storage_dtype=dtype, base_dtype=t.W.dtype,
                                    name=name, **orient_kwargs)
        except ValueError as e:
            raise ValueError(f"quantize_residual failed for {t.where()}r={t.rank}: {e}") from e
        if not bool(res.S.any()):
            raise ValueError(f"{t.where()}the best iterate is the zero adapter (B = A = 0), which LoRA cannot train; "
                             "use quant_start='oriented' or more loftq_iters")
        B, A = _split(res.U, res.S, res.P, dtype)
        deq = res.base.dequantize()  # (d_out, d_in), the model dtype
        hat = deq.to(F64) + B.to(F64) @ A.to(F64)
        ones = torch.ones(t.rank, dtype=B.dtype, device=B.device)
        sources[name], factors[name], bases[name] = res.source, (B, A), res.base
        info = dict(eps=res.info["eps"], cond=None, energy_kept=None, rel_error=res.errors[res.best])
        rows.append(layer_row(
            name, t.W, t.rank, plan.metric, info, identity_error(t.W, B, ones, A, deq), quant_errors=list(res.errors), quant_fro_errors=list(res.fro_errors),
            best=res.best, bits=res.bits, adapter_bits=res.info["adapter_bits"], quantizations=res.info["quantizations"],
            output_error=_output_error(t.W, hat, t.moment)))
    return sources, factors, bases, rows


def _base_config(quant: FourBit, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**quant.config(), bnb_4bit_compute_dtype=dtype)


def _write_base(model: nn.Module, plan: Plan, sources: dict, quant: FourBit, directory: Path, scratch: Path,
                tokenizer) -> None:
    """Save ``model`` with the targets' sources to ``scratch``, load it in 4-bit, save it to ``directory``.
    Empties ``sources`` once they are written (peak memory: the model plus its targets' sources)."""
    state = model.state_dict()  # references; the targets' entries are replaced, the model is not
    for name, X in sources.items():
        state[f"{name}.weight"] = X.T.contiguous() if isinstance(plan.targets[name].module, Conv1D) else X
    model.save_pretrained(scratch, state_dict=state)
    del state
    sources.clear()  # on disk now: free them before the 4-bit model is built
    dtype = next(iter(plan.targets.values())).W.dtype
    quantized = type(model).from_pretrained(scratch, quantization_config=_base_config(quant, dtype), dtype=dtype)
    quantized.save_pretrained(directory)
    del quantized
    shutil.rmtree(scratch)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def stored_bases(directory: Path, names: list[str]) -> dict:
    """``{name: (codes uint8, QuantState)}`` of each named 4-bit layer, read from the safetensors files of a
    pre-quantized bitsandbytes checkpoint (what any later load restores). Raises ``RuntimeError`` naming a
    layer stored in floating point."""
    from bitsandbytes.functional import QuantState
    from safetensors import safe_open

    wanted = {f"{name}.weight" for name in names}
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):  # every shard; only the targets' tensors are read
        with safe_open(f, "pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()  # noqa: SIM118 - safe_open has no iterator
                            if k in wanted or k.rpartition(".weight.")[0] + ".weight" in wanted})
    out = {}
    for name in names:
        prefix = f"{name}.weight."
        parts = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if not parts:
            raise RuntimeError(f"layer {name!r} is stored in floating point in {directory}: transformers did not "
                               "quantize it, so the 4-bit base would not hold its residual")
        out[name] = (tensors[f"{name}.weight"], QuantState.from_dict(parts, device=torch.device("cpu")))
    return out


def check_stored(directory: Path, bases: dict) -> None:
    """Raise ``RuntimeError`` unless every target's codes, absmax (8-bit ones, nested absmax and offset with double
    quantization) and kind in ``directory`` equal its ``Quantized`` base's and dequantize to exactly
    ``Q.dequantize()`` (bit for bit)."""
    from bitsandbytes.functional import dequantize_4bit

    for name, (codes, state) in stored_bases(directory, list(bases)).items():
        q, mine = bases[name], bases[name].state
        same = (torch.equal(codes, q.data.cpu()) and torch.equal(state.absmax, mine.absmax.cpu())
                and state.nested == mine.nested and state.quant_type == mine.quant_type
                and (not state.nested or (torch.equal(state.state2.absmax, mine.state2.absmax.cpu())
                                          and torch.equal(state.offset, mine.offset.cpu())))
                and torch.equal(dequantize_4bit(codes, state), q.dequantize().cpu()))
        if not same:
            raise RuntimeError(f"layer {name!r}: the 4-bit base transformers wrote does not reproduce covsvd's "
                               f"{q.kind} quantization of its residual ({tuple(q.shape)}); nothing was written")


def qlora_card(model: nn.Module, plan: Plan, settings: dict, quant: FourBit) -> list[str]:
    ident = plan.identity
    cfg = quant.config()
    args = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
    return [
        "A peft LoRA adapter written by covsvd (`covsvd.export_peft(quantize=...)`). It completes the **4-bit",
        f"residual base** in `../base`: each target's weight there is `Q = {quant.kind}(W - B A)` (bitsandbytes,",
        f"blocksize 64, double quantization {quant.double_quant}), so base + adapter computes `dequant(Q) + B A`.",
        "The base is a pre-quantized bitsandbytes checkpoint: it loads in 4-bit with exactly these codes "
        f"(`BitsAndBytesConfig({args})`, the `quantization_config` in its `config.json`). Never load this",
        f"adapter onto the original model ({ident['model_type']} `{ident['name_or_path'] or type(model).__name__}`)"
        " nor onto another quantization of it.",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModel, BitsAndBytesConfig  # the Auto class of the original model",
        f"base = AutoModel.from_pretrained(\"EXPORT/base\", quantization_config=BitsAndBytesConfig({args}))",
        'model = PeftModel.from_pretrained(base, "EXPORT/adapter")',
        "```",
        "",
        f"- covsvd {__version__}; metric `{settings['metric']}`, r `{rank_str(settings['r'])}`, eps "
        f"`{settings['eps']}` ({settings['eps_mode']}); quantization `{quant.kind}` (double quantization "
        f"{quant.double_quant}), LoftQ iterations `{settings['loftq_iters']}` from `{settings['quant_start']}`, "
        f"the best iterate under the metric kept; {len(plan.names)} target layers.",
        f"- original model weights fingerprint `{ident['weights']}` (architecture `{ident['fingerprint']}`);"
        " `../covsvd.json` has every layer's errors per iterate.",
    ]


def write_qlora(tmp: Path, model: nn.Module, plan: Plan, quant: FourBit, config: dict, settings: dict, tokenizer,
                eps: float, eps_mode: str, orient_kwargs: dict, progress: bool) -> None:
    """Write ``tmp/base`` (pre-quantized 4-bit, checked against ``Q``), ``tmp/adapter`` and ``tmp/covsvd.json``
    (module docstring). ``config``: the LoRA config (its ``fan_in_fan_out`` is set false here)."""
    iters, start = settings["loftq_iters"], settings["quant_start"]
    sources, factors, bases, rows = _quantize_targets(plan, quant, iters, start, eps, eps_mode, orient_kwargs,
                                                      progress)
    _write_base(model, plan, sources, quant, tmp / "base", tmp / ".source", tokenizer)
    check_stored(tmp / "base", bases)
    write_lora_adapter(tmp / "adapter", factors, dict(config, fan_in_fan_out=False))
    write_model_card(tmp / "adapter", "covsvd initialisation (peft LoRA on a 4-bit residual base)",
                     qlora_card(model, plan, settings, quant))
    quantization = dict(quant.config(), blocksize=quant.blocksize, base="pre-quantized bitsandbytes checkpoint",
                        bnb_4bit_compute_dtype=plain(next(iter(plan.targets.values())).W.dtype))
    record = dict(format="covsvd.peft_export", covsvd_version=__version__, model=plan.identity, settings=settings,
                  quantization=quantization, layers=rows)
    (tmp / "covsvd.json").write_text(json.dumps(record, indent=2) + "\n")
