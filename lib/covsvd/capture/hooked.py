"""Hook-based capture of ``C = E[x x^T]`` for the inputs of a model's Linear / Conv1D layers.

The thin layer that touches modules: forward pre-hooks (:class:`InputHooks`) hand each call's input to
a :class:`~covsvd.capture.moments.MomentAccumulator` after dropping padding (:class:`TokenRows`). The algebra
(the streaming sums and their precision) lives in :mod:`covsvd.capture.moments`.

Per call, one copy of the input: its real rows, padding dropped and cast to the Gram product's dtype in
the same pass, written into one reusable buffer (:class:`RowBuffers`) that the accumulator may then
overwrite (``|x|`` in place), so no ``(N, d_in)`` tensor is allocated per hook. Measured on the default
model, bench/results/capture.md has what these copies, the O(d_in) sums and the hooks cost beside the forward.

Shared inputs (:class:`~covsvd.capture.hooks.SharedInputs`): targets that read the same input tensor share one
accumulator, so the product is computed once.

Which tokens count: padding (``attention_mask == 0``) never does; ``token_mask=`` may drop more (e.g. the
prompt: ``"labels"`` keeps ``labels != -100``), see :func:`covsvd.capture.rows.token_mask`. A batch key read as the
mask is kept out of the model's forward (a transformers model given ``labels`` would compute a loss, unused).
Capture never builds a KV cache: ``use_cache=False`` is passed to a forward that takes it.

Devices and dtypes: the accumulators live on the model's device (``layerwise=True``: each block's). Rows of a
bf16 / fp16 / fp32 model are cast to the Gram product's dtype (fp64, or fp32 for ``accumulate="float32"``)
before the product, never multiplied in half precision; the sums are fp64. On CUDA, ``accumulate="float32"``
with TF32 matmuls enabled raises (:func:`covsvd.util.checks.check_no_tf32`) rather than silently computing TF32
products.

``layerwise=True`` (:mod:`covsvd.capture.layerwise`): the data goes through the model one transformer block at a time,
so only one block's accumulators exist at a time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..data.fingerprint import model_identity
from ..data.targets import TargetSpec, find_targets, in_out_features
from ..util.checks import check_no_tf32
from .gram import gram_dtype
from .hooks import InputHooks, SharedInputs
from .moments import MomentAccumulator, SecondMoment
from .options import CaptureOptions
from .rows import RowBuffers, TokenMaskSpec, TokenRows, mask_key, token_mask


def batch_count(batches) -> int | None:
    """``len(batches)`` when it has one (a list, a DataLoader), else ``None`` (a generator): progress bars."""
    try:
        return len(batches)
    except TypeError:
        return None


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (else buffer; CPU for a module with neither)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def _to(value, device: torch.device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def bound_arguments(forward: Callable, args: tuple) -> dict:
    """``forward``'s parameters bound to positional ``args`` (``{}`` when they cannot be bound)."""
    try:
        return inspect.signature(forward).bind_partial(*args).arguments
    except (TypeError, ValueError):
        return {}


def as_call(batch, device: torch.device, forward: Callable) -> tuple[tuple, dict, torch.Tensor | None]:
    """``(args, kwargs, attention_mask)`` for one batch, tensors moved to ``device``.

    A mapping is passed as keyword arguments; a tuple/list positionally (its ``attention_mask`` found by
    binding it to ``forward``'s signature); a bare tensor is ``input_ids`` with every token real.
    """
    if isinstance(batch, Mapping):
        kwargs = {k: _to(v, device) for k, v in batch.items()}
        return (), kwargs, kwargs.get("attention_mask")
    if isinstance(batch, (tuple, list)):
        args = tuple(_to(v, device) for v in batch)
        return args, {}, bound_arguments(forward, args).get("attention_mask")
    if isinstance(batch, torch.Tensor):
        return (batch.to(device, non_blocking=True),), {}, None
    raise TypeError(
        f"a batch must be a dict of model inputs, a tuple/list of positional inputs, or a tensor of input_ids; "
        f"got {type(batch).__name__}"
    )


def prepare(batch, device: torch.device, forward: Callable, mask_spec: TokenMaskSpec = None
            ) -> tuple[tuple, dict, torch.Tensor | None]:
    """``(args, kwargs, mask)``: :func:`as_call`, then the mask of the tokens that count (padding and, with
    ``mask_spec``, the unselected tokens out; :func:`covsvd.capture.rows.token_mask`), the batch key read as the mask
    removed from the forward's inputs, and ``use_cache=False`` when ``forward`` takes ``use_cache``."""
    args, kwargs, attention = as_call(batch, device, forward)
    key = mask_key(mask_spec)
    if key is not None and isinstance(batch, Mapping):
        kwargs.pop(key, None)
    mask = token_mask(batch, mask_spec, attention, device) if mask_spec is not None else attention
    try:
        takes_cache = "use_cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_cache = False
    if takes_cache and "use_cache" not in bound_arguments(forward, args):
        kwargs["use_cache"] = False  # no KV cache: it would only hold memory
    return args, kwargs, mask


@contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` within the block; every module's own train/eval flag restored on exit (also on error)."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


class MomentCapture:
    """Streaming capture, one batch at a time: a context manager around hooks on the target modules.

    ``capture_moments`` is a loop over this; use it directly to feed batches from your own loop::

        with MomentCapture(model, kind="full") as cap:
            for batch in batches:
                cap.add(batch)
        moments = cap.moments()

    On enter: the model is put in eval mode and forward pre-hooks are installed; on exit (also when an
    error was raised) the hooks are removed and every module's train/eval flag restored. Each ``add``
    runs the forward under ``torch.no_grad()`` (the caller's grad mode is untouched). Arguments as in
    :func:`capture_moments`; ``device``: where the accumulators live (default: the model's device).
    :meth:`run` feeds any call instead of the model's forward (one transformer block: :mod:`covsvd.capture.layerwise`).
    """

    def __init__(self, model: nn.Module, targets: TargetSpec = None, kind: str = "full", *,
                 device: torch.device | str | None = None, **options) -> None:
        opts = CaptureOptions.make(kind=kind, **options)  # every option checked before anything runs
        self.options = opts
        self.model, self.kind, self.accumulate, self.token_mask = model, opts.kind, opts.accumulate, opts.token_mask
        accumulate, share_inputs = opts.accumulate, opts.share_inputs
        self.dtype = gram_dtype(accumulate)  # of the Gram products (and the row copies)
        self.device = torch.device(device) if device is not None else module_device(model)
        check_no_tf32(self.device, (self.dtype,), "capture with accumulate='float32'", "use accumulate='float64'")
        self.names = find_targets(model, targets)
        modules = dict(model.named_modules())
        self.d_in = {n: in_out_features(modules[n])[1] for n in self.names}
        self.widest = max(self.d_in.values())  # the row buffer holds B*T rows of the widest input
        self.sharing = SharedInputs(self.names, enabled=share_inputs)
        self.accs: dict[str, MomentAccumulator] = {}  # leader name -> accumulator, made on its first input
        self.rows = TokenRows(None)
        self.scratch = RowBuffers()  # the copies of each call's real rows (see RowBuffers)
        self.batches = 0
        self.tokens = 0  # counted tokens (real and selected) fed so far; unknown without any mask
        self._hooks: InputHooks | None = None
        self._stack = ExitStack()
        self._done = False

    def __enter__(self) -> MomentCapture:
        with ExitStack() as stack:  # on an error here, whatever was entered is undone
            stack.enter_context(eval_mode(self.model))
            self._hooks = stack.enter_context(InputHooks(self.model, self.names, self._on_input))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks = None
        self._stack.close()  # hooks removed, then every module's train/eval flag restored

    def _on_input(self, name: str, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d_in[name]:
            raise ValueError(f"module {name!r}: input of shape {tuple(x.shape)}; expected last dim {self.d_in[name]}")
        if not self.sharing.on_input(name, x):
            return
        lead = self.sharing.leader[name]
        acc = self.accs.get(lead)
        if acc is None:
            acc = self.accs[lead] = MomentAccumulator(
                self.d_in[lead], kind=self.kind, accumulate=self.accumulate, device=self.device
            )
        rows = self.rows.select(x, name, acc.dtype, self.scratch)  # (N, d_in) real rows, in the GEMM dtype
        # a copy (padding dropped or dtype cast) is the accumulator's to overwrite: it saves a buffer
        acc.add(rows, consume=rows.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())

    def add(self, batch) -> None:
        """Run the model on one batch (dict, tuple/list or tensor; see :func:`capture_moments`) and add its inputs."""
        args, kwargs, mask = prepare(batch, module_device(self.model), self.model.forward, self.token_mask)
        self.run(lambda: self.model(*args, **kwargs), mask)

    def run(self, call: Callable[[], object], mask: torch.Tensor | None):
        """Call ``call()`` under ``torch.no_grad()`` with the hooks on, as one forward of one batch: the targets'
        inputs are added, keeping the tokens where ``mask`` ``(B, T)`` is 1 (``None``: every row). Returns
        what ``call`` returns."""
        if self._hooks is None:
            raise RuntimeError("MomentCapture.add / run must be called inside its `with` block")
        self.rows = TokenRows(mask)
        if mask is not None:  # the row copies need at most B*T rows of the widest input: allocate them now
            self.scratch.reserve(mask.numel() * self.widest, self.dtype, self.device)
        with torch.no_grad():
            out = call()
        self.sharing.end_forward()
        _check_finite(self.accs, self.sharing, self.batches)
        self.batches += 1
        self.tokens += self.rows.n_real if self.rows.n_real is not None else 0
        return out

    def seen(self) -> list[str]:
        """The targets whose input was added at least once so far (a target never called has no accumulator)."""
        return [n for n in self.names if self.sharing.leader[n] in self.accs]

    def moments(self, all_reduce: bool = False, group=None, names: list[str] | None = None
                ) -> dict[str, SecondMoment]:
        """``{target name: SecondMoment}`` (shared inputs: one object under each name); finishes the capture.

        ``names``: only these targets (default: all); the others are dropped unreduced.
        Raises ``ValueError`` when no batch was added or a target saw zero counted tokens (after the
        ``all_reduce`` across processes, when asked).
        """
        if self._done:
            raise RuntimeError("MomentCapture.moments() was already called; start a new capture")
        if self.batches == 0:
            raise ValueError("no batches: `batches` is empty; pass calibration batches (covsvd.calibration_batches)")
        self._done = True
        wanted = set(self.names if names is None else names)
        keep = [n for n in self.names if n in wanted]
        identity = model_identity(self.model)
        distinct: dict[str, SecondMoment] = {}
        for lead in dict.fromkeys(self.sharing.leader[n] for n in keep):
            acc = self.accs.pop(lead, None) or MomentAccumulator(
                self.d_in[lead], kind=self.kind, accumulate=self.accumulate, device=self.device
            )
            distinct[lead] = acc.moment(model=identity)
        if all_reduce:
            from .distributed import all_reduce_moments

            all_reduce_moments(distinct, group=group)
        self.accs.clear()
        members = self.sharing.members
        empty = [m for lead, mom in distinct.items() if mom.count == 0 for m in members[lead]]
        if empty:
            cause = ("every token was padding (attention_mask all 0)" if self.token_mask is None else
                     f"token_mask={self.token_mask!r} selected no token (or every token was padding)")
            raise ValueError(
                f"{len(empty)} target(s) saw zero real tokens, e.g. {empty[:3]}: {cause} or the module was never "
                f"called; add text, fix the mask, or exclude them with targets=..."
            )
        return {n: distinct[self.sharing.leader[n]] for n in keep}


def _check_finite(accs: dict[str, MomentAccumulator], sharing: SharedInputs, batch: int) -> None:
    """Raise naming the modules whose input held NaN/inf (one host sync per batch)."""
    if not accs:
        return
    items = list(accs.items())
    ok = torch.stack([a.finite() for _, a in items])
    if bool(ok.all()):
        return
    bad = [m for (lead, _), good in zip(items, ok.tolist(), strict=True) if not good for m in sharing.members[lead]]
    raise ValueError(
        f"NaN/inf in the input of module(s) {bad} (batch {batch}): check the model's dtype "
        f"(fp16 overflow?) and the batch's inputs"
    )
