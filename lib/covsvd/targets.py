"""Which modules are adapter / capture targets, and the one place Conv1D's transposed weight is handled.

A target is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 family). covsvd's convention is the
Linear one everywhere: ``W`` is ``(d_out, d_in)`` and ``y = x @ W.T + b``. ``Conv1D`` stores ``W.T``
(``(d_in, d_out)``, ``y = x @ weight + b``), so :func:`weight_matrix` converts once, here.
"""

from __future__ import annotations

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


def find_targets(model: nn.Module, targets: TargetSpec = None) -> list[str]:
    """Names of the Linear/Conv1D modules selected by ``targets``, in ``named_modules`` order.

    ``targets`` may be:
      * ``None``: every ``nn.Linear`` and ``Conv1D``;
      * a ``str`` or compiled regex: modules whose full name matches it (``re.fullmatch``, so
        ``r".*output\\.dense"`` or an exact name both work);
      * an iterable of exact names: those modules (each must exist and be Linear-like);
      * a predicate ``f(name, module) -> bool``, called on Linear-like modules only.

    Raises ``ValueError`` naming the spec when nothing matches, or naming the missing/non-linear
    module when an explicit name is wrong.
    """
    linear = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    if not linear:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D modules to target")
    if targets is None:
        return [n for n, _ in linear]
    if isinstance(targets, (str, re.Pattern)):
        pattern = re.compile(targets) if isinstance(targets, str) else targets
        names = [n for n, _ in linear if pattern.fullmatch(n)]
        if not names:
            raise ValueError(
                f"target pattern {pattern.pattern!r} matches none of the {len(linear)} Linear/Conv1D modules "
                f"of {type(model).__name__} (e.g. {linear[0][0]!r}); the pattern must match the full name"
            )
        return names
    if callable(targets):
        names = [n for n, m in linear if targets(n, m)]
        if not names:
            raise ValueError(f"target predicate {targets!r} selected none of the {len(linear)} Linear/Conv1D modules")
        return names
    wanted = list(targets)
    if not wanted:
        raise ValueError("targets is an empty list: pass None for every Linear/Conv1D module")
    modules = dict(model.named_modules())
    for n in wanted:
        if n not in modules:
            close = [m for m, _ in linear if n.split(".")[-1] in m][:3]
            raise ValueError(f"target {n!r} is not a module of {type(model).__name__}" + (f"; similar: {close}" if close else ""))
        if not is_linear(modules[n]):
            raise ValueError(f"target {n!r} is a {type(modules[n]).__name__}, not nn.Linear or Conv1D")
    order = {n: i for i, (n, _) in enumerate(linear)}
    return sorted(dict.fromkeys(wanted), key=order.__getitem__)
