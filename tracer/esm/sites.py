"""Where each tap lives in fair-esm's ``ESM2`` modules: the one module <-> tap table.

Two readers use it:

* the hooks on fair-esm's own padded forward (:mod:`tracer.capture.hooks`, rows marked
  ``padded``), which know the module's exact call and layout;
* the observer of a user's forward (:mod:`tracer.capture.observe`, rows marked ``observed``),
  which cannot assume that the layer module itself is called, so it reads the residual stream
  at the inputs of the LayerNorms every implementation must call, and marks the current layer
  from the q/k/v projections.

Layouts in the padded forward: ``TBE`` = ``(T, B, E)``, ``BHTd`` = ``(B*H, T, d)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tracer.taps import EMBED, FINAL


@dataclass(frozen=True)
class ModuleSite:
    """One place in ``ESM2`` where a tap (or an observer role) is read.

    Attributes:
        role: the site it gives (``q_rope`` ... ``final_norm``), or an observer role:
            ``rot_emb`` (q and k after RoPE together), ``layer_mark`` (marks the current layer).
        module: ``(model, layer) -> module`` to hook.
        hook: ``pre`` (the module's input) or ``post`` (its output).
        item: index of the tensor in the input/output tuple; ``None`` = the tensor itself.
        layout: the tensor's layout in fair-esm's padded forward (``TBE``, ``BHTd``).
        layer_shift: the tap's layer minus the module's (``-1``: the input of layer i's first
            LayerNorm is layer i-1's output; at layer 0 it is ``embed``).
        padded: used by the hooks on fair-esm's padded forward.
        observed: used by the observer of plug-ins.
        per_layer: one module per layer (``False``: a module of the whole model, read once).
    """

    role: str
    module: Callable
    hook: str
    item: int | None
    layout: str
    layer_shift: int = 0
    padded: bool = False
    observed: bool = False
    per_layer: bool = True


def _attn(name):
    return lambda m, i: getattr(m.layers[i].self_attn, name)


SITES_TABLE: tuple[ModuleSite, ...] = (
    # fair-esm's padded forward, read where its own modules produce each value
    ModuleSite("q_rope", _attn("rot_emb"), "post", 0, "BHTd", padded=True),
    ModuleSite("k_rope", _attn("rot_emb"), "post", 1, "BHTd", padded=True),
    ModuleSite("v", _attn("v_proj"), "post", None, "TBE", padded=True, observed=True),
    ModuleSite("ctx", _attn("out_proj"), "pre", 0, "TBE", padded=True, observed=True),
    ModuleSite("attn_out", lambda m, i: m.layers[i].self_attn, "post", 0, "TBE", padded=True),
    ModuleSite("resid_mid", lambda m, i: m.layers[i].final_layer_norm, "pre", 0, "TBE", padded=True, observed=True),
    ModuleSite("ffn_out", lambda m, i: m.layers[i].fc2, "post", None, "TBE", padded=True, observed=True),
    ModuleSite("resid_out", lambda m, i: m.layers[i], "post", 0, "TBE", padded=True),
    ModuleSite(EMBED, lambda m, i: m.layers[0], "pre", 0, "TBE", padded=True, per_layer=False),
    ModuleSite(FINAL, lambda m, i: m.emb_layer_norm_after, "post", None, "TBE", padded=True, observed=True, per_layer=False),
    # what the observer reads instead where a plug-in need not call the same module
    ModuleSite("attn_out", _attn("out_proj"), "post", None, "TBE", observed=True),
    ModuleSite("resid_out", lambda m, i: m.layers[i].self_attn_layer_norm, "pre", 0, "TBE", layer_shift=-1, observed=True),
    ModuleSite("resid_out", lambda m, i: m.emb_layer_norm_after, "pre", 0, "TBE", observed=True, per_layer=False),
    ModuleSite("rot_emb", _attn("rot_emb"), "post", None, "BHTd", observed=True),
    ModuleSite("layer_mark", _attn("q_proj"), "pre", 0, "TBE", observed=True),
    ModuleSite("layer_mark", _attn("k_proj"), "pre", 0, "TBE", observed=True),
    ModuleSite("layer_mark", _attn("v_proj"), "pre", 0, "TBE", observed=True),
    ModuleSite("layer_mark", lambda m, i: m.layers[i].self_attn_layer_norm, "pre", 0, "TBE", observed=True),  # fused q/k/v weights skip the projections
)
"""Every module <-> tap row (see :class:`ModuleSite`); a test pins it."""


def _hf(path: str):
    return lambda m, i: m.encoder.layer[i].get_submodule(path)


def _hf_model(path: str):
    return lambda m, i: m.get_submodule(path)


HF_SITES_TABLE: tuple[ModuleSite, ...] = (
    # Hugging Face transformers' EsmModel (5.x), read by the observer of the hf paths
    # (:mod:`tracer.capture.hf_paths`); layouts: BTE = (B, T, E), BHTd = (B, H, T, d) (batch 1: padding-free)
    ModuleSite("resid_out", _hf("attention.LayerNorm"), "pre", 0, "BTE", layer_shift=-1, observed=True),  # embed at layer 0
    ModuleSite("q_rope", _hf("attention.self"), "call", 1, "BHTd", observed=True),  # the attention function's query
    ModuleSite("k_rope", _hf("attention.self"), "call", 2, "BHTd", observed=True),  # ... its key
    ModuleSite("v", _hf("attention.self"), "call", 3, "BHTd", observed=True),  # ... its value
    ModuleSite("v", _hf("attention.self.value"), "post", None, "BTE", observed=True),  # if no attention call is seen
    ModuleSite("ctx", _hf("attention.output.dense"), "pre", 0, "BTE", observed=True),
    ModuleSite("attn_out", _hf("attention.output.dense"), "post", None, "BTE", observed=True),
    ModuleSite("resid_mid", _hf("LayerNorm"), "pre", 0, "BTE", observed=True),
    ModuleSite("ffn_out", _hf("output.dense"), "post", None, "BTE", observed=True),
    ModuleSite("resid_out", _hf_model("encoder.emb_layer_norm_after"), "pre", 0, "BTE", observed=True, per_layer=False),
    ModuleSite(FINAL, _hf_model("encoder.emb_layer_norm_after"), "post", None, "BTE", observed=True, per_layer=False),
    ModuleSite("layer_mark", _hf("attention.self.query"), "pre", 0, "BTE", observed=True),
    ModuleSite("layer_mark", _hf("attention.self.key"), "pre", 0, "BTE", observed=True),
    ModuleSite("layer_mark", _hf("attention.self.value"), "pre", 0, "BTE", observed=True),
)
"""Hugging Face ``EsmModel``'s module <-> tap rows (``hook`` ``call``: the arguments the attention
function receives from that module, ``item`` = their position: module, query, key, value)."""


def padded_sites() -> dict:
    """``{site: ModuleSite}`` for the hooks on fair-esm's padded forward."""
    return {s.role: s for s in SITES_TABLE if s.padded}


def observed_sites() -> list[ModuleSite]:
    """The rows the plug-in observer hooks."""
    return [s for s in SITES_TABLE if s.observed]
