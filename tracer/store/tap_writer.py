"""The background tap writer: copies taps off the device and writes them to the trace file.

Full tensors go to an :class:`AsyncTapWriter`, so the forward never waits for the disk: on CUDA
a copy thread waits for the kernel that produced a tap (a CUDA event) and copies it into a
reusable pinned host buffer on its own stream (pageable ``.cpu()`` copies run at ~1 GB/s on the
H100 machine, pinned ones at ~50 GB/s), and a disk thread writes it. :class:`Ledger` counts the
tap bytes the run holds at once.
"""


from __future__ import annotations

import queue
import threading
import time

import torch

from tracer.store.trace_file import tap_checksum


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
    """Writes taps to a :class:`tracer.store.trace_file.TraceWriter` in the background, in two stages.

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
                crc = tap_checksum(host, self.writer.seed(f"taps/{path}/{name}"))  # bound to the run and the name
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
                    self.stats["bytes"] += nbytes(host)
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

        ``progress``: a :class:`tracer.runner.progress.Progress` to tick bytes written of ``total``.
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

