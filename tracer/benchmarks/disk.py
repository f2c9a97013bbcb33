"""Disk and comparator probes of the benchmark: a raw sequential write, tracer's writer on the
same taps, a compression study and the comparator in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

GB = 1e9


def raw_write(folder: Path, nbytes: int, block: int = 16 << 20) -> float:
    """Seconds to write ``nbytes`` sequentially in ``block`` chunks and fsync (then delete)."""
    buf = np.random.default_rng(0).integers(0, 255, size=block, dtype=np.uint8).tobytes()
    path = folder / "raw-write.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, block)
            f.write(buf[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


def tracer_write(folder: Path, trace_path: Path) -> tuple[float, int]:
    """Wall-clock seconds for tracer's writer to store taps of ``trace_path``'s names, shapes and
    dtypes and commit them durably (``TraceWriter`` fsyncs before its rename), and the bytes.

    Timed from creating the file to ``commit()`` returning: the same clock as :func:`raw_write`
    (busy time of the writer thread would leave out writeback still running in the kernel).
    Each distinct (shape, dtype) gets one tensor of random values, reused (contents do not
    change the speed of an uncompressed write).
    """
    from tracer.store.tap_writer import AsyncTapWriter
    from tracer.store.trace_file import TraceWriter

    with h5py.File(trace_path) as f:
        taps = [(p, n, ds.shape, ds.attrs["dtype"]) for p in f["taps"] for n, ds in f["taps"][p].items()]
    tensors = {(shape, dt): torch.randn(shape).to(getattr(torch, dt)) for _, _, shape, dt in taps}
    path = folder / "bench-write.h5"
    t = time.perf_counter()
    with TraceWriter(path, force=True) as writer:
        async_writer = AsyncTapWriter(writer)
        for p, n, shape, dt in taps:
            async_writer.submit(p, n, tensors[(shape, dt)])
        async_writer.close()
        nbytes = writer.bytes_written
        writer.commit()
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds, nbytes


def compression_study(trace_path: Path, folder: Path, max_bytes: int = 256 << 20) -> list[dict]:
    """Write a sample of the trace's own taps with each compression; size and throughput."""
    sample, total = [], 0
    with h5py.File(trace_path) as f:
        paths = list(f["taps"])
        for path in paths:  # an equal share of each path (bf16 and fp32 compress differently)
            share = 0
            for ds in f["taps"][path].values():
                if share >= max_bytes // len(paths):
                    break
                arr = ds[()]
                sample.append(arr)
                share += arr.nbytes
            total += share
    rows = []
    for label, kwargs in [
        ("none", {}),
        ("lzf", {"compression": "lzf"}),
        ("gzip-1", {"compression": "gzip", "compression_opts": 1}),
        ("gzip-4", {"compression": "gzip", "compression_opts": 4}),
    ]:
        path = folder / f"compression-{label}.h5"
        t = time.perf_counter()
        with h5py.File(path, "w") as f:
            for i, arr in enumerate(sample):
                chunks = {"chunks": (max(1, min(len(arr), (4 << 20) // max(1, arr[0].nbytes))),) + arr.shape[1:]} if kwargs else {}
                f.create_dataset(f"t{i}", data=arr, **kwargs, **chunks)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - t
        size = path.stat().st_size
        path.unlink()
        rows.append({"compression": label, "size_ratio": size / total, "write_gb_s": total / seconds / GB, "sample_gb": total / GB})
    return rows


def comparator_probe(trace_path: Path) -> dict:
    """Run the comparator in a fresh process; its time and memory.

    Peak memory is VmHWM of that process (``ru_maxrss`` would include the forking parent's
    pages: Linux keeps it across exec).
    """
    code = (
        "import json, resource, sys, time;"
        "import tracer.compare as c;"
        "from tracer.store.trace_file import open_trace;"
        "base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize();"
        "t = time.perf_counter();"
        "tr = open_trace(sys.argv[1]); s = c.summarize(tr, recompute=True); tr.close();"
        "dt = time.perf_counter() - t;"
        "peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "print(json.dumps({'seconds': dt, 'baseline_rss': base, 'peak_rss': peak, 'verdict': s.verdict}))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(trace_path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_layer_bytes(trace_path: Path) -> int:
    with h5py.File(trace_path) as f:
        return sum(ds.nbytes for path in f["taps"] for name, ds in f["taps"][path].items() if name.startswith("layers.0."))


def read_file(path: Path, block: int = 16 << 20) -> float:
    """Seconds to read ``path`` sequentially (unbuffered, ``block`` at a time)."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t
