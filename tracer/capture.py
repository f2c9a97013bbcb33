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
from tracer.store import tap_checksum
from tracer.verdict import ROUNDED


class Ledger:
    """Bytes of tap tensors held by the run (collector, sub-batch assembly, writer in flight).

    Counted exactly from the tensors' sizes, so the bound on held memory can be tested on a
    shared machine where RSS is noisy. ``peak`` is the most held at once.
    """

    def __init__(self):
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.held += n
            self.peak = max(self.peak, self.held)

    def sub(self, n: int) -> None:
        with self._lock:
            self.held -= n


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class AsyncTapWriter:
    """Writes taps to a :class:`tracer.store.TraceWriter` in the background, in two stages.

    A *copy* thread waits for the kernel that produced each CUDA tap (an event) and copies it
    into a pinned host buffer on its own stream (a few buffers per shape, reused), then computes
    the CRC-32 of the host bytes; a *disk* thread writes host tensors and their checksums to the
    trace. The stages overlap, and the forward never waits for either (it only enqueues). CPU
    taps skip the copy, not the checksum.

    Args:
        writer: the trace writer (only the disk thread touches the HDF5 file until :meth:`close`).
        buffers: pinned buffers per tap shape (bounds host memory in flight).
        budget: bytes of submitted taps not yet on disk before :meth:`submit` waits (so a slow
            disk cannot make the run hold every tap); ``None`` = no limit.
        ledger: a :class:`Ledger` that counts those bytes.
    """

    def __init__(self, writer, buffers: int = 4, budget: int | None = None, ledger: Ledger | None = None):
        self.writer = writer
        self.budget = budget
        self.ledger = ledger or Ledger()
        self._inflight = 0
        self._room = threading.Condition()
        self.error: BaseException | None = None
        self.stats = {"taps": 0, "bytes": 0, "write_seconds": 0.0, "copy_seconds": 0.0}
        self._copy_q: queue.Queue = queue.Queue()
        self._disk_q: queue.Queue = queue.Queue()
        self._pools: dict[tuple, queue.Queue] = {}
        self._buffers = buffers
        self._stream = None
        self._stopped = False  # set by abort(): queued taps are dropped, not written
        self._copier = threading.Thread(target=self._copy_loop, name="tracer-copy", daemon=True)
        self._disk = threading.Thread(target=self._disk_loop, name="tracer-disk", daemon=True)
        self._copier.start()
        self._disk.start()

    def submit(self, path: str, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        n = nbytes(tensor)
        with self._room:  # back-pressure: wait for the disk rather than hold every tap
            while self.budget is not None and self._inflight and self._inflight + n > self.budget and self.error is None:
                self._room.wait(0.5)
            self._inflight += n
        self.ledger.add(n)
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
            if self.error is not None or self._stopped:
                self._disk_q.put((path, name, tensor, None, None))
                continue
            try:
                t0 = time.perf_counter()
                if tensor.is_cuda:
                    if self._stream is None:
                        self._stream = torch.cuda.Stream(device=tensor.device)
                    pool = self._pool(tensor)
                    host = pool.get()  # blocks while the disk stage holds every buffer of this shape
                    event.wait(self._stream)  # the producing kernel has run
                    with torch.cuda.stream(self._stream):
                        host.copy_(tensor, non_blocking=True)
                    self._stream.synchronize()
                else:
                    host, pool = tensor.contiguous(), None
                # the checksum of the bytes about to be written, here so that it overlaps the
                # disk stage's previous write (zlib releases the GIL)
                crc = tap_checksum(host)
                self.stats["copy_seconds"] += time.perf_counter() - t0
                self._disk_q.put((path, name, host, pool, crc))
            except BaseException as e:  # surfaced by close()/submit() in the main thread
                self.error = e
                self._disk_q.put((path, name, tensor, None, None))  # (not written: only accounted)
            del tensor, item

    def _disk_loop(self) -> None:
        while True:
            item = self._disk_q.get()
            if item is None:
                return
            path, name, host, pool, crc = item
            try:
                if self.error is None and not self._stopped:
                    t0 = time.perf_counter()
                    self.writer.write_tap(path, name, host, crc)
                    self.stats["write_seconds"] += time.perf_counter() - t0
                    self.stats["taps"] += 1
                    self.stats["bytes"] += host.numel() * host.element_size()
            except BaseException as e:
                self.error = e
            finally:
                if pool is not None:
                    pool.put(host)
                n = nbytes(host)
                self.ledger.sub(n)
                with self._room:
                    self._inflight -= n
                    self._room.notify_all()

    def abort(self) -> None:
        """Stop now (an interrupt or a failure): taps still queued are dropped, not written;
        returns once both threads have finished (at most the one tap being written)."""
        self._stopped = True
        try:
            self.close()
        except BaseException:  # the run is failing already; its own exception is the one to show
            pass

    def close(self, progress=None, total: int | None = None) -> None:
        """Wait until every submitted tap is written; re-raise a writer failure.

        ``progress``: a :class:`tracer.progress.Progress` to tick bytes written of ``total``.
        """
        self._copy_q.put(None)
        while self._disk.is_alive():
            self._disk.join(0.2)
            if progress is not None and total:
                progress.tick("writing", min(self.stats["bytes"], total), total, bytes_unit=True)
        self._copier.join()
        if progress is not None:
            progress.tick_done()
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
                self.ledger.sub(nbytes(self.held[path].pop(name)))

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

    A path split into sub-batches (:mod:`tracer.batching`) delivers each tap once per
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
