"""Which rows of a module's input are real tokens (:class:`TokenRows`), and the reusable buffer the real rows are
copied into (:class:`RowBuffers`): per call one copy, padding dropped and cast to the Gram product's dtype in
the same pass, so no ``(N, d_in)`` tensor is allocated per hook; and which tokens count (:func:`token_mask`:
padding never does; ``token_mask=`` may drop more, e.g. prompt tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..data.textfiles import IGNORE_INDEX

#: ``token_mask=`` of capture: ``None`` (padding only), ``"labels"``, a batch key, or ``f(batch) -> (B, T)``.
TokenMaskSpec = None | str | Callable[[object], torch.Tensor]


def mask_key(spec: TokenMaskSpec) -> str | None:
    """The batch key ``spec`` reads (``"labels"`` or another key), which capture keeps out of the forward."""
    if spec is None or callable(spec):
        return None
    if isinstance(spec, str):
        return spec
    raise TypeError(f"token_mask={spec!r}: expected None, 'labels', a batch key (str) or a callable(batch) -> "
                    "(B, T) bool tensor")


def token_mask(batch, spec: TokenMaskSpec, attention_mask: torch.Tensor | None, device: torch.device
               ) -> torch.Tensor | None:
    """The ``(B, T)`` mask of the tokens that count in ``batch``: real (``attention_mask`` 1, when given) and
    selected by ``spec``; ``None`` when ``spec`` is ``None`` (then ``attention_mask`` alone decides).

    ``spec``: ``"labels"`` selects ``batch["labels"] != -100`` (the transformers ignore index); another string
    reads ``batch[spec]``, a bool or 0/1 integer tensor; a callable gets the batch as given and returns a
    ``(B, T)`` bool or 0/1 tensor. Raises ``ValueError`` for a missing key, a non-mapping batch with a key,
    a wrong shape or values other than 0/1, naming the fix.
    """
    if spec is None:
        return None
    key = mask_key(spec)
    if key is not None:
        if not isinstance(batch, Mapping):
            raise ValueError(f"token_mask={key!r} reads a batch key, but the batch is a {type(batch).__name__}; "
                             "pass dict batches, or token_mask=callable(batch) -> (B, T) bool")
        if key not in batch:
            raise ValueError(f"token_mask={key!r}: the batch has no {key!r} entry (keys {sorted(batch)}); "
                             "add it to every batch or pick another key")
        raw = batch[key]
        if not isinstance(raw, torch.Tensor):
            raw = torch.as_tensor(raw)
        selected = raw != IGNORE_INDEX if key == "labels" else raw
    else:
        selected = spec(batch)
        if not isinstance(selected, torch.Tensor):
            raise ValueError(f"token_mask callable returned a {type(selected).__name__}; expected a (B, T) tensor")
    what = f"token_mask={spec!r}" if key is not None else "the token_mask callable's mask"
    if selected.dim() != 2:
        raise ValueError(f"{what} has shape {tuple(selected.shape)}; expected (batch, tokens)")
    if selected.dtype != torch.bool:
        if selected.is_floating_point() or not ((selected == 0) | (selected == 1)).all():
            raise ValueError(f"{what} must be bool or hold only 0/1 (got {selected.dtype})")
        selected = selected.bool()
    selected = selected.to(device)
    if attention_mask is None:
        return selected
    if tuple(attention_mask.shape) != tuple(selected.shape):
        raise ValueError(f"{what} has shape {tuple(selected.shape)}, the attention_mask "
                         f"{tuple(attention_mask.shape)}; they must match (B, T)")
    return selected & attention_mask.to(device).bool()  # padding never counts


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
