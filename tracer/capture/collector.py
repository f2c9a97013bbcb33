"""From hooks to results: the collector that pairs paths up, and the sub-batch assembler.

The :class:`Collector` receives each tap once, in canonical layout, from the hooks of
:mod:`tracer.capture.hooks` or the observer. As soon as both sides of a pair are present it
computes the per-token sums the metrics derive from (on the tap's device), and it lets go of a
tensor once no later pair or step needs it; full tensors go on to the tap writer
(:mod:`tracer.store.tap_writer`). The :class:`Assembler` joins sub-batches of fair-esm's padded
forward back into one canonical tap.
"""


from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from tracer.judging.metrics import from_sums, norms, round_to, token_sums
from tracer.judging.pairs import PAIRS
from tracer.judging.verdict import ROUNDED
from tracer.store.tap_writer import Ledger, nbytes



class Collector:
    """Receives taps path by path, computes pair metrics, forwards tensors to the writer.

    Per-token sums (:func:`tracer.judging.metrics.token_sums`) are computed on the taps' device in
    batches of up to :attr:`batch` taps of the same shape, a handful of fused kernels per batch
    (the run is otherwise bound by kernel launches); the metrics are finished from the sums on
    the CPU, for the whole table at once, by :meth:`table`.

    Args:
        names: tap names being traced (walk order).
        paths: paths that will run, in order (``unpacked``, ``packed`` [, ``reference``]).
        dtype: the low-precision run dtype (for the representation floor).
        writer: an :class:`AsyncTapWriter`, or ``None`` for ``--metrics-only``.
        keep: paths whose taps are kept after their metrics (needed by the local re-runs).
        ledger: counts the bytes held (default: the writer's, or a new one).
    """

    batch = 8

    def __init__(self, names: list[str], paths: list[str], dtype: torch.dtype, writer=None, keep=frozenset(), ledger: Ledger | None = None):
        self.ledger = ledger or (writer.ledger if writer is not None else Ledger())
        self.names = list(names)
        self.paths = list(paths)
        self.dtype = dtype
        self.writer = writer
        self.keep = set(keep)
        self.held: dict[str, dict[str, torch.Tensor]] = {p: {} for p in paths}
        self.pairs = {k: v for k, v in PAIRS.items() if set(v) <= set(paths)}
        self.metrics: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # pair -> tap -> (5, N) sums
        self.pending: list[tuple[str, str]] = []  # (pair, tap) ready to compute
        self._norms: dict[tuple[str, str], torch.Tensor] = {}  # (path, tap) -> (N,) norms, CPU flushes only

    def recorder(self, path: str):
        """The ``record(name, tensor)`` callback for ``path``'s hooks."""

        def record(name: str, tensor: torch.Tensor) -> None:
            self.add(path, name, tensor)

        return record

    def add(self, path: str, name: str, tensor: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.submit(path, name, tensor)
        self.held[path][name] = tensor
        self.ledger.add(nbytes(tensor))
        for pair, (a, b) in self.pairs.items():
            if path in (a, b) and name in self.held[a] and name in self.held[b]:
                self.pending.append((pair, name))
        if path == "reference":
            self.pending.append((ROUNDED, name))
        if len(self.pending) >= self.batch:
            self.flush()

    def _operands(self, pair: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if pair == ROUNDED:
            ref = self.held["reference"][name]
            return round_to(ref, self.dtype), ref
        a, b = self.pairs[pair]
        return self.held[a][name], self.held[b][name]

    def flush(self) -> None:
        """Compute every pending pair, then release what is done.

        On a GPU the run is bound by kernel launches, so pairs of one shape and dtypes are
        stacked and reduced together (a handful of kernels per batch). On a CPU it is bound by
        memory traffic, so each pair is reduced in place, and each tap's norm is computed once
        for all the pairs it is in (not stacked, not recomputed per pair).
        """
        pending, self.pending = self.pending, []
        if pending and self._device(pending[0]).type != "cpu":
            self._flush_batched(pending)
            return
        for pair, name in pending:
            a, b = self._operands(pair, name)
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # (N, F)
            na = norms(a) if pair == ROUNDED else self._norm(self.pairs[pair][0], name, a)
            nb = self._norm("reference" if pair == ROUNDED else self.pairs[pair][1], name, b)
            self.metrics[pair][name] = token_sums(a, b, na, nb)  # (5, N)
            self._release(name)

    def _device(self, item: tuple[str, str]) -> torch.device:
        return self._operands(*item)[1].device

    def _norm(self, path: str, name: str, x: torch.Tensor) -> torch.Tensor:
        """``norms(x)`` of ``path``'s tap ``name``, computed once while the tap is held."""
        key = (path, name)
        if key not in self._norms:
            self._norms[key] = norms(x)
        return self._norms[key]

    def _flush_batched(self, pending: list[tuple[str, str]]) -> None:
        groups: dict[tuple, list[tuple[str, str, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for pair, name in pending:
            a, b = self._operands(pair, name)
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # (N, F)
            groups[(a.shape, a.dtype, b.dtype, a.device)].append((pair, name, a, b))
        for items in groups.values():
            out = token_sums(torch.stack([x[2] for x in items]), torch.stack([x[3] for x in items]))  # (K, 5, N)
            for (pair, name, _, _), m in zip(items, out):
                self.metrics[pair][name] = m
            for _, name, _, _ in items:
                self._release(name)

    def _release(self, name: str) -> None:
        """Drop every held tensor of ``name`` whose pairs are all computed."""
        for path in self.paths:
            pairs = [pair for pair, members in self.pairs.items() if path in members]
            if path == "reference":
                pairs.append(ROUNDED)
            if path not in self.keep and name in self.held[path] and all(name in self.metrics[pair] for pair in pairs):
                self.ledger.sub(nbytes(self.held[path].pop(name)))
                self._norms.pop((path, name), None)

    def table(self) -> dict[str, dict[str, np.ndarray]]:
        """``{pair: {metric: (T, N) float32}}`` over :attr:`names` (rows of missing taps are NaN)."""
        self.flush()
        out = {}
        for pair, by_tap in self.metrics.items():
            if not by_tap:
                continue
            some = next(iter(by_tap.values()))
            nan = torch.full_like(some, torch.nan)
            sums = torch.stack([by_tap.get(name, nan) for name in self.names]).cpu().double()  # (T, 5, N), one transfer
            out[pair] = {m: v.float().numpy() for m, v in from_sums(sums).items()}
        return out

    def present(self) -> dict[str, np.ndarray]:
        """``{pair: (T,) bool}``: which taps both sides of each pair recorded (missing rows of
        :meth:`table` are NaN, and must not be mistaken for non-finite values)."""
        self.flush()
        return {pair: np.array([name in by_tap for name in self.names]) for pair, by_tap in self.metrics.items() if by_tap}

class Assembler:
    """Joins the taps of a path's sub-batches into one canonical tensor per tap.

    A path split into sub-batches (:mod:`tracer.inputs.batching`) delivers each tap once per
    sub-batch, for that sub-batch's rows; when every part of a tap has arrived, the joined
    ``(N, ...)`` tensor goes to ``record``. With one part covering the batch in its own order,
    taps pass through untouched (no copy).

    Args:
        rows: per part, ``(n_k,)`` int64 canonical rows of its tokens, in the part's own order.
        n_tokens: N.
        record: ``record(name, tensor)`` receiving whole taps.
        ledger: counts the partly joined tensors.
    """

    def __init__(self, rows: list[torch.Tensor], n_tokens: int, record, ledger: Ledger | None = None):
        self.rows = rows
        self.n_tokens = n_tokens
        self.record = record
        self.ledger = ledger or Ledger()
        self.identity = len(rows) == 1 and torch.equal(rows[0], torch.arange(n_tokens))
        self._parts: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (joined, parts received)
        self._device_rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def recorder(self, part: int):
        """The ``record(name, tensor)`` callback of part ``part``."""

        def record(name: str, tensor: torch.Tensor) -> None:
            self.add(part, name, tensor)

        return record

    def add(self, part: int, name: str, tensor: torch.Tensor) -> None:
        if self.identity:
            self.record(name, tensor)
            return
        if name not in self._parts:
            joined = tensor.new_empty((self.n_tokens, *tensor.shape[1:]))
            self.ledger.add(nbytes(joined))
            self._parts[name] = (joined, 0)
        joined, seen = self._parts[name]
        key = (part, tensor.device)
        if key not in self._device_rows:
            self._device_rows[key] = self.rows[part].to(tensor.device)
        joined.index_copy_(0, self._device_rows[key], tensor)  # (n_k, ...) rows into (N, ...)
        if seen + 1 < len(self.rows):
            self._parts[name] = (joined, seen + 1)
            return
        del self._parts[name]
        self.ledger.sub(nbytes(joined))
        self.record(name, joined)
