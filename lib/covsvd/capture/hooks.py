"""Forward pre-hooks on named modules (:class:`InputHooks`) and the discovery of targets that read one input
tensor (:class:`SharedInputs`), so a shared input's product is computed once.

Sharing: targets that read the *same tensor object* in one forward (q/k/v; gate/up) share one accumulator.
It is discovered in the first forward (by object identity, through weak references, so a freed tensor's
recycled ``id`` never matches) and then checked in every later forward; a model whose sharing changes between
batches raises (pass ``share_inputs=False`` to give every target its own accumulator).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
from torch import nn


class InputHooks(dict):
    """``{module name: hook handle}``: forward pre-hooks calling ``fn(name, x)`` with each call's input tensor.

    A context manager in the spirit of baukit's ``TraceDict``: every hook is removed on exit, also when
    the forward (or ``fn``) raised.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], fn: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.fn = fn
        modules = dict(model.named_modules())
        try:
            for name in names:
                hook = partial(self._pre_hook, name)
                self[name] = modules[name].register_forward_pre_hook(hook, with_kwargs=True)
        except BaseException:
            self.remove()
            raise

    def _pre_hook(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"module {name!r} was called without a tensor input (got {type(x).__name__})")
        self.fn(name, x)

    def remove(self) -> None:
        for handle in self.values():
            handle.remove()
        self.clear()

    def __enter__(self) -> InputHooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class SharedInputs:
    """Groups of targets that read the same input tensor, so their product is computed once.

    ``on_input(name, x)`` returns whether this call's input must be accumulated (into the accumulator of
    ``leader[name]``). The first forward discovers the groups; later forwards must repeat them.
    """

    def __init__(self, names: Sequence[str], enabled: bool = True) -> None:
        self.enabled = enabled
        self.discovering = enabled
        self.leader = {n: n for n in names}
        self.members: dict[str, list[str]] = {n: [n] for n in names}
        self._calls: dict[str, list[tuple[str, int]]] = {n: [] for n in names}  # first forward: per call, (owner, index)
        self._seen: dict[int, tuple[weakref.ref, str, int]] = {}
        self._refs: dict[str, list[weakref.ref]] = {}  # later forwards: leader -> inputs accumulated so far
        self._count: dict[str, int] = {}  # later forwards: member -> calls so far

    def on_input(self, name: str, x: torch.Tensor) -> bool:
        if not self.enabled:
            return True
        if self.discovering:
            return self._discover(name, x)
        lead = self.leader[name]
        if len(self.members[lead]) == 1:
            return True
        k = self._count.get(name, 0)
        self._count[name] = k + 1
        refs = self._refs.setdefault(lead, [])
        if k < len(refs):
            if refs[k]() is not x:
                raise ValueError(
                    f"targets {self.members[lead]} read one input tensor in the first batch, but {name!r} read a "
                    f"different tensor in a later batch (call {k}); pass share_inputs=False to capture each "
                    f"target separately"
                )
            return False
        refs.append(weakref.ref(x))
        return True

    def _discover(self, name: str, x: torch.Tensor) -> bool:
        calls = self._calls[name]
        k = len(calls)
        seen = self._seen.get(id(x))
        if seen is not None and seen[0]() is x and seen[1] != name:
            calls.append((seen[1], seen[2]))
            return False
        if seen is None or seen[0]() is not x:
            self._seen[id(x)] = (weakref.ref(x), name, k)
        calls.append((name, k))
        return True

    def end_forward(self) -> None:
        if not self.enabled:
            return
        if self.discovering:
            self._finish_discovery()
            return
        for lead, refs in self._refs.items():
            counts = {m: self._count.get(m, 0) for m in self.members[lead]}
            if any(c != len(refs) for c in counts.values()):
                raise ValueError(
                    f"targets {self.members[lead]} share one input, but were called {counts} times in one forward; "
                    f"pass share_inputs=False to capture each target separately"
                )
        self._refs.clear()
        self._count.clear()

    def _finish_discovery(self) -> None:
        def own(n: str) -> bool:
            return all(c == (n, i) for i, c in enumerate(self._calls[n]))

        for name, calls in self._calls.items():
            if own(name):
                continue
            lead = calls[0][0]
            if calls == [(lead, i) for i in range(len(calls))] and own(lead) and len(self._calls[lead]) == len(calls):
                self.leader[name] = lead
                continue
            raise ValueError(
                f"target {name!r} shares its input with other targets in some calls only ({calls}); "
                f"pass share_inputs=False to capture each target separately"
            )
        self.members = {}
        for name, lead in self.leader.items():
            self.members.setdefault(lead, []).append(name)
        self.discovering = False
        self._calls.clear()
        self._seen.clear()
