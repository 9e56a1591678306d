"""capture_moments against an independent brute force (every masked input stored, X^T X / n), and its contract:
sharing, hooks and modes restored, every batch form, and clear errors on bad input."""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import covsvd
from covsvd.capture.hooks import InputHooks
from covsvd.capture.rows import RowBuffers, TokenRows, contiguous_runs

TOL = 1e-10  # relative, fp64 accumulation vs fp64 brute force


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_matches_brute_force(model, batches, moments, reference):
    rows = reference(model, batches, list(moments))
    for name, m in moments.items():
        X = rows[name]  # (N, d_in) fp64
        assert m.count == X.shape[0], name
        assert rel(m.matrix(), X.T @ X / len(X)) <= TOL, name
        assert rel(m.mean(), X.mean(0)) <= TOL, name
        assert rel(m.mean_abs(), X.abs().mean(0)) <= TOL, name


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_default_model_equals_brute_force_with_padding(default_model, brute_force_rows, side):
    model, tok = default_model
    batches = covsvd.calibration_batches(tok, max_tokens=300, seq_len=40, batch_size=4, padding_side=side)
    masks = [b["attention_mask"] for b in batches]
    assert any((m == 0).any() for m in masks), "the test needs a batch with real padding"
    edge = 0 if side == "left" else -1
    assert any((m[:, edge] == 0).any() for m in masks), f"padding must sit on the {side}"
    moments = covsvd.capture_moments(model, batches, progress=False)
    assert len(moments) == 37
    n_tokens = covsvd.count_tokens(batches)
    assert moments["encoder.layer.0.attention.self.query"].count == n_tokens
    assert moments["pooler.dense"].count == sum(len(m) for m in masks)  # one CLS row per sequence
    assert_matches_brute_force(model, batches, moments, brute_force_rows)


@pytest.mark.parametrize("side", ["right", "left"])
def test_random_gpt2_conv1d_equals_brute_force(gpt2_tiny, make_batches, brute_force_rows, side):
    from transformers.pytorch_utils import Conv1D

    batches = make_batches([[9, 3, 12], [5, 16]], side=side, seed=1)
    moments = covsvd.capture_moments(gpt2_tiny, batches, progress=False)
    modules = dict(gpt2_tiny.named_modules())
    assert moments and all(isinstance(modules[n], Conv1D) for n in moments)
    assert moments["h.0.mlp.c_proj"].d_in == 4 * 32  # d_in read from Conv1D's (d_in, d_out) weight
    assert_matches_brute_force(gpt2_tiny, batches, moments, brute_force_rows)


def test_diag_equals_the_diagonal_of_full(bert_tiny, make_batches):
    batches = make_batches([[7, 2, 10]])
    full = covsvd.capture_moments(bert_tiny, batches, progress=False)
    diag = covsvd.capture_moments(bert_tiny, batches, kind="diag", progress=False)
    for name in full:
        assert diag[name].kind == "diag" and diag[name].sum_xx.shape == (full[name].d_in,)
        assert rel(diag[name].diag(), full[name].matrix().diagonal()) <= 1e-14
        assert diag[name].count == full[name].count


def test_shared_inputs_share_one_accumulator_equal_to_separate_ones(bert_tiny, make_batches):
    batches = make_batches([[7, 2, 10], [4, 4]])
    shared = covsvd.capture_moments(bert_tiny, batches, progress=False)
    separate = covsvd.capture_moments(bert_tiny, batches, progress=False, share_inputs=False)
    for i in range(2):
        q, k, v = (f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value"))
        assert shared[q] is shared[k] is shared[v]
        assert separate[q] is not separate[k]
    assert len({id(m) for m in shared.values()}) == 2 * 4 + 1  # qkv, attn out, intermediate, output; pooler
    for name in shared:
        assert torch.equal(shared[name].sum_xx, separate[name].sum_xx)
        assert shared[name].count == separate[name].count


def test_float32_accumulation_is_close_to_float64(bert_tiny, make_batches):
    batches = make_batches([[30, 20, 25]])
    exact = covsvd.capture_moments(bert_tiny, batches, progress=False)
    fast = covsvd.capture_moments(bert_tiny, batches, progress=False, accumulate="float32")
    for name in exact:
        assert fast[name].accumulate == "float32"
        assert rel(fast[name].matrix(), exact[name].matrix()) <= 1e-5


def test_targets_by_regex_names_and_predicate(bert_tiny, make_batches):
    batches = make_batches([[5, 3]])
    by_regex = covsvd.capture_moments(bert_tiny, batches, targets=r".*\.output\.dense", progress=False)
    assert len(by_regex) == 4 and all(n.endswith("output.dense") for n in by_regex)
    names = ["encoder.layer.1.attention.self.query", "pooler.dense"]
    assert list(covsvd.capture_moments(bert_tiny, batches, targets=names, progress=False)) == names
    pred = covsvd.capture_moments(bert_tiny, batches, targets=lambda n, m: m.in_features == 64, progress=False)
    assert list(pred) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]


def test_every_batch_form_gives_the_same_moments(bert_tiny, make_batches):
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import BatchEncoding

    b = make_batches([[6, 4, 9]])[0]
    ref = covsvd.capture_moments(bert_tiny, [b], progress=False)

    def same(moments):
        for name in ref:
            assert torch.equal(moments[name].sum_xx, ref[name].sum_xx), name
            assert moments[name].count == ref[name].count

    same(covsvd.capture_moments(bert_tiny, [BatchEncoding(b)], progress=False))
    same(covsvd.capture_moments(bert_tiny, [(b["input_ids"], b["attention_mask"])], progress=False))
    same(covsvd.capture_moments(bert_tiny, (x for x in [b]), progress=True))  # generator, bar on
    loader = DataLoader(TensorDataset(b["input_ids"], b["attention_mask"]), batch_size=3)
    same(covsvd.capture_moments(bert_tiny, loader, progress=False))
    # a bare tensor is input_ids with every token real: the count is B * T
    bare = covsvd.capture_moments(bert_tiny, [b["input_ids"]], progress=False)
    assert bare["encoder.layer.0.intermediate.dense"].count == b["input_ids"].numel()


def test_hooks_removed_and_modes_restored_also_on_error(make_batches):
    from conftest import tiny_bert

    model = tiny_bert().train()
    model.encoder.layer[1].eval()  # a mixed state must come back as it was
    before = {n: m.training for n, m in model.named_modules()}
    seen_training = []
    model.encoder.register_forward_pre_hook(lambda m, a: seen_training.append(m.training))

    def n_hooks():
        return sum(len(m._forward_pre_hooks) for m in model.modules())

    baseline = n_hooks()
    good = make_batches([[5, 3]])
    covsvd.capture_moments(model, good, progress=False)
    assert seen_training == [False]  # captured in eval mode (no dropout)
    # a forward that raises midway, after layer 0's hooks ran
    def explode(module, args):
        raise RuntimeError("layer 1 failed")

    handle = model.encoder.layer[1].register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="layer 1 failed"):
        covsvd.capture_moments(model, good, progress=False)
    handle.remove()
    out_of_vocab = [{"input_ids": torch.full((1, 4), 10**6)}]
    with pytest.raises(IndexError):
        covsvd.capture_moments(model, out_of_vocab, progress=False)
    assert n_hooks() == baseline
    assert {n: m.training for n, m in model.named_modules()} == before
    assert torch.is_grad_enabled()


def test_input_hooks_are_removed_when_the_body_raises(bert_tiny):
    calls = []
    with pytest.raises(RuntimeError, match="boom"):
        with InputHooks(bert_tiny, ["pooler.dense"], lambda n, x: calls.append(n)) as hooks:
            assert set(hooks) == {"pooler.dense"}
            raise RuntimeError("boom")
    assert not bert_tiny.pooler.dense._forward_pre_hooks


def test_empty_data_and_zero_real_tokens_raise(bert_tiny, make_batches):
    with pytest.raises(ValueError, match="no batches"):
        covsvd.capture_moments(bert_tiny, [], progress=False)
    b = make_batches([[4, 2]])[0]
    all_padding = {"input_ids": b["input_ids"], "attention_mask": torch.zeros_like(b["attention_mask"])}
    with pytest.raises(ValueError, match="zero real tokens"):
        covsvd.capture_moments(bert_tiny, [all_padding], targets=r".*intermediate\.dense", progress=False)


def test_never_called_module_raises_naming_it(make_batches):
    class TwoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="unused"):
        covsvd.capture_moments(TwoLinears(), [torch.randn(2, 5, 3)], progress=False)


def test_nan_activation_raises_naming_the_module(make_batches):
    from conftest import tiny_bert

    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf in the input of module\(s\) \['encoder\.layer\.1\.output\.dense'\]"):
        covsvd.capture_moments(model, make_batches([[4, 2]]), targets=r".*output\.dense", progress=False)


def test_mask_that_fits_no_input_raises_with_both_shapes():
    class Flattens(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, input_ids, attention_mask):
            return self.lin(torch.randn(7, 4))  # 7 rows: neither B*T = 6 nor B = 2

    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3)}
    with pytest.raises(ValueError, match=r"module 'lin': input of shape \(7, 4\) fits no attention_mask of shape \(2, 3\)"):
        covsvd.capture_moments(Flattens(), [batch], progress=False)


def test_token_rows_selects_real_rows_for_every_layout():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])  # right- and left-padded rows
    rows = TokenRows(mask)
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (B, T, d)
    expect = x[mask.bool()]
    assert torch.equal(rows.select(x, "m"), expect)
    assert torch.equal(rows.select(x.reshape(6, 2), "m"), expect)  # (B*T, d)
    assert torch.equal(rows.select(x[:, 0], "m"), x[:, 0])  # (B, d): per sequence, as is
    assert rows.n_real == 4
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        TokenRows(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"\(batch, tokens\)"):
        TokenRows(torch.ones(2, 1, 3, 3))


def test_contiguous_runs_of_right_left_and_holed_masks():
    right_left = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]).bool()
    assert contiguous_runs(right_left) == [(0, 2), (6, 8), (12, 16)]  # flat spans; the all-padding row left out
    touching = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]]).bool()
    assert contiguous_runs(touching) == [(0, 5), (7, 12)]  # a full-length sequence runs on into the next one
    assert contiguous_runs(torch.tensor([[1, 0, 1, 1]]).bool()) is None  # a hole inside a sequence


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=6))
def test_contiguous_runs_cover_exactly_the_real_positions(rows):
    T = 6
    mask = torch.tensor([[s <= t < s + n for t in range(T)] for s, n in rows])  # (B, T), one run per row
    spans = contiguous_runs(mask)
    flat = [i for a, b in spans for i in range(a, b)]
    assert flat == mask.reshape(-1).nonzero().squeeze(1).tolist()  # in order, each real position once
    assert all(a < b for a, b in spans) and all(x[1] < y[0] for x, y in pairwise(spans))  # none touch


@pytest.mark.parametrize("mask", [[[1, 1, 0], [0, 1, 1]], [[1, 0, 1], [1, 1, 1]], [[1, 1, 1], [1, 1, 1]],
                                  [[0, 0, 0], [0, 0, 0]]], ids=["right-left", "hole", "no-padding", "all-padding"])
def test_select_casts_and_drops_padding_in_one_copy_into_the_scratch(mask):
    mask = torch.tensor(mask)
    rows = TokenRows(mask)
    x = torch.randn(2, 3, 4)  # (B, T, d) fp32
    expect = x[mask.bool()].double()
    scratch = RowBuffers()
    for layout in (x, x.reshape(6, 4)):  # (B, T, d) and (B*T, d)
        for buffers in (None, scratch):
            got = rows.select(layout, "m", torch.float64, buffers)
            assert got.dtype == torch.float64 and torch.equal(got, expect)
            assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a copy: ours to overwrite
    assert torch.equal(rows.select(x[:, 0], "m", torch.float64, scratch), x[:, 0].double())  # (B, d) as is
    if mask.all():  # nothing dropped, same dtype: a view, not a copy
        assert rows.select(x, "m").data_ptr() == x.data_ptr()


def test_row_buffers_are_one_reused_buffer_grown_to_the_largest_request():
    scratch, cpu = RowBuffers(), torch.device("cpu")
    a = scratch.rows(5, 3, torch.float64, cpu)
    b = scratch.rows(2, 6, torch.float64, cpu)  # another width, same memory
    assert a.shape == (5, 3) and b.shape == (2, 6) and b.data_ptr() == a.data_ptr()
    scratch.reserve(40, torch.float64, cpu)
    assert scratch.buffers[(torch.float64, cpu)].numel() == 40
    assert scratch.rows(4, 10, torch.float64, cpu).shape == (4, 10)
    assert scratch.rows(9, 5, torch.float64, cpu).shape == (9, 5)  # grown to 45
    assert scratch.buffers[(torch.float64, cpu)].numel() == 45
    assert scratch.rows(2, 3, torch.float32, cpu).dtype == torch.float32  # one buffer per dtype


@pytest.mark.parametrize("accumulate", ["float64", "float32"])
def test_a_mask_with_holes_equals_brute_force(bert_tiny, brute_force_rows, accumulate):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 50, (3, 7), generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0]])
    batches = [{"input_ids": ids, "attention_mask": mask}]
    moments = covsvd.capture_moments(bert_tiny, batches, progress=False, accumulate=accumulate)
    rows = brute_force_rows(bert_tiny, batches, list(moments))
    tol = TOL if accumulate == "float64" else 1e-6
    for name, m in moments.items():
        X = rows[name]  # (N, d_in) fp64
        assert m.count == X.shape[0], name
        assert rel(m.matrix(), X.T @ X / len(X)) <= tol, name
        assert rel(m.mean(), X.mean(0)) <= TOL, name  # the O(d_in) sums are fp64 in both modes
        assert rel(m.mean_abs(), X.abs().mean(0)) <= TOL, name


def test_bad_arguments_raise(bert_tiny, make_batches):
    batches = make_batches([[3]])
    with pytest.raises(ValueError, match="matches none"):
        covsvd.capture_moments(bert_tiny, batches, targets=r"nothing\.here", progress=False)
    with pytest.raises(ValueError, match="kind"):
        covsvd.capture_moments(bert_tiny, batches, kind="lowrank", progress=False)
    with pytest.raises(ValueError, match="accumulate"):
        covsvd.capture_moments(bert_tiny, batches, accumulate="float16", progress=False)
    with pytest.raises(TypeError, match="a batch must be"):
        covsvd.capture_moments(bert_tiny, ["some text"], progress=False)


class SometimesShared(nn.Module):
    """a and b read the same tensor, except in forwards where ``split`` is set (b reads a copy)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)
        self.split = False

    def forward(self, x):
        return self.a(x) + self.b(x.clone() if self.split else x)


def test_sharing_that_changes_between_batches_raises():
    model = SometimesShared()
    x = torch.randn(2, 4, 3)

    class Flip:
        def __iter__(self):
            yield x
            model.split = True
            yield x

    with pytest.raises(ValueError, match="different tensor in a later batch"):
        covsvd.capture_moments(model, Flip(), progress=False)
    model.split = True  # never shared: captured separately, equal values
    m = covsvd.capture_moments(model, [x], progress=False)
    assert m["a"] is not m["b"] and torch.equal(m["a"].sum_xx, m["b"].sum_xx)


def test_moments_are_tagged_with_the_model_identity(bert_tiny, make_batches):
    moments = covsvd.capture_moments(bert_tiny, make_batches([[3]]), progress=False)
    assert all(m.model == covsvd.data.model_identity(bert_tiny) for m in moments.values())
    other = copy.deepcopy(bert_tiny)
    assert covsvd.data.model_identity(other) == covsvd.data.model_identity(bert_tiny)


def test_moment_capture_streams_from_a_user_loop(bert_tiny, make_batches):
    from covsvd.capture.hooked import MomentCapture

    batches = make_batches([[7, 2, 10], [4, 4]])
    whole = covsvd.capture_moments(bert_tiny, batches, progress=False)
    with MomentCapture(bert_tiny) as cap:
        assert torch.is_grad_enabled()  # only the forward inside add() runs without grad
        for b in batches:
            cap.add(b)
        assert cap.tokens == covsvd.count_tokens(batches) and cap.batches == 2
    assert not any(m._forward_pre_hooks for m in bert_tiny.modules())
    streamed = cap.moments()
    assert all(torch.equal(streamed[n].sum_xx, whole[n].sum_xx) for n in whole)
    with pytest.raises(RuntimeError, match="already called"):
        cap.moments()
    with pytest.raises(RuntimeError, match="inside its `with` block"):
        MomentCapture(bert_tiny).add(batches[0])


def test_run_feeds_any_call_and_moments_can_keep_a_subset(bert_tiny, make_batches):
    from covsvd.capture.hooked import MomentCapture

    batch = make_batches([[6, 4]], seed=2)[0]
    whole = covsvd.capture_moments(bert_tiny, [batch], progress=False)
    names = ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    layer0 = bert_tiny.encoder.layer[0]
    caught = []
    hook = layer0.register_forward_pre_hook(lambda m, a, kw: caught.append((a, kw)), with_kwargs=True)
    try:
        with torch.no_grad():
            bert_tiny(**batch)  # layer 0's arguments: hidden states (B, T, d), the model's mask
    finally:
        hook.remove()
    args, kwargs = caught[0]
    with MomentCapture(bert_tiny, names) as cap:
        out = cap.run(lambda: layer0(*args, **kwargs), batch["attention_mask"])  # one block, not the model
        assert cap.seen() == names[:1] and isinstance(out, torch.Tensor)
    got = cap.moments(names=cap.seen())
    assert list(got) == names[:1]
    assert rel(got[names[0]].sum_xx, whole[names[0]].sum_xx) <= 1e-12


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_sequence_with_exactly_one_pad_token_equals_brute_force(gpt2_tiny, make_batches, brute_force_rows, side):
    """End to end: a batch whose only padding is one token of one row (a mask of all ones but one) must drop
    exactly that row (a capture treating "almost all real" as unpadded would count it)."""
    batches = make_batches([[6, 7], [8, 8, 8, 7]], side=side, seed=7)
    assert all(int((b["attention_mask"] == 0).sum()) == 1 for b in batches)
    names = covsvd.find_targets(gpt2_tiny)
    moments = covsvd.capture_moments(gpt2_tiny, batches, targets=names, progress=False)
    rows = brute_force_rows(gpt2_tiny, batches, names)
    for name in names:
        X = rows[name]
        assert moments[name].count == X.shape[0] == 6 + 7 + 8 * 3 + 7
        torch.testing.assert_close(moments[name].matrix(), X.T @ X / X.shape[0], rtol=1e-12, atol=1e-14)
