"""The forward paths a run traces, over one encoded batch.

* ``unpacked`` -- fair-esm's own ``ESM2.forward`` on its padded ``(B, T)`` batch, untouched
  (hooks only record). Run in the model's current precision.
* ``packed`` -- :class:`tracer.packed.PackedESM2` over the concatenated stream.
* ``reference`` -- the unpacked computation again, in float32 or float64 on the same weights
  (the caller switches precision with :func:`tracer.models.set_precision`).

Example::

    batch = encode(sequences, model.alphabet, pack_order="given")
    with torch.inference_mode():
        run_unpacked(model, batch, names, record)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracer.faults import Faults
from tracer.packed import PackedESM2
from tracer.packing import Layout, pack_order
from tracer.sequences import Sequence
from tracer.taps import Record, tap_packed, tap_unpacked

@dataclass(frozen=True)
class Batch:
    """One batch, encoded for both paths.

    Attributes:
        sequences: the input sequences, canonical order.
        layout: token bookkeeping (:class:`tracer.packing.Layout`).
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
