"""Hook-based capture of ``C = E[x x^T]`` for the inputs of a model's Linear / Conv1D layers.

The thin layer that touches modules: forward pre-hooks (:class:`InputHooks`) hand each call's input to
a :class:`~covsvd.moments.MomentAccumulator` after dropping padding (:class:`TokenRows`). The algebra
(the streaming sums and their precision) lives in :mod:`covsvd.moments`.

Per call, one copy of the input: its real rows, padding dropped and cast to the Gram product's dtype in
the same pass, written into one reusable buffer (:class:`RowBuffers`) that the accumulator may then
overwrite (``|x|`` in place), so no ``(N, d_in)`` tensor is allocated per hook. Measured on the default
model (bench/results/capture.md): these copies, the O(d_in) sums and the hooks cost ~11% of forward + Gram
GEMMs (3.4 s over 11.5 + 18.2 s).

Shared inputs: targets that read the *same tensor object* in one forward (q/k/v; gate/up) share one
accumulator, so the product is computed once. Sharing is discovered in the first forward (by object
identity, through weak references, so a freed tensor's recycled ``id`` never matches) and then checked
in every later forward; a model whose sharing changes between batches raises (pass
``share_inputs=False`` to give every target its own accumulator).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

import torch
from torch import nn

from .models import model_identity
from .moments import ACCUMULATE, KINDS, MomentAccumulator, SecondMoment, gram_dtype
from .targets import TargetSpec, find_targets, in_out_features


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


class TokenRows:
    """Which rows of a module's input are real tokens, for the current batch.

    Built once per batch from its ``attention_mask`` ``(B, T)`` (``None``: every token is real). An input
    ``(B, T, d_in)`` or ``(B*T, d_in)`` keeps the rows where the mask is 1 (right or left padding alike);
    an input ``(B, d_in)`` (one row per sequence, e.g. BERT's pooler on the CLS vector) counts its rows
    as they are; any other shape raises, naming the module and both shapes.
    """

    def __init__(self, mask: torch.Tensor | None) -> None:
        self.shape: tuple[int, int] | None = None
        self.padded = False  # some token of the batch is padding
        self.runs: list[tuple[int, int]] | None = None  # [start, stop) spans of the B*T positions, when contiguous
        self.index: torch.Tensor | None = None  # (n_real,) flat indices into B*T, only when runs is None
        self.n_real: int | None = None
        if mask is None:
            return
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must be a (batch, tokens) tensor of 0/1; got {shape}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        self.shape = (mask.shape[0], mask.shape[1])
        flat = mask.reshape(-1).bool()  # (B*T,)
        self.n_real = int(flat.sum())
        self.padded = self.n_real < flat.numel()
        if self.padded:
            self.runs = contiguous_runs(mask.bool())
            if self.runs is None:
                self.index = flat.nonzero().squeeze(1)

    def select(
        self, x: torch.Tensor, name: str, dtype: torch.dtype | None = None, scratch: RowBuffers | None = None
    ) -> torch.Tensor:
        """The real rows of ``x`` ``(..., d_in)`` as ``(N, d_in)``, in ``dtype`` (default: ``x``'s).

        A view of ``x`` when no row is dropped and the dtype is ``x``'s; otherwise a copy, written in one pass
        (padding dropped and dtype cast together) when every sequence's real tokens are contiguous (right or
        left padding), else by an index gather and a cast. The copy goes into ``scratch`` when given (then it
        is valid until the next ``select`` into the same ``scratch`` and dtype).
        """
        d = x.shape[-1]
        dtype = dtype or x.dtype
        if self.shape is None:
            return _cast(x.reshape(-1, d), dtype, scratch)
        B, T = self.shape
        lead = tuple(x.shape[:-1])
        if lead in ((B, T), (B * T,)):
            if not self.padded:
                return _cast(x.reshape(B * T, d), dtype, scratch)  # (B*T, d_in)
            if self.runs is None:  # a hole inside some sequence: gather (a new tensor), then cast
                return _cast(x.reshape(B * T, d).index_select(0, self.index), dtype, scratch)
            out = _empty(self.n_real, d, dtype, x.device, scratch)  # (N, d_in)
            flat, at = x.reshape(B * T, d), 0
            for start, stop in self.runs:  # copy_ casts as it copies (torch.cat(out=) would cast via temporaries)
                out[at : at + stop - start].copy_(flat[start:stop])
                at += stop - start
            return out
        if lead == (B,):
            return _cast(x, dtype, scratch)  # (B, d_in): one row per sequence, every row counts
        raise ValueError(
            f"module {name!r}: input of shape {tuple(x.shape)} fits no attention_mask of shape {(B, T)}: "
            f"expected (B, T, d_in), (B*T, d_in) or (B, d_in); exclude the module with targets=..."
        )


class RowBuffers:
    """Reusable memory for the ``(N, d_in)`` row copies capture makes, one flat buffer per (dtype, device).

    Capture copies each module's real rows (fp64 cast, padding dropped) into this buffer instead of a fresh
    tensor per call (calls are sequential, so one buffer serves every width): no large allocation per hook.
    :meth:`reserve` sizes it before a forward runs, so it is not allocated amid the forward's activations
    (which fragments glibc's heap). Memory: the largest ``N * d_in`` seen, whatever the number of tokens.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def reserve(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        """Grow the (dtype, device) buffer to at least ``numel`` elements."""
        key = (dtype, torch.device(device))
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            self.buffers.pop(key, None)  # free the old one first
            self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)

    def rows(self, n: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An ``(n, d)`` view of the buffer (valid until the next ``rows`` call), grown when needed."""
        self.reserve(n * d, dtype, device)
        return self.buffers[(dtype, torch.device(device))][: n * d].view(n, d)


def _empty(n: int, d: int, dtype: torch.dtype, device: torch.device, scratch: RowBuffers | None) -> torch.Tensor:
    if scratch is None:
        return torch.empty(n, d, dtype=dtype, device=device)
    return scratch.rows(n, d, dtype, device)


def _cast(x: torch.Tensor, dtype: torch.dtype, scratch: RowBuffers | None) -> torch.Tensor:
    """``x`` ``(N, d)`` in ``dtype``: ``x`` itself when it already is, else a copy (into ``scratch`` when given)."""
    if x.dtype == dtype:
        return x
    return _empty(x.shape[0], x.shape[1], dtype, x.device, scratch).copy_(x)


def contiguous_runs(mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """``[(start, stop), ...]``: the real tokens of a bool ``mask`` ``(B, T)`` as spans ``[start, stop)`` of its
    flattened ``B*T`` positions, one per sequence, and neighbours that touch merged into one (a full-length
    sequence touches the next one's first token): fewer, longer copies. Sequences without real tokens are
    left out. ``None`` if some sequence has a hole (its real tokens are not one contiguous run)."""
    B, T = mask.shape
    lengths = mask.sum(1)  # (B,)
    start = mask.to(torch.uint8).argmax(1)  # (B,) first real token (0 for an all-padding row)
    pos = torch.arange(T, device=mask.device)  # (T,)
    inside = (pos >= start[:, None]) & (pos < (start + lengths)[:, None])  # (B, T)
    if not torch.equal(inside, mask):
        return None
    spans: list[tuple[int, int]] = []
    for b, (s, n) in enumerate(zip(start.tolist(), lengths.tolist(), strict=True)):
        if n == 0:
            continue
        lo, hi = b * T + s, b * T + s + n
        if spans and spans[-1][1] == lo:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans


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
