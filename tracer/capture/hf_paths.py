"""Hugging Face ESM-2 as traced paths: ``--unpacked hf`` (padded) and ``--packed hf`` (padding-free).

An HF path is a plug-in that tracer ships (:class:`tracer.capture.plugin.Plugin`, run by
:class:`tracer.capture.paths.PluginPath`): its factory converts the run's fair-esm model to an HF
``EsmModel`` (:mod:`tracer.esm.hf_model`) and returns the padded or padding-free forward. Its
taps are captured by :class:`HfObserver`, the plug-in :class:`tracer.capture.observe.Observer`
with HF's modules in place of fair-esm's, from ONE table
(:data:`tracer.esm.sites.HF_SITES_TABLE`); names, layouts and the checks for missing or partial
taps are the plug-in ones::

    HF module (EsmModel)                            hook    tap
    encoder.layer.{i}.attention.LayerNorm           input   embed (i = 0) / layers.{i-1}.resid_out
    encoder.layer.{i}.attention.self  (attention    call    layers.{i}.q_rope, k_rope, v
       interface: query/key/value as consumed)
    encoder.layer.{i}.attention.self.value          output  layers.{i}.v (if no attention call is seen)
    encoder.layer.{i}.attention.output.dense        input   layers.{i}.ctx
    encoder.layer.{i}.attention.output.dense        output  layers.{i}.attn_out
    encoder.layer.{i}.LayerNorm                     input   layers.{i}.resid_mid
    encoder.layer.{i}.output.dense                  output  layers.{i}.ffn_out
    encoder.emb_layer_norm_after                    input   layers.{L-1}.resid_out
    encoder.emb_layer_norm_after                    output  final_norm

``q_rope``: HF scales q by ``head_dim ** -0.5`` before RoPE (as fair-esm does) and calls the
attention function with ``scaling=1.0``, so the query the interface receives is already in
fair-esm's convention; the scale argument is applied as for any kernel (a no-op at 1.0).

The attention call is seen through HF's own dispatch: while any HF observer is active,
``modeling_esm``'s ``ALL_ATTENTION_FUNCTIONS`` is a view that hands every ESM attention module
the function HF would have chosen, wrapped to record query/key/value and call it with the very
same arguments. The wrapper finds its observer by the attention module's identity (so two HF
paths in lockstep threads each see their own), and the view is removed when the last observer
leaves. Tracing leaves HF's output bitwise unchanged (tested).

Example::

    plugin = hf_plugin("packed", dtype_by="to", backend=attention.resolve("math", cpu, torch.float32))
    path = HfPath(plugin, model)          # a PluginPath
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from tracer.esm.attention import Backend
from tracer.errors import TracerError
from tracer.inputs.faults import Faults
from tracer.capture.observe import Observer, module_roles
from tracer.capture.paths import PluginPath
from tracer.capture.plugin import Plugin, held_modules
from tracer.esm.sites import HF_SITES_TABLE

SPEC = "hf"
FAULT_SWITCHES = ("positions_not_restarted", "leak_across_sequences")
"""The ``--fault`` switches the padding-free HF path honours (on every layer)."""


@dataclass(frozen=True)
class HfPlugin(Plugin):
    """The plug-in of an HF path; ``backend``: the padding-free side's kernel (``None`` when padded)."""

    backend: Backend | None = None
    switches: tuple[str, ...] = ()


def is_hf(plugin) -> bool:
    return isinstance(plugin, HfPlugin)


def path_for(plugin: Plugin, model, pack_order: str) -> PluginPath:
    """The traced path of a plug-in: :class:`HfPath` for tracer's HF one, and for a user's
    forward that holds an HF ``EsmModel`` (:func:`held_hf_model`: its taps are read with HF's
    module table); else :class:`PluginPath` (fair-esm's modules)."""
    if is_hf(plugin):
        return HfPath(plugin, model, pack_order)
    path = PluginPath(plugin, model, pack_order)
    hf = held_hf_model(path.forward)
    if hf is not None:
        return HfPath(plugin, model, pack_order, forward=path.forward, hf=hf)
    own = [m for m in held_modules(path.forward, type(model)) if m is not model]
    if len(own) == 1:  # the forward runs its own copy of the model (copy.deepcopy in its factory)
        path.observed = own[0]
    return path


def held_hf_model(forward):
    """The one HF ``EsmModel`` a user's forward holds (:func:`tracer.capture.plugin.held_modules`;
    an ``EsmForMaskedLM`` holds one), else ``None``: only if the user's code imported HF's ESM,
    and two different models found is ``None`` (ambiguous)."""
    modeling = sys.modules.get("transformers.models.esm.modeling_esm")
    if modeling is None:
        return None
    found = held_modules(forward, modeling.EsmModel)
    return found[0] if len(found) == 1 else None


def load_side(spec, side: str, config, device, dtype) -> Plugin | None:
    """``--{side} SPEC``: the HF plug-in for ``hf`` (options from ``config``: ``hf_dtype_by``,
    ``hf_attn``, ``attn``, ``faults``), else :func:`tracer.capture.plugin.load`."""
    from tracer.capture.plugin import load
    from tracer.esm import attention

    if not (isinstance(spec, str) and spec == SPEC):
        return load(spec, side)
    backend = attention.resolve(config.attn, device, dtype) if side == "packed" else None
    return hf_plugin(side, config.hf_dtype_by, config.hf_attn, backend, config.faults if side == "packed" else None)

def _rows(hook_is_call: bool):
    return [r for r in HF_SITES_TABLE if (r.hook == "call") == hook_is_call]


def hf_module_roles(hf) -> dict[int, tuple[object, list[tuple[str, str, int]]]]:
    """``{id(module): (module, [(hook, role, layer)])}`` of the hooked rows of :data:`HF_SITES_TABLE`."""
    return module_roles(hf, _rows(False), num_layers=len(hf.encoder.layer))


def attention_modules(hf) -> dict[int, int]:
    """``{id(attention module): layer}``: the modules HF passes to the attention function."""
    row = _rows(True)[0]
    return {id(row.module(hf, i)): i for i in range(len(hf.encoder.layer))}


# ---------------------------------------------------------------------------------------------
# The attention-interface view, shared by every active HF observer.


class _Dispatch:
    """Reference-counted view over ``modeling_esm.ALL_ATTENTION_FUNCTIONS`` (module docstring)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.observers: dict[int, list[tuple["HfObserver", int]]] = {}  # id(attention module) -> [(observer, layer)]
        self.saved = None
        self.users = 0

    def enter(self, observer: "HfObserver", modules: dict[int, int]) -> None:
        from transformers.models.esm import modeling_esm

        with self.lock:
            for key, layer in modules.items():  # two paths may share a model (one per lockstep thread)
                self.observers.setdefault(key, []).append((observer, layer))
            if self.users == 0:
                self.saved = modeling_esm.ALL_ATTENTION_FUNCTIONS
                modeling_esm.ALL_ATTENTION_FUNCTIONS = _View(self.saved, self)
            self.users += 1

    def leave(self, observer: "HfObserver", modules: dict[int, int]) -> None:
        from transformers.models.esm import modeling_esm

        with self.lock:
            for key in modules:
                left = [entry for entry in self.observers.get(key, []) if entry[0] is not observer]
                if left:
                    self.observers[key] = left
                else:
                    self.observers.pop(key, None)
            self.users -= 1
            if self.users == 0:
                modeling_esm.ALL_ATTENTION_FUNCTIONS = self.saved
                self.saved = None


class _View:
    """What ``EsmSelfAttention.forward`` sees as ``ALL_ATTENTION_FUNCTIONS`` while tracing."""

    def __init__(self, inner, dispatch: _Dispatch):
        self.inner, self.dispatch = inner, dispatch

    def get_interface(self, attn_implementation, default):
        fn = self.inner.get_interface(attn_implementation, default)
        dispatch = self.dispatch

        def recorded(module, query, key, value, *args, **kwargs):
            for observer, layer in dispatch.observers.get(id(module), ()):  # each records only in its own thread
                observer.attention_interface(layer, query, key, value, kwargs.get("scaling"))
            return fn(module, query, key, value, *args, **kwargs)

        return recorded

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __getitem__(self, key):
        return self.inner[key]

    def __contains__(self, key):
        return key in self.inner


_DISPATCH = _Dispatch()


class HfObserver(Observer):
    """:class:`tracer.capture.observe.Observer` over an HF ``EsmModel`` (module docstring)."""

    def _roles(self) -> dict:
        return hf_module_roles(self.model)

    def _install_attention(self) -> None:
        self._attention_modules = attention_modules(self.model)
        _DISPATCH.enter(self, self._attention_modules)

    def __exit__(self, *exc) -> None:
        if getattr(self, "_attention_modules", None) is not None:
            _DISPATCH.leave(self, self._attention_modules)
            self._attention_modules = None
        super().__exit__(*exc)

    def attention_interface(self, layer: int, query, key, value, scaling) -> None:
        """HF's ``(B, H, T, d)`` query/key/value as the attention function consumes them."""
        if not self._mine():
            return
        self.attention_calls += 1
        self._offer_qkv(layer, query, key, value, scaling, sdpa=True)


class HfPath(PluginPath):
    """An HF forward as a traced path: a :class:`PluginPath` whose taps come from :class:`HfObserver`."""

    def __init__(self, plugin: Plugin, model, pack_order: str = "given", forward=None, hf=None):
        super().__init__(plugin, model, pack_order, forward)
        self.hf = hf if hf is not None else self.forward.hf
        if is_hf(plugin):
            self.label = plugin.label  # "hf padded (...)": tracer's own path, not a user's plug-in

    batch_first = True  # HF is batch-first whatever B and T are

    def capturable(self, names: list[str]) -> list[str]:
        """As a plug-in's; a user's forward whose HF calls do not fit the path's layout (it runs HF
        on a padded batch inside a packed forward, say) is observed through fair-esm's modules
        instead, where it captures what it captures (never a failed run)."""
        try:
            return super().capturable(names)
        except TracerError as e:
            if is_hf(self.plugin) or not getattr(e, "layout_mismatch", False):
                raise
            self.hf = None
            return super().capturable(names)

    def _observe(self, batch, names, record, sources):
        if self.hf is None:
            return super()._observe(batch, names, record, sources)
        return HfObserver(self.hf, self._geometry(batch), names, record, sources)


def hf_plugin(side: str, dtype_by: str = "to", attn: str = "sdpa", backend: Backend | None = None, faults: Faults | None = None) -> Plugin:
    """The plug-in for ``--{side} hf``.

    Args:
        side: ``packed`` (padding-free) or ``unpacked`` (padded).
        dtype_by: ``to`` (``model.to(dtype)``) or ``from_pretrained`` (``from_pretrained(dtype=...)``).
        attn: the padded side's ``attn_implementation``: ``sdpa`` (HF's default) or ``eager``.
        backend: the padding-free side's kernel (:func:`tracer.attention.resolve`): ``flash-attn``
            runs HF's own ``flash_attention_2``, any other runs as :data:`tracer.esm.hf_model.VARLEN`.
        faults: the padding-free side's ``positions_not_restarted`` / ``leak_across_sequences``.
    """
    from tracer.esm import hf_model
    from tracer.esm.hf_convert import require_transformers

    transformers = require_transformers(f"--{side} hf")
    if dtype_by not in hf_model.DTYPE_BY:
        raise TracerError(f"--hf-dtype-by {dtype_by!r}: choose one of {', '.join(hf_model.DTYPE_BY)}")
    if attn not in hf_model.PADDED_ATTN:
        raise TracerError(f"--hf-attn {attn!r}: choose one of {', '.join(hf_model.PADDED_ATTN)} (the padded HF path's attn_implementation)")
    if side == "packed":
        if backend is None:
            raise ValueError("the padding-free HF path needs an attention backend")
        if faults is not None and faults.layers is not None and any(getattr(faults, k) for k in FAULT_SWITCHES):
            raise TracerError("faults in --packed hf act on every layer (HF hands every layer the same positions and cu_seq_lens); drop the @LAYERS")
        impl = "flash_attention_2" if backend.name == "flash-attn" and hf_model.flash_attention_2_available() else hf_model.VARLEN
        label = f"hf padding-free (transformers {transformers.__version__}, attn {impl}{'' if impl != hf_model.VARLEN else ' ' + backend.name}, dtype by {dtype_by})"
    elif side == "unpacked":
        impl = attn
        label = f"hf padded (transformers {transformers.__version__}, attn {attn}, dtype by {dtype_by})"
    else:
        raise ValueError(side)

    def factory(model, alphabet):
        if impl == hf_model.VARLEN:
            hf_model.register_varlen(backend)
        dtype = model.embed_tokens.weight.dtype
        hf = hf_model.build_hf(model, impl, dtype_by, dtype)
        if side == "packed":
            return hf_model.PackedForward(hf, faults)
        return hf_model.PaddedForward(hf, alphabet.padding_idx)

    return HfPlugin(side, label, factory, backend=backend, switches=FAULT_SWITCHES if side == "packed" else ())
