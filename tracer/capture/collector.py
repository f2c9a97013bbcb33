"""From hooks to results: the collector that pairs paths up, and the sub-batch assembler.

The :class:`Collector` receives each tap once, in canonical layout, from the hooks of
:mod:`tracer.capture.hooks` or the observer. As soon as both sides of a pair are present it
computes the per-token sums the metrics derive from (on the tap's device), and it lets go of a
tensor once no later pair or step needs it; full tensors go on to the tap writer
(:mod:`tracer.store.tap_writer`). The :class:`Assembler` joins sub-batches of fair-esm's padded
forward back into one canonical tap.
"""


from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from tracer.judging.metrics import METRICS, from_sums, norms, round_to, token_sums, work_dtype
from tracer.judging.pairs import PAIRS
from tracer.judging.verdict import ROUNDED
from tracer.store.tap_writer import Ledger, nbytes



def per_layer_on(device_type: str) -> bool:
    """Whether the collector computes pairs once per layer on this device type (a GPU, bound by
    kernel launches) rather than as they become ready (a CPU, bound by memory traffic); the
    pre-flight's held-tap estimate follows the same rule."""
    return device_type == "cuda"


class Collector:
    """Receives taps path by path, computes pair metrics, forwards tensors to the writer.

    Per-token sums (:func:`tracer.judging.metrics.token_sums`) are computed on the taps' device;
    the metrics are finished from the sums on the CPU, for the whole table at once, by
    :meth:`table`. When they are computed depends on what bounds the device:

    * ``per_layer=False`` (a CPU: memory traffic): every :attr:`batch` ready pairs, each reduced
      in place, so at most a part of a layer's reference taps is held;
    * ``per_layer=True`` (a GPU: kernel launches): once per layer, when :meth:`flush` is called
      after the layer's group (:mod:`tracer.capture.lockstep`). Each path's taps of the layer are
      stacked and up-cast once, each operand's norms computed once, and each pair is then a
      handful of kernels for all its taps (:meth:`_flush_stacked`), whatever the number of taps.

    Args:
        names: tap names being traced (walk order).
        paths: paths that will run, in order (``unpacked``, ``packed`` [, ``reference``]).
        dtype: the low-precision run dtype (for the representation floor).
        writer: an :class:`AsyncTapWriter`, or ``None`` for ``--metrics-only``.
        keep: paths whose taps are kept after their metrics (needed by the local re-runs).
        ledger: counts the bytes held (default: the writer's, or a new one).
        per_layer: compute pairs once per layer (above).
    """

    batch = 8
    chunk_bytes = 64 << 20
    """Per-layer mode: at most this much of one operand is stacked at once (one tap at least)."""

    def __init__(self, names: list[str], paths: list[str], dtype: torch.dtype, writer=None, keep=frozenset(),
                 ledger: Ledger | None = None, per_layer: bool = False):
        self.ledger = ledger or (writer.ledger if writer is not None else Ledger())
        self.names = list(names)
        self.paths = list(paths)
        self.dtype = dtype
        self.writer = writer
        self.keep = set(keep)
        self.held: dict[str, dict[str, torch.Tensor]] = {p: {} for p in paths}
        self.pairs = {k: v for k, v in PAIRS.items() if set(v) <= set(paths)}
        self.all_pairs = {**self.pairs, **({ROUNDED: (ROUNDED, "reference")} if "reference" in paths else {})}
        """Every pair computed, with its operands: the floor's first one is the reference rounded to the run dtype."""
        self.pairs_of = {path: [pair for pair, members in self.all_pairs.items() if path in members] for path in paths}
        """The pairs each path's taps take part in (a tap is let go once they are all computed)."""
        self.metrics: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # pair -> tap -> (5, N) sums
        self.pending: list[tuple[str, str]] = []  # (pair, tap) ready to compute
        self._norms: dict[tuple[str, str], torch.Tensor] = {}  # (path, tap) -> (N,) norms, CPU flushes only
        self.per_layer = per_layer

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
        for pair in self.pairs_of[path]:
            a, b = self.all_pairs[pair]
            if all(side == ROUNDED or name in self.held[side] for side in (a, b)):
                self.pending.append((pair, name))
        if not self.per_layer and len(self.pending) >= self.batch:
            self.flush()

    def _operands(self, pair: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.all_pairs[pair]
        ref = self.held[b][name]
        return (round_to(ref, self.dtype) if a == ROUNDED else self.held[a][name]), ref

    def flush(self) -> None:
        """Compute every pending pair, then release what is done (class docstring).

        Per pair in place (a CPU), each tap's norm computed once for all the pairs it is in; or
        stacked per layer (a GPU, :meth:`_flush_stacked`).
        """
        pending, self.pending = self.pending, []
        if not pending:
            return
        if self.per_layer:
            self._flush_stacked(pending)
            return
        for pair, name in pending:
            a, b = self._operands(pair, name)
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # (N, F)
            side_a, side_b = self.all_pairs[pair]
            na = norms(a) if side_a == ROUNDED else self._norm(side_a, name, a)
            nb = self._norm(side_b, name, b)
            self.metrics[pair][name] = token_sums(a, b, na, nb)  # (5, N)
            self._release(name)

    def _norm(self, path: str, name: str, x: torch.Tensor) -> torch.Tensor:
        """``norms(x)`` of ``path``'s tap ``name``, computed once while the tap is held."""
        key = (path, name)
        if key not in self._norms:
            self._norms[key] = norms(x)
        return self._norms[key]

    def _flush_stacked(self, pending: list[tuple[str, str]]) -> None:
        """Every pending pair of a layer in a few kernels: per operand one ``(K, N, F)`` stack in
        the working dtype and its norms, shared by every pair it is in; per pair one
        :func:`token_sums` over the stacks. Taps are taken in chunks of at most
        :attr:`chunk_bytes` per operand (one tap at least), the same chunks for every pair, and a
        chunk's stacks and taps are let go before the next is stacked: the workspace is one chunk
        per operand, as the pre-flight estimates."""
        by_shape: dict[tuple, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))  # (N, F) -> tap -> pairs
        for pair, name in pending:
            x = self.held[self.all_pairs[pair][1]][name]  # the second operand is always a path's own tap
            by_shape[(x.shape[0], math.prod(x.shape[1:]))][name].append(pair)
        for (n, f), by_name in by_shape.items():
            names = list(by_name)
            pairs = list(dict.fromkeys(pair for name in names for pair in by_name[name]))
            works = {pair: self._work(pair, next(name for name in names if pair in by_name[name])) for pair in pairs}  # from a tap the pair has
            step = max(1, self.chunk_bytes // max(1, n * f * max(w.itemsize for w in works.values())))
            for i in range(0, len(names), step):
                chunk = names[i:i + step]
                self._flush_chunk(chunk, pairs, works, by_name)
                for name in chunk:
                    self._release(name)

    def _work(self, pair: str, name: str) -> torch.dtype:
        a, b = self.all_pairs[pair]
        xb = self.held[b][name]
        return work_dtype(xb.dtype if a == ROUNDED else self.held[a][name].dtype, xb.dtype)

    def _flush_chunk(self, chunk: list[str], pairs: list[str], works: dict, by_name: dict) -> None:
        """The pairs of one chunk of a layer's taps, each operand stacked once for all its pairs.

        The stacks live in a local dict that nothing else refers to (no closure, no cycle), so
        they are freed when this returns, not when the garbage collector next runs."""
        stacks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (operand, taps, dtype) -> (stack, norms)
        for pair in pairs:
            taps = tuple(name for name in chunk if pair in by_name[name])
            if not taps:
                continue
            a, b = self.all_pairs[pair]
            (xa, na), (xb, nb) = self._operand(stacks, a, taps, works[pair]), self._operand(stacks, b, taps, works[pair])
            for name, sums in zip(taps, token_sums(xa, xb, na, nb)):  # (K, 5, N)
                self.metrics[pair][name] = sums

    def _operand(self, stacks: dict, side: str, taps: tuple[str, ...], work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``side``'s taps stacked as ``(K, N, F)`` in ``work``, and their ``(K, N)`` norms, made
        once per chunk (``stacks``)."""
        key = (side, taps, work)
        if key not in stacks:
            if side == ROUNDED:
                x = round_to(self._operand(stacks, "reference", taps, work)[0], self.dtype)
            else:
                x = torch.stack([self.held[side][t].reshape(self.held[side][t].shape[0], -1) for t in taps]).to(work)
            stacks[key] = (x, torch.linalg.vector_norm(x, dim=-1))
        return stacks[key]

    def _release(self, name: str) -> None:
        """Drop every held tensor of ``name`` whose pairs are all computed."""
        for path in self.paths:
            if path not in self.keep and name in self.held[path] and all(name in self.metrics[pair] for pair in self.pairs_of[path]):
                self.ledger.sub(nbytes(self.held[path].pop(name)))
                self._norms.pop((path, name), None)

    def table(self) -> dict[str, dict[str, np.ndarray]]:
        """``{pair: {metric: (T, N) float32}}`` over :attr:`names` (rows of missing taps are NaN).

        Finished one pair at a time on the sums' device, in float64, and fetched in one transfer
        per pair (on a GPU a float64 pass over ``(T, 5, N)`` is instant; on the host it took
        tens of ms per pair for the 3B)."""
        self.flush()
        out = {}
        for pair, by_tap in self.metrics.items():
            if not by_tap:
                continue
            some = next(iter(by_tap.values()))
            nan = torch.full_like(some, torch.nan)
            sums = torch.stack([by_tap.get(name, nan) for name in self.names]).double()  # (T, 5, N)
            metrics = from_sums(sums)
            values = torch.stack([metrics[m] for m in METRICS]).float().cpu().numpy()  # (3, T, N), one transfer
            out[pair] = dict(zip(METRICS, values))
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
