"""Packing arithmetic: ``cu_seqlens``, per-sequence positions and the token index maps.

Three token orders appear in tracer:

* **canonical** -- sequences in input order, each sequence's tokens ``0..L+1`` in a row. Every
  tap is stored in this order, so the same row means the same (sequence, token) in every path.
* **packed** -- sequences concatenated in *pack order* (``Layout.order``), the stream the
  FlashAttention varlen kernels see, delimited by ``cu_seqlens``.
* **padded** -- fair-esm's ``(B, T)`` batch in input order, ``T = max(L) + 2``, padded on the right.

All functions here are pure; they return index tensors on the CPU (move them where needed).

Example::

    >>> lay = Layout.from_lengths([5, 3], order=[1, 0])
    >>> lay.cu_seqlens.tolist(), lay.positions.tolist()
    ([0, 3, 8], [0, 1, 2, 0, 1, 2, 3, 4])
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from tracer.errors import TracerError

PACK_ORDERS = ("given", "reversed", "longest-first", "shortest-first")


def pack_order(lengths: list[int], how: str) -> list[int]:
    """Sequence indices in the order they are packed. ``how`` is one of :data:`PACK_ORDERS`."""
    idx = list(range(len(lengths)))
    if how == "given":
        return idx
    if how == "reversed":
        return idx[::-1]
    if how == "longest-first":
        return sorted(idx, key=lambda i: (-lengths[i], i))
    if how == "shortest-first":
        return sorted(idx, key=lambda i: (lengths[i], i))
    raise TracerError(f"unknown pack order {how!r}; choose one of {', '.join(PACK_ORDERS)}")


@dataclass(frozen=True)
class Layout:
    """Token bookkeeping for one batch.

    Attributes:
        lengths: tokens per sequence (``L + 2``), canonical order.
        order: pack order; ``order[j]`` is the canonical index of the j-th packed sequence.
    """

    lengths: tuple[int, ...]
    order: tuple[int, ...]

    @classmethod
    def from_lengths(cls, lengths: list[int], order: list[int] | None = None) -> "Layout":
        lengths = tuple(int(n) for n in lengths)
        order = tuple(range(len(lengths))) if order is None else tuple(int(i) for i in order)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one token, got {lengths}")
        if sorted(order) != list(range(len(lengths))):
            raise ValueError(f"order {order} is not a permutation of {len(lengths)} sequences")
        return cls(lengths, order)

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @cached_property
    def offsets(self) -> torch.Tensor:
        """Canonical start of each sequence, ``(S + 1,)`` int64; ``offsets[-1] == n_tokens``."""
        return _cumsum0(self.lengths)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """Packed-stream boundaries, ``(S + 1,)`` int32, as the varlen kernels expect."""
        return _cumsum0([self.lengths[i] for i in self.order]).to(torch.int32)

    @cached_property
    def positions(self) -> torch.Tensor:
        """Position of every packed token within its own sequence, ``(N,)`` int64, restarting at 0."""
        return torch.cat([torch.arange(self.lengths[i]) for i in self.order])

    @cached_property
    def packed_seq_index(self) -> torch.Tensor:
        """Canonical sequence index of every packed token, ``(N,)`` int64."""
        return torch.cat([torch.full((self.lengths[i],), i) for i in self.order])

    @cached_property
    def packed_row_of_canonical(self) -> torch.Tensor:
        """``g[c]`` = the packed row holding canonical row ``c``, so ``canonical = packed[g]``; ``(N,)`` int64."""
        starts = self.cu_seqlens.long()
        slot = {seq: j for j, seq in enumerate(self.order)}
        return torch.cat(
            [starts[slot[i]] + torch.arange(n) for i, n in enumerate(self.lengths)]
        )

    @cached_property
    def canonical_row_of_packed(self) -> torch.Tensor:
        """``g[p]`` = the canonical row held by packed row ``p``, so ``packed = canonical[g]``; the inverse of :attr:`packed_row_of_canonical`."""
        inv = torch.empty(self.n_tokens, dtype=torch.long)
        inv[self.packed_row_of_canonical] = torch.arange(self.n_tokens)
        return inv

    @property
    def is_identity(self) -> bool:
        """True when pack order equals canonical order (no reindexing needed)."""
        return self.order == tuple(range(len(self.lengths)))

    def canonical_from_padded(self, padded_len: int) -> torch.Tensor:
        """Index ``g`` into a flattened ``(B * T)`` padded batch with ``canonical = flat[g]``."""
        if padded_len < self.max_seqlen:
            raise ValueError(f"padded length {padded_len} < longest sequence {self.max_seqlen}")
        return torch.cat([b * padded_len + torch.arange(n) for b, n in enumerate(self.lengths)])

    def token(self, row: int) -> tuple[int, int]:
        """``(sequence index, token position)`` of canonical row ``row``."""
        seq = int(torch.searchsorted(self.offsets, torch.tensor(row), right=True)) - 1
        return seq, row - int(self.offsets[seq])


def _cumsum0(values) -> torch.Tensor:
    out = torch.zeros(len(values) + 1, dtype=torch.long)
    out[1:] = torch.cumsum(torch.tensor(values, dtype=torch.long), 0)
    return out


def pack(per_sequence: list[torch.Tensor], layout: Layout) -> torch.Tensor:
    """Concatenate per-sequence ``(n_i, ...)`` tensors (canonical order) into the packed stream."""
    return torch.cat([per_sequence[i] for i in layout.order], dim=0)


def unpack(canonical: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Split a canonical ``(N, ...)`` tensor back into per-sequence ``(n_i, ...)`` views."""
    return list(torch.split(canonical, list(layout.lengths), dim=0))
