"""Attaching and detaching bounded-gain adapters on a model (the only module that swaps modules in and out).

* :func:`attach_adapters` validates every target first (names, shapes, ``r``, moments, tied weights), then
  orients every target (:func:`covsvd.orient`, pure tensors), then swaps all modules in. Any error before
  the swap leaves the model exactly as it was.
* :func:`detach_adapters` puts plain ``nn.Linear`` / ``Conv1D`` modules back with ``W = W_res + U S P``
  (or the trained, merged weight with ``merge=True``).
* :func:`disable_adapters`: a context manager under which every adapter computes the original layer.

What attaching must remember about the plain model (its ``requires_grad`` flags and its identity) is kept
in a weak registry keyed by the model object, never as attributes on the user's model.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..algebra.damping import DEFAULT_EPS, DEFAULT_EPS_MODE
from ..algebra.measures import identity_error, max_relative_error
from ..algebra.orient import orient
from ..algebra.rotation import a_limit, block_sizes
from ..algebra.validate import METRICS, moment_parts
from ..capture.moments import SecondMoment
from ..data.models import model_identity
from ..data.targets import find_targets, in_out_features, weight_matrix
from ..util.checks import check_choice, check_rank, check_weight
from ..util.digest import sampled_digest
from .layer import BoundedGainLinear, rotate_arm
from .sufficiency import check_sufficient


@dataclass
class _Attached:
    requires_grad: dict[str, bool]  # the plain model's flags by parameter name, restored on detach
    identity: dict  # model_identity of the plain model, for save/load


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, _Attached] = weakref.WeakKeyDictionary()


def attached_identity(model: nn.Module) -> dict:
    """:func:`covsvd.model_identity` of the model *before* adapters were attached (of ``model`` if none are)."""
    state = _ATTACHED.get(model)
    return state.identity if state is not None and adapters(model) else model_identity(model)


def layout(module: nn.Module) -> str:
    """``"linear"`` or ``"conv1d"``: which plain module a target is."""
    return "linear" if isinstance(module, nn.Linear) else "conv1d"


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Install ``new`` as ``model.<name>``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def shape_str(module: nn.Module) -> str:
    """``"Linear W (d_out, d_in)"``, for error messages."""
    d_out, d_in = in_out_features(module)
    return f"{type(module).__name__} W ({d_out}, {d_in})"


def adapters(model: nn.Module) -> dict[str, BoundedGainLinear]:
    """``{module name: BoundedGainLinear}`` for every attached adapter, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BoundedGainLinear)}


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad`` (after :func:`attach_adapters`: ``g`` and rotations)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable tensors (``g``, rotation ``theta``), for an optimizer."""
    return [p for m in adapters(model).values() for p in m.parameters()]


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
        """The rows as a polars DataFrame (polars is a lab dependency, imported here only: ``import covsvd`` never
        loads it). Raises ``ImportError`` naming the extra when polars is missing."""
        try:
            import polars as pl
        except ImportError as e:
            raise ImportError("AttachReport.to_polars needs polars: pip install 'covsvd[lab]' "
                              "(or use report.rows, a list of dicts)") from e
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
                f"r={rank_str(self.settings.get('r'))}, rotate={self.settings.get('rotate')}, "
                f"trainable={self.trainable}, "
                f"max identity error {worst:.2e}, init {init:.2f} s)")



# --------------------------------------------------------------------------------------------- attach


def rank_str(r) -> str:
    """``"64"`` for one rank, ``"per layer 8..96"`` for a ``{name: r}`` dict (progress bars, reports)."""
    if isinstance(r, Mapping):
        return f"per layer {min(r.values())}..{max(r.values())}" if r else "per layer (none)"
    return str(r)


def layer_ranks(r, names: list[str]) -> dict[str, int]:
    """``{name: r}`` for every target from an int or a dict; raises naming missing / extra layers or bad ranks."""
    if isinstance(r, Mapping):
        missing = [n for n in names if n not in r]
        if missing:
            raise ValueError(f"r is a dict without an entry for {len(missing)} target layer(s): {missing[:5]}; "
                             "give every target a rank (with targets=None the dict's own layers are attached)")
        extra = [n for n in r if n not in names]
        if extra:
            raise ValueError(f"r has ranks for {len(extra)} layer(s) that are not targets: {extra[:5]}; drop "
                             "them from r or add them to targets")
        ranks = {n: r[n] for n in names}
    else:
        ranks = dict.fromkeys(names, r)
    for n, rn in ranks.items():
        if not isinstance(rn, int) or isinstance(rn, bool) or rn < 1:
            raise ValueError(f"layer {n!r}: r={rn!r} must be a positive int")
    return ranks


def resolve_targets(model, moments, metric, targets) -> list[str]:
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


def check_target(model: nn.Module, name: str, r: int, C, metric: str) -> None:
    """Everything one target needs before it is oriented: ``r`` fits its shape, its weight is materialised,
    floating and finite, it is not an ``nn.MultiheadAttention.out_proj`` (MHA reads that weight directly: a
    replaced or LoRA-wrapped out_proj would never run), and ``C`` fits ``metric`` (:func:`covsvd.algebra.validate.
    moment_parts`; ``None`` only for ``identity``). Raises ``ValueError`` naming the layer, its shape and the fix;
    changes nothing. Shared by :func:`attach_adapters` and :func:`covsvd.export_peft`."""
    module = model.get_submodule(name)
    prefix = f"layer {name!r} ({shape_str(module)}): "
    d_out, d_in = in_out_features(module)
    check_rank(r, d_out, d_in, prefix)
    check_weight(weight_matrix(module), prefix)  # quantised (not floating) / meta / non-finite
    if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
        raise ValueError(f"{prefix}is the out_proj of an nn.MultiheadAttention, which reads out_proj.weight "
                         "directly: an adapter there would never run; leave it out of targets")
    if C is None and metric != "identity":
        raise ValueError(f"{prefix}metric={metric!r} needs a second moment and moments has no entry for it; "
                         f"capture it (covsvd.capture_moments(model, batches, targets=[{name!r}, ...])) or leave "
                         "the layer out of targets")
    if C is not None:
        moment_parts(C, metric, r, (d_out, d_in), prefix)


def check_tied(model: nn.Module, names: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        module = model.get_submodule(name)
        shared = [o for o in owners.get(id(module.weight), []) if o != f"{name}.weight"]
        if shared:
            raise ValueError(f"layer {name!r} ({shape_str(module)}) shares its weight with {shared} (tied "
                             "weights): an adapter would untie them; leave it out of targets "
                             "(e.g. targets=lambda n, m: n != " + repr(name) + ")")


def attach_adapters(
    model: nn.Module,
    moments: dict | None,
    r: int | dict[str, int],
    metric: str = "identity",
    eps: float = DEFAULT_EPS,
    eps_mode: str = DEFAULT_EPS_MODE,
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
        r: rank kept per layer, ``1 <= r <= min(d_out, d_in)``: one int for every layer, or a ``{name: r}``
            dict (e.g. from :func:`covsvd.allocate_ranks`); its keys are then the default targets, and explicit
            ``targets`` must each have an entry (a key that is not a target raises too).
        metric, eps, eps_mode, **orient_kwargs: passed to :func:`covsvd.orient` (``components``,
            ``solver``, ``alpha``, ``compute_dtype``: every decomposition runs in fp64 by default). The
            defaults are orient's (``eps=1e-3`` absolute).
        coeff, rotate, block_size, max_angle: the adapter (:class:`BoundedGainLinear`).
        dtype: storage dtype of ``U, S, P`` (``None``: fp32, whatever the model's dtype). ``W_res`` is fp32
            (fp64 for fp64 storage), formed by orient from the *rounded* factors, so ``W_res + U S P``
            reproduces ``W`` to fp32 rounding even with bf16 factors.
        targets: a :func:`covsvd.find_targets` spec; default: the keys of ``r`` (a dict), else of ``moments``,
            else every Linear / Conv1D (``moments`` ``None``).
        progress: a tqdm bar over layers.

    Every target is validated before anything changes (names, ``r`` vs the shape, moments present,
    matching, finite and with ``>= r`` real tokens, no tied weights); then all are oriented; only then are
    the modules swapped and every non-adapter parameter frozen (``requires_grad=False``; the previous
    flags come back on :func:`detach_adapters`). On any error the model is untouched.

    Returns:
        :class:`AttachReport`.
    """
    rotate = rotate_arm(rotate)
    check_choice("metric", metric, METRICS)
    if not isinstance(r, Mapping) and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        raise ValueError(f"r={r!r} must be a positive int or a {{layer name: positive int}} dict")
    a_limit(max_angle)
    block_sizes(1, block_size)  # checks block_size (every rank is checked against its layer below)
    if not math.isfinite(float(coeff)):
        raise ValueError(f"coeff={coeff!r} must be finite")
    storage = torch.float32 if dtype is None else dtype
    if not storage.is_floating_point:
        raise ValueError(f"dtype={dtype!r} must be a floating dtype (storage of U, S, P)")

    if isinstance(r, Mapping) and targets is None:
        targets = list(r)  # a {name: r} dict names its layers (as covsvd.export_peft)
    names = resolve_targets(model, moments, metric, targets)
    ranks = layer_ranks(r, names)
    modules = {n: model.get_submodule(n) for n in names}
    for name in names:
        C = None if metric == "identity" or moments is None else moments.get(name)  # identity orients without C
        check_target(model, name, ranks[name], C, metric)
    check_tied(model, names)
    if moments is not None:  # one warning naming every layer whose C is rank deficient (count < d_in)
        check_sufficient({n: moments[n] for n in names if isinstance(moments.get(n), SecondMoment)}, metric,
                         stacklevel=3)

    identity = attached_identity(model)
    settings = dict(metric=metric, r=dict(ranks) if isinstance(r, Mapping) else r, eps=eps, eps_mode=eps_mode,
                    coeff=coeff, rotate=rotate,
                    block_size=block_size, max_angle=max_angle, dtype=str(storage).removeprefix("torch."),
                    **{k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                       for k, v in orient_kwargs.items()})
    report = AttachReport(settings=settings)
    built: dict[str, BoundedGainLinear] = {}
    for name in tqdm(names, desc=f"orient ({metric}, r={rank_str(r)})", disable=not progress, leave=False):
        module = modules[name]
        rank = ranks[name]
        t0 = time.perf_counter()
        W = weight_matrix(module).detach()  # (d_out, d_in), model dtype
        C = None if metric == "identity" or moments is None else moments.get(name)
        try:
            o = orient(W, C, rank, metric=metric, eps=eps, eps_mode=eps_mode, name=name, storage_dtype=storage,
                       **orient_kwargs)
        except Exception as e:
            msg = f"orient failed for layer {name!r} ({shape_str(module)}, r={rank}, metric={metric!r}): {e}"
            raise (ValueError(msg) if isinstance(e, ValueError) else RuntimeError(msg)) from e
        info = dict(o.info)
        # eps: the absolute eps used (the pair reads on its own); eps_arg, eps_mode_arg: what was asked for
        config = dict(metric=metric, eps=info["eps"], eps_mode="absolute", eps_arg=info["eps_arg"], eps_mode_arg=eps_mode,
                      components=info["components"],
                      storage=str(storage).removeprefix("torch."), base_digest=sampled_digest(module.weight))
        adapter = BoundedGainLinear(
            o.U.to(W.device), o.S.to(W.device), o.P.to(W.device), o.W_res.to(W.device),
            getattr(module, "bias", None), coeff=coeff, rotate=rotate, block_size=block_size,
            max_angle=max_angle, layout=layout(module), base_dtype=W.dtype, config=config)
        ident = identity_error(W, adapter.U, adapter.S, adapter.P, adapter.W_res)
        restore = max_relative_error(adapter.dense_weight(trained=False), W)  # what detach will install
        adapter.config.update(identity_error=ident, restore_error=restore)
        built[name] = adapter
        d_out, d_in = W.shape
        report.rows.append(dict(
            name=name, d_out=d_out, d_in=d_in, r=rank, metric=metric, eps=info["eps"], cond=info["cond"],
            energy_kept=info["energy_kept"], rel_error=info["rel_error"], identity_error=ident,
            restore_error=restore, init_s=time.perf_counter() - t0,
            trainable=sum(p.numel() for p in adapter.parameters())))
        report.info[name] = info

    install(model, built, identity)
    return report


def install(model: nn.Module, built: dict[str, BoundedGainLinear], identity: dict) -> None:
    """Swap the adapters in and freeze everything else (the only mutating step of attach/load)."""
    state = _ATTACHED.get(model)
    if state is None:
        state = _ATTACHED[model] = _Attached({n: p.requires_grad for n, p in model.named_parameters()}, identity)
    for name, adapter in built.items():
        set_module(model, name, adapter)
    trainable = {id(p) for a in adapters(model).values() for p in a.parameters()}
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)



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
            out[name] = max_relative_error(weight_matrix(plain), adapter.dense_weight(trained=False))
        else:
            out[name] = float(adapter.config.get("restore_error", float("nan")))
        set_module(model, name, plain)
    state = _ATTACHED.pop(model, None)
    flags = state.requires_grad if state is not None else {}
    for pname, p in model.named_parameters():
        p.requires_grad_(flags.get(pname, True))
    return out




@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every adapter computes its original layer ``W_res + U diag(S) P`` (no gain, no
    rotation): the model's original outputs up to rounding, as peft's ``disable_adapter()``. Restored on exit,
    also after an error. Raises ``ValueError`` when ``model`` carries no covsvd adapters."""
    found = adapters(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no covsvd adapters attached (nothing to disable)")
    before = {name: m.disabled for name, m in found.items()}
    for m in found.values():
        m.disabled = True
    try:
        yield model
    finally:
        for name, m in found.items():
            m.disabled = before[name]
