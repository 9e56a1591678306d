"""Which covsvd adapters a model carries, and what attaching must remember about the plain model.

The only module that swaps modules in and out of a model. What it remembers (the plain model's
``requires_grad`` flags, its identity, the modules it replaced) lives in a weak registry keyed by the model
object, never as attributes on the user's model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from ..data.fingerprint import model_identity
from .layer import BoundedGainLinear


@dataclass
class _Attached:
    requires_grad: dict[str, bool]  # the plain model's flags by parameter name, restored on detach
    identity: dict  # model_identity of the plain model, for files and checks
    training: dict[str, bool] = field(default_factory=dict)  # train/eval flag of each replaced module


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, _Attached] = weakref.WeakKeyDictionary()


def adapters(model: nn.Module) -> dict[str, BoundedGainLinear]:
    """``{module name: BoundedGainLinear}`` for every attached adapter, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BoundedGainLinear)}


def attached_identity(model: nn.Module) -> dict:
    """:func:`covsvd.data.fingerprint.model_identity` of the model *before* adapters were attached (of ``model``
    itself when it carries none)."""
    state = _ATTACHED.get(model)
    return state.identity if state is not None and adapters(model) else model_identity(model)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Install ``new`` as ``model.<name>``; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def install(model: nn.Module, built: dict[str, BoundedGainLinear], identity: dict,
            training: dict[str, bool] | None = None) -> dict[str, nn.Module]:
    """Swap the adapters in and freeze everything else; returns ``{name: the module replaced}``. The only
    mutating step of attach / init / load. Each adapter takes ``training[name]`` as its train/eval flag (by
    default that of the module it replaces; :func:`covsvd.init_adapters` passes the flags from before its
    capture put the model in eval mode)."""
    state = _ATTACHED.get(model)
    if state is None:
        state = _ATTACHED[model] = _Attached({n: p.requires_grad for n, p in model.named_parameters()}, identity)
    replaced = {}
    for name, adapter in built.items():
        flag = model.get_submodule(name).training if training is None else training[name]
        adapter.train(flag)
        replaced[name] = set_module(model, name, adapter)
        state.training[name] = flag
    trainable = {id(p) for a in adapters(model).values() for p in a.parameters()}
    for p in model.parameters():
        if id(p) not in trainable:
            p.requires_grad_(False)
    return replaced


def restore(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put the very modules ``originals`` back (``{name: module}``, from :func:`install`) and, when no adapter
    is left, every parameter's ``requires_grad`` flag: a failed attach leaves the model as it was."""
    for name, module in originals.items():
        set_module(model, name, module)
    state = _ATTACHED.get(model)
    if state is not None:
        for name in originals:
            state.training.pop(name, None)
        if not adapters(model):
            release(model)


def release(model: nn.Module) -> None:
    """Forget ``model`` and put back its parameters' ``requires_grad`` flags (once no adapter is attached)."""
    state = _ATTACHED.pop(model, None)
    flags = state.requires_grad if state is not None else {}
    for pname, p in model.named_parameters():
        p.requires_grad_(flags.get(pname, True))


def training_flag(model: nn.Module, name: str, default: bool) -> bool:
    """The train/eval flag the module replaced at ``name`` had (``default`` when unknown)."""
    state = _ATTACHED.get(model)
    return state.training.get(name, default) if state is not None else default
