"""Weight quantizers: a ``(d_out, d_in)`` float tensor in, a :class:`Quantized` (packed codes + statistics) out,
and ``Quantized.dequantize()`` giving back exactly the tensor a loaded bitsandbytes layer computes with.
Pure tensors; bitsandbytes is imported inside the functions that need it (the ``bitsandbytes`` extra).

* ``"nf4"`` / ``"fp4"`` (:class:`FourBit`): ``bitsandbytes.functional.quantize_4bit``, blockwise absmax over the
  row-major flattened weight (blocks may span rows; a last partial block is allowed), ``blocksize`` and
  ``double_quant`` (bnb's ``compress_statistics``: the fp32 absmax values quantized to 8 bits in blocks of 256
  around their mean) as options. This is what ``bnb.nn.Params4bit(W, blocksize=..., compress_statistics=...,
  quant_type=...)`` stores when moved to a device, hence what ``bnb.nn.Linear4bit`` and transformers'
  ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant)``
  hold for a weight of the same values and dtype (transformers always uses ``blocksize=64``). The codes depend
  on the input's dtype only through its values: quantize the weight in the dtype the base is stored in.
* ``"int8"`` (:class:`Int8`): bitsandbytes' LLM.int8 weight format without outlier columns, per-row absmax:
  the weight is cast to float16, ``int8_vectorwise_quant`` gives int8 codes and per-row fp32 scales
  (``row absmax``), and ``dequantize()`` is ``int8_vectorwise_dequant`` (``codes * scale / 127``, fp32): what
  ``bnb.nn.Int8Params`` stores and ``peft``'s LoftQ dequantizes for 8 bits.

Another format joins by any object with a ``name`` and a ``quantize(W) -> Quantized`` method (:class:`Quantizer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..util.checks import check_choice, check_weight

#: The quantizer names :func:`quantizer` knows.
QUANTS = ("nf4", "fp4", "int8")
#: The blocksizes bitsandbytes' 4-bit kernels accept.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: The input dtypes bitsandbytes' 4-bit kernels accept (the dtype the base is stored in).
FOUR_BIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FP16_MAX = float(torch.finfo(torch.float16).max)


def _bnb():
    """``bitsandbytes.functional``, or an ``ImportError`` naming the extra."""
    try:
        import bitsandbytes.functional as F
    except ImportError as e:  # pragma: no cover - the extra is installed in the test environment
        raise ImportError("covsvd's quantizers need bitsandbytes: pip install 'covsvd[quant]' "
                          "(or pip install bitsandbytes)") from e
    return F


@dataclass(frozen=True)
class Quantized:
    """A quantized ``(d_out, d_in)`` weight.

    Attributes:
        kind: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        data: the codes as bitsandbytes stores them: 4-bit: ``uint8 (d_out * d_in / 2, 1)`` (two codes a
            byte, row-major); int8: ``int8 (d_out, d_in)``.
        state: 4-bit: the ``bitsandbytes.functional.QuantState`` (absmax, code table, blocksize, nested
            statistics, shape, dtype); int8: the ``(d_out,)`` fp32 per-row absmax.
        shape: ``(d_out, d_in)``; dtype: the dtype :meth:`dequantize` returns (4-bit: the quantized input's
            dtype; int8: float32).
    """

    kind: str
    data: torch.Tensor
    state: object = field(repr=False)
    shape: tuple
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """The ``(d_out, d_in)`` weight a loaded layer computes with (``dequantize_4bit(data, state)`` /
        ``int8_vectorwise_dequant(data, state)``), in :attr:`dtype`, on the codes' device."""
        F = _bnb()
        if self.kind == "int8":
            return F.int8_vectorwise_dequant(self.data, self.state)
        return F.dequantize_4bit(self.data, self.state)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and of the per-block / per-row statistics (absmax; with double quantization the
        8-bit absmax, the nested fp32 absmax and the fp32 offset). The fixed code tables (16 fp32 values, 256
        for the nested one) are not counted: they do not grow with the weight."""
        total = self.data.numel() * self.data.element_size()
        if self.kind == "int8":
            return total + self.state.numel() * self.state.element_size()
        st = self.state
        total += st.absmax.numel() * st.absmax.element_size()
        if st.nested:
            total += st.state2.absmax.numel() * st.state2.absmax.element_size() + st.offset.element_size()
        return total

    @property
    def bits(self) -> float:
        """Bits per weight parameter: ``8 * nbytes / (d_out * d_in)``."""
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])


@runtime_checkable
class Quantizer(Protocol):
    """What :func:`covsvd.algebra.loftq.quantize_residual` needs from a quantizer: a ``name`` and ``quantize(W,
    name=None)`` returning a :class:`Quantized` (or any object with ``dequantize() -> (d_out, d_in) tensor`` and
    ``bits``); ``name`` is a layer name for its error messages."""

    name: str

    def quantize(self, W: torch.Tensor, name: str | None = None) -> Quantized: ...


@dataclass(frozen=True)
class FourBit:
    """bitsandbytes' blockwise 4-bit quantization (``kind`` ``"nf4"`` or ``"fp4"``), see the module docstring.

    ``blocksize`` one of :data:`BLOCKSIZES` (64: what transformers and ``Params4bit`` use); ``double_quant``:
    bnb's ``compress_statistics``. Raises ``ValueError`` for another kind or blocksize.
    """

    kind: str = "nf4"
    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self):
        check_choice("quant", self.kind, ("nf4", "fp4"))
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize={self.blocksize!r}; bitsandbytes' 4-bit kernels accept {BLOCKSIZES} "
                             "(transformers' BitsAndBytesConfig always uses 64)")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be a bool")

    @property
    def name(self) -> str:
        return self.kind

    def quantize(self, W: torch.Tensor, name: str | None = None) -> Quantized:
        """Quantize ``W (d_out, d_in)`` (float32 / bfloat16 / float16, finite) in its own dtype and device.

        Raises ``ValueError`` for another dtype (cast to the dtype the base is stored in first)."""
        prefix = f"layer {name!r}: " if name else ""
        shape = check_weight(W, prefix)
        if W.dtype not in FOUR_BIT_DTYPES:
            raise ValueError(f"{prefix}{self.kind} quantizes float32 / bfloat16 / float16 weights; W {shape} is "
                             f"{W.dtype}: cast it to the dtype the base is stored in first")
        F = _bnb()
        data, state = F.quantize_4bit(W.detach().contiguous(), blocksize=self.blocksize,
                                      compress_statistics=self.double_quant, quant_type=self.kind)
        return Quantized(self.kind, data, state, shape, W.dtype)

    def config(self) -> dict:
        """The ``transformers.BitsAndBytesConfig`` arguments that load a base stored from this quantizer's
        input into the same codes. Raises ``ValueError`` for a blocksize other than 64 (transformers fixes it)."""
        if self.blocksize != 64:
            raise ValueError(f"blocksize={self.blocksize}: transformers' BitsAndBytesConfig quantizes with "
                             "blocksize 64 only; use FourBit(blocksize=64) for a base loaded by transformers")
        return dict(load_in_4bit=True, bnb_4bit_quant_type=self.kind, bnb_4bit_use_double_quant=self.double_quant)


@dataclass(frozen=True)
class Int8:
    """bitsandbytes' per-row absmax int8 (``Int8Params``' format, no outlier columns); see the module docstring."""

    name: str = "int8"

    def quantize(self, W: torch.Tensor, name: str | None = None) -> Quantized:
        """Quantize ``W (d_out, d_in)`` (any float dtype, finite, ``|W| <= 65504``: it passes through
        float16 as in ``Int8Params``). Raises ``ValueError`` otherwise."""
        prefix = f"layer {name!r}: " if name else ""
        shape = check_weight(W, prefix)
        big = float(W.detach().abs().max())
        if big > FP16_MAX:
            raise ValueError(f"{prefix}int8 casts W {shape} to float16 first (as bitsandbytes' Int8Params does) "
                             f"but max |W| = {big:.3g} exceeds {FP16_MAX:g}; use a 4-bit quantizer")
        F = _bnb()
        codes, scales, _ = F.int8_vectorwise_quant(W.detach().contiguous().to(torch.float16))
        return Quantized("int8", codes, scales, shape, torch.float32)


def quantizer(quant="nf4", *, blocksize: int = 64, double_quant: bool = False) -> Quantizer:
    """A :class:`Quantizer` from a name in :data:`QUANTS` (``blocksize`` / ``double_quant`` for the 4-bit kinds)
    or an object already implementing :class:`Quantizer` (returned as is; then the options must be defaults).

    Raises ``ValueError`` for an unknown name, 4-bit options given for int8 or for an object, a bad blocksize.
    """
    if not isinstance(quant, str):
        if not isinstance(quant, Quantizer):
            raise ValueError(f"quant={quant!r}; expected one of {QUANTS} or an object with a name and a "
                             "quantize(W) -> Quantized method")
        if (blocksize, double_quant) != (64, False):
            raise ValueError("blocksize / double_quant configure the named 4-bit quantizers; set them on the "
                             "quantizer object itself")
        return quant
    check_choice("quant", quant, QUANTS, "unknown ")
    if quant == "int8":
        if (blocksize, double_quant) != (64, False):
            raise ValueError("quant='int8' is per-row absmax: blocksize and double_quant do not apply")
        return Int8()
    return FourBit(quant, blocksize, double_quant)
