"""The forward paths a run traces, over one encoded batch: one :class:`TracedPath` notion for all.

* ``unpacked`` -- fair-esm's own ``ESM2.forward`` on its padded ``(B, T)`` batch, untouched
  (hooks only record), in the model's current precision (:class:`FairEsmPath`).
* ``packed`` -- tracer's packed forward :class:`tracer.esm.packed_forward.PackedESM2` over the
  concatenated stream (:class:`BuiltinPackedPath`).
* ``reference`` -- fair-esm's forward again on an up-cast twin of the weights, with full-float32
  matmuls (a :class:`FairEsmPath` with a run context; :func:`reference_path`).
* a user's plug-in (``--packed SPEC`` / ``--unpacked SPEC``, :mod:`tracer.capture.plugin`) in place
  of either side, its taps captured by :class:`tracer.capture.observe.Observer` (:class:`PluginPath`).

Every path says what it can do beyond one whole-batch forward (:class:`Supports`: sub-batches of
the padded batch) and which taps it delivers, and runs the batch, handing each tap to
``record(name, canonical_tensor)``. The runner asks ``path.supports``; it never tests a path's
class. Which options need the built-in paths (``--local``'s single-layer re-runs, planted
faults) is decided by the plan, before any path exists (:func:`tracer.runner.plan.check_plugin_options`).

Example::

    batch = encode(sequences, model.alphabet, order="given")
    with torch.inference_mode():
        FairEsmPath(model).run(batch, names, record)
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
from tracer.capture.plugin import Plugin, fitted
from tracer.inputs.sequences import Sequence, make_batch
from tracer.taps import FINAL
from tracer.capture.hooks import Record, tap_packed, tap_unpacked
from tracer.inputs.batching import sub_faults


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


@dataclass(frozen=True)
class Supports:
    """What a path can do beyond one whole-batch forward.

    Attributes:
        sub_batches: runs on length-sorted sub-batches of the padded batch (:meth:`TracedPath.part`).
    """

    sub_batches: bool = False


class TracedPath:
    """A forward that can be traced. Subclasses say how it runs and how taps are captured.

    Attributes:
        name: the role it plays: ``unpacked``, ``packed``, ``reference`` (or ``control``).
        label: what it is, for messages and the trace's meta.
        supports: what it can do besides a whole-batch forward.
        context: ``None`` or a context-manager factory its forward runs inside (in its own thread).
    """

    name: str = ""
    label: str = ""
    supports: Supports = Supports()
    context: Callable | None = None

    def capturable(self, names: list[str]) -> list[str]:
        """The subset of ``names`` this path delivers (built-in paths: all of them)."""
        return list(names)

    def run(self, batch: Batch, names: list[str], record: Record) -> PathOutput:
        raise NotImplementedError

    def part(self, group: tuple[int, ...]) -> "TracedPath":
        """This path for the sub-batch of canonical sequences ``group`` (``supports.sub_batches``)."""
        raise NotImplementedError(f"{self.label} does not run sub-batches")

    def run_layer(self, i: int, x: torch.Tensor, batch: Batch, names: list[str], record: Record) -> None:
        """Layer ``i`` alone on the canonical ``(N, E)`` input ``x`` (the built-in paths; ``--local``)."""
        raise NotImplementedError(f"{self.label} does not re-run single layers")

    def describe(self, batch: Batch) -> str:
        return self.label


class FairEsmPath(TracedPath):
    """fair-esm's own ``ESM2.forward`` on the padded batch (hooks only record)."""

    supports = Supports(sub_batches=True)

    def __init__(self, model, faults: Faults | None = None, name: str = "unpacked", context: Callable | None = None, label: str = "fair-esm ESM2.forward"):
        self.model, self.faults, self.name, self.context, self.label = model, faults, name, context, label

    def run(self, batch, names, record) -> PathOutput:
        run_unpacked(self.model, batch, names, record, self.faults)
        return PathOutput(set(names))

    def part(self, group):
        faults = sub_faults(self.faults, group) if self.faults is not None else None
        return FairEsmPath(self.model, faults, self.name, self.context, self.label)

    def run_layer(self, i, x, batch, names, record) -> None:
        run_unpacked_layer(self.model, i, to_padded(x, batch), batch, names, record, self.faults)

    def describe(self, batch) -> str:
        return f"fair-esm forward, padded batch {tuple(batch.padded.shape)}"


def reference_path(twin, strict_matmul: Callable, dtype_name: str) -> FairEsmPath:
    """fair-esm's forward on the up-cast twin (:func:`tracer.esm.models.upcast_twin`), no faults."""
    return FairEsmPath(twin, None, "reference", strict_matmul, f"fair-esm ESM2.forward in {dtype_name} on up-cast weights")


class BuiltinPackedPath(TracedPath):
    """tracer's own packed forward (:class:`tracer.esm.packed_forward.PackedESM2`)."""

    def __init__(self, packed: PackedESM2, name: str = "packed"):
        self.packed, self.name = packed, name
        self.label = f"builtin (attention {packed.backend.name}, RoPE {packed.rope_mode})"

    def run(self, batch, names, record) -> PathOutput:
        run_packed(self.packed, batch, names, record)
        return PathOutput(set(names))

    def run_layer(self, i, x, batch, names, record) -> None:
        run_packed_layer(self.packed, i, to_packed(x, batch), batch, names, record)

    def describe(self, batch) -> str:
        return f"builtin packed forward, {batch.layout.n_tokens} tokens, cu_seqlens {cu_seqlens_text(batch.layout)}, RoPE {self.packed.rope_mode}"


def output_vs_final_norm(side: str, tapped: torch.Tensor, output: torch.Tensor) -> str | None:
    """A note when a plug-in's returned output is not its own ``final_norm`` tap (``None`` if it is).

    NaN/Inf are data, not a mismatch: the same non-finite values at the same places are equal
    (the verdict reports them as NaN/Inf). Non-finite values in one and not the other are
    counted; finite values are compared exactly (in float64).
    """
    if torch.equal(tapped, output):  # the usual case, without float64 copies (False wherever there is NaN)
        return None
    a, b = tapped.detach().double(), output.detach().double()
    bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
    same_nonfinite = torch.equal(bad_a, bad_b) and torch.equal(torch.where(bad_a, a.nan_to_num(0.0, 1.0, -1.0), 0), torch.where(bad_b, b.nan_to_num(0.0, 1.0, -1.0), 0))
    finite = ~(bad_a | bad_b)
    diff = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
    if same_nonfinite and diff == 0:
        return None
    advice = "does the adapter return the representation after emb_layer_norm_after?"
    if not same_nonfinite:
        only_out, only_tap = int((bad_b & ~bad_a).sum()), int((bad_a & ~bad_b).sum())
        return (
            f"the {side} plug-in's returned output and its own final_norm tap hold NaN/Inf at different places "
            f"({only_out} values non-finite only in the output, {only_tap} only in the tap; finite values differ by at most {diff:.3g}): {advice}"
        )
    return f"the {side} plug-in's returned output differs from its own final_norm tap (max |diff| {diff:.3g}): {advice}"


def cu_seqlens_text(layout, shown: int = 8) -> str:
    """``[0, 5, 15, 175, 577]``, or for a long batch ``[0, 5, 15, ..., 9001234] (10001 offsets)``:
    a status line stays one short line whatever the batch."""
    cu = layout.cu_seqlens.tolist()
    if len(cu) <= shown:
        return str(cu)
    return f"[{', '.join(map(str, cu[:shown - 2]))}, ..., {cu[-1]}] ({len(cu)} offsets)"


def to_padded(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Canonical ``(N, E)`` -> fair-esm's ``(T, B, E)``, padding rows zero."""
    b, t = batch.padded.shape
    flat = x.new_zeros(b * t, x.shape[-1])  # (B*T, E)
    flat.index_copy_(0, batch.layout.canonical_from_padded(t).to(x.device), x)
    return flat.view(b, t, -1).transpose(0, 1)  # (T, B, E)


def to_packed(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Canonical ``(N, E)`` -> pack order ``(N, E)``."""
    if batch.layout.is_identity:
        return x
    return x.index_select(0, batch.layout.canonical_row_of_packed.to(x.device))


PROBE = (("probe-a", "MKTAYIAKQRQISFVK"), ("probe-b", "MKTAYIA"))
"""The mini batch a plug-in is first run on, to learn which taps it exposes (and fail fast)."""


class PluginPath(TracedPath):
    """A user's forward (:mod:`tracer.capture.plugin`), captured by :class:`tracer.capture.observe.Observer`.

    Before the traced run the forward runs once on :data:`PROBE` (two short sequences): that
    shows which taps it exposes and from which source, and surfaces layout errors and
    exceptions in a second rather than after the expensive paths.
    """

    batch_first = False
    """Whether the padded side's tensors are known to be batch-first (else a square ``B x T``
    batch is refused: the layouts could not be told apart)."""

    def __init__(self, plugin: Plugin, model, pack_order: str = "given", forward=None):
        self.plugin, self.model = plugin, model
        self.name = plugin.side
        self.label = f"plug-in {plugin.label}"
        self.pack_order = pack_order
        self.forward = forward if forward is not None else plugin.make(model, model.alphabet)  # made once
        self.observed = model
        """The fair-esm model whose modules the forward runs: the run's, or its own copy."""
        self.sources: dict[str, str] | None = None

    def _device(self):
        return self.model.embed_tokens.weight.device

    def _geometry(self, batch: Batch) -> Geometry:
        m, lay = self.model, batch.layout
        if self.name == "packed":
            to_canonical = None if lay.is_identity else lay.packed_row_of_canonical.to(self._device())
            return Geometry("packed", lay.n_tokens, m.embed_dim, m.attention_heads, to_canonical,
                            tokens=batch.packed, cu_seqlens=tuple(lay.cu_seqlens.tolist()))
        b, t = batch.padded.shape
        if b == t and b > 1 and not self.batch_first:
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
            args = fitted(self.forward, (batch.packed.to(device), lay.cu_seqlens.to(device), lay.max_seqlen), 2)
        else:
            args = (batch.padded.to(device),)
        out = self.plugin.call(self.forward, *args)
        expect = (batch.layout.n_tokens, self.model.embed_dim) if self.name == "packed" else (*batch.padded.shape, self.model.embed_dim)
        if isinstance(out, torch.Tensor) and out.is_meta:
            raise TracerError(
                f"{self.name} plug-in {self.plugin.label} returned a meta tensor (a shape with no data: it was built on "
                "the 'meta' device, or from weights never loaded); return the computed representation"
            )
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if self.name == "packed" and isinstance(out, torch.Tensor) and out.dim() == 3 and 1 in got[:2] and got[-1] == expect[-1]:
            out = out.reshape(-1, got[-1])  # a batch axis of one, (1, N, E) or (N, 1, E), as the taps may have
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expect:
            raise TracerError(
                f"{self.name} plug-in {self.plugin.label} returned {got}; expected the final representation {expect} "
                "(after emb_layer_norm_after)"
            )
        return out.to(device)  # a forward that hands its result back on the host (.cpu()) is compared on the run's device

    def _observe(self, batch, names, record, sources):
        return Observer(self.observed, self._geometry(batch), names, record, sources, (self.plugin.namespace,) if self.plugin.namespace else ())

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
        elif "x" in final_tap:
            note = output_vs_final_norm(self.name, final_tap["x"], final)
            if note:
                notes.append(note)
        if obs.reordered:
            notes.append(f"the {self.name} plug-in {obs.reordered} (read from its call of embed_tokens); its taps were read at the batch's rows, in the batch's order")
        if obs.unattributed_attention:
            notes.append(
                f"{obs.unattributed_attention} attention call(s) came before any self_attn_layer_norm or q/k/v projection of a layer and "
                "could not be given a layer; tap q/k/v with tracer.tap"
            )
        return PathOutput(obs.captured, notes)

    def describe(self, batch) -> str:
        return f"{self.label}, {batch.layout.n_tokens} tokens" + (
            f", cu_seqlens {cu_seqlens_text(batch.layout)}" if self.name == "packed" else f", padded batch {tuple(batch.padded.shape)}"
        )
