"""The AntiPaSTO bounded-gain adapter: a drop-in replacement for a Linear / Conv1D target.

Per target (DESIGN.md, "Bounded-gain adapter")::

    frozen   U (d_out, r), S (r,), P (r, d_in)       storage dtype (fp32 unless ``dtype=`` says e.g. bf16)
             W_res (d_out, d_in) = W - U diag(S) P    fp32, formed from the *rounded* factors ("bf16-tight")
             bias (d_out,)                            the original bias, its own dtype
    trained  g (r,) zeros, fp32;  Cayley parameters (zeros) when ``rotate`` is set
    S_eff = S * (1 + ELU(coeff * g))
    y = x @ W_res.T + ((x @ P_eff.T) * S_eff) @ U_eff.T + bias
    P_eff = R_V @ P  (rotate "V" / "both"),  U_eff = U @ R_U.T  (rotate "U" / "both"),  R = I at init

so at ``g = 0`` (or ``coeff = 0``) and zero rotation parameters the layer computes ``x @ W.T + b`` up to
rounding. The forward runs in the input's dtype (buffers are cast to it: exact for an upcast).

The model-level verbs:

* :func:`attach_adapters` validates every target first (names, shapes, ``r``, moments, tied weights),
  then orients every target (:func:`covsvd.orient`, pure tensors), then swaps all modules in. Any error
  before the swap leaves the model exactly as it was.
* :func:`detach_adapters` puts plain ``nn.Linear`` / ``Conv1D`` modules back with
  ``W = W_res + U S P`` (or the trained, merged weight with ``merge=True``).
* :func:`save_adapters` / :func:`load_adapters`: one safetensors file (no pickle), JSON metadata
  describing the model, the targets and every setting; a file from another model, other targets or
  other shapes raises.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .damping import DEFAULT_EPS
from .models import model_identity
from .moments import SecondMoment
from .rotation import BlockCayley, a_limit, block_sizes, rotation_blocks
from .targets import Conv1D, find_targets, in_out_features, weight_matrix

ROTATE = (None, "V", "U", "both")
METRICS = ("identity", "diag", "asvd", "full", "corda")
_FULL_METRICS = ("full", "corda")  # need the (d_in, d_in) matrix
FORMAT = "covsvd.adapters"
FORMAT_VERSION = "1"


# --------------------------------------------------------------------------------------------- module


def _rotate_arm(rotate: str | None) -> str | None:
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
        block_size, max_angle: the Cayley layout and bound (:mod:`covsvd.rotation`).
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
        self.rotate = _rotate_arm(rotate)
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
        return torch.block_diag(*R.unbind(0))[: self.r, : self.r]  # (r, r) fp64

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


# --------------------------------------------------------------------------------------------- helpers


def adapters(model: nn.Module) -> dict[str, BoundedGainLinear]:
    """``{module name: BoundedGainLinear}`` for every attached adapter, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BoundedGainLinear)}


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (after :func:`attach_adapters`: ``g`` and rotations)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable tensors (``g``, rotation ``theta``), for an optimizer."""
    return [p for m in adapters(model).values() for p in m.parameters()]


def weight_digest(W: torch.Tensor) -> str:
    """A short hash of a weight: its shape, dtype and up to 4096 values at evenly spaced positions.

    Cheap on any size (O(4096) reads), and enough to tell the weights a file was saved from apart
    from another checkpoint of the same architecture. ``W`` in its own layout and dtype.
    """
    W = W.detach()
    flat = W.reshape(-1)
    n = flat.numel()
    idx = torch.linspace(0, n - 1, min(4096, n), dtype=torch.float64, device=flat.device).round().long()
    sample = flat[idx].contiguous().cpu()
    h = hashlib.sha256(f"{tuple(W.shape)}|{W.dtype}|".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _frozen_digest(m: BoundedGainLinear) -> str:
    """Hash of an adapter's frozen factors (all of U, S, P): a trainable-only file must fit them."""
    h = hashlib.sha256()
    for t in (m.U, m.S, m.P):
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _layout(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv1d"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _shape_str(module: nn.Module) -> str:
    d_out, d_in = in_out_features(module)
    return f"{type(module).__name__} W ({d_out}, {d_in})"


# --------------------------------------------------------------------------------------------- report


@dataclass
class AttachReport:
    """What :func:`attach_adapters` did: one row per layer, and the settings it was called with.

    Row keys: ``name, d_out, d_in, r, metric, eps`` (the absolute eps orient used), ``cond`` (of the
    damped metric), ``energy_kept`` and ``rel_error`` (orient's functional truncation error), ``identity_error`` (``max|W_res + U S P - W| / max|W|``, fp64, from the stored
    tensors), ``restore_error`` (the same for the weight :func:`detach_adapters` will install, after
    rounding to the model's dtype), ``init_s`` (orient + build, seconds), ``trainable``. ``info[name]``
    is orient's whole ``info`` dict for that layer.
    """

    rows: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_polars(self):
        import polars as pl

        return pl.DataFrame(self.rows)

    @property
    def trainable(self) -> int:
        return sum(r["trainable"] for r in self.rows)

    def __str__(self) -> str:
        if not self.rows:
            return "AttachReport(no layers)"
        worst = max(r["identity_error"] for r in self.rows)
        init = sum(r["init_s"] for r in self.rows)
        return (f"AttachReport({len(self.rows)} layers, metric={self.settings.get('metric')}, "
                f"r={self.settings.get('r')}, rotate={self.settings.get('rotate')}, trainable={self.trainable}, "
                f"max identity error {worst:.2e}, init {init:.2f} s)")


# --------------------------------------------------------------------------------------------- attach


def _resolve_targets(model, moments, metric, targets) -> list[str]:
    named = list(moments) if targets is None and moments else (
        [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple, set)) else [])
    attached = adapters(model)
    done = [n for n in named if n in attached]
    if done:
        raise ValueError(f"layer(s) {done[:5]} already carry a covsvd adapter; detach_adapters(model) first "
                         "(or leave them out of targets)")
    if targets is not None:
        return find_targets(model, targets)
    if moments is not None:
        if not moments:
            raise ValueError("moments is empty: capture some targets first, or pass targets= with metric='identity'")
        return find_targets(model, list(moments))
    if metric != "identity":
        raise ValueError(f"metric={metric!r} needs moments (covsvd.capture_moments(model, batches)); "
                         "only metric='identity' can run without them")
    return find_targets(model, None)


def _check_moment(name: str, module: nn.Module, C, metric: str, r: int) -> None:
    """Raise a clear error if ``C`` cannot orient ``module`` under ``metric``; never mutates."""
    d_out, d_in = in_out_features(module)
    where = f"layer {name!r} ({_shape_str(module)})"
    if C is None:
        raise ValueError(f"{where}: metric={metric!r} needs a second moment and moments has no entry for it; "
                         f"capture it (covsvd.capture_moments(model, batches, targets=[{name!r}, ...])) or drop "
                         "the layer from targets")
    if isinstance(C, SecondMoment):
        if C.d_in != d_in:
            raise ValueError(f"{where}: its moment has d_in={C.d_in}, the layer's input is {d_in}; "
                             "the moments were captured on another model or layer")
        if metric in _FULL_METRICS and C.kind != "full":
            raise ValueError(f"{where}: metric={metric!r} needs the full (d_in, d_in) moment, this one was "
                             "captured with kind='diag'; capture with kind='full' or use metric='diag'")
        if C.count < r:
            raise ValueError(f"{where}: its moment saw {C.count} real tokens, fewer than r={r}: C has rank < r "
                             "and the extra directions are arbitrary; capture more calibration text or lower r")
        tensors = {"sum_xx": C.sum_xx, "sum_x": C.sum_x, "sum_abs": C.sum_abs}
    elif isinstance(C, torch.Tensor):
        ok = {(d_in, d_in)} if metric in _FULL_METRICS else {(d_in, d_in), (d_in,)}
        if tuple(C.shape) not in ok:
            raise ValueError(f"{where}: moment tensor has shape {tuple(C.shape)}; metric={metric!r} needs "
                             f"{' or '.join(str(s) for s in sorted(ok))}")
        tensors = {"C": C}
    else:
        raise TypeError(f"{where}: moments[{name!r}] is a {type(C).__name__}; expected covsvd.SecondMoment "
                        "(or a (d_in, d_in) / (d_in,) tensor)")
    for key, t in tensors.items():
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise ValueError(f"{where}: its moment's {key} has {bad} non-finite entries (overflow or NaN "
                             "activations during capture); recapture in fp32 / on clean data")


def _check_tied(model: nn.Module, names: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        module = model.get_submodule(name)
        shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(f"layer {name!r} ({_shape_str(module)}) shares its weight with {shared} (tied "
                             "weights): an adapter would untie them; leave it out of targets "
                             "(e.g. targets=lambda n, m: n != " + repr(name) + ")")


def attach_adapters(
    model: nn.Module,
    moments: dict | None,
    r: int,
    metric: str = "identity",
    eps: float = DEFAULT_EPS,
    eps_mode: str = "absolute",
    coeff: float = 1.0,
    rotate: str | None = None,
    block_size: int = 4,
    max_angle: float = 0.5,
    dtype: torch.dtype | None = None,
    targets=None,
    progress: bool = True,
    **orient_kwargs,
) -> AttachReport:
    """Replace each target with a :class:`BoundedGainLinear` oriented by ``metric``; freeze the rest.

    Args:
        model: any module with ``nn.Linear`` / transformers ``Conv1D`` targets.
        moments: ``{module name: SecondMoment}`` from :func:`covsvd.capture_moments` (a ``(d_in, d_in)``
            or ``(d_in,)`` tensor is accepted too, but carries no token count, so the ``count >= r`` check
            only applies to ``SecondMoment``). ``None`` is allowed for ``metric="identity"``.
        r: rank kept per layer; ``1 <= r <= min(d_out, d_in)``.
        metric, eps, eps_mode, **orient_kwargs: passed to :func:`covsvd.orient` (``components``,
            ``solver``, ``alpha``, ``compute_dtype``: every decomposition runs in fp64 by default). The
            defaults are orient's (``eps=1e-3`` absolute).
        coeff, rotate, block_size, max_angle: the adapter (:class:`BoundedGainLinear`).
        dtype: storage dtype of ``U, S, P`` (``None``: fp32, whatever the model's dtype). ``W_res`` is fp32
            (fp64 for fp64 storage), formed by orient from the *rounded* factors, so ``W_res + U S P``
            reproduces ``W`` to fp32 rounding even with bf16 factors.
        targets: a :func:`covsvd.find_targets` spec; default: the keys of ``moments``, or every Linear /
            Conv1D when ``moments`` is ``None``.
        progress: a tqdm bar over layers.

    Every target is validated before anything changes (names, ``r`` vs the shape, moments present,
    matching, finite and with ``>= r`` real tokens, no tied weights); then all are oriented; only then are
    the modules swapped and every non-adapter parameter frozen (``requires_grad=False``; the previous
    flags come back on :func:`detach_adapters`). On any error the model is untouched.

    Returns:
        :class:`AttachReport`.
    """
    from .orient import orient  # late: orient is a sibling module with no dependency on this one

    rotate = _rotate_arm(rotate)
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {METRICS}")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r={r!r} must be a positive int")
    a_limit(max_angle)
    block_sizes(r, block_size)
    if not math.isfinite(float(coeff)):
        raise ValueError(f"coeff={coeff!r} must be finite")
    storage = torch.float32 if dtype is None else dtype
    if not storage.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating dtype (storage of U, S, P)")

    names = _resolve_targets(model, moments, metric, targets)
    modules = {n: model.get_submodule(n) for n in names}
    for name, module in modules.items():
        d_out, d_in = in_out_features(module)
        W = weight_matrix(module)
        if r > min(d_out, d_in):
            raise ValueError(f"layer {name!r} ({_shape_str(module)}): r={r} exceeds min(d_out, d_in)="
                             f"{min(d_out, d_in)}; lower r or leave the layer out of targets")
        if W.is_meta or not W.is_floating_point():
            raise ValueError(f"layer {name!r} ({_shape_str(module)}): weight is {W.dtype} on {W.device}; "
                             "adapters need a materialised floating weight (quantised / meta layers unsupported)")
        if metric != "identity":
            _check_moment(name, module, None if moments is None else moments.get(name), metric, r)
    _check_tied(model, names)

    identity = getattr(model, "_covsvd_identity", None) or model_identity(model)
    settings = dict(metric=metric, r=r, eps=eps, eps_mode=eps_mode, coeff=coeff, rotate=rotate,
                    block_size=block_size, max_angle=max_angle, dtype=str(storage).removeprefix("torch."),
                    **{k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                       for k, v in orient_kwargs.items()})
    report = AttachReport(settings=settings)
    built: dict[str, BoundedGainLinear] = {}
    for name in tqdm(names, desc=f"orient ({metric}, r={r})", disable=not progress, leave=False):
        module = modules[name]
        t0 = time.perf_counter()
        W = weight_matrix(module).detach()  # (d_out, d_in), model dtype
        C = None if metric == "identity" or moments is None else moments.get(name)
        try:
            o = orient(W, C, r, metric=metric, eps=eps, eps_mode=eps_mode, name=name, storage_dtype=storage,
                       **orient_kwargs)
        except Exception as e:
            msg = f"orient failed for layer {name!r} ({_shape_str(module)}, r={r}, metric={metric!r}): {e}"
            raise (ValueError(msg) if isinstance(e, ValueError) else RuntimeError(msg)) from e
        info = dict(o.info)
        config = dict(metric=metric, eps=info["eps"], eps_mode=eps_mode, components=info["components"],
                      storage=str(storage).removeprefix("torch."), base_digest=weight_digest(module.weight))
        adapter = BoundedGainLinear(
            o.U.to(W.device), o.S.to(W.device), o.P.to(W.device), o.W_res.to(W.device),
            getattr(module, "bias", None), coeff=coeff, rotate=rotate, block_size=block_size,
            max_angle=max_angle, layout=_layout(module), base_dtype=W.dtype, config=config)
        ident, restore = _identity_errors(adapter, W)
        adapter.config.update(identity_error=ident, restore_error=restore)
        built[name] = adapter
        d_out, d_in = W.shape
        report.rows.append(dict(
            name=name, d_out=d_out, d_in=d_in, r=r, metric=metric, eps=info["eps"], cond=info["cond"],
            energy_kept=info["energy_kept"], rel_error=info["rel_error"], identity_error=ident,
            restore_error=restore, init_s=time.perf_counter() - t0,
            trainable=sum(p.numel() for p in adapter.parameters())))
        report.info[name] = info

    _install(model, built, identity)
    return report


def _identity_errors(adapter: BoundedGainLinear, W: torch.Tensor) -> tuple[float, float]:
    """``(max|W_res + U S P - W| / max|W|`` in fp64, the same for the restored weight in ``W``'s dtype)."""
    W64 = W.detach().double()
    scale = W64.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    hat = adapter.W_res.double() + adapter.delta_weight(trained=False)  # (d_out, d_in) fp64
    ident = ((hat - W64).abs().max() / scale).item()
    restore = ((adapter.dense_weight(trained=False).double() - W64).abs().max() / scale).item()
    return ident, restore


def _install(model: nn.Module, built: dict[str, BoundedGainLinear], identity: dict) -> None:
    """Swap the adapters in and freeze everything else (the only mutating step of attach/load)."""
    flags = getattr(model, "_covsvd_requires_grad", None)
    if flags is None:
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, adapter in built.items():
        _set_module(model, name, adapter)
    trainable = {id(p) for a in adapters(model).values() for p in a.parameters()}
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)
    model._covsvd_requires_grad = flags  # original flags by parameter name, restored on detach
    model._covsvd_identity = identity  # model_identity of the plain model, for save/load


# --------------------------------------------------------------------------------------------- detach


def detach_adapters(model: nn.Module, merge: bool = False) -> dict[str, float]:
    """Replace every adapter by a plain ``nn.Linear`` / ``Conv1D``; restore the ``requires_grad`` flags.

    ``merge=False`` installs ``W = W_res + U S P`` (fp64 sum, rounded once to the model's dtype): the
    original weight up to rounding. ``merge=True`` installs the trained weight
    ``W_res + U_eff diag(S_eff) P_eff`` instead.

    Returns ``{name: error}``. With ``merge=False`` the error is ``max|W_restored - W_original| / max|W_original|``
    as measured at attach time by the identical computation (the original weight is not kept, so this
    is the deterministic reconstruction checked once, when both existed). With ``merge=True`` it is
    ``max|W_merged - W_restored| / max|W_restored|``: how far training moved the layer.
    """
    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached (nothing to detach)")
    out = {}
    for name, adapter in found.items():
        plain = adapter.to_plain(merge=merge)
        if merge:
            base = adapter.dense_weight(trained=False).double()
            W = weight_matrix(plain).detach().double()
            out[name] = ((W - base).abs().max() / base.abs().max().clamp_min(1e-300)).item()
        else:
            out[name] = float(adapter.config.get("restore_error", float("nan")))
        _set_module(model, name, plain)
    flags = getattr(model, "_covsvd_requires_grad", {})
    for pname, p in model.named_parameters():
        p.requires_grad_(flags.get(pname, True))
    for attr in ("_covsvd_requires_grad", "_covsvd_identity"):
        if hasattr(model, attr):
            delattr(model, attr)
    return out


# --------------------------------------------------------------------------------------------- files


def _layer_meta(m: BoundedGainLinear) -> dict:
    return dict(d_out=m.out_features, d_in=m.in_features, r=m.r, layout=m.layout,
                base_dtype=str(m.base_dtype).removeprefix("torch."), coeff=m.coeff, rotate=m.rotate,
                block_size=m.block_size, max_angle=m.max_angle, has_bias=m.bias is not None,
                frozen_digest=_frozen_digest(m), **m.config)


def save_adapters(path: str | os.PathLike, model: nn.Module, trainable_only: bool = False) -> dict:
    """Write every adapter of ``model`` to one safetensors file; returns the metadata written.

    Tensors are named ``"{module}.{U,S,P,W_res,bias,g,rot_V.theta,rot_U.theta}"``. ``trainable_only=True``
    writes only ``g`` and the rotation parameters (tiny; loadable into a model whose adapters were
    attached with the very same frozen factors, which the file's digests check). Metadata (JSON strings):
    format, covsvd version, ``model_identity`` of the plain model, and per layer its shapes and settings
    (metric, r, eps used, rotate, coeff, block_size, max_angle, storage dtype, digests, identity errors).
    """
    from safetensors.torch import save_file

    from . import __version__

    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached (nothing to save)")
    tensors = {}
    for name, m in found.items():
        state = m.state_dict()
        for key, t in state.items():
            if trainable_only and not (key == "g" or key.endswith(".theta")):
                continue
            if t is not None:
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
    layers = {name: _layer_meta(m) for name, m in found.items()}
    common = {k: sorted({json.dumps(v[k]) for v in layers.values()}) for k in ("metric", "r", "eps", "rotate", "coeff")}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "covsvd_version": __version__,
        "contents": "trainable" if trainable_only else "full",
        "model_identity": json.dumps(getattr(model, "_covsvd_identity", None) or model_identity(model)),
        "targets": json.dumps(list(found)),
        "layers": json.dumps(layers),
        **{k: (json.loads(v[0]) if len(v) == 1 else "mixed") for k, v in common.items()},
    }
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    save_file(tensors, os.fspath(path), metadata=meta)
    return meta


def _read(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a covsvd adapter file (metadata format={meta.get('format')!r}); "
                             "write one with covsvd.save_adapters(path, model)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: adapter file format version {meta.get('format_version')!r}, this "
                             f"covsvd reads {FORMAT_VERSION!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


_SETTINGS = ("d_out", "d_in", "r", "layout", "rotate", "block_size", "max_angle", "coeff", "has_bias")


def load_adapters(path: str | os.PathLike, model: nn.Module) -> list[str]:
    """Load a :func:`save_adapters` file into ``model``; returns the layer names loaded.

    * a ``"full"`` file onto a plain model: rebuilds and installs the adapters (no moments needed),
      freezing the rest as :func:`attach_adapters` does;
    * a ``"full"`` file onto a model with the same adapters attached: overwrites all their tensors;
    * a ``"trainable"`` file: the model must already carry adapters with the same frozen factors
      (checked by digest); only ``g`` and the rotations are overwritten.

    Everything is checked before anything changes: the model identity (architecture fingerprint),
    the target set, every shape and setting, and a digest of each original weight (so a file saved
    from another checkpoint of the same architecture raises too).
    """
    meta, tensors = _read(path)
    layers: dict[str, dict] = json.loads(meta["layers"])
    file_id = json.loads(meta["model_identity"])
    attached = adapters(model)
    here_id = getattr(model, "_covsvd_identity", None) if attached else model_identity(model)
    here_id = here_id or model_identity(model)
    if file_id.get("fingerprint") != here_id.get("fingerprint"):
        raise ValueError(f"{path} was saved from another model ({file_id.get('model_type')} "
                         f"{file_id.get('name_or_path')!r}, fingerprint {file_id.get('fingerprint')}); this one is "
                         f"{here_id.get('model_type')} {here_id.get('name_or_path')!r} (fingerprint "
                         f"{here_id.get('fingerprint')}); load it into the model it was trained on")
    contents = meta.get("contents")
    if attached or contents == "trainable":
        if set(attached) != set(layers):
            raise ValueError(f"{path} holds adapters for {len(layers)} layers, the model has {len(attached)} "
                             f"attached; only in file: {sorted(set(layers) - set(attached))[:5]}, only in model: "
                             f"{sorted(set(attached) - set(layers))[:5]}"
                             + ("; a trainable-only file needs the same adapters attached first"
                                if contents == "trainable" else "; detach_adapters(model) first"))
        for name, m in attached.items():
            here, there = _layer_meta(m), layers[name]
            diff = {k: (there.get(k), here.get(k)) for k in _SETTINGS + ("base_digest",) if there.get(k) != here.get(k)}
            if contents == "trainable" and there.get("frozen_digest") != here["frozen_digest"]:
                diff["frozen_digest"] = (there.get("frozen_digest"), here["frozen_digest"])
            if diff:
                raise ValueError(f"{path}: layer {name!r} does not match the attached adapter "
                                 f"(file, model): {diff}")
        own = {f"{name}.{k}": t for name, m in attached.items() for k, t in m.state_dict().items()}
        keys = [k for k in own if contents == "full" or k.endswith(".g") or k.endswith(".theta")]
        _check_tensors(path, tensors, {k: own[k] for k in keys})
        with torch.no_grad():
            for k in keys:
                own[k].copy_(tensors[k])
        return list(attached)

    # a full file onto a plain model
    names = find_targets(model, list(layers))
    built = {}
    for name in names:
        module, lm = model.get_submodule(name), layers[name]
        d_out, d_in = in_out_features(module)
        W = weight_matrix(module)
        got = dict(d_out=d_out, d_in=d_in, layout=_layout(module), base_digest=weight_digest(module.weight))
        diff = {k: (lm.get(k), v) for k, v in got.items() if lm.get(k) != v}
        if diff:
            raise ValueError(f"{path}: layer {name!r} ({_shape_str(module)}) does not match the file "
                             f"(file, model): {diff}; the file was saved from other weights or shapes")
        t = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        want = ["U", "S", "P", "W_res", "g"] + (["bias"] if lm["has_bias"] else [])
        want += ["rot_V.theta"] * (lm["rotate"] in ("V", "both")) + ["rot_U.theta"] * (lm["rotate"] in ("U", "both"))
        missing = [k for k in want if k not in t]
        if missing:
            raise ValueError(f"{path}: layer {name!r} lacks tensors {missing}")
        dev = W.device
        config = {k: v for k, v in lm.items() if k not in _SETTINGS + ("base_dtype", "frozen_digest")}
        adapter = BoundedGainLinear(
            t["U"].to(dev), t["S"].to(dev), t["P"].to(dev), t["W_res"].to(dev),
            t["bias"].to(dev) if lm["has_bias"] else None, coeff=lm["coeff"], rotate=lm["rotate"],
            block_size=lm["block_size"], max_angle=lm["max_angle"], layout=lm["layout"], base_dtype=W.dtype,
            config=config)
        _check_tensors(path, {k: v for k, v in tensors.items() if k.startswith(name + ".")},
                       {f"{name}.{k}": v for k, v in adapter.state_dict().items()})
        with torch.no_grad():
            adapter.g.copy_(t["g"])
            for arm in ("rot_V", "rot_U"):
                if getattr(adapter, arm) is not None:
                    getattr(adapter, arm).theta.copy_(t[f"{arm}.theta"])
        built[name] = adapter
    _install(model, built, here_id)
    return names


def _check_tensors(path, tensors: dict, own: dict) -> None:
    for k, t in own.items():
        if k not in tensors:
            raise ValueError(f"{path}: tensor {k!r} missing from the file")
        if tuple(tensors[k].shape) != tuple(t.shape) or tensors[k].dtype != t.dtype:
            raise ValueError(f"{path}: tensor {k!r} is {tuple(tensors[k].shape)} {tensors[k].dtype} in the file, "
                             f"{tuple(t.shape)} {t.dtype} in the model")
