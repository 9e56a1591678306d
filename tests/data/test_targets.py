"""Target selection follows peft's ``target_modules``: names match by full name or dotted suffix, a string is a
full-match regex."""

import pytest
from conftest import tiny_decoder

import covsvd


@pytest.fixture(scope="module")
def llama():
    return tiny_decoder("llama", layers=2)


def test_names_select_every_module_ending_with_them(llama):
    names = covsvd.find_targets(llama, ["q_proj", "v_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert covsvd.find_targets(llama, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]
    assert covsvd.find_targets(llama, ["layers.1.mlp.down_proj", "q_proj"])[-1] == "model.layers.1.mlp.down_proj"


def test_a_string_is_a_full_match_regex_and_says_how_to_select_by_name(llama):
    assert covsvd.find_targets(llama, r".*\.q_proj") == covsvd.find_targets(llama, ["q_proj"])
    with pytest.raises(ValueError, match=r"targets=\['q_proj'\]"):
        covsvd.find_targets(llama, "q_proj")  # a regex matching no full name: the list form is suggested


def test_bad_specs_raise_one_clear_error(llama):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        covsvd.find_targets(llama, "model.layers.(")
    with pytest.raises(ValueError, match="'k_projj' is not a module.*similar"):
        covsvd.find_targets(llama, ["k_projj"])
    with pytest.raises(ValueError, match="is a LlamaAttention, not nn.Linear"):
        covsvd.find_targets(llama, ["self_attn"])
    with pytest.raises(ValueError, match="empty list"):
        covsvd.find_targets(llama, [])


def test_attach_and_export_take_peft_style_targets(llama, tmp_path):
    import copy

    model = copy.deepcopy(llama)
    report = covsvd.attach_adapters(model, None, r=2, metric="identity", targets=["q_proj", "v_proj"], progress=False)
    assert [row["name"] for row in report.rows] == covsvd.find_targets(llama, ["q_proj", "v_proj"])
