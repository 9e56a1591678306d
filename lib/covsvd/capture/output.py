"""Output second moments ``G = E[g g^T]`` of the target modules: :func:`capture_output_moments`.

For a target ``y = W x`` and a scalar ``L`` of the batch, ``g = dL/dy`` at each real token; ``G`` is the fp64 sum
of ``g g^T`` over those tokens (docs/algebra.md, "The output side: a two-sided metric"). Two choices of ``L``:

* ``"fisher"``: the model's token loss on the batch's ``labels``, *summed* (not averaged) over the label tokens
  that count, computed here from the model's logits (the model is called without ``labels``, so it computes no
  loss of its own): ``L = sum cross_entropy(logits[t], labels[t'])`` with ``t' = t + 1`` for a causal LM
  (transformers' ``*ForCausalLM`` / ``*LMHeadModel`` classes: the labels are shifted, as their own loss does) and
  ``t' = t`` for a masked LM (``*ForMaskedLM``). A term counts when ``labels[t'] != -100`` and both ``t`` and
  ``t'`` are real tokens (``attention_mask`` 1), so padding never enters the loss, on either side. Half-precision
  logits are upcast to fp32 for the log-softmax. Summed, ``G`` is the empirical Fisher of the summed loss:
  ``G / count`` is ``E[g g^T]`` per token.
* ``"probe"``: ``L = <V, H>`` with ``H`` the final hidden states: the input of the output embeddings (the LM head,
  ``model.get_output_embeddings()``, read by a forward pre-hook) when the model has them, else the output's
  ``last_hidden_state`` (encoders, base models), else the output itself when it is a tensor; and
  ``V ~ N(0, I)`` drawn per batch and per probe (fp64 on the CPU from one ``torch.Generator`` seeded with
  ``seed``, then cast to H's dtype and device; zero on padding). Then ``E_V[g g^T] = sum_s J_st^T J_st`` with
  ``J_st = dH_s / dy_t``: the Gauss-Newton matrix of ``||H(W') - H(W)||^2``. Each of ``probes`` draws runs
  its own backward over one forward (the graph is kept between them), and every token counts once per probe
  (``count = tokens x probes``). Needs no labels; works for encoders.

How the gradients are taken: every parameter's ``requires_grad`` is switched off for the capture (restored after,
also on error), so no parameter gradient is computed and no ``.grad`` is touched; inputs are detached. A forward
hook on each target registers a tensor hook on its output ``y``, which adds the real rows of ``dL/dy`` to the
target's :class:`~covsvd.capture.moments.MomentAccumulator` (rows as in input capture: :class:`TokenRows`, padding
and, with ``token_mask``, unselected tokens dropped; cast to fp64 before the Gram product) as the backward
produces it, so no gradient is held longer than the backward needs it. An output that does not require grad
(nothing upstream of it does) is replaced by an equal detached leaf that does; the backward runs to those leaves
only (``torch.autograd.backward(L, inputs=leaves)``). A target whose output never receives a gradient raises.

The model runs in eval mode; train/eval flags, ``requires_grad`` flags and hooks are restored on exit; the
weights are never written, so the model is bit-identical afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..data.fingerprint import model_identity
from ..data.targets import TargetSpec, find_targets, in_out_features
from ..data.textfiles import IGNORE_INDEX
from ..util.checks import check_choice, check_count
from .hooked import batch_count, bound_arguments, eval_mode, module_device, prepare
from .moments import KINDS, MomentAccumulator, SecondMoment
from .rows import RowBuffers, TokenMaskSpec, TokenRows, mask_key

MODES = ("fisher", "probe")
HALF = (torch.float16, torch.bfloat16)


@contextmanager
def frozen_parameters(model: nn.Module):
    """``requires_grad=False`` on every parameter within the block; each flag restored on exit (also on error)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def label_shift(model: nn.Module) -> bool:
    """Whether ``model``'s labels are shifted (causal LM: True) or aligned (masked LM: False), from transformers'
    auto-class tables. Raises ``ValueError`` for any other model: fisher mode cannot compute its loss."""
    from transformers.models.auto import modeling_auto as auto

    def names(table) -> set[str]:
        return {n for v in table.values() for n in ((v,) if isinstance(v, str) else v)}

    cls = type(model).__name__
    if cls in names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return True
    if cls in names(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return False
    raise ValueError(f"mode='fisher' computes the token loss of a causal LM (*ForCausalLM, *LMHeadModel) or a masked "
                     f"LM (*ForMaskedLM); {cls} is neither, so its loss cannot be computed here: load it with "
                     "AutoModelForCausalLM, or use mode='probe' (no labels, any model)")


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


class OutputCapture:
    """Streaming capture of output moments, one batch at a time (:func:`capture_output_moments` loops over it)::

        with OutputCapture(model, mode="probe") as cap:
            for batch in batches:
                cap.add(batch)
        moments = cap.moments()

    On enter: eval mode, every parameter frozen, forward hooks on the targets; on exit (also on error) all
    three undone. Arguments as in :func:`capture_output_moments`.
    """

    def __init__(self, model: nn.Module, mode: str = "fisher", targets: TargetSpec = None, kind: str = "full", *,
                 token_mask: TokenMaskSpec = None, probes: int = 1, seed: int = 0) -> None:
        check_choice("mode", mode, MODES)
        check_choice("kind", kind, KINDS)
        mask_key(token_mask)  # a bad spec raises before anything runs
        check_count("probes", probes, 1)
        check_count("seed", seed, 0)
        if mode == "fisher" and probes != 1:
            raise ValueError(f"probes={probes} is for mode='probe' (random output directions); the fisher loss is "
                             "one scalar per batch: leave probes=1")
        self.model, self.mode, self.kind, self.token_mask, self.probes = model, mode, kind, token_mask, probes
        self.shift = label_shift(model) if mode == "fisher" else None
        self.names = find_targets(model, targets)
        modules = dict(model.named_modules())
        self.d_out = {n: in_out_features(modules[n])[0] for n in self.names}
        self.device = module_device(model)
        self.generator = torch.Generator().manual_seed(seed)  # the probes' V, drawn on the CPU in fp64
        self.accs: dict[str, MomentAccumulator] = {}
        self.rows, self.scratch = TokenRows(None), RowBuffers()
        self.calls: dict[str, int] = {}
        self.fired: dict[str, int] = {}
        self.leaves: list[torch.Tensor] = []
        self.head_input: torch.Tensor | None = None
        self.batches = self.tokens = self.label_tokens = 0
        self._stack: ExitStack | None = None
        self._done = False

    def __enter__(self) -> OutputCapture:
        with ExitStack() as stack:  # on an error here, whatever was entered is undone
            stack.enter_context(eval_mode(self.model))
            stack.enter_context(frozen_parameters(self.model))
            modules = dict(self.model.named_modules())
            for n in self.names:
                stack.callback(modules[n].register_forward_hook(partial(self._on_output, n)).remove)
            head = output_head(self.model) if self.mode == "probe" else None
            if head is not None:  # H = the head's input (the final hidden states), read as the forward passes
                stack.callback(head.register_forward_pre_hook(self._on_head).remove)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        self.leaves = []
        if stack is not None:
            stack.close()  # hooks removed, requires_grad and train/eval flags restored

    def _on_output(self, name: str, module: nn.Module, args: tuple, y) -> torch.Tensor | None:
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise TypeError(f"module {name!r} returned {type(y).__name__}, not a floating tensor: exclude it with "
                            "targets=...")
        if y.shape[-1] != self.d_out[name]:
            raise ValueError(f"module {name!r}: output of shape {tuple(y.shape)}; expected last dim {self.d_out[name]}")
        replaced = None
        if not y.requires_grad:  # nothing upstream needs a gradient: an equal leaf that does
            y = replaced = y.detach().requires_grad_(True)
            self.leaves.append(y)
        self.calls[name] = self.calls.get(name, 0) + 1
        y.register_hook(partial(self._on_grad, name))
        return replaced

    def _on_head(self, module: nn.Module, args: tuple) -> None:
        self.head_input = args[0] if args and isinstance(args[0], torch.Tensor) else None

    def _on_grad(self, name: str, g: torch.Tensor) -> None:
        acc = self.accs.get(name)
        if acc is None:
            acc = self.accs[name] = MomentAccumulator(self.d_out[name], kind=self.kind, device=self.device)
        rows = self.rows.select(g, name, torch.float64, self.scratch)  # (N, d_out) real rows, fp64
        acc.add(rows, consume=rows.untyped_storage().data_ptr() != g.untyped_storage().data_ptr())
        self.fired[name] = self.fired.get(name, 0) + 1

    def add(self, batch) -> None:
        """Run the model on one batch (as in :func:`capture_output_moments`), backward, and add the gradients."""
        if self._stack is None:
            raise RuntimeError("OutputCapture.add must be called inside its `with` block")
        args, kwargs, mask = prepare(batch, self.device, self.model.forward, self.token_mask)
        attention = kwargs.get("attention_mask") if kwargs else bound_arguments(self.model.forward, args).get("attention_mask")
        labels = self._labels(batch, kwargs)
        args, kwargs = tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}
        self.rows = TokenRows(mask)
        self.calls, self.fired, self.leaves, self.head_input = {}, {}, [], None
        try:
            with torch.enable_grad():
                out = self.model(*args, **kwargs)
                losses = self._fisher(out, labels, attention) if self.mode == "fisher" else \
                    self._probes(out, attention)
                for i, loss in enumerate(losses):
                    if not loss.requires_grad:
                        raise ValueError(self._no_gradient(self.names))
                    torch.autograd.backward(loss, inputs=self.leaves or None, retain_graph=i < self.probes - 1)
        finally:
            self.leaves, self.head_input = [], None  # the graph goes with them
        silent = [n for n, c in self.calls.items() if self.fired.get(n, 0) != c * self.probes]
        if silent:
            raise ValueError(self._no_gradient(silent))
        self._check_finite()
        self.batches += 1
        self.tokens += self.rows.n_real if self.rows.n_real is not None else 0

    def _labels(self, batch, kwargs: dict) -> torch.Tensor | None:
        """The batch's labels (fisher; raises without them), always kept out of the forward (no model loss)."""
        labels = kwargs.pop("labels", None)
        if self.mode != "fisher":
            return None
        if labels is None:
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor):
            raise ValueError("mode='fisher' needs labels: every batch must be a dict with a (B, T) 'labels' tensor "
                             "(-100 where no loss is taken; covsvd.prompt_batches / text_batches make them); "
                             "without labels use mode='probe'")
        return labels.to(self.device)

    def _fisher(self, out, labels: torch.Tensor, attention: torch.Tensor | None) -> list[torch.Tensor]:
        """``[L]``: the summed token cross-entropy (module doc), from the output's ``logits`` ``(B, T, vocab)``."""
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(labels.shape):
            raise ValueError(f"mode='fisher' needs (B, T, vocab) logits matching labels {tuple(labels.shape)}; "
                             f"{type(self.model).__name__} returned {getattr(logits, 'shape', type(logits).__name__)}"
                             ": its loss cannot be computed here; use mode='probe'")
        keep = labels != IGNORE_INDEX  # (B, T)
        real = attention.to(self.device).bool() if attention is not None else torch.ones_like(keep)
        keep &= real
        if self.shift:  # position t predicts label t + 1; both must be real tokens
            logits, labels, keep = logits[:, :-1], labels[:, 1:], keep[:, 1:] & real[:, :-1]
        z = logits[keep]  # (n, vocab)
        self.label_tokens += int(keep.sum())
        return [F.cross_entropy(z.float() if z.dtype in HALF else z, labels[keep], reduction="sum")]

    def _probes(self, out, attention: torch.Tensor | None):
        """``<V_p, H>`` for each probe p, V drawn lazily (one ``(B, T, d)`` V alive at a time)."""
        H = _final_hidden(out, self.head_input, type(self.model).__name__)
        for _ in range(self.probes):
            V = torch.randn(H.shape, generator=self.generator, dtype=torch.float64).to(H.device, H.dtype)
            if attention is not None and H.dim() == 3:
                V = V * attention.to(H.device, H.dtype)[..., None]  # padding outputs never count
            yield (V * H).sum()

    def _check_finite(self) -> None:
        """Raise naming the targets whose output gradient held NaN/inf (one host sync per batch)."""
        items = list(self.accs.items())
        ok = torch.stack([a.finite() for _, a in items]) if items else torch.ones(0, dtype=torch.bool)
        if not bool(ok.all()):
            bad = [n for (n, _), good in zip(items, ok.tolist(), strict=True) if not good]
            raise ValueError(f"NaN/inf in the output gradient of module(s) {bad[:5]} (batch {self.batches}): check "
                             "the model's dtype (fp16 overflow?), the inputs and the labels")

    def _no_gradient(self, names: list[str]) -> str:
        what = "the loss on labels" if self.mode == "fisher" else "the final hidden states"
        return (f"target(s) {names[:5]} ({len(names)} in all) got no gradient from {what} (mode={self.mode!r}): "
                f"their output does not reach it (e.g. BERT's pooler for mode='probe'), or is computed without "
                f"autograd; leave them out with targets=...")

    def moments(self) -> dict[str, SecondMoment]:
        """``{target: SecondMoment}`` of the output gradients (``d_in`` field = the output width); finishes.

        Raises ``ValueError`` when no batch was added, fisher saw no label token, or a target counted no token.
        """
        if self._done:
            raise RuntimeError("OutputCapture.moments() was already called; start a new capture")
        if self.batches == 0:
            raise ValueError("no batches: `batches` is empty; pass calibration batches (covsvd.prompt_batches)")
        if self.mode == "fisher" and self.label_tokens == 0:
            raise ValueError("mode='fisher': no label token counted (labels all -100, or only on padding / the "
                             "first position of a causal LM): G would be 0; check the labels or use mode='probe'")
        self._done = True
        identity = model_identity(self.model)
        out = {n: (self.accs.pop(n, None) or MomentAccumulator(self.d_out[n], kind=self.kind, device=self.device)
                   ).moment(model=identity) for n in self.names}
        empty = [n for n, m in out.items() if m.count == 0]
        if empty:
            raise ValueError(f"{len(empty)} target(s) counted zero tokens, e.g. {empty[:3]}: every token was padding, "
                             f"token_mask={self.token_mask!r} selected none, or the module was never called")
        return out


def output_head(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` when the model has an output head module (the LM head), else ``None``."""
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    return head if isinstance(head, nn.Module) else None


def _final_hidden(out, head_input: torch.Tensor | None, cls: str) -> torch.Tensor:
    """H: the LM head's input (when read), else ``last_hidden_state``, else the output itself when it is a tensor."""
    H = head_input
    if H is None:
        H = out.get("last_hidden_state") if isinstance(out, Mapping) else getattr(out, "last_hidden_state", None)
    if H is None and isinstance(out, torch.Tensor):
        H = out
    if not isinstance(H, torch.Tensor) or not H.is_floating_point():
        raise ValueError(f"mode='probe' needs the final hidden states; {cls} has no output head and returned no "
                         "last_hidden_state (pass a transformers model, or one whose forward returns a float tensor)")
    return H


def capture_output_moments(
    model: nn.Module,
    batches: Iterable,
    mode: str = "fisher",
    targets: TargetSpec = None,
    kind: str = "full",
    token_mask: TokenMaskSpec = None,
    probes: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, SecondMoment]:
    """``{module name: SecondMoment}`` of the *output gradients* ``g = dL/dy`` of the target modules.

    Args:
        model: a transformers model (fisher: a causal or masked LM; probe: any model returning hidden states).
            Run in eval mode with every parameter frozen; modes, ``requires_grad`` flags and hooks restored
            afterwards (also on error); no ``.grad`` is written; weights untouched (bit-identical).
        batches: as in :func:`covsvd.capture_moments` (dicts, tuples/lists or tensors); fisher needs dict
            batches with ``labels`` (-100: no loss). ``labels`` is never passed to the forward.
        mode: ``"fisher"`` (L = summed token loss on the labels) or ``"probe"`` (L = <V, H>, V ~ N(0, I)); the
            module docstring defines both exactly.
        targets: see :func:`covsvd.find_targets`.
        kind: ``"full"`` (``(d_out, d_out)`` sums) or ``"diag"`` (``(d_out,)``, FWSVD-style).
        token_mask: which tokens' gradients count besides padding (as in capture_moments). It selects rows of G,
            not loss terms: fisher's loss is always over its labels, probe's over every real token.
        probes: probe only: draws of V per batch, each its own backward (``count`` counts each token per draw).
        seed: the probes' generator seed (deterministic for a seed; fisher ignores it).
        progress: a tqdm bar over batches.

    Returns:
        One :class:`~covsvd.SecondMoment` per target in ``named_modules`` order, fp64 sums: ``sum_xx`` is
        ``sum g g^T`` (``(d_out, d_out)`` or ``(d_out,)``), ``sum_x`` / ``sum_abs`` the sums of ``g`` / ``|g|``,
        ``count`` the rows summed; its ``d_in`` field is the output width ``d_out``. ``.matrix()`` is ``E[g g^T]``,
        what ``covsvd.orient(..., metric="two-sided", output=...)`` takes.

    Raises:
        ValueError: a bad ``mode`` / ``kind`` / ``probes`` / ``seed`` / ``token_mask``; fisher without labels, on
            a model whose token loss cannot be computed, or with no label token at all; a target whose output
            gets no gradient (naming it: leave it out with ``targets=``); NaN/inf gradients; empty data.
    """
    from tqdm.auto import tqdm

    capture = OutputCapture(model, mode, targets, kind, token_mask=token_mask, probes=probes, seed=seed)
    with capture:
        bar = tqdm(batches, total=batch_count(batches), desc=f"output capture ({mode})", unit="batch",
                   disable=not progress)
        for batch in bar:
            capture.add(batch)
            if progress:
                bar.set_postfix(tokens=capture.tokens, refresh=False)
    return capture.moments()
