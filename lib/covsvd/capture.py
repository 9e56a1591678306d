"""Hook-based capture of ``C = E[x x^T]`` for the inputs of a model's Linear / Conv1D layers.

The thin layer that touches modules: forward pre-hooks (:class:`InputHooks`) hand each call's input to
a :class:`~covsvd.moments.MomentAccumulator` after dropping padding (:class:`TokenRows`). The algebra
(the streaming sums and their precision) lives in :mod:`covsvd.moments`.

Per call, one copy of the input: its real rows, padding dropped and cast to the Gram product's dtype in
the same pass, written into one reusable buffer (:class:`RowBuffers`) that the accumulator may then
overwrite (``|x|`` in place), so no ``(N, d_in)`` tensor is allocated per hook. Measured on the default
model, bench/results/capture.md has what these copies, the O(d_in) sums and the hooks cost beside the forward.

Shared inputs (:class:`~covsvd.hooks.SharedInputs`): targets that read the same input tensor share one
accumulator, so the product is computed once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .gram import ACCUMULATE, gram_dtype
from .hooks import InputHooks, SharedInputs
from .models import model_identity
from .moments import KINDS, MomentAccumulator, SecondMoment
from .rows import RowBuffers, TokenRows
from .targets import TargetSpec, find_targets, in_out_features


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to(value, device: torch.device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


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
        try:
            bound = inspect.signature(forward).bind_partial(*args).arguments
        except (TypeError, ValueError):
            bound = {}
        return args, {}, bound.get("attention_mask")
    if isinstance(batch, torch.Tensor):
        return (batch.to(device, non_blocking=True),), {}, None
    raise TypeError(
        f"a batch must be a dict of model inputs, a tuple/list of positional inputs, or a tensor of input_ids; "
        f"got {type(batch).__name__}"
    )


def _length(batches) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


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
    :func:`capture_moments`.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: TargetSpec = None,
        kind: str = "full",
        *,
        accumulate: str = "float64",
        share_inputs: bool = True,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
        if accumulate not in ACCUMULATE:
            raise ValueError(f"accumulate={accumulate!r}; expected one of {ACCUMULATE}")
        self.model, self.kind, self.accumulate = model, kind, accumulate
        self.dtype = gram_dtype(accumulate)  # of the Gram products (and the row copies)
        self.device = _model_device(model)
        if accumulate == "float32" and self.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            raise ValueError(
                "accumulate='float32' with TF32 matmuls enabled would compute the products in TF32; "
                "set torch.backends.cuda.matmul.allow_tf32 = False or use accumulate='float64'"
            )
        self.names = find_targets(model, targets)
        modules = dict(model.named_modules())
        self.d_in = {n: in_out_features(modules[n])[1] for n in self.names}
        self.widest = max(self.d_in.values())  # the row buffer holds B*T rows of the widest input
        self.sharing = SharedInputs(self.names, enabled=share_inputs)
        self.accs: dict[str, MomentAccumulator] = {}  # leader name -> accumulator, made on its first input
        self.rows = TokenRows(None)
        self.scratch = RowBuffers()  # the copies of each call's real rows (see RowBuffers)
        self.batches = 0
        self.tokens = 0  # real tokens (mask == 1) fed so far; unknown without a mask
        self._hooks: InputHooks | None = None
        self._training: dict[nn.Module, bool] = {}
        self._done = False

    def __enter__(self) -> MomentCapture:
        self._training = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            self._hooks = InputHooks(self.model, self.names, self._on_input)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for m, flag in self._training.items():
            m.training = flag

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
        if self._hooks is None:
            raise RuntimeError("MomentCapture.add must be called inside its `with` block")
        args, kwargs, mask = as_call(batch, self.device, self.model.forward)
        self.rows = TokenRows(mask)
        if mask is not None:  # the row copies need at most B*T rows of the widest input: allocate them now
            self.scratch.reserve(mask.numel() * self.widest, self.dtype, self.device)
        with torch.no_grad():
            self.model(*args, **kwargs)
        self.sharing.end_forward()
        _check_finite(self.accs, self.sharing, self.batches)
        self.batches += 1
        self.tokens += self.rows.n_real if self.rows.n_real is not None else 0

    def moments(self, all_reduce: bool = False, group=None) -> dict[str, SecondMoment]:
        """``{target name: SecondMoment}`` (shared inputs: one object under each name); finishes the capture.

        Raises ``ValueError`` when no batch was added or a target saw zero real tokens (after the
        ``all_reduce`` across processes, when asked).
        """
        if self._done:
            raise RuntimeError("MomentCapture.moments() was already called; start a new capture")
        if self.batches == 0:
            raise ValueError("no batches: `batches` is empty; pass calibration batches (covsvd.calibration_batches)")
        self._done = True
        identity = model_identity(self.model)
        distinct: dict[str, SecondMoment] = {}
        for lead in dict.fromkeys(self.sharing.leader.values()):
            acc = self.accs.pop(lead, None) or MomentAccumulator(
                self.d_in[lead], kind=self.kind, accumulate=self.accumulate, device=self.device
            )
            distinct[lead] = acc.moment(model=identity)
        if all_reduce:
            from .distributed import all_reduce_moments

            all_reduce_moments(distinct, group=group)
        members = self.sharing.members
        empty = [m for lead, mom in distinct.items() if mom.count == 0 for m in members[lead]]
        if empty:
            raise ValueError(
                f"{len(empty)} target(s) saw zero real tokens, e.g. {empty[:3]}: every token was padding "
                f"(attention_mask all 0) or the module was never called; add text or exclude them with targets=..."
            )
        return {n: distinct[self.sharing.leader[n]] for n in self.names}


def capture_moments(
    model: nn.Module,
    batches: Iterable,
    targets: TargetSpec = None,
    kind: str = "full",
    progress: bool = True,
    *,
    accumulate: str = "float64",
    share_inputs: bool = True,
    all_reduce: bool = False,
    group=None,
) -> dict[str, SecondMoment]:
    """``{module name: SecondMoment}`` of the inputs of the target modules over ``batches``.

    Args:
        model: any ``nn.Module`` (a transformers model); run in eval mode under ``torch.no_grad()``, its
            train/eval flags and the grad mode are restored afterwards, and the hooks always removed.
        batches: an iterable (list, generator, ``DataLoader``) of dicts of model inputs (passed as
            ``**kwargs``), tuples/lists (passed positionally) or tensors of ``input_ids`` (every token real);
            moved to the model's device (that of its first parameter). Tokens where the batch's
            ``attention_mask`` is 0 never count.
        targets: see :func:`covsvd.find_targets` (``None``: every Linear and Conv1D).
        kind: ``"full"`` (``(d_in, d_in)`` sums) or ``"diag"`` (``(d_in,)``).
        progress: a tqdm bar over batches.
        accumulate: precision of each batch's Gram product, added into fp64 sums: ``"float64"`` (default:
            equals fp64 brute force to ~1e-15) or ``"float32"`` (fp32 GEMM, ~1e-7 relative; faster on CPU
            but it loses the small eigenvalues, see bench/results/capture.md). On CUDA with TF32 matmuls
            enabled, ``"float32"`` raises (the product would be TF32).
        share_inputs: targets reading the same input tensor share one accumulator (one product).
        all_reduce: sum the moments over the processes of ``group`` with ``torch.distributed`` before
            returning (each process passes its own shard of the data).

    Returns:
        One entry per target name, in ``named_modules`` order; targets sharing an input map to the *same*
        ``SecondMoment`` object. ``count`` is the number of real rows seen.

    Raises:
        ValueError: empty data, zero real tokens for a target, a mask that fits no input, NaN/inf
            inputs (naming the module and batch), a bad ``targets``/``kind``/``accumulate``.
    """
    from tqdm.auto import tqdm

    capture = MomentCapture(model, targets, kind, accumulate=accumulate, share_inputs=share_inputs)
    with capture:
        bar = tqdm(batches, total=_length(batches), desc="capture", unit="batch", disable=not progress)
        for batch in bar:
            capture.add(batch)
            if progress:
                bar.set_postfix(tokens=capture.tokens, refresh=False)
    return capture.moments(all_reduce=all_reduce, group=group)


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
