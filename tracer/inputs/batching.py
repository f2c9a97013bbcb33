"""Splitting the padded batch into length-sorted sub-batches under a token budget.

fair-esm's padded forward pads every sequence to the longest one of its batch, so a batch of
mixed lengths costs ``B x T_max`` tokens of memory and time. With ``--max-batch-tokens K`` the
unpacked path (and the reference, with the same split) runs fair-esm's ``ESM2.forward`` once per
sub-batch: sequences sorted by length (longest first), filled greedily while
``sequences x longest <= K``. A sequence longer than ``K`` alone gets a sub-batch of its own.
``K = 0`` keeps the user's batch as it is (one forward, input order), and so does any ``K`` the
whole batch fits in. The split is recorded in the trace's meta: fair-esm's result for a sequence
depends on its batch only through the kernels chosen for that batch's shape.

Example::

    plan = plan_sub_batches([5, 10, 402, 162], max_tokens=1000)
    plan.groups      # ((2,), (3, 1, 0))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tracer.inputs.faults import Faults
from tracer.inputs.packing import Layout


@dataclass(frozen=True)
class SubBatches:
    """How the padded paths split the batch.

    Attributes:
        max_tokens: the budget in padded tokens (``0`` = one batch).
        groups: per sub-batch, the canonical indices of its sequences, in its own order.
        n_tokens: tokens (``L + 2``) of every sequence, canonical order.
    """

    max_tokens: int
    groups: tuple[tuple[int, ...], ...]
    n_tokens: tuple[int, ...]

    def padded_tokens(self, k: int) -> int:
        """``B x T`` of sub-batch ``k``."""
        g = self.groups[k]
        return len(g) * max(self.n_tokens[i] for i in g)

    @property
    def largest_padded_tokens(self) -> int:
        return max(self.padded_tokens(k) for k in range(len(self.groups)))

    @property
    def total_padded_tokens(self) -> int:
        return sum(self.padded_tokens(k) for k in range(len(self.groups)))

    def rows(self, layout: Layout) -> list[torch.Tensor]:
        """Per sub-batch, ``(n_k,)`` canonical rows of its tokens in its own order."""
        offsets = layout.offsets.tolist()
        return [torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in g]) for g in self.groups]

    def to_meta(self) -> dict:
        return {
            "max_batch_tokens": self.max_tokens,
            "sub_batches": [list(g) for g in self.groups],
            "padded_tokens": [self.padded_tokens(k) for k in range(len(self.groups))],
        }


def plan_sub_batches(n_tokens: list[int], max_tokens: int) -> SubBatches:
    """Length-sorted greedy split of sequences with ``n_tokens`` tokens each (module docstring)."""
    if max_tokens < 0:
        raise ValueError("max_tokens must be >= 0")
    n = tuple(int(x) for x in n_tokens)
    whole = tuple(range(len(n)))
    if max_tokens == 0 or len(n) * max(n) <= max_tokens:
        return SubBatches(max_tokens, (whole,), n)
    order = sorted(whole, key=lambda i: (-n[i], i))  # longest first; stable for equal lengths
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    for i in order:
        longest = n[current[0]] if current else n[i]
        if current and (len(current) + 1) * longest > max_tokens:
            groups.append(tuple(current))
            current = []
        current.append(i)
    groups.append(tuple(current))
    return SubBatches(max_tokens, tuple(groups), n)


def sub_faults(faults: Faults, group: tuple[int, ...]) -> Faults:
    """``faults`` with the perturbations of ``group``'s sequences, renumbered within the group."""
    where = {c: k for k, c in enumerate(group)}
    kept = tuple(replace(p, sequence=where[p.sequence]) for p in faults.perturbations if p.sequence in where)
    return replace(faults, perturbations=kept)
