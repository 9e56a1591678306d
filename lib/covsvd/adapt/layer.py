"""The AntiPaSTO bounded-gain layer: a drop-in replacement for one Linear / Conv1D target.

Per target (docs/algebra.md, "Bounded-gain adapter")::

    frozen   U (d_out, r), S (r,), P (r, d_in)       storage dtype (fp32 unless ``dtype=`` says e.g. bf16)
             W_res (d_out, d_in) = W - U diag(S) P    fp32, formed from the *rounded* factors ("bf16-tight")
             bias (d_out,)                            the original bias, its own dtype
    trained  g (r,) zeros, fp32;  Cayley parameters (zeros) when ``rotate`` is set
    S_eff = S * (1 + ELU(coeff * g))
    y = x @ W_res.T + ((x @ P_eff.T) * S_eff) @ U_eff.T + bias
    P_eff = R_V @ P  (rotate "V" / "both"),  U_eff = U @ R_U.T  (rotate "U" / "both"),  R = I at init

so at ``g = 0`` (or ``coeff = 0``) and zero rotation parameters the layer computes ``x @ W.T + b`` up to
rounding. The forward runs in the input's dtype (buffers are cast to it: exact for an upcast). The dense
weights (:meth:`BoundedGainLinear.delta_weight`, :meth:`~BoundedGainLinear.dense_weight`) are fp64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..algebra.rotation import block_diag_matrix, rotation_blocks
from ..data.targets import Conv1D
from .rotation import BlockCayley

ROTATE = (None, "V", "U", "both")


def rotate_arm(rotate: str | None) -> str | None:
    """``rotate`` normalised (``"none"`` -> ``None``); raises ``ValueError`` for anything but :data:`ROTATE`."""
    rotate = None if rotate in (None, "none", "None") else rotate
    if rotate not in ROTATE:
        raise ValueError(f"rotate={rotate!r}; expected one of None, 'V' (input basis), 'U' (output basis), 'both'")
    return rotate


class BoundedGainLinear(nn.Module):
    """Frozen ``W_res + U diag(S_eff) P`` with a trainable gain ``g`` (and optional Cayley rotations).

    Args:
        U, S, P: the oriented factors ``(d_out, r)``, ``(r,)``, ``(r, d_in)``, already in their storage dtype.
        W_res: ``(d_out, d_in)``, the residual formed from those (rounded) factors.
        bias: the original bias ``(d_out,)`` or ``None``.
        coeff: gain slope, ``S_eff = S * (1 + ELU(coeff * g))``.
        rotate: ``None``, ``"V"`` (rows of P), ``"U"`` (columns of U) or ``"both"`` (independent rotations).
        block_size, max_angle: the Cayley layout and bound (:mod:`covsvd.algebra.rotation`).
        layout: ``"linear"`` or ``"conv1d"``: which plain module :meth:`to_plain` rebuilds.
        base_dtype: the original weight's dtype (the restored weight gets it back).
        config: free-form description kept for reports and files (metric, eps used, digests, ...).

    ``g`` and the rotation parameters are fp32 on ``U``'s device. Everything else is a buffer, so
    ``parameters()`` lists exactly what trains.
    """

    def __init__(self, U: torch.Tensor, S: torch.Tensor, P: torch.Tensor, W_res: torch.Tensor,
                 bias: torch.Tensor | None = None, *, coeff: float = 1.0, rotate: str | None = None,
                 block_size: int = 4, max_angle: float = 0.5, layout: str = "linear",
                 base_dtype: torch.dtype | None = None, config: dict | None = None) -> None:
        super().__init__()
        d_out, r = U.shape
        d_in = P.shape[-1]
        want = {"S": (r,), "P": (r, d_in), "W_res": (d_out, d_in), "bias": (d_out,)}
        for key, t in (("S", S), ("P", P), ("W_res", W_res), ("bias", bias)):
            if t is not None and tuple(t.shape) != want[key]:
                raise ValueError(f"BoundedGainLinear: {key} has shape {tuple(t.shape)}; U {tuple(U.shape)} "
                                 f"and P {tuple(P.shape)} need {want[key]}")
        if layout not in ("linear", "conv1d"):
            raise ValueError(f"layout={layout!r}; expected 'linear' or 'conv1d'")
        if not math.isfinite(float(coeff)):
            raise ValueError(f"coeff={coeff!r} must be finite")
        self.rotate = rotate_arm(rotate)
        self.coeff, self.block_size, self.max_angle = float(coeff), int(block_size), float(max_angle)
        self.layout = layout
        self.base_dtype = base_dtype or W_res.dtype
        self.config = dict(config or {})
        own = dict(memory_format=torch.contiguous_format)  # row-major: the same kernels after a file round trip
        self.register_buffer("U", U.detach().clone(**own))  # (d_out, r)
        self.register_buffer("S", S.detach().clone(**own))  # (r,)
        self.register_buffer("P", P.detach().clone(**own))  # (r, d_in)
        self.register_buffer("W_res", W_res.detach().clone(**own))  # (d_out, d_in)
        self.register_buffer("bias", None if bias is None else bias.detach().clone(**own))  # (d_out,)
        self.g = nn.Parameter(torch.zeros(r, dtype=torch.float32, device=U.device))  # (r,)
        rot = dict(r=r, block_size=block_size, max_angle=max_angle, device=U.device)
        self.rot_V = BlockCayley(**rot) if self.rotate in ("V", "both") else None
        self.rot_U = BlockCayley(**rot) if self.rotate in ("U", "both") else None
        self.disabled = False  # set by covsvd.disable_adapters: forward computes the original layer

    @property
    def r(self) -> int:
        return self.S.shape[0]

    @property
    def in_features(self) -> int:
        return self.P.shape[1]

    @property
    def out_features(self) -> int:
        return self.U.shape[0]

    def s_eff(self) -> torch.Tensor:
        """``S * (1 + ELU(coeff * g))``, ``(r,)`` in fp32 or S's dtype if wider (exactly ``S`` at ``g = 0``)."""
        S = self.S.to(torch.promote_types(self.S.dtype, torch.float32))
        return S * (1.0 + F.elu(self.coeff * self.g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., d_in)
        dt = x.dtype
        bias = None if self.bias is None else self.bias.to(dt)
        y = F.linear(x, self.W_res.to(dt), bias)  # (..., d_out)
        h = F.linear(x, self.P.to(dt))  # (..., r)   x @ P.T
        if self.disabled:  # the original layer: W_res + U diag(S) P, no gain, no rotation
            return y + F.linear(h * self.S.to(dt), self.U.to(dt))  # (..., d_out)
        if self.rot_V is not None:
            h = self.rot_V.rotate(h)  # (..., r)   x @ (R_V P).T = h @ R_V.T
        h = h * self.s_eff().to(dt)  # (..., r)
        if self.rot_U is not None:
            h = self.rot_U.rotate(h, transpose=True)  # (..., r)   h @ (U R_U.T).T = (h @ R_U) @ U.T
        return y + F.linear(h, self.U.to(dt))  # (..., d_out)

    # -- dense weights (fp64), for detach / merge / checks

    def _rotation64(self, rot: BlockCayley | None) -> torch.Tensor | None:
        if rot is None:
            return None
        R = rotation_blocks(rot.theta.detach().double(), rot.r, rot.block_size, rot.max_angle)
        return block_diag_matrix(R, self.r)  # (r, r) fp64

    def delta_weight(self, trained: bool = True) -> torch.Tensor:
        """``U_eff diag(S_eff) P_eff`` ``(d_out, d_in)`` in fp64 (``trained=False``: ``U diag(S) P``)."""
        U, P = self.U.detach().double(), self.P.detach().double()
        if not trained:
            return (U * self.S.detach().double()) @ P
        s = self.s_eff().detach().double()
        R_V, R_U = self._rotation64(self.rot_V), self._rotation64(self.rot_U)
        if R_V is not None:
            P = R_V @ P  # (r, d_in)
        if R_U is not None:
            U = U @ R_U.T  # (d_out, r)
        return (U * s) @ P

    def delta_core(self) -> torch.Tensor:
        """What training changed, in the adapter's own basis: ``K (r, r)`` fp64 with
        ``delta_weight(True) - delta_weight(False) == U K P``, ``K = R_U^T diag(S_eff) R_V - diag(S)``.
        So the change has rank ``<= r`` (used by :func:`covsvd.export.lora_delta.export_lora_delta`)."""
        K = torch.diag(self.s_eff().detach().double())  # (r, r)
        R_V, R_U = self._rotation64(self.rot_V), self._rotation64(self.rot_U)
        if R_V is not None:
            K = K @ R_V
        if R_U is not None:
            K = R_U.T @ K
        return K - torch.diag(self.S.detach().double())

    def dense_weight(self, trained: bool = False) -> torch.Tensor:
        """``W_res + delta`` in fp64, then rounded once to ``base_dtype``: what :meth:`to_plain` installs."""
        return (self.W_res.detach().double() + self.delta_weight(trained)).to(self.base_dtype)

    def to_plain(self, merge: bool = False) -> nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` with :meth:`dense_weight` (``merge``: the trained weight)."""
        W = self.dense_weight(trained=merge)  # (d_out, d_in)
        d_out, d_in = W.shape
        if self.layout == "conv1d":
            plain = Conv1D(d_out, d_in).to(device=W.device, dtype=self.base_dtype)
            weight = W.T.contiguous()  # Conv1D stores (d_in, d_out)
        else:  # skip_init: no random init of a weight about to be overwritten
            plain = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=self.bias is not None,
                                       device=W.device, dtype=self.base_dtype)
            weight = W
        with torch.no_grad():
            plain.weight.copy_(weight)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
            elif getattr(plain, "bias", None) is not None:  # Conv1D always has a bias: keep it zero
                plain.bias.zero_()
        return plain

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"coeff={self.coeff}, rotate={self.rotate}, layout={self.layout}, "
                f"storage={str(self.U.dtype).removeprefix('torch.')}")
