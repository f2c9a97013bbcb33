"""fair-esm ESM-2 <-> Hugging Face EsmModel: exact both ways, folders, configs, one-line errors."""

import json
import sys

import pytest
import torch

from tracer.errors import TracerError
from tracer.esm import hf_convert
from tracer.esm.models import load_model

MODELS = ["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"]


def _same(a: dict, b: dict, keys) -> list[str]:
    """Keys whose tensors differ in dtype, shape or any bit."""
    return [k for k in keys if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def _hf(cls_name: str, state: dict, arch):
    import transformers

    cls = getattr(transformers, cls_name)
    kwargs = {"add_pooling_layer": False} if cls_name == "EsmModel" else {}
    with torch.device("meta"):
        hf = cls(hf_convert.hf_config(arch), **kwargs)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


@pytest.mark.parametrize("name", MODELS)
def test_fair_to_hf_to_fair_is_bitwise(name):
    model, arch, _ = load_model(name, "random", seed=0)
    fair = model.state_dict()
    hf_state = hf_convert.fair_to_hf(fair, arch.num_layers, masked_lm=True)
    hf = _hf("EsmForMaskedLM", hf_state, arch)  # every key HF expects is there, none extra
    back = hf_convert.hf_to_fair(hf.state_dict(), arch.num_layers)
    assert set(back) == set(fair)
    assert _same(back, fair, fair) == []


@pytest.mark.parametrize("name", MODELS)
def test_hf_to_fair_to_hf_is_bitwise(name):
    model, arch, _ = load_model(name, "random", seed=1)
    hf = _hf("EsmForMaskedLM", hf_convert.fair_to_hf(model.state_dict(), arch.num_layers, masked_lm=True), arch)
    # an HF model with its own values: every tensor perturbed, so nothing can come from fair-esm by accident
    hf_state = {k: v + 0.5 if v.is_floating_point() else v for k, v in hf.state_dict().items()}
    hf_state["lm_head.decoder.weight"] = hf_state["esm.embeddings.word_embeddings.weight"]  # tied, as in HF
    again = hf_convert.fair_to_hf(hf_convert.hf_to_fair(hf_state, arch.num_layers), arch.num_layers, masked_lm=True)
    assert set(again) == set(hf_state)
    assert _same(again, hf_state, hf_state) == []


def test_save_pretrained_folder_loads_as_the_same_fair_esm_model(tmp_path):
    model, arch, _ = load_model("esm2_t6_8M_UR50D", "random", seed=0)
    fair = model.state_dict()
    inv = fair["layers.0.self_attn.rot_emb.inv_freq"].half().float()  # a released checkpoint's fp16-rounded buffer
    for i in range(arch.num_layers):
        fair[f"layers.{i}.self_attn.rot_emb.inv_freq"] = inv
    hf = _hf("EsmForMaskedLM", hf_convert.fair_to_hf(fair, arch.num_layers, masked_lm=True), arch)
    hf.save_pretrained(tmp_path)  # transformers 5.x writes LayerNorm.gamma/beta and a pattern inv_freq key
    loaded, found, weights = hf_convert.load_hf_folder(tmp_path)
    assert found.name == "esm2_t6_8M_UR50D" and weights.source == "hf-folder"
    got = loaded.state_dict()
    assert _same(got, fair, [k for k in fair if not k.startswith("contact_head")]) == []


def test_esm_model_folder_without_head_loads(tmp_path):
    model, arch, _ = load_model("esm2_t6_8M_UR50D", "random", seed=0)
    fair = model.state_dict()
    _hf("EsmModel", hf_convert.fair_to_hf(fair, arch.num_layers), arch).save_pretrained(tmp_path)
    loaded, _, _ = hf_convert.load_hf_folder(tmp_path)
    got = loaded.state_dict()
    assert _same(got, fair, [k for k in fair if k.startswith(("layers.", "embed_tokens", "emb_layer_norm_after"))]) == []


def test_config_round_trip_names_the_architecture():
    model, arch, _ = load_model("esm2_t6_8M_UR50D", "random", seed=0)
    cfg = hf_convert.hf_config(arch).to_dict()
    assert hf_convert.architecture_of(cfg, "x") == arch


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"position_embedding_type": "absolute"}, "position_embedding_type is 'absolute'"),
        ({"emb_layer_norm_before": True}, "emb_layer_norm_before"),
        ({"intermediate_size": 7}, "intermediate_size = 4 x hidden_size"),
        ({"is_folding_model": True}, "is_folding_model"),
    ],
)
def test_a_config_that_is_no_esm2_is_one_line(tmp_path, change, fragment):
    _, arch, _ = load_model("esm2_t6_8M_UR50D", "random", seed=0)
    cfg = {**hf_convert.hf_config(arch).to_dict(), **change}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TracerError, match=fragment.replace("(", r"\(")):
        hf_convert.load_hf_folder(tmp_path)


def test_folder_without_safetensors_is_one_line(tmp_path):
    _, arch, _ = load_model("esm2_t6_8M_UR50D", "random", seed=0)
    (tmp_path / "config.json").write_text(json.dumps(hf_convert.hf_config(arch).to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(TracerError, match="no \\*.safetensors file .*pytorch_model.bin"):
        hf_convert.load_hf_folder(tmp_path)


def test_missing_transformers_is_one_line(monkeypatch):
    for mod in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(TracerError) as e:
        hf_convert.require_transformers("--packed hf")
    assert str(e.value).count("\n") == 0
    assert "--packed hf need the Hugging Face extra" in str(e.value) and "pip install 'tracer[hf]'" in str(e.value)


def test_transformers_4_is_refused_in_one_line(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(TracerError, match="need transformers>=5.17 .* this is transformers 4.57.1, whose ESM RoPE takes no position_ids"):
        hf_convert.require_transformers("--unpacked hf")
