"""Which modules are adapter / capture targets, and the one place Conv1D's transposed weight is handled.

A target is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 family). covsvd's convention is the
Linear one everywhere: ``W`` is ``(d_out, d_in)`` and ``y = x @ W.T + b``. ``Conv1D`` stores ``W.T``
(``(d_in, d_out)``, ``y = x @ weight + b``), so :func:`weight_matrix` converts once, here.

LLM conventions (``targets=None`` only): the output embeddings (``model.get_output_embeddings()``, the
``lm_head`` of a causal LM) and any Linear-like module whose weight *is* an embedding's weight (tied: same
Parameter or same storage) are not default targets: :func:`embedding_modules` names them. A regex, predicate or
name list is the user's explicit choice and may still select them (attach then refuses tied weights).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

try:  # transformers is a hard dependency, but keep the algebra importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

TargetSpec = None | str | re.Pattern | Iterable[str] | Callable[[str, nn.Module], bool]


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear-like module."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if Conv1D and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return d_out, d_in
    raise TypeError(f"{type(module).__name__} is not nn.Linear or transformers Conv1D")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(d_out, d_in)`` (a view for Linear, a transposed view for Conv1D)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.T  # Conv1D stores (d_in, d_out)
    raise TypeError(f"{type(module).__name__} is not nn.Linear or transformers Conv1D")


def _same_weight(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor object, or two tensors over the same memory (same address, shape and strides: a tie made by
    sharing data); never true for meta tensors (they have no memory to compare)."""
    if a is b:
        return True
    if a.is_meta or b.is_meta or a.device != b.device:
        return False
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _embeddings(model: nn.Module) -> list[nn.Module]:
    """The model's input / output embeddings (transformers' accessors, when they exist) and every nn.Embedding."""
    found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, accessor, None)
        try:
            module = get() if callable(get) else None
        except (NotImplementedError, AttributeError):  # transformers' base raises for models without one
            module = None
        if isinstance(module, nn.Module) and all(module is not m for m in found):
            found.append(module)
    return found


def embedding_modules(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv1D modules that default targets leave out, in ``named_modules`` order: the output
    embeddings (``model.get_output_embeddings()``) and any module whose weight is an embedding's (tied)."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    weights = [e.weight for e in _embeddings(model) if isinstance(getattr(e, "weight", None), torch.Tensor)]
    return [
        n for n, m in model.named_modules()
        if is_linear(m) and (m is head or any(_same_weight(m.weight, w) for w in weights))
    ]


def find_targets(model: nn.Module, targets: TargetSpec = None) -> list[str]:
    """Names of the Linear/Conv1D modules selected by ``targets``, in ``named_modules`` order.

    ``targets`` follows peft's ``target_modules``:
      * ``None``: every ``nn.Linear`` and ``Conv1D`` except the output embeddings and modules tied to an
        embedding (:func:`embedding_modules`; the LLM convention: the ``lm_head`` is not adapted);
      * a list (any iterable) of names: every Linear-like module whose full name equals one of them or ends
        with ``"." + name`` (``["q_proj", "v_proj"]`` selects every block's ``q_proj`` and ``v_proj``; a full
        name selects that module); each name must select at least one module;
      * a ``str`` or compiled regex: modules whose full name matches it (``re.fullmatch``, so
        ``r".*output\\.dense"`` or an exact name both work);
      * a predicate ``f(name, module) -> bool``, called on Linear-like modules only.

    Raises ``ValueError`` naming the spec when nothing matches, a name that selects nothing (with similar
    names), a name that selects a module that is not Linear-like, or an invalid regex.
    """
    linear = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D modules to target")
    if targets is None:
        return _default_targets(model, linear)
    if isinstance(targets, (str, re.Pattern)):
        return _regex_targets(model, linear, targets)
    if callable(targets):
        names = [n for n, m in linear if targets(n, m)]
        if not names:
            raise ValueError(f"target predicate {targets!r} selected none of the {len(linear)} Linear/Conv1D modules")
        return names
    return _named_targets(model, linear, list(targets))


def _default_targets(model: nn.Module, linear: list) -> list[str]:
    skip = set(embedding_modules(model))
    names = [n for n, _ in linear if n not in skip]
    if not names:
        raise ValueError(
            f"every Linear/Conv1D module of {type(model).__name__} is an output embedding or tied to an "
            f"embedding ({sorted(skip)[:3]}); name them explicitly with targets=[...] to capture them"
        )
    return names


def _regex_targets(model: nn.Module, linear: list, targets) -> list[str]:
    try:
        pattern = re.compile(targets) if isinstance(targets, str) else targets
    except re.error as e:
        raise ValueError(f"targets={targets!r} is not a valid regular expression ({e}); pass a regex that matches "
                         "full module names, or a list of names such as ['q_proj', 'v_proj']") from e
    names = [n for n, _ in linear if pattern.fullmatch(n)]
    if not names:
        hint = (f"; to select every module named like it, pass a list: targets=[{targets!r}]"
                if isinstance(targets, str) and any(n == targets or n.endswith("." + targets) for n, _ in linear)
                else "")
        raise ValueError(
            f"target pattern {pattern.pattern!r} matches none of the {len(linear)} Linear/Conv1D modules "
            f"of {type(model).__name__} (e.g. {linear[0][0]!r}): a string is a regex that must match the full "
            f"name{hint}"
        )
    return names


def _named_targets(model: nn.Module, linear: list, wanted: list[str]) -> list[str]:
    if not wanted:
        raise ValueError("targets is an empty list: pass None for every Linear/Conv1D module")
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for t in wanted:
        if not isinstance(t, str):
            raise ValueError(f"targets has {t!r}; a list of targets holds module names (str)")
        hits = [n for n in modules if n == t or n.endswith("." + t)]
        if not hits:
            leaves = sorted({m.rpartition(".")[2] for m, _ in linear})
            close = difflib.get_close_matches(t.rpartition(".")[2], leaves, n=3)
            raise ValueError(f"target {t!r} is not a module of {type(model).__name__} (no module is named {t!r} "
                             "or ends with '." + t + "')" + (f"; similar: {close}" if close else ""))
        plain = [n for n in hits if not is_linear(modules[n])]
        if plain and len(plain) == len(hits):
            raise ValueError(f"target {t!r} is a {type(modules[plain[0]]).__name__}, not nn.Linear or Conv1D")
        chosen.update(n for n in hits if is_linear(modules[n]))
    return [n for n, _ in linear if n in chosen]
