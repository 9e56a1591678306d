"""LLM conventions of capture: default targets without the output embeddings or tied modules, token_mask=
(labels / a batch key / a callable, padding still out), no KV cache, and bf16 / fp16 models captured in fp64."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same, rel, tiny_decoder
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import covsvd
from covsvd.capture.hooked import MomentCapture
from covsvd.data.targets import embedding_modules


@pytest.fixture(scope="module")
def llama():
    return tiny_decoder("llama", layers=2)


def labelled(batches, seed: int = 0):
    """``batches`` with ``labels``: -100 on a random prefix (the prompt) of each row and on padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        labels = b["input_ids"].clone()
        B, T = labels.shape
        prompt = torch.randint(0, T, (B, 1), generator=g)  # (B, 1)
        labels[torch.arange(T)[None] < prompt] = -100
        labels[b["attention_mask"] == 0] = -100
        pad = (b["attention_mask"] == 0).nonzero()
        if len(pad):
            labels[pad[0, 0], pad[0, 1]] = 5  # a label on a padding token: padding still never counts
        out.append({**b, "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------- targets


def test_default_targets_leave_out_the_output_embeddings_and_tied_modules(bert_tiny):
    untied = tiny_decoder("llama", layers=1)  # lm_head is the output embeddings (own weight)
    tied = tiny_decoder("gpt2", layers=1)  # lm_head.weight is wte.weight
    for model in (untied, tied):
        assert embedding_modules(model) == ["lm_head"]
        names = covsvd.find_targets(model)
        assert "lm_head" not in names and len(names) == len(covsvd.find_targets(model, r".*")) - 1
        assert covsvd.find_targets(model, ["lm_head"]) == ["lm_head"]  # an explicit choice still may
    assert embedding_modules(tied.transformer) == []  # the bare model has no head
    assert embedding_modules(bert_tiny) == [] and len(covsvd.find_targets(bert_tiny)) == 13  # encoders: unchanged

    class TiedInside(nn.Module):  # a projection sharing the input embedding's weight (no transformers accessor)
        def __init__(self):
            super().__init__()
            self.embed, self.mix, self.out = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 7, bias=False)
            self.out.weight = self.embed.weight

    assert covsvd.find_targets(TiedInside()) == ["mix"]

    class OnlyHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
            self.out.weight = self.embed.weight

    with pytest.raises(ValueError, match="explicitly with targets"):
        covsvd.find_targets(OnlyHead())


def test_attach_with_default_targets_works_on_a_tied_model(make_batches):
    model = tiny_decoder("qwen2", layers=1)
    moments = covsvd.capture_moments(model, make_batches([[12, 8]]), progress=False)
    report = covsvd.attach_adapters(model, moments, r=2, metric="full", progress=False)
    assert len(report.rows) == 7 and "lm_head" not in covsvd.adapters(model)


# ------------------------------------------------------------------------------------------- token_mask


def rows_where(model, batches, names, keep) -> dict[str, torch.Tensor]:
    """``{name: (N, d_in) fp64}``: every input row of each module where ``keep(batch)`` (B, T) holds, stored whole
    (plain pre-hooks; the forward gets the batch's own attention mask and no labels)."""
    rows: dict[str, list] = {n: [] for n in names}
    where = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: rows[n].append(a[0][where["k"]].double()))
             for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                where["k"] = keep(b)
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.mark.parametrize("side", ["right", "left"])
def test_labels_mask_equals_brute_force_over_the_selected_tokens(llama, make_batches, side):
    batches = labelled(make_batches([[9, 3, 12], [5, 16]], side=side, seed=1))
    moments = covsvd.capture_moments(llama, batches, token_mask="labels", progress=False)
    rows = rows_where(llama, batches, list(moments), lambda b: (b["labels"] != -100) & b["attention_mask"].bool())
    n = len(next(iter(rows.values())))
    assert 0 < n < covsvd.count_tokens(batches)
    for name, m in moments.items():
        X = rows[name]  # (n, d_in) fp64
        assert m.count == X.shape[0] == n, name
        assert rel(m.matrix(), X.T @ X / n) <= 1e-12, name
    # layerwise: the same
    assert_same(covsvd.capture_moments(llama, batches, token_mask="labels", progress=False, layerwise=True), moments)


def test_a_batch_key_and_a_callable_select_the_same_tokens(llama, make_batches):
    batches = labelled(make_batches([[9, 3, 12]], seed=2))
    ref = covsvd.capture_moments(llama, batches, token_mask="labels", progress=False)
    keyed = [{**b, "keep": b["labels"] != -100} for b in batches]
    by_key = covsvd.capture_moments(llama, keyed, token_mask="keep", progress=False)
    ints = [{**b, "keep": (b["labels"] != -100).int()} for b in batches]
    by_int = covsvd.capture_moments(llama, ints, token_mask="keep", progress=False)
    by_fn = covsvd.capture_moments(llama, batches, token_mask=lambda b: b["labels"] >= 0, progress=False)
    for other in (by_key, by_int, by_fn):
        assert all(torch.equal(other[n].sum_xx, ref[n].sum_xx) and other[n].count == ref[n].count for n in ref)


def test_the_mask_key_is_not_passed_to_the_forward(llama, make_batches):
    batches = labelled(make_batches([[6, 4]], seed=3))
    seen = []
    hook = llama.register_forward_pre_hook(lambda m, a, kw: seen.append(sorted(kw)), with_kwargs=True)
    layer = llama.model.layers[0].register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw.get("use_cache"), kw.get("cache"))), with_kwargs=True)
    try:
        covsvd.capture_moments(llama, batches, token_mask="labels", progress=False)
        covsvd.capture_moments(llama, batches, progress=False)  # no mask: the labels go to the forward as given
    finally:
        hook.remove()
        layer.remove()
    assert seen[0] == ["attention_mask", "input_ids", "use_cache"]  # labels kept out, no KV cache
    assert seen[1] == (False, None)
    assert "labels" in seen[2]


def test_a_mask_selecting_nothing_or_malformed_raises(llama, make_batches):
    batches = make_batches([[6, 4]], seed=4)
    nothing = [{**b, "labels": torch.full_like(b["input_ids"], -100)} for b in batches]
    for layerwise in (False, True):
        with pytest.raises(ValueError, match="token_mask='labels' select"):
            covsvd.capture_moments(llama, nothing, token_mask="labels", progress=False, layerwise=layerwise)
    with pytest.raises(ValueError, match="no 'labels' entry"):
        covsvd.capture_moments(llama, batches, token_mask="labels", progress=False)
    with pytest.raises(ValueError, match="reads a batch key, but the batch is a tuple"):
        covsvd.capture_moments(llama, [(b["input_ids"],) for b in batches], token_mask="labels", progress=False)
    with pytest.raises(ValueError, match="has shape"):
        covsvd.capture_moments(llama, batches, token_mask=lambda b: b["input_ids"][:, :2] > 0, progress=False)
    with pytest.raises(ValueError, match="only 0/1"):
        covsvd.capture_moments(llama, [{**b, "k": b["input_ids"]} for b in batches], token_mask="k", progress=False)
    with pytest.raises(TypeError, match="token_mask="):
        covsvd.capture_moments(llama, batches, token_mask=3, progress=False)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=2, max_size=2))
def test_any_mask_counts_exactly_its_real_selected_tokens(bert_tiny, make_batches, picks):
    batch = make_batches([[7, 4]], seed=5)[0]
    keep = torch.tensor(picks)  # (2, 7) bool
    want = int((keep & batch["attention_mask"].bool()).sum())
    run = dict(targets=r".*intermediate\.dense", progress=False)
    if want == 0:
        with pytest.raises(ValueError, match="selected no token"):
            covsvd.capture_moments(bert_tiny, [{**batch, "keep": keep}], token_mask="keep", **run)
        return
    m = covsvd.capture_moments(bert_tiny, [{**batch, "keep": keep}], token_mask="keep", **run)
    assert all(v.count == want for v in m.values())


# -------------------------------------------------------------------------------------- dtypes, TF32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate", ["float64", "float32"])
def test_half_precision_models_are_captured_from_upcast_rows(make_batches, monkeypatch, dtype, accumulate):
    import covsvd.capture.moments as moments_module

    model = tiny_decoder("llama", layers=1).to(dtype)
    batches = make_batches([[9, 3, 12]], side="left", seed=6)
    products = []
    real = moments_module.add_gram_upper_
    monkeypatch.setattr(moments_module, "add_gram_upper_", lambda out, x, b=None: (products.append(x.dtype),
                                                                                   real(out, x, b))[1])
    moments = covsvd.capture_moments(model, batches, progress=False, accumulate=accumulate)
    assert set(products) == {torch.float64 if accumulate == "float64" else torch.float32}  # never a half product
    rows = rows_where(model, batches, list(moments), lambda b: b["attention_mask"].bool())  # same inputs, upcast
    for name, m in moments.items():
        X = rows[name]
        assert m.sum_xx.dtype == torch.float64
        assert rel(m.matrix(), X.T @ X / len(X)) <= (1e-12 if accumulate == "float64" else 1e-6), name


def test_float32_products_refuse_tf32_on_cuda(bert_tiny):
    before = torch.get_float32_matmul_precision()
    MomentCapture(bert_tiny, accumulate="float32", device="cuda")  # TF32 off (the default): fine (nothing allocated)
    try:
        torch.set_float32_matmul_precision("high")
        with pytest.raises(ValueError, match="TF32"):
            MomentCapture(bert_tiny, accumulate="float32", device="cuda")
        MomentCapture(bert_tiny, accumulate="float64", device="cuda")  # fp64 products never use TF32
        MomentCapture(bert_tiny, accumulate="float32", device="cpu")  # TF32 is a CUDA matter
    finally:
        torch.set_float32_matmul_precision(before)
