"""The forward hooks that record taps from fair-esm's padded forward and the built-in packed forward.

Tap names, sites and layouts are listed in :mod:`tracer.taps`; where each is read in fair-esm's
modules, in :mod:`tracer.esm.sites`.

Every tap is handed to the recorder **token-major in canonical order** (``(N, ...)``, sequences in
input order, tokens 0..L+1 each; see :mod:`tracer.inputs.packing`), whatever layout the path uses
inside: fair-esm's ``(T, B, E)`` and ``(B*H, T, d)``, or the packed ``(N, H, d)``. A tap records
``x.detach()`` and returns nothing, so it never changes the forward. Hooks live inside a context
manager and are removed in ``finally``. The paths of a run share fair-esm's modules and run in
lockstep threads (:mod:`tracer.capture.lockstep`), so a hook acts only in the thread that installed it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from tracer.esm.sites import padded_sites
from tracer.taps import HEAD_SITES, parse_tap
from tracer.inputs.faults import Perturbation
from tracer.inputs.packing import Layout

Record = Callable[[str, torch.Tensor], None]
"""``record(tap_name, canonical_tensor)``: where hooks deliver taps."""


class HookPoint(nn.Module):
    """Identity module: a named place in the packed forward to hang a hook on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ---------------------------------------------------------------------------------------------
# fair-esm's padded forward: where each site lives and what layout it has there.


_UNPACKED_SITES = padded_sites()
"""Where each tap is read in fair-esm's padded forward (:mod:`tracer.esm.sites`)."""


def _get(value, item):
    return value if item is None else value[item]


def _put(value, item, tensor):
    if item is None:
        return tensor
    value = list(value)
    value[item] = tensor
    return tuple(value)


def padded_rows(flat: torch.Tensor, padded_len: int, batch: int, heads: int) -> tuple[torch.Tensor, ...]:
    """Where every canonical token sits in fair-esm's layouts, from its row ``flat`` in the padded
    ``(B, T)`` batch (computed once per forward, not once per tap): ``(seq, pos, time_major,
    head_rows)``: batch index, position, row in ``(T, B, E)`` flattened, and the ``N x H`` rows
    of its heads in ``(T, B*H, d)`` flattened (fair-esm's rotated q and k are transposed views of
    that layout)."""
    seq, pos = flat // padded_len, flat % padded_len
    head_rows = ((pos * (batch * heads) + seq * heads)[:, None] + torch.arange(heads, device=flat.device)[None, :]).reshape(-1)
    return seq, pos, pos * batch + seq, head_rows


def unpacked_to_canonical(x: torch.Tensor, layout: str, batch: int, heads: int, rows, per_head: bool):
    """fair-esm layout -> canonical ``(N, E)`` or ``(N, H, d)``: one gather, always a fresh tensor.

    ``rows``: :func:`padded_rows` of the batch.
    """
    seq, pos, time_major, head_rows = rows
    if layout == "BHTd":
        bh, t, d = x.shape  # (B*H, T, d)
        time_first = x.transpose(0, 1)  # (T, B*H, d)
        if time_first.is_contiguous():  # fair-esm's rotated q and k: one index_select (cheaper to launch than advanced indexing)
            return time_first.reshape(-1, d).index_select(0, head_rows).view(-1, heads, d)  # (N, H, d)
        return x.view(batch, heads, t, d)[seq, :, pos, :]  # (N, H, d)
    t, b, e = x.shape  # (T, B, E), contiguous
    x = x.reshape(t * b, e).index_select(0, time_major)  # (N, E)
    return x.view(-1, heads, e // heads) if per_head else x


def _perturbed_padded(x: torch.Tensor, layout: str, batch: int, heads: int, p: Perturbation) -> torch.Tensor:
    x = x.clone()
    if p.whole_tap:
        return add_to_every_row(x, p)
    if layout == "BHTd":
        view = x.view(batch, heads, x.shape[1], x.shape[2])[p.sequence, :, p.token, :]  # (H, d)
    else:
        view = x[p.token, p.sequence]  # (E,)
    view.add_(perturbation_delta(view, p))
    return x


def perturbation_delta(row: torch.Tensor, p: Perturbation) -> torch.Tensor:
    """``eps * |row|`` in a direction fixed by ``p.seed`` (same on every device)."""
    g = torch.Generator().manual_seed(p.seed)
    r = torch.randn(row.shape, generator=g, dtype=torch.float64)
    r = r / r.norm()
    return (p.eps * row.double().norm().cpu() * r).to(device=row.device, dtype=row.dtype)


def add_to_every_row(x: torch.Tensor, p: Perturbation) -> torch.Tensor:
    """``x`` (any layout, last dim = features) with ``p.eps * |row|`` added to every last-dim row
    in a seeded direction (in place when ``x`` is contiguous). Rows partition each token's values
    (a token or one head of it), so every token's relative L2 error is exactly ``eps``."""
    x = x.contiguous()  # a copy already (the hooks clone); contiguous so rows are a view
    rows = x.view(-1, x.shape[-1])  # (R, F)
    g = torch.Generator().manual_seed(p.seed)
    r = torch.randn(rows.shape, generator=g, dtype=torch.float64)
    r = r / r.norm(dim=1, keepdim=True)
    size = rows.double().norm(dim=1, keepdim=True).cpu()  # (R, 1), float64
    rows.add_((p.eps * size * r).to(device=x.device, dtype=x.dtype))
    return x


@contextlib.contextmanager
def tap_unpacked(model, layout: Layout, padded_len: int, names: list[str], record: Record, perturbations=()):
    """Hooks on fair-esm's modules that deliver ``names`` to ``record`` in canonical layout.

    Args:
        model: the ``esm.model.esm2.ESM2``.
        layout: token bookkeeping of the batch (padded batch in canonical sequence order).
        padded_len: T of the padded batch.
        names: tap names to record.
        record: ``record(name, tensor)``.
        perturbations: :class:`Perturbation` s to apply (fault injection, tests only).
    """
    heads = model.attention_heads
    batch = len(layout.lengths)
    flat = layout.canonical_from_padded(padded_len).to(model.embed_tokens.weight.device)
    index = padded_rows(flat, padded_len, batch, heads)
    groups: dict[tuple[int, str], list] = defaultdict(list)  # (id(module), kind) -> [(name, site)]
    modules = {}
    for name in names:
        layer, site = parse_tap(name)
        spec = _UNPACKED_SITES[site]
        module = spec.module(model, layer)
        key = (id(module), spec.hook)
        modules[key] = module
        groups[key].append((name, spec, site in HEAD_SITES))
    for p in perturbations:
        layer, site = parse_tap(p.tap)
        spec = _UNPACKED_SITES[site]
        module = spec.module(model, layer)
        key = (id(module), spec.hook)
        modules[key] = module
        groups[key].insert(0, (None, spec, p))  # perturb before recording, so the tap sees it

    owner = threading.get_ident()  # paths run in lockstep threads over shared modules

    def make_hook(entries, kind):
        def hook(module, *args):
            if threading.get_ident() != owner:
                return None
            value = args[0] if kind == "pre" else args[1]
            changed = False
            for name, spec, what in entries:  # what: the perturbation, or whether the tap is per head
                if name is None:
                    value = _put(value, spec.item, _perturbed_padded(_get(value, spec.item), spec.layout, batch, heads, what))
                    changed = True
                else:
                    x = _get(value, spec.item).detach()
                    record(name, unpacked_to_canonical(x, spec.layout, batch, heads, index, what))
            return value if changed else None

        return hook

    handles = []
    try:
        for key, entries in groups.items():
            module, kind = modules[key], key[1]
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(make_hook(entries, "pre")))
            else:
                handles.append(module.register_forward_hook(make_hook(entries, "post")))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def tap_packed(packed, layout: Layout, names: list[str], record: Record, perturbations=()):
    """Hooks on the packed path's :class:`HookPoint` s (module path == tap name).

    Packed ``(N, ...)`` tensors are reindexed from pack order to canonical order (no copy when
    the pack order is the input order: the packed path never writes a tapped tensor in place).
    """
    device = next(iter(packed.esm.parameters())).device
    to_canonical = None if layout.is_identity else layout.packed_row_of_canonical.to(device)
    packed_row_of_canonical = layout.packed_row_of_canonical
    offsets = layout.offsets
    handles = []
    owner = threading.get_ident()

    def recorder(name):
        def hook(module, inputs, output):
            if threading.get_ident() != owner:
                return
            x = output.detach()
            record(name, x if to_canonical is None else x.index_select(0, to_canonical))

        return hook

    def perturber(p):
        row = int(packed_row_of_canonical[int(offsets[p.sequence]) + p.token])

        def hook(module, inputs, output):
            if threading.get_ident() != owner:
                return None
            out = output.clone()
            if p.whole_tap:
                return add_to_every_row(out, p)
            out[row].add_(perturbation_delta(out[row], p))
            return out

        return hook

    try:
        for p in perturbations:  # registered first: hooks run in registration order
            handles.append(packed.get_submodule(p.tap).register_forward_hook(perturber(p)))
        for name in names:
            handles.append(packed.get_submodule(name).register_forward_hook(recorder(name)))
        yield
    finally:
        for h in handles:
            h.remove()
