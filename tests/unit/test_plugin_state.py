"""The model state a plug-in's factory receives: a view, never a change to the user's model."""

import pytest
import torch

from tracer.capture.plugin_state import plugin_view
from tracer.errors import TracerError
from tracer.esm.models import Architecture, build_random, set_precision


def test_rotary_fp32_view_changes_only_the_plugins_buffers():
    model = build_random(Architecture("custom", 2, 64, 4), seed=0)
    set_precision(model, torch.device("cpu"), torch.bfloat16)
    before = [(layer.self_attn.rot_emb, layer.self_attn.rot_emb.inv_freq) for layer in model.layers]
    hits = []
    model.layers[0].fc1.register_forward_hook(lambda *a: hits.append(1))
    view = plugin_view(model, "rotary-fp32")
    for (rot, inv), layer, mine in zip(before, model.layers, view.layers):
        assert layer.self_attn.rot_emb is rot and layer.self_attn.rot_emb.inv_freq is inv  # the user's model: untouched
        assert inv.dtype == torch.bfloat16
        assert mine.self_attn.rot_emb is not rot and mine.self_attn.rot_emb.inv_freq.dtype == torch.float32
        assert torch.equal(mine.self_attn.rot_emb.inv_freq.to(torch.bfloat16), inv)  # the same values, not rounded
        assert mine.self_attn.q_proj.weight is layer.self_attn.q_proj.weight  # parameters shared, not copied
        assert not mine._forward_hooks and not mine.self_attn._forward_hooks
    assert view.embed_tokens is model.embed_tokens
    assert plugin_view(model, "as-loaded") is model
    with pytest.raises(TracerError, match="unknown plug-in state"):
        plugin_view(model, "fp64")
