"""From hooks to results: the collector that pairs paths up, and the background tap writer.

The paths run one after another (``unpacked``, ``packed``, then ``reference``). The
:class:`Collector` receives each tap once, in canonical layout, from the hooks of
:mod:`tracer.taps`. As soon as both sides of a pair are present it computes the per-token
sums the metrics derive from (on the tap's device), and it lets go of a tensor once no later
pair or step needs it. Full tensors go to an :class:`AsyncTapWriter`, so the forward never waits for
the disk: on CUDA a copy thread waits for the kernel that produced a tap (a CUDA event) and
copies it into a reusable pinned host buffer on its own stream (pageable ``.cpu()`` copies run
at ~1 GB/s on the H100 machine, pinned ones at ~50 GB/s), and a disk thread writes it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import defaultdict

import numpy as np
import torch

from tracer.metrics import from_sums, round_to, token_sums
from tracer.report import PAIRS
from tracer.verdict import ROUNDED


class AsyncTapWriter:
    """Writes taps to a :class:`tracer.store.TraceWriter` in the background, in two stages.

    A *copy* thread waits for the kernel that produced each CUDA tap (an event) and copies it
    into a pinned host buffer on its own stream (a few buffers per shape, reused); a *disk*
    thread writes host tensors to the trace. The stages overlap, and the forward never waits
    for either (it only enqueues). CPU taps skip the copy stage.

    Args:
        writer: the trace writer (only the disk thread touches the HDF5 file until :meth:`close`).
        buffers: pinned buffers per tap shape (bounds host memory in flight).
    """

    def __init__(self, writer, buffers: int = 4):
        self.writer = writer
        self.error: BaseException | None = None
        self.stats = {"taps": 0, "bytes": 0, "write_seconds": 0.0, "copy_seconds": 0.0}
        self._copy_q: queue.Queue = queue.Queue()
        self._disk_q: queue.Queue = queue.Queue()
        self._pools: dict[tuple, queue.Queue] = {}
        self._buffers = buffers
        self._stream = None
        self._copier = threading.Thread(target=self._copy_loop, name="tracer-copy", daemon=True)
        self._disk = threading.Thread(target=self._disk_loop, name="tracer-disk", daemon=True)
        self._copier.start()
        self._disk.start()

    def submit(self, path: str, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        event = None
        if tensor.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))
        self._copy_q.put((path, name, tensor, event))

    def _pool(self, t: torch.Tensor) -> queue.Queue:
        key = (tuple(t.shape), t.dtype)
        if key not in self._pools:
            pool: queue.Queue = queue.Queue()
            for _ in range(self._buffers):
                pool.put(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            self._pools[key] = pool
        return self._pools[key]

    def _copy_loop(self) -> None:
        while True:
            item = self._copy_q.get()
            if item is None:
                self._disk_q.put(None)
                return
            path, name, tensor, event = item
            if self.error is not None or not tensor.is_cuda:
                self._disk_q.put((path, name, tensor, None))
                continue
            try:
                t0 = time.perf_counter()
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device=tensor.device)
                pool = self._pool(tensor)
                buf = pool.get()  # blocks while the disk stage holds every buffer of this shape
                event.wait(self._stream)  # the producing kernel has run
                with torch.cuda.stream(self._stream):
                    buf.copy_(tensor, non_blocking=True)
                self._stream.synchronize()
                self.stats["copy_seconds"] += time.perf_counter() - t0
                self._disk_q.put((path, name, buf, pool))
            except BaseException as e:  # surfaced by close()/submit() in the main thread
                self.error = e
            del tensor, item

    def _disk_loop(self) -> None:
        while True:
            item = self._disk_q.get()
            if item is None:
                return
            path, name, host, pool = item
            try:
                if self.error is None:
                    t0 = time.perf_counter()
                    self.writer.write_tap(path, name, host)
                    self.stats["write_seconds"] += time.perf_counter() - t0
                    self.stats["taps"] += 1
                    self.stats["bytes"] += host.numel() * host.element_size()
            except BaseException as e:
                self.error = e
            finally:
                if pool is not None:
                    pool.put(host)

    def close(self) -> None:
        """Wait until every submitted tap is written; re-raise a writer failure."""
        self._copy_q.put(None)
        self._copier.join()
        self._disk.join()
        self._pools.clear()
        if self.error is not None:
            raise self.error


class Collector:
    """Receives taps path by path, computes pair metrics, forwards tensors to the writer.

    Per-token sums (:func:`tracer.metrics.token_sums`) are computed on the taps' device in
    batches of up to :attr:`batch` taps of the same shape, a handful of fused kernels per batch
    (the run is otherwise bound by kernel launches); the metrics are finished from the sums on
    the CPU, for the whole table at once, by :meth:`table`.

    Args:
        names: tap names being traced (walk order).
        paths: paths that will run, in order (``unpacked``, ``packed`` [, ``reference``]).
        dtype: the low-precision run dtype (for the representation floor).
        writer: an :class:`AsyncTapWriter`, or ``None`` for ``--metrics-only``.
        keep: paths whose taps are kept after their metrics (needed by the local re-runs).
    """

    batch = 8

    def __init__(self, names: list[str], paths: list[str], dtype: torch.dtype, writer=None, keep=frozenset()):
        self.names = list(names)
        self.paths = list(paths)
        self.dtype = dtype
        self.writer = writer
        self.keep = set(keep)
        self.held: dict[str, dict[str, torch.Tensor]] = {p: {} for p in paths}
        self.pairs = {k: v for k, v in PAIRS.items() if set(v) <= set(paths)}
        self.metrics: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # pair -> tap -> (5, N) sums
        self.pending: list[tuple[str, str]] = []  # (pair, tap) ready to compute

    def recorder(self, path: str):
        """The ``record(name, tensor)`` callback for ``path``'s hooks."""

        def record(name: str, tensor: torch.Tensor) -> None:
            self.add(path, name, tensor)

        return record

    def add(self, path: str, name: str, tensor: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.submit(path, name, tensor)
        self.held[path][name] = tensor
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
        """Compute every pending pair (batched by shape and dtypes), then release what is done."""
        groups: dict[tuple, list[tuple[str, str, torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for pair, name in self.pending:
            a, b = self._operands(pair, name)
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # (N, F)
            groups[(a.shape, a.dtype, b.dtype, a.device)].append((pair, name, a, b))
        self.pending = []
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
                del self.held[path][name]

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
