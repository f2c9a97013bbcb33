"""The forward paths a run traces, over one encoded batch.

* ``unpacked`` -- fair-esm's own ``ESM2.forward`` on its padded ``(B, T)`` batch, untouched
  (hooks only record). Run in the model's current precision.
* ``packed`` -- :class:`tracer.esm.packed_forward.PackedESM2` over the concatenated stream.
* ``reference`` -- the unpacked computation again, in float32 or float64 on the same weights
  (the caller switches precision with :func:`tracer.esm.models.set_precision`).
* a user's plug-in (``--packed SPEC`` / ``--unpacked SPEC``, :mod:`tracer.capture.plugin`) in place of
  either side, its taps captured by :class:`tracer.capture.observe.Observer`.

Every path is a :class:`TracedPath`: it says which taps it can deliver and runs the batch,
handing each tap to ``record(name, canonical_tensor)``.

Example::

    batch = encode(sequences, model.alphabet, pack_order="given")
    with torch.inference_mode():
        run_unpacked(model, batch, names, record)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tracer.errors import TracerError
from tracer.inputs.faults import Faults
from tracer.capture.observe import Geometry, Observer
from tracer.esm.packed_forward import PackedESM2
from tracer.inputs.packing import Layout, pack_order
from tracer.capture.plugin import Plugin
from tracer.capture.plugin import load as load_plugin
from tracer.inputs.sequences import Sequence, make_batch
from tracer.taps import FINAL
from tracer.capture.hooks import Record, tap_packed, tap_unpacked

@dataclass(frozen=True)
class Batch:
    """One batch, encoded for both paths.

    Attributes:
        sequences: the input sequences, canonical order.
        layout: token bookkeeping (:class:`tracer.inputs.packing.Layout`).
        padded: ``(B, T)`` int64 token ids from fair-esm's own batch converter.
        packed: ``(N,)`` int64 token ids in pack order.
    """

    sequences: tuple[Sequence, ...]
    layout: Layout
    padded: torch.Tensor
    packed: torch.Tensor

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.sequences]


def encode(sequences: list[Sequence], alphabet, order: str = "given") -> Batch:
    """Tokenise with fair-esm's ``BatchConverter`` and derive the packed stream from it."""
    _, _, padded = alphabet.get_batch_converter()([(s.id, s.residues) for s in sequences])
    lengths = [s.n_tokens for s in sequences]
    real = (padded != alphabet.padding_idx).sum(1).tolist()
    if real != lengths:  # our alphabet check and fair-esm's tokenizer must agree
        raise AssertionError(f"token counts {real} differ from expected {lengths}")
    layout = Layout.from_lengths(lengths, pack_order(lengths, order))
    packed = torch.cat([padded[i, : lengths[i]] for i in layout.order])
    return Batch(tuple(sequences), layout, padded, packed)


def run_unpacked(model, batch: Batch, names: list[str], record: Record, faults: Faults | None = None):
    """fair-esm's forward on the padded batch; returns its final representations ``(B, T, E)``."""
    device = model.embed_tokens.weight.device
    perturb = (faults or Faults()).perturbations_of("unpacked")
    with tap_unpacked(model, batch.layout, batch.padded.shape[1], names, record, perturb):
        out = model(batch.padded.to(device), repr_layers=[model.num_layers])
    return out["representations"][model.num_layers]


def run_unpacked_layer(model, i: int, x: torch.Tensor, batch: Batch, names: list[str], record: Record, faults=None):
    """fair-esm's layer ``i`` alone on a padded ``(T, B, E)`` input, with its padding mask."""
    device = x.device
    mask = batch.padded.to(device).eq(model.padding_idx)  # (B, T)
    perturb = (faults or Faults()).perturbations_of("unpacked")
    with tap_unpacked(model, batch.layout, batch.padded.shape[1], names, record, perturb):
        out, _ = model.layers[i](x, self_attn_padding_mask=mask if mask.any() else None)
    return out


def run_packed(packed: PackedESM2, batch: Batch, names: list[str], record: Record):
    """The packed forward; returns its final representations ``(N, E)`` in pack order."""
    device = next(iter(packed.esm.parameters())).device
    with tap_packed(packed, batch.layout, names, record, packed.faults.perturbations_of("packed")):
        return packed(batch.packed.to(device), batch.layout)


def run_packed_layer(packed: PackedESM2, i: int, x: torch.Tensor, batch: Batch, names: list[str], record: Record):
    """Packed layer ``i`` alone on a packed ``(N, E)`` input."""
    with tap_packed(packed, batch.layout, names, record, packed.faults.perturbations_of("packed")):
        return packed.run_layer(i, x, batch.layout)


# ---------------------------------------------------------------------------------------------
# One notion of a traced path: how it runs and how its taps are captured.


@dataclass
class PathOutput:
    """What one run of a path gave.

    Attributes:
        captured: tap names delivered to the recorder.
        notes: things the user should know (e.g. the output disagrees with its own last tap).
    """

    captured: set[str]
    notes: list[str] = field(default_factory=list)


class TracedPath:
    """A forward that can be traced. Subclasses say how it runs and how taps are captured.

    Attributes:
        name: ``unpacked`` or ``packed`` (the side it plays in the comparison).
        label: what it is, for messages and the trace's meta.
    """

    name: str = ""
    label: str = ""

    def capturable(self, names: list[str]) -> list[str]:
        """The subset of ``names`` this path delivers (built-in paths: all of them)."""
        return list(names)

    def run(self, batch: Batch, names: list[str], record: Record) -> PathOutput:
        raise NotImplementedError

    def describe(self, batch: Batch) -> str:
        return self.label


class FairEsmPath(TracedPath):
    """fair-esm's own ``ESM2.forward`` on the padded batch (hooks only record)."""

    def __init__(self, model, faults: Faults | None = None, name: str = "unpacked"):
        self.model, self.faults, self.name = model, faults, name
        self.label = "fair-esm ESM2.forward"

    def run(self, batch, names, record) -> PathOutput:
        run_unpacked(self.model, batch, names, record, self.faults)
        return PathOutput(set(names))

    def describe(self, batch) -> str:
        return f"fair-esm forward, padded batch {tuple(batch.padded.shape)}"


class BuiltinPackedPath(TracedPath):
    """tracer's own packed forward (:class:`tracer.esm.packed_forward.PackedESM2`)."""

    name = "packed"

    def __init__(self, packed: PackedESM2):
        self.packed = packed
        self.label = f"builtin (attention {packed.backend.name}, RoPE {packed.rope_mode})"

    def run(self, batch, names, record) -> PathOutput:
        run_packed(self.packed, batch, names, record)
        return PathOutput(set(names))

    def describe(self, batch) -> str:
        return f"builtin packed forward, {batch.layout.n_tokens} tokens, cu_seqlens {batch.layout.cu_seqlens.tolist()}, RoPE {self.packed.rope_mode}"


PROBE = (("probe-a", "MKTAYIAKQRQISFVK"), ("probe-b", "MKTAYIA"))
"""The mini batch a plug-in is first run on, to learn which taps it exposes (and fail fast)."""


class PluginPath(TracedPath):
    """A user's forward (:mod:`tracer.capture.plugin`), captured by :class:`tracer.capture.observe.Observer`.

    Before the traced run the forward runs once on :data:`PROBE` (two short sequences): that
    shows which taps it exposes and from which source, and surfaces layout errors and
    exceptions in a second rather than after the expensive paths.
    """

    def __init__(self, plugin: Plugin, model, pack_order: str = "given"):
        self.plugin, self.model = plugin, model
        self.name = plugin.side
        self.label = f"plug-in {plugin.label}"
        self.pack_order = pack_order
        self.forward = plugin.make(model, model.alphabet)
        self.sources: dict[str, str] | None = None

    def _device(self):
        return self.model.embed_tokens.weight.device

    def _geometry(self, batch: Batch) -> Geometry:
        m, lay = self.model, batch.layout
        if self.name == "packed":
            to_canonical = None if lay.is_identity else lay.packed_row_of_canonical.to(self._device())
            return Geometry("packed", lay.n_tokens, m.embed_dim, m.attention_heads, to_canonical)
        b, t = batch.padded.shape
        if b == t and b > 1:
            raise TracerError(
                f"unpacked plug-in {self.plugin.label}: the padded batch is {b} x {t}, so batch-first and "
                "time-first layouts cannot be told apart; add or remove a sequence"
            )
        flat = lay.canonical_from_padded(t).to(self._device())
        return Geometry("padded", lay.n_tokens, m.embed_dim, m.attention_heads, flat, batch=b, padded_len=t)

    def _call(self, batch: Batch) -> torch.Tensor:
        device = self._device()
        if self.name == "packed":
            lay = batch.layout
            args = (batch.packed.to(device), lay.cu_seqlens.to(device), lay.max_seqlen)
        else:
            args = (batch.padded.to(device),)
        out = self.plugin.call(self.forward, *args)
        expect = (batch.layout.n_tokens, self.model.embed_dim) if self.name == "packed" else (*batch.padded.shape, self.model.embed_dim)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expect:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TracerError(
                f"{self.name} plug-in {self.plugin.label} returned {got}; expected the final representation {expect} "
                "(after emb_layer_norm_after)"
            )
        return out

    def _observe(self, batch, names, record, sources):
        return Observer(self.model, self._geometry(batch), names, record, sources, (self.plugin.namespace,) if self.plugin.namespace else ())

    def capturable(self, names: list[str]) -> list[str]:
        probe = encode(make_batch(list(PROBE)), self.model.alphabet, self.pack_order)
        obs = self._observe(probe, names, None, None)
        with obs:
            self._call(probe)
        obs.finish()
        self.sources = obs.choose()
        if FINAL in names and FINAL not in self.sources:
            self.sources[FINAL] = "output"  # the returned value is the final representation by contract
        return [n for n in names if n in self.sources]

    def run(self, batch, names, record) -> PathOutput:
        if self.sources is None:
            self.capturable(names)
        final_tap = {}

        def keep_final(name, x):
            if name == FINAL:
                final_tap["x"] = x
            record(name, x)

        obs = self._observe(batch, names, keep_final, self.sources)
        with obs:
            out = self._call(batch)
        obs.finish()
        notes = []
        final = obs.canonical(FINAL, out.detach())  # (N, E), canonical rows
        if FINAL in names and self.sources.get(FINAL) == "output":
            record(FINAL, final)
            obs.delivered[FINAL] = "output"
        elif "x" in final_tap and not torch.equal(final_tap["x"], final):
            diff = (final_tap["x"].double() - final.double()).abs().max().item()
            notes.append(
                f"the {self.name} plug-in's returned output differs from its own final_norm tap "
                f"(max |diff| {diff:.3g}): does the adapter return the representation after emb_layer_norm_after?"
            )
        if obs.unattributed_attention:
            notes.append(
                f"{obs.unattributed_attention} attention call(s) came before any q/k/v projection of a layer and "
                "could not be given a layer; tap q/k/v with tracer.tap"
            )
        return PathOutput(obs.captured, notes)

    def describe(self, batch) -> str:
        return f"{self.label}, {batch.layout.n_tokens} tokens" + (
            f", cu_seqlens {batch.layout.cu_seqlens.tolist()}" if self.name == "packed" else f", padded batch {tuple(batch.padded.shape)}"
        )


def make_path(spec, side: str, model, builtin: Callable[[], TracedPath], pack_order: str = "given") -> TracedPath:
    """The path for a ``--packed``/``--unpacked`` SPEC (``builtin()`` builds the default)."""
    plugin = spec if isinstance(spec, Plugin) else load_plugin(spec, side)
    return builtin() if plugin is None else PluginPath(plugin, model, pack_order)
