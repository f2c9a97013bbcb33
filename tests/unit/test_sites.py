"""The one module <-> tap table, pinned, and what each reader derives from it."""

import pytest
from esm.model.esm2 import ESM2

from tracer.capture.hooks import _UNPACKED_SITES
from tracer.capture.observe import module_roles
from tracer.esm.sites import SITES_TABLE
from tracer.taps import EMBED, FINAL, SITES


@pytest.fixture(scope="module")
def model():
    return ESM2(num_layers=2, embed_dim=32, attention_heads=4, token_dropout=True)


def test_table_is_pinned():
    rows = [(s.role, s.hook, s.item, s.layout, s.layer_shift, s.padded, s.observed, s.per_layer) for s in SITES_TABLE]
    assert rows == [
        ("q_rope", "post", 0, "BHTd", 0, True, False, True),
        ("k_rope", "post", 1, "BHTd", 0, True, False, True),
        ("v", "post", None, "TBE", 0, True, True, True),
        ("ctx", "pre", 0, "TBE", 0, True, True, True),
        ("attn_out", "post", 0, "TBE", 0, True, False, True),
        ("resid_mid", "pre", 0, "TBE", 0, True, True, True),
        ("ffn_out", "post", None, "TBE", 0, True, True, True),
        ("resid_out", "post", 0, "TBE", 0, True, False, True),
        (EMBED, "pre", 0, "TBE", 0, True, False, False),
        (FINAL, "post", None, "TBE", 0, True, True, False),
        ("attn_out", "post", None, "TBE", 0, False, True, True),
        ("resid_out", "pre", 0, "TBE", -1, False, True, True),
        ("resid_out", "pre", 0, "TBE", 0, False, True, False),
        ("rot_emb", "post", None, "BHTd", 0, False, True, True),
        ("layer_mark", "pre", 0, "TBE", 0, False, True, True),
        ("layer_mark", "pre", 0, "TBE", 0, False, True, True),
        ("layer_mark", "pre", 0, "TBE", 0, False, True, True),
        ("layer_mark", "pre", 0, "TBE", 0, False, True, True),
    ]


def test_padded_hooks_cover_every_tap_once():
    assert sorted(_UNPACKED_SITES) == sorted([*SITES, EMBED, FINAL])


def test_observer_roles_per_module(model):
    by_module = {id(m): (m, sorted(r)) for m, r in module_roles(model).values()}
    l0, l1 = model.layers
    expect = {
        id(l0.self_attn_layer_norm): [("pre", EMBED, -1), ("pre", "layer_mark", 0)],
        id(l1.self_attn_layer_norm): [("pre", "layer_mark", 1), ("pre", "resid_out", 0)],
        id(l1.final_layer_norm): [("pre", "resid_mid", 1)],
        id(l1.self_attn.out_proj): [("post", "attn_out", 1), ("pre", "ctx", 1)],
        id(l1.fc2): [("post", "ffn_out", 1)],
        id(l1.self_attn.v_proj): [("post", "v", 1), ("pre", "layer_mark", 1)],
        id(l1.self_attn.q_proj): [("pre", "layer_mark", 1)],
        id(l1.self_attn.rot_emb): [("post", "rot_emb", 1)],
        id(model.emb_layer_norm_after): [("post", FINAL, -1), ("pre", "resid_out", 1)],
    }
    for key, roles in expect.items():
        assert by_module[key][1] == roles
    assert len(by_module) == 2 * 8 + 1  # 8 hooked modules per layer, plus the final LayerNorm
