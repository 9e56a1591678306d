"""The plan step: every target checked before anything runs, the model left bit-identical on failure, moments
and files bound to the weights they came from, and models holding wrapped layers refused."""

import copy

import pytest
import torch
from conftest import padded_batches, tiny_decoder

import covsvd


def state(model):
    """Every number, every module object, every flag: what "bit-identical" compares."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: (id(m), m.training) for n, m in model.named_modules()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_identical(model, before):
    tensors, modules, flags = state(model)
    assert modules == before[1] and flags == before[2]
    assert tensors.keys() == before[0].keys()
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)


def batches(seed=0):
    return padded_batches([[9, 4, 12], [6, 6]], vocab=97, seed=seed)


class Forwards:
    """Counts the model's forward calls (a pre-hook): what ran before an error."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("case", ["rank too large in block 1", "NaN weight in block 1", "tied head"])
def test_init_checks_every_target_before_any_data_runs(case, layerwise):
    model = tiny_decoder("qwen2" if case == "tied head" else "llama", layers=2)
    names = covsvd.find_targets(model)
    r, targets = 4, None
    if case == "rank too large in block 1":
        r = {n: (40 if n == "model.layers.1.mlp.down_proj" else 4) for n in names}
    elif case == "NaN weight in block 1":
        with torch.no_grad():
            model.get_submodule("model.layers.1.self_attn.o_proj").weight[0, 0] = float("nan")
    else:
        targets = r".*(q_proj|lm_head)"  # the tied head named explicitly
    before, calls = state(model), Forwards(model)
    match = {"rank too large in block 1": r"layers\.1\.mlp\.down_proj.*r=40 exceeds",
             "NaN weight in block 1": r"layers\.1\.self_attn\.o_proj.*non-finite", "tied head": "lm_head.*tied"}[case]
    with pytest.raises(ValueError, match=match):
        covsvd.init_adapters(model, batches(), r, "full", targets=targets, capture={"layerwise": layerwise},
                             progress=False)
    assert calls.n == 0, "a forward ran before the error"
    calls.handle.remove()
    if case != "NaN weight in block 1":  # NaN != NaN: the weights are compared by the other two cases
        assert_identical(model, before)


def test_a_failed_init_leaves_the_model_bit_identical(monkeypatch):
    import covsvd.adapt.init as init_module

    model = tiny_decoder("llama", layers=3)
    model.train()
    model.get_submodule("model.layers.0.mlp").eval()  # mixed flags must come back as they were
    model.get_submodule("model.embed_tokens").weight.requires_grad_(False)
    before, real, calls = state(model), init_module.build_adapters, []

    def fails_on_the_third_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(init_module, "build_adapters", fails_on_the_third_block)
    with pytest.raises(RuntimeError, match="interrupted"):
        covsvd.init_adapters(model, batches(), 3, "full", progress=False)
    assert len(calls) == 3 and not covsvd.adapters(model)
    assert_identical(model, before)


def test_adapters_keep_the_train_flags_and_detach_restores_them():
    model = tiny_decoder("llama", layers=2).eval()
    moments = covsvd.capture_moments(model, batches(), progress=False)
    covsvd.attach_adapters(model, moments, r=3, progress=False)
    assert not any(m.training for m in model.modules())
    covsvd.detach_adapters(model)
    assert not any(m.training for m in model.modules())
    model.train()
    covsvd.init_adapters(model, batches(), 3, progress=False)  # the layerwise capture runs in eval mode
    assert all(m.training for m in covsvd.adapters(model).values())
    covsvd.detach_adapters(model)
    assert all(m.training for m in model.modules())


def test_moments_of_other_weights_are_refused_everywhere_unless_asked(tmp_path):
    base = tiny_decoder("llama", layers=2)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_submodule("model.layers.1.mlp.up_proj").weight.mul_(1.1)  # a "fine-tune": one weight moved
    moments = covsvd.capture_moments(base, batches(), progress=False)
    calls = {
        "attach": lambda **kw: covsvd.attach_adapters(copy.deepcopy(tuned), moments, r=2, progress=False, **kw),
        "export": lambda **kw: covsvd.export_peft(tuned, moments, tmp_path / f"x{len(kw)}", r=2, progress=False,
                                                  **kw),
        "allocate": lambda **kw: covsvd.allocate_ranks(tuned, moments, 10_000, progress=False, **kw),
    }
    for call in calls.values():
        with pytest.raises(ValueError, match="other weights of the same architecture.*check_weights=False"):
            call()
        call(check_weights=False)  # the named override
    path = covsvd.save_moments(moments, tmp_path / "m.safetensors", model=base)
    with pytest.raises(ValueError, match="other weights"):
        covsvd.load_moments(path, model=tuned)
    covsvd.init_adapters(copy.deepcopy(base), batches(), 2, moments_dir=tmp_path / "resume", progress=False)
    with pytest.raises(ValueError, match="other weights"):  # a resume directory of the base's moments
        covsvd.init_adapters(copy.deepcopy(tuned), batches(), 2, moments_dir=tmp_path / "resume", progress=False)


def test_models_holding_peft_layers_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    llama = tiny_decoder("llama", layers=2)
    inner = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).base_model.model
    moments = covsvd.capture_moments(inner, batches(), progress=False)  # reading the model is harmless
    before = state(inner)
    with pytest.raises(ValueError, match=r"q_proj.*peft\.tuners.*merge_and_unload"):
        covsvd.export_peft(inner, moments, tmp_path / "x", r=2, progress=False)
    with pytest.raises(ValueError, match="peft"):
        covsvd.attach_adapters(inner, None, r=2, metric="identity", progress=False)
    assert_identical(inner, before)
    assert not (tmp_path / "x").exists()


def test_a_model_with_every_target_adapted_is_told_so():
    model = tiny_decoder("llama", layers=1)
    covsvd.attach_adapters(model, None, r=2, metric="identity", progress=False)
    with pytest.raises(ValueError, match="every default target of LlamaForCausalLM already carries a covsvd adapter"):
        covsvd.attach_adapters(model, None, r=2, metric="identity", progress=False)


def test_a_budget_beyond_full_rank_is_capped():
    model = tiny_decoder("llama", layers=1)
    moments = covsvd.capture_moments(model, batches(), progress=False)
    ranks = covsvd.allocate_ranks(model, moments, 10**12, cost="gain", progress=False)  # 8 TB uncapped
    assert ranks == {n: min(covsvd.weight_matrix(model.get_submodule(n)).shape) for n in moments}


def test_check_sufficient_names_what_it_needs():
    with pytest.raises(TypeError, match="SecondMoment"):
        covsvd.check_sufficient({"a": torch.eye(3)})


def test_a_capture_option_given_to_init_is_refused_before_any_data_runs():
    model = tiny_decoder("llama", layers=1)
    calls = Forwards(model)
    with pytest.raises(TypeError, match=r"\['token_mask'\] are capture options: pass capture=\{'token_mask': \.\.\.\}"):
        covsvd.init_adapters(model, batches(), 2, token_mask="labels", progress=False)
    with pytest.raises(TypeError, match="orient's keywords are"):
        covsvd.attach_adapters(model, None, r=2, metric="identity", solvr="eigh", progress=False)
    assert calls.n == 0
