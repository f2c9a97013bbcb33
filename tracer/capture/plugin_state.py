"""Model state handed to a plug-in's factory: as the run has it, or with one thing changed.

``tracer.experiments`` names a cause inside a plug-in without editing it by changing only the
state its factory receives. The other paths (fair-esm's, the control, the reference) keep the
model exactly as loaded: a changed state is a *view* of the model, built for the plug-in alone.
Only the modules on the way to what changes are copied (shallow ``copy.copy``, with their own
``_modules``/``_buffers`` dicts and no hooks); every parameter and every other module is the
model's own object, so the view costs no memory and the user's model is never written.

States (:data:`STATES`):

* ``as-loaded`` -- the model itself (the default; nothing is copied).
* ``rotary-fp32`` -- every rotary module's ``inv_freq`` buffer kept in float32: the values the
  model was loaded with, up-cast exactly (:func:`tracer.esm.models.loaded_inv_freq`; the reference
  and the control use these), instead of the copy ``model.to(dtype)`` rounded. If a plug-in's
  drift disappears under this state, its RoPE reads the cast buffer.

Example::

    view = plugin_view(model, "rotary-fp32")   # model untouched; view.layers[0].self_attn.rot_emb.inv_freq is float32
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch

from tracer.errors import TracerError
from tracer.esm.models import loaded_inv_freq
from tracer.esm.precision import clear_rotary_cache

STATES = {
    "as-loaded": "the model as the run has it",
    "rotary-fp32": "rotary inv_freq buffers kept in float32 (the loaded values, up-cast exactly)",
}

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _own(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of ``module`` with its own module/buffer dicts and no hooks (parameters shared)."""
    twin = copy.copy(module)
    twin._modules = OrderedDict(module._modules)
    twin._buffers = OrderedDict(module._buffers)
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            twin.__dict__[name] = OrderedDict()
    return twin


def plugin_view(model, state: str = "as-loaded"):
    """The model the plug-in's factory receives under ``state`` (module docstring)."""
    if state not in STATES:
        raise TracerError(f"unknown plug-in state {state!r}; choose one of {', '.join(STATES)}")
    if state == "as-loaded":
        return model
    view = _own(model)
    layers = _own(model.layers)
    for i, layer in enumerate(model.layers):
        rot = layer.self_attn.rot_emb
        new_rot = _own(rot)
        new_rot._buffers["inv_freq"] = loaded_inv_freq(rot).to(device=rot.inv_freq.device, dtype=torch.float32)
        clear_rotary_cache(new_rot)  # rebuilt from the new buffer
        attn = _own(layer.self_attn)
        attn._modules["rot_emb"] = new_rot
        new_layer = _own(layer)
        new_layer._modules["self_attn"] = attn
        layers._modules[str(i)] = new_layer
    view._modules["layers"] = layers
    return view
