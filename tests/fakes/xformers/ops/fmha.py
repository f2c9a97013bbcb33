"""Test double of ``xformers.ops.fmha``: the block-diagonal mask of packed sequences."""

from __future__ import annotations


class BlockDiagonalMask:
    def __init__(self, seqlens):
        self.seqlens = list(seqlens)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen)
