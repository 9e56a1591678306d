"""Layerwise capture (covsvd.capture.layerwise): equal to the default capture on encoder and decoder models, one block's
accumulators at a time, targets outside the blocks, and clear errors when the blocks cannot be used."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import assert_same, rel, tiny_decoder
from torch import nn

import covsvd
from covsvd.capture.layerwise import AFTER, BEFORE, find_blocks, iter_block_moments


@pytest.fixture(scope="module")
def decoders():
    return {arch: tiny_decoder(arch) for arch in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_layerwise_equals_the_default_capture(decoders, bert_tiny, make_batches, arch, side):
    model = bert_tiny if arch == "bert" else decoders[arch]
    batches = make_batches([[9, 3, 12], [5, 16], [16, 16]], side=side, seed=2)
    default = covsvd.capture_moments(model, batches, progress=False)
    layered = covsvd.capture_moments(model, batches, progress=False, layerwise=True)
    assert_same(layered, default)
    assert all(m.sum_xx.device.type == "cpu" for m in layered.values())  # offload="cpu"
    if arch == "bert":
        assert "pooler.dense" in layered  # outside the blocks: the tail pass


def test_per_layer_masks_are_caught_per_block(decoders, make_batches):
    """Qwen2's sliding-window layer gets another mask than its neighbours: reusing block 0's arguments for every
    block would be wrong, and the per-block catch is what makes layerwise equal the default here."""
    model = decoders["qwen2"]
    batches = make_batches([[16, 12]], seed=3)
    masks = {}
    hooks = [model.model.layers[i].register_forward_pre_hook(
        lambda m, a, kw, i=i: masks.update({i: kw["attention_mask"]}), with_kwargs=True) for i in (0, 1)]
    try:
        with torch.no_grad():
            model(**batches[0])
    finally:
        for h in hooks:
            h.remove()
    assert not torch.equal(masks[0], masks[1])
    layered = covsvd.capture_moments(model, batches, progress=False, layerwise=True)
    assert_same(layered, covsvd.capture_moments(model, batches, progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("side", ["right", "left"])
def test_default_model_layerwise_equals_default(default_model, side):
    model, tok = default_model
    batches = covsvd.calibration_batches(tok, max_tokens=200, seq_len=40, batch_size=4, padding_side=side)
    assert any((b["attention_mask"] == 0).any() for b in batches)
    default = covsvd.capture_moments(model, batches, progress=False)
    assert_same(covsvd.capture_moments(model, batches, progress=False, layerwise=True, offload=None), default)


def test_one_block_of_accumulators_alive_at_a_time(decoders, make_batches):
    model = decoders["llama"]
    batches = make_batches([[9, 3, 12], [5, 16]])
    alive: list[list[weakref.ref]] = []
    stages = []
    for stage, moments in iter_block_moments(model, batches, progress=False):
        assert all(r() is None for refs in alive for r in refs), f"moments of an earlier stage alive at {stage}"
        assert all(n.startswith(stage + ".") for n in moments)
        alive.append([weakref.ref(m.sum_xx) for m in moments.values()])
        stages.append(stage)
        del moments
    assert stages == [b for b, _ in find_blocks(model)]  # no target outside: no BEFORE / AFTER stage


class Tupled(nn.Module):
    """A block taking keyword arguments computed before block 0 and returning a tuple (hidden, extra)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, scale=None, bias=None):
        return h + self.down(torch.tanh(self.up(h) * scale)) + bias, None


class Toy(nn.Module):
    """Embedding -> Linear (before the blocks) -> blocks fed kwargs and tuple outputs -> Linear head (after)."""

    def __init__(self, d: int = 6, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, d)
        self.proj_in = nn.Linear(d, d)
        self.layers = nn.ModuleList(Tupled(d) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, input_ids, attention_mask=None):
        h = self.proj_in(self.embed(input_ids))
        scale = 1 + input_ids[..., None].float() / 10  # (B, T, 1): computed before block 0, per batch
        bias = h.mean()
        for layer in self.layers:
            h = layer(h, scale=scale, bias=bias)[0] * 0.5  # the model's own step between blocks
        return self.head(h)


def test_targets_outside_the_blocks_and_tuple_returning_blocks(make_batches):
    torch.manual_seed(0)
    model = Toy().eval()
    batches = make_batches([[5, 2, 7]], vocab=11, seed=4)
    default = covsvd.capture_moments(model, batches, progress=False)
    stages = [(s, sorted(m)) for s, m in iter_block_moments(model, batches, progress=False)]
    assert stages[0] == (BEFORE, ["proj_in"]) and stages[-1] == (AFTER, ["head"])
    assert [s for s, _ in stages[1:-1]] == ["layers.0", "layers.1", "layers.2"]
    assert_same(covsvd.capture_moments(model, batches, progress=False, layerwise=True), default)
    # explicit block lists: the path, or names in call order
    assert_same(covsvd.capture_moments(model, batches, progress=False, layerwise=True, blocks="layers"), default)
    names = ["layers.0", "layers.1", "layers.2"]
    assert_same(covsvd.capture_moments(model, batches, progress=False, layerwise=True, blocks=names), default)
    # blocks after the last one holding targets are not run
    only0 = covsvd.capture_moments(model, batches, targets=r"layers\.0\..*", progress=False, layerwise=True)
    assert list(only0) == ["layers.0.up", "layers.0.down"]


def test_blocks_that_cannot_be_used_raise_naming_the_fix(make_batches):
    torch.manual_seed(0)
    batches = make_batches([[4, 3]], vocab=11)

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.a, self.b = nn.Embedding(11, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask=None):
            return self.b(self.a(self.embed(input_ids)))

    with pytest.raises(ValueError, match="could not find the transformer blocks.*blocks="):
        covsvd.capture_moments(Flat(), batches, progress=False, layerwise=True)
    model = Toy().eval()
    with pytest.raises(ValueError, match="blocks='nope' is not a submodule"):
        covsvd.capture_moments(model, batches, progress=False, layerwise=True, blocks="nope")
    with pytest.raises(ValueError, match="called before block"):
        covsvd.capture_moments(model, batches, progress=False, layerwise=True, blocks=["layers.1", "layers.0"])
    with pytest.raises(ValueError, match="nest"):
        find_blocks(model, ["layers.0", "layers.0.up"])

    class Skips(Toy):  # the last block is never called
        def forward(self, input_ids, attention_mask=None):
            h = self.proj_in(self.embed(input_ids))
            for layer in self.layers[:-1]:
                h = layer(h, scale=torch.ones_like(h[..., :1]), bias=0.0)[0]
            return self.head(h)

    with pytest.raises(ValueError, match="never called block 'layers.2'"):
        covsvd.capture_moments(Skips().eval(), batches, targets=r"layers\..*", progress=False, layerwise=True)

    class Shared(Toy):  # one block called twice (weight sharing)
        def forward(self, input_ids, attention_mask=None):
            h = self.proj_in(self.embed(input_ids))
            one = torch.ones_like(h[..., :1])
            for layer in (self.layers[0], self.layers[0], self.layers[1]):
                h = layer(h, scale=one, bias=0.0)[0]
            return self.head(h)

    with pytest.raises(ValueError, match="called twice"):
        covsvd.capture_moments(Shared().eval(), batches, progress=False, layerwise=True, blocks="layers")


def test_generators_modes_and_forwards_are_restored(make_batches):
    torch.manual_seed(0)
    model = Toy().train()
    batches = make_batches([[5, 2, 7], [3, 3]], vocab=11, seed=5)
    default = covsvd.capture_moments(model, batches, progress=False)
    got = covsvd.capture_moments(model, (b for b in batches), progress=True, layerwise=True, offload=None)
    assert_same(got, default)  # a generator is stored once and replayed per block
    assert all(m.training for m in model.modules())  # train flags back
    assert all("forward" not in layer.__dict__ for layer in model.layers)  # the class forwards back
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="no batches"):
        covsvd.capture_moments(model, [], progress=False, layerwise=True)


# ------------------------------------------------------------------------------------------ init_adapters


def gain_step(model, seed: int = 7) -> None:
    """Set every adapter's ``g`` to the same nonzero values (drawn in module order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in covsvd.adapters(model).values():
            adapter.g.copy_(torch.randn(adapter.g.shape, generator=g) / 2)


def outputs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out.pooler_output).double()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_init_adapters_equals_capture_then_attach(bert_tiny, make_batches, arch):
    import copy

    from covsvd.adapt.init import init_adapters

    base = tiny_decoder("llama", layers=2) if arch == "llama" else copy.deepcopy(bert_tiny)
    batches = make_batches([[9, 3, 12], [5, 16]], side="left", seed=8)
    plain = outputs(base, batches[0])
    ref, streamed = copy.deepcopy(base), copy.deepcopy(base)
    moments = covsvd.capture_moments(ref, batches, progress=False)
    want = covsvd.attach_adapters(ref, moments, r=4, metric="full", rotate="both", progress=False)
    got = init_adapters(streamed, batches, 4, "full", rotate="both", progress=False)
    assert sorted(r["name"] for r in got.rows) == sorted(r["name"] for r in want.rows)
    if arch == "bert":
        assert got.rows[-1]["name"] == "pooler.dense"  # outside the blocks: attached last
    assert got.settings["r"] == 4 and got.settings["rotate"] == "both"
    for model in (ref, streamed):
        gain_step(model)
    a, b = outputs(ref, batches[0]), outputs(streamed, batches[0])
    assert rel(a, plain) > 1e-3  # the gain step moved the outputs
    assert rel(b, a) <= 1e-5


def test_init_adapters_resumes_from_moments_dir_and_undoes_a_failed_run(make_batches, tmp_path, monkeypatch):
    import copy

    import covsvd.adapt.init as init_module

    base = tiny_decoder("llama", layers=3)
    batches = make_batches([[9, 3, 12], [5, 16]], seed=9)
    other = make_batches([[4, 4]], seed=10)  # different data: a resumed block must not see it
    done = copy.deepcopy(base)
    init_module.init_adapters(done, batches, 3, "full", moments_dir=tmp_path / "all", progress=False)
    files = sorted(p.name for p in (tmp_path / "all").iterdir())
    assert files == [f"{k:04d}-model.layers.{k}.moments.safetensors" for k in range(3)]

    real, calls = init_module.build_adapters, []

    def flaky(*args, **kwargs):  # the second block's attach fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    broken = copy.deepcopy(base)
    flags = {n: p.requires_grad for n, p in broken.named_parameters()}
    monkeypatch.setattr(init_module, "build_adapters", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        init_module.init_adapters(broken, batches, 3, "full", moments_dir=tmp_path / "part", progress=False)
    monkeypatch.undo()
    assert not covsvd.adapters(broken) and {n: p.requires_grad for n, p in broken.named_parameters()} == flags
    assert len(list((tmp_path / "part").iterdir())) == 2  # blocks 0 and 1 were saved before attaching

    # resume: blocks 0 and 1 from their files (so `other` never reaches them), block 2 recaptured on `other`
    init_module.init_adapters(broken, other, 3, "full", moments_dir=tmp_path / "part", progress=False)
    resumed = copy.deepcopy(base)
    init_module.init_adapters(resumed, other, 3, "full", moments_dir=tmp_path / "all", progress=False)
    for model in (done, broken, resumed):
        gain_step(model)
    assert rel(outputs(resumed, batches[0]), outputs(done, batches[0])) <= 1e-6  # every block from the files
    mixed = {n: a.U for n, a in covsvd.adapters(broken).items()}
    full = {n: a.U for n, a in covsvd.adapters(done).items()}
    for n in full:  # block 0 was attached, then its original module put back: its W, and so its U, are exact
        same = torch.equal(mixed[n], full[n])
        assert not same if ".layers.2." in n else same, n

    with pytest.raises(ValueError, match="different model"):
        init_module.init_adapters(tiny_decoder("qwen2", layers=3), batches, 3, "full",
                                  capture={"blocks": "model.layers"}, moments_dir=tmp_path / "all", progress=False)


def test_init_adapters_ranks_kinds_and_early_errors(make_batches):
    from covsvd.adapt.init import init_adapters

    model = tiny_decoder("llama", layers=1)
    batches = make_batches([[9, 12]], seed=11)
    names = covsvd.find_targets(model)
    ranks = {n: 1 + k % 3 for k, n in enumerate(names)}
    report = init_adapters(model, batches, ranks, "diag", progress=False)  # kind None -> diag
    assert {r["name"]: r["r"] for r in report.rows} == ranks
    assert all(m.config["metric"] == "diag" for m in covsvd.adapters(model).values())
    covsvd.detach_adapters(model)
    with pytest.raises(ValueError, match="without an entry"):
        init_adapters(model, [], {names[0]: 2}, "full", targets=names, progress=False)  # before any data is read
    with pytest.raises(ValueError, match="kind='diag'"):
        init_adapters(model, [], 2, "full", capture={"kind": "diag"}, progress=False)
    report = init_adapters(model, [], 2, "identity", progress=False)  # no data needed
    assert len(report.rows) == len(names)
