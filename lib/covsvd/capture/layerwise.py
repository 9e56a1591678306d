"""Layerwise capture: the calibration data goes through the model one transformer block at a time, so only one
block's accumulators exist at a time (``capture_moments(..., layerwise=True)``, :func:`iter_block_moments`).

Per block ``i`` and per batch ``b``:

1. *catch*: the model's own forward runs on batch ``b`` with every block's ``forward`` swapped out: the blocks
   before ``i`` return block ``i-1``'s cached output for ``b`` (only block ``i-1``'s matters: it is what the
   model hands on to block ``i``, through whatever it does between blocks), and block ``i`` records the
   positional and keyword arguments the model calls it with (hidden states, attention mask, position ids,
   rotary ``position_embeddings``, ``cache_position`` ...), then stops the forward with a private exception.
   Each block thus gets exactly the arguments the model computes for it, per-layer masks included (e.g.
   Qwen2's sliding-window layers), recomputed per batch (embeddings and masks only: no block runs) rather
   than stored.
2. *run*: block ``i`` runs (its real forward) on those arguments with hooks on its targets
   (:class:`~covsvd.capture.hooked.MomentCapture`); its output, whatever its form (a tensor, or a tuple led by the
   hidden states), replaces block ``i-1``'s in the cache, on ``offload`` (CPU by default).

The forward gets ``use_cache=False`` (no KV cache). Block inputs always come from the cached outputs of the
model as it was when each block ran, so adapters attached to earlier blocks meanwhile (:func:`covsvd.init_adapters`)
never change what later blocks see.

Targets outside the blocks: those the model calls before block 0 (e.g. an embedding projection) are captured
in block 0's catch passes; the others (BERT's pooler, an explicitly targeted head) in a final *tail* pass where
the last block returns its cached output and the forward runs to its end. The tail runs only when such targets
exist, and blocks after the last one holding targets are skipped when no tail is needed.

Assumptions, checked where a pass can see them: the forward calls each block once per forward, in list order
(a block called before the one being caught, twice, or never raises). A model calling a block again after the
last one (weight-shared layers) is seen only by a tail pass: use ``layerwise=False`` for such models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from functools import partial

import torch
from torch import nn

from ..data.targets import TargetSpec, find_targets, is_linear
from .hooked import MomentCapture, eval_mode, module_device, prepare
from .moments import SecondMoment
from .options import BlockSpec, CaptureOptions

#: Stage names of the targets outside the blocks (the model calls them before block 0 / after the last block).
BEFORE, AFTER = "<before blocks>", "<after blocks>"



class _Caught(BaseException):  # noqa: N818 - not an error: a BaseException, so a model's `except Exception` can't eat it
    """Raised by the block being caught to stop the model's forward, carrying the block's arguments."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args_, self.kwargs = args, kwargs


def find_blocks(model: nn.Module, blocks: BlockSpec = None) -> list[tuple[str, nn.Module]]:
    """``[(name, module), ...]``: the model's transformer blocks, in the order its forward calls them.

    ``blocks=None``: the ``nn.ModuleList`` of same-type modules holding the most Linear / Conv1D layers
    (``model.layers`` of Llama / Qwen2, ``h`` of GPT-2, ``encoder.layer`` of BERT); a string: the dotted path
    of the block container (its children, in order); a list: block module names in call order.
    Raises ``ValueError`` naming ``blocks=`` when nothing is found or a name is wrong.
    """
    if blocks is None:
        best: tuple[int, str, nn.Module] | None = None
        for name, m in model.named_modules():
            if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
                linears = sum(is_linear(x) for c in m for x in c.modules())
                if linears and (best is None or linears > best[0]):
                    best = (linears, name, m)
        if best is None:
            raise ValueError(
                f"layerwise capture could not find the transformer blocks of {type(model).__name__} (no "
                f"nn.ModuleList of same-type modules holding Linear layers): pass blocks= the dotted path of the "
                f"block list (e.g. blocks='model.layers') or a list of block names in call order, or use "
                f"layerwise=False")
        _, path, container = best
        return [(f"{path}.{k}" if path else str(k), c) for k, c in enumerate(container)]
    if isinstance(blocks, str):
        try:
            container = model.get_submodule(blocks)
        except AttributeError as e:
            raise ValueError(f"blocks={blocks!r} is not a submodule of {type(model).__name__}: pass the dotted "
                             f"path of the block list, e.g. 'model.layers'") from e
        found = [(f"{blocks}.{k}", c) for k, c in container.named_children()]
        if not found:
            raise ValueError(f"blocks={blocks!r} is a {type(container).__name__} without children; pass the "
                             "path of the list of blocks")
        return found
    names = list(blocks)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"blocks={names!r} must be a non-empty list of distinct block module names")
    found = []
    for n in names:
        try:
            found.append((n, model.get_submodule(n)))
        except AttributeError as e:
            raise ValueError(f"block {n!r} is not a submodule of {type(model).__name__}") from e
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        raise ValueError(f"blocks {nested[0]} nest in one another; list disjoint blocks")
    return found


def _move(obj, device: torch.device):
    """``obj`` with every tensor inside (tuples, lists, dicts / ModelOutputs) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(_move(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(v, device) for v in obj)
    if isinstance(obj, dict):
        out = obj.copy()
        for k, v in obj.items():
            out[k] = _move(v, device)
        return out
    return obj


def _to(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return mask.to(device) if mask is not None else None


def _first_tensor(obj) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    return next((t for t in map(_first_tensor, values) if t is not None), None)


class _Stage:
    """Within ``with``: the blocks' ``forward`` swapped for one catch / tail pass (see the module doc).

    Blocks before ``i`` return ``cached``; block ``i`` (``i < len(blocks)``) raises :class:`_Caught`; a later
    block raises ``ValueError`` (called out of order). The original forwards (an instance attribute such as
    accelerate's hook wrapper, or the class's) are restored on exit.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]], i: int, cached) -> None:
        self.blocks, self.i, self.cached = blocks, i, cached
        self.calls = [0] * len(blocks)
        self._saved: list[tuple[nn.Module, bool, object]] = []

    def __enter__(self) -> _Stage:
        for j, (_, block) in enumerate(self.blocks):
            self._saved.append((block, "forward" in block.__dict__, block.__dict__.get("forward")))
            block.forward = partial(self._call, j)
        return self

    def __exit__(self, *exc) -> None:
        for block, had, old in self._saved:
            if had:
                block.forward = old
            else:
                del block.forward
        self._saved.clear()

    def _call(self, j: int, *args, **kwargs):
        name = self.blocks[j][0]
        if j == self.i:
            raise _Caught(args, kwargs)
        if j > self.i:
            raise ValueError(f"block {name!r} was called before block {self.blocks[self.i][0]!r}: layerwise "
                             "capture needs the blocks listed in the order the forward calls them (blocks=[...])")
        self.calls[j] += 1
        if self.calls[j] > 1:
            raise ValueError(f"block {name!r} was called twice in one forward (weight-shared blocks?): "
                             "layerwise capture needs each block called once; use layerwise=False")
        return self.cached

    def check(self) -> None:
        """Raise unless every block before ``i`` was called exactly once."""
        missed = [self.blocks[j][0] for j in range(min(self.i, len(self.blocks))) if self.calls[j] != 1]
        if missed:
            raise ValueError(f"block(s) {missed[:3]} were not called by the model's forward: pass blocks= the "
                             "blocks the forward runs, in call order, or use layerwise=False")


def _catch(model: nn.Module, blocks, i: int, cached, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` the model's forward calls block ``i`` with (blocks before it returning ``cached``)."""
    with _Stage(blocks, i, cached) as stage:
        try:
            model(*args, **kwargs)
        except _Caught as caught:
            stage.check()
            return caught.args_, caught.kwargs
    raise ValueError(f"the model's forward never called block {blocks[i][0]!r}: pass blocks= the blocks it runs, "
                     "in call order, or use layerwise=False")


def _tail(model: nn.Module, blocks, cached, args: tuple, kwargs: dict) -> None:
    """The model's forward with every block returning ``cached`` (the last block's output): runs what follows."""
    with _Stage(blocks, len(blocks), cached) as stage:
        model(*args, **kwargs)
        stage.check()


def iter_block_moments(
    model: nn.Module,
    batches: Iterable,
    targets: TargetSpec = None,
    kind: str = "full",
    progress: bool = True,
    *,
    reuse: Callable[[str, list[str]], dict[str, SecondMoment] | None] | None = None,
    **options,
) -> Iterator[tuple[str, dict[str, SecondMoment]]]:
    """Yield ``(stage, {target name: SecondMoment})`` as each block finishes, in forward order.

    ``stage`` is a block's module name, or :data:`BEFORE` / :data:`AFTER` for targets outside the blocks
    (yielded only when there are some). Between yields no accumulator exists: a consumer that drops each
    dict holds one block's moments at most. Arguments as in :func:`covsvd.capture_moments` (``**options``: the
    fields of :class:`~covsvd.capture.options.CaptureOptions`; ``layerwise`` is implied); the moments are
    on the block's device (that of its first parameter), cached block outputs on ``offload`` (``None``: kept
    where the block put them). ``reuse(block name, its target names)``: moments to use instead of capturing
    that block (the block still runs, without hooks, to feed the next), or ``None`` to capture it.

    The model is in eval mode from the first ``next`` until the generator ends or is closed (then its
    train/eval flags come back); the forwards run under ``torch.no_grad()``, the consumer's code between
    yields does not. Raises as :func:`covsvd.capture_moments`, and ``ValueError`` when the blocks are not
    found or not called once each in order (naming ``blocks=``).
    """
    opts = CaptureOptions.make(options, kind=kind)  # every option checked before anything runs
    names = find_targets(model, targets)
    found = find_blocks(model, opts.blocks)
    inside = {b: [n for n in names if n.startswith(b + ".")] for b, _ in found}
    in_blocks = {n for group_ in inside.values() for n in group_}
    outside = [n for n in names if n not in in_blocks]
    prepared = _prepared(model, batches, opts.token_mask)
    outputs = _Outputs(len(prepared), opts.offload, module_device(model))
    last = max((k for k, (b, _) in enumerate(found) if inside[b]), default=-1)
    options = dict(kind=opts.kind, accumulate=opts.accumulate, share_inputs=opts.share_inputs,
                   token_mask=opts.token_mask)

    def finish(cap: MomentCapture, names_: list[str] | None = None) -> dict[str, SecondMoment]:
        return cap.moments(all_reduce=opts.all_reduce, group=opts.group, names=names_)

    from tqdm.auto import tqdm

    after: list[str] = []
    with eval_mode(model):
        bar = tqdm(total=len(found), desc="layerwise capture", unit="block", disable=not progress)
        try:
            for i, (bname, block) in enumerate(found):
                if i > last and i > 0 and not after:
                    break  # nothing left to capture downstream
                reused = reuse(bname, inside[bname]) if reuse is not None and inside[bname] else None
                before: dict[str, SecondMoment] = {}
                with ExitStack() as stack:
                    cap = (stack.enter_context(MomentCapture(model, inside[bname], device=module_device(block),
                                                             **options)) if inside[bname] and reused is None else None)
                    pre = stack.enter_context(MomentCapture(model, outside, **options)) if i == 0 and outside else None
                    _run_block(model, found, i, prepared, outputs, cap, pre)
                    if pre is not None:
                        seen = pre.seen()
                        after = [n for n in outside if n not in seen]
                        before = finish(pre, seen) if seen else {}
                    done = finish(cap) if cap is not None else reused
                    del cap, pre  # their row buffers too: nothing of this block's capture outlives it
                if before:
                    yield BEFORE, before
                del before
                if done:
                    yield bname, done
                del done
                bar.update(1)
                bar.set_postfix(block=bname, refresh=False)
            if after:
                with MomentCapture(model, after, **options) as post:
                    for b, (args, kwargs, mask) in enumerate(prepared):
                        post.run(partial(_tail, model, found, outputs.get(b), args, kwargs), mask)
                    tail = finish(post)
                yield AFTER, tail
        finally:
            bar.close()


def _prepared(model: nn.Module, batches: Iterable, token_mask) -> list[tuple[tuple, dict, torch.Tensor | None]]:
    """``(args, kwargs, mask)`` of every batch (:func:`covsvd.capture.hooked.prepare`); raises ``ValueError`` for
    no batches, or a token mask selecting no token in any of them."""
    data = list(batches)
    if not data:
        raise ValueError("no batches: `batches` is empty; pass calibration batches (covsvd.calibration_batches)")
    device = module_device(model)
    prepared = [prepare(b, device, model.forward, token_mask) for b in data]
    if token_mask is not None and not any(bool(mask.any()) for _, _, mask in prepared):
        raise ValueError(f"token_mask={token_mask!r} selects no token in any of the {len(data)} batches "
                         "(padding never counts); check the mask (labels all -100?)")
    return prepared


class _Outputs:
    """Each batch's last block output, waiting on ``offload`` (``None``: where the block put it) between blocks
    and moved back to its own device when read."""

    def __init__(self, n: int, offload, device: torch.device) -> None:
        self.offload = torch.device(offload) if offload is not None else None
        self.device = device
        self.cache: list = [None] * n  # per batch: (output, the device it came from)

    def get(self, b: int):
        out, home = self.cache[b]
        return _move(out, home) if self.offload is not None else out

    def put(self, b: int, out) -> None:
        first = _first_tensor(out)
        home = first.device if first is not None else self.device
        self.cache[b] = (_move(out, self.offload) if self.offload is not None else out, home)


def _run_block(model: nn.Module, found, i: int, prepared: list, outputs: _Outputs, cap: MomentCapture | None,
               pre: MomentCapture | None) -> None:
    """Run block ``i`` on every batch: its arguments caught from the model's forward (the blocks before it
    returning their cached outputs; ``pre`` hooked on the targets before the blocks), then the block itself
    (``cap`` hooked on its targets); its outputs replace the cached ones."""
    block = found[i][1]
    where = module_device(block)
    for b, (args, kwargs, mask) in enumerate(prepared):
        prev = outputs.get(b) if i > 0 else None
        catch = partial(_catch, model, found, i, prev, args, kwargs)
        with torch.no_grad():
            bargs, bkwargs = pre.run(catch, mask) if pre is not None else catch()
        del prev
        call = partial(block, *bargs, **bkwargs)
        with torch.no_grad():
            outputs.put(b, cap.run(call, _to(mask, where)) if cap is not None else call())
        del bargs, bkwargs, call


def capture_layerwise(model: nn.Module, batches: Iterable, targets: TargetSpec, options: CaptureOptions,
                      progress: bool = True) -> dict[str, SecondMoment]:
    """:func:`covsvd.capture_moments` with ``layerwise=True``: every stage of :func:`iter_block_moments`
    collected, in ``named_modules`` order, each block's moments moved to ``options.offload`` as it finishes
    (``None``: left on the block's device). Shared inputs stay one object under each name."""
    out: dict[str, SecondMoment] = {}
    offload = options.offload
    for _, moments in iter_block_moments(model, batches, targets, options.kind, progress, **options.kwargs("kind")):
        moved: dict[int, SecondMoment] = {}
        for name, m in moments.items():
            out[name] = moved.setdefault(id(m), m.to(offload) if offload is not None else m)
    return {n: out[n] for n in find_targets(model, targets)}
