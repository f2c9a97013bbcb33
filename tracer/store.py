"""The HDF5 trace: one self-describing file per run, written atomically; and its read API.

Layout (schema version 1)::

    /                          attrs: format="tracer-trace", schema_version, complete,
                               meta (JSON: command line, versions, model, weights, dtypes,
                               device, backend, ...), summary (JSON, the comparator's verdict)
    /sequences/ids             (S,) str     input order ("canonical")
    /sequences/residues        (S,) str
    /sequences/lengths         (S,) int64   residues L per sequence
    /sequences/offsets         (S+1,) int64 canonical row where each sequence starts (tokens = L+2)
    /sequences/pack_order      (S,) int64   canonical index of the j-th packed sequence
    /sequences/cu_seqlens      (S+1,) int32 boundaries of the packed stream, as the kernel saw them
    /taps/<path>/<tap>         (N, ...)     path in unpacked|packed|reference, tap like
                                            "layers.3.q_rope"; rows are canonical tokens;
                                            attrs: dtype, encoding
    /metrics/taps              (T,) str     tap names, walk order
    /metrics/<pair>/<metric>   (T, N) float32 per-token metrics (pair like "packed-vs-unpacked")
    /local/...                 same shape, per-layer re-runs (tracer.run --local)
    /embeddings/<path>         (S, E) float64 final_norm averaged over each sequence's residues
                               (tracer.embeddings), when final_norm was traced

Tensors are stored losslessly in the dtype they were computed in. HDF5 has no bfloat16, so a
bfloat16 tap is stored as its raw 16-bit patterns in a ``uint16`` dataset with attributes
``dtype="bfloat16"`` and ``encoding="bfloat16-bits-as-uint16"``. Decode with
``torch.from_numpy(a).view(torch.bfloat16)``, or without torch with
``(a.astype(np.uint32) << 16).view(np.float32)`` (exact). :func:`open_trace` does this for you.

A trace is written to ``<path>.partial`` and renamed into place only once complete, flushed
and closed, so a file at the final path is always whole; readers refuse files without
``complete=True``.

Example::

    >>> import tracer
    >>> t = tracer.open_trace("traces/trace.h5")          # doctest: +SKIP
    >>> q = t.tap("packed", "layers.0.q_rope")            # doctest: +SKIP
    >>> t.token_slice("large")                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from tracer.errors import TracerError
from tracer.packing import Layout

FORMAT = "tracer-trace"
SCHEMA_VERSION = 1
BF16_ENCODING = "bfloat16-bits-as-uint16"
COMPRESSIONS = ("none", "lzf", "gzip")
_STR = h5py.string_dtype()


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU tensor as a numpy array HDF5 can hold, and its dtype name (bf16 as uint16 bits)."""
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), name
    return t.numpy(), name


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class TraceWriter:
    """Writes one trace; nothing appears at ``path`` until :meth:`commit`.

    Args:
        path: final file path.
        force: overwrite an existing file at ``path`` (checked again at commit).
        compression: ``none``, ``lzf`` or ``gzip`` (level 4) for tap tensors.

    Use as a context manager: leaving it with an exception (Ctrl-C included) removes the
    partial file.
    """

    def __init__(self, path: str | Path, force: bool = False, compression: str = "none"):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.force = force
        if compression not in COMPRESSIONS:
            raise TracerError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
        self.compression = None if compression == "none" else compression
        if self.path.exists() and not force:
            raise TracerError(f"{self.path} exists; pass --force to overwrite it or --out to choose another path")
        if self.path.is_dir():
            raise TracerError(f"{self.path} is a directory; --out takes a file path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = h5py.File(self.partial, "w")
        except OSError as e:
            raise TracerError(f"cannot write {self.partial}: {e.strerror or e}") from None
        self.file.attrs["format"] = FORMAT
        self.file.attrs["schema_version"] = SCHEMA_VERSION
        self.file.attrs["complete"] = False
        self.bytes_written = 0
        self._fd = os.open(self.partial, os.O_WRONLY)  # raw data of uncompressed taps (write_tap)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False

    def set_json(self, key: str, value) -> None:
        self.file.attrs[key] = json.dumps(value, sort_keys=True)

    def write_sequences(self, ids, residues, lengths, layout: Layout) -> None:
        g = self.file.create_group("sequences")
        g.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR)
        g.create_dataset("residues", data=np.array(residues, dtype=object), dtype=_STR)
        g.create_dataset("lengths", data=np.array(lengths, dtype=np.int64))
        g.create_dataset("offsets", data=layout.offsets.numpy())
        g.create_dataset("pack_order", data=np.array(layout.order, dtype=np.int64))
        g.create_dataset("cu_seqlens", data=layout.cu_seqlens.numpy())

    def write_tap(self, path: str, name: str, tensor: torch.Tensor) -> None:
        """Store one tap (a CPU tensor, canonical layout), losslessly.

        Uncompressed taps are contiguous datasets allocated up front; HDF5 writes their
        metadata and tracer writes their bytes at the dataset's file offset with one
        ``os.pwrite`` (the use ``H5Dget_offset`` exists for), which skips HDF5's per-write
        overhead and never holds the GIL. Compressed taps go through h5py's chunked path.
        """
        data, dtype = to_numpy(tensor)
        key = f"taps/{path}/{name}"
        if self.compression:
            kwargs = {"compression": self.compression, "chunks": (min(len(data), max(1, (1 << 22) // max(1, data[0].nbytes))),) + data.shape[1:]}
            if self.compression == "gzip":
                kwargs["compression_opts"] = 4
            ds = self.file.create_dataset(key, data=data, **kwargs)
        else:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_layout(h5py.h5d.CONTIGUOUS)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            ds = self.file.create_dataset(key, shape=data.shape, dtype=data.dtype, dcpl=dcpl)
            offset = ds.id.get_offset()  # None only for an empty dataset
            view = memoryview(np.ascontiguousarray(data)).cast("B")
            done = 0
            while offset is not None and done < len(view):  # pwrite may write less than asked
                done += os.pwrite(self._fd, view[done:], offset + done)
            if offset is not None and done and hasattr(os, "posix_fadvise"):
                # start writeback of this range now (asynchronously) rather than leaving
                # gigabytes of dirty pages for the final fsync, and keep them out of the cache
                os.posix_fadvise(self._fd, offset, done, os.POSIX_FADV_DONTNEED)
        ds.attrs["dtype"] = dtype
        ds.attrs["encoding"] = BF16_ENCODING if dtype == "bfloat16" else "raw"
        self.bytes_written += data.nbytes

    def write_metrics(self, group: str, taps: list[str], table: dict[str, dict[str, np.ndarray]], present=None) -> None:
        """``table[pair][metric]`` is ``(T, N)`` in the order of ``taps``; ``present[pair]``, if
        given, is ``(T,)`` bool (which taps both sides recorded), stored as ``<pair>/present``."""
        g = self.file.require_group(group)
        if "taps" not in g:
            g.create_dataset("taps", data=np.array(taps, dtype=object), dtype=_STR)
        for pair, metrics in table.items():
            for metric, values in metrics.items():  # uncompressed: gzip cost 0.4 s per 3B trace (bundles compress)
                g.create_dataset(f"{pair}/{metric}", data=np.asarray(values, dtype=np.float32))
            if present and pair in present:
                g.create_dataset(f"{pair}/present", data=np.asarray(present[pair], dtype=bool))

    def write_embeddings(self, pooled: dict[str, np.ndarray], pooling: str) -> None:
        """Per-sequence pooled final embeddings, ``/embeddings/<path>`` ``(S, E)`` float64."""
        g = self.file.require_group("embeddings")
        g.attrs["pooling"] = pooling
        for path, values in pooled.items():
            g.create_dataset(path, data=np.asarray(values, dtype=np.float64))

    def commit(self) -> Path:
        """Mark complete, flush, fsync, close and rename into place. Returns the final path."""
        t0 = time.perf_counter()
        self.file.attrs["complete"] = True
        self.file.flush()
        self.file.close()
        os.fsync(self._fd)  # the file's data and metadata, whichever descriptor wrote them
        self._close_fd()
        self.commit_seconds = time.perf_counter() - t0
        if self.path.exists() and not self.force:
            self.abort()
            raise TracerError(f"{self.path} appeared while tracing; pass --force to overwrite it")
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the partial file (idempotent)."""
        try:
            if self.file.id.valid:
                self.file.close()
        finally:
            self._close_fd()
            self.partial.unlink(missing_ok=True)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


@dataclass(frozen=True)
class SequenceInfo:
    """One sequence as recorded in a trace. ``rows`` are its canonical token rows."""

    index: int
    id: str
    residues: str
    length: int
    rows: slice


class Trace:
    """Read access to a trace file (use :func:`open_trace`).

    Attributes:
        path: the file.
        meta: run metadata (dict).
        sequences: list of :class:`SequenceInfo`, canonical order.
        layout: :class:`tracer.packing.Layout` of the batch.
    """

    def __init__(self, path: Path, file: h5py.File):
        self.path = path
        self.file = file
        self.meta = _json_attr(file, "meta", path)
        g = file["sequences"]
        ids = [s.decode() if isinstance(s, bytes) else s for s in g["ids"][()]]
        residues = [s.decode() if isinstance(s, bytes) else s for s in g["residues"][()]]
        lengths = g["lengths"][()].tolist()
        offsets = g["offsets"][()].tolist()
        self.layout = Layout.from_lengths([n + 2 for n in lengths], g["pack_order"][()].tolist())
        self.sequences = [
            SequenceInfo(i, ids[i], residues[i], lengths[i], slice(offsets[i], offsets[i + 1]))
            for i in range(len(ids))
        ]

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()

    @property
    def n_tokens(self) -> int:
        return self.layout.n_tokens

    @property
    def summary(self) -> dict | None:
        return json.loads(self.file.attrs["summary"]) if "summary" in self.file.attrs else None

    @property
    def paths(self) -> list[str]:
        return sorted(self.file["taps"].keys()) if "taps" in self.file else []

    def taps(self, path: str) -> list[str]:
        from tracer.taps import walk_key

        if path not in self.paths:
            raise TracerError(f"{self.path} has no tensors for path {path!r}; it has: {', '.join(self.paths) or 'none'}")
        return sorted(self.file["taps"][path].keys(), key=walk_key)

    def has_tap(self, path: str, name: str) -> bool:
        return f"taps/{path}/{name}" in self.file

    def tap(self, path: str, name: str, rows=None, as_numpy: bool = False):
        """One tap as a torch tensor (bf16 decoded) or, with ``as_numpy``, a float numpy array.

        Args:
            path: ``unpacked``, ``packed`` or ``reference``.
            name: tap name, e.g. ``layers.3.q_rope``.
            rows: optional slice/array of canonical rows (e.g. ``trace.token_slice("large")``);
                in a bundle's slim trace, a tap holds only rows ``ds.attrs["rows"]`` and
                ``rows`` indexes what is stored.
            as_numpy: return numpy (bfloat16 decoded exactly to float32).
        """
        key = f"taps/{path}/{name}"
        if key not in self.file:
            have = self.taps(path)
            raise TracerError(
                f"{self.path} has no tap {name!r} for path {path!r}; it has {len(have)} taps "
                f"({', '.join(have[:3])}{', ...' if len(have) > 3 else ''})"
            )
        ds = self.file[key]
        data = ds[()] if rows is None else ds[rows]
        dtype = _attr_str(ds.attrs.get("dtype", ""))
        t = from_numpy(data, dtype)
        if as_numpy:
            return t.float().numpy() if dtype == "bfloat16" else t.numpy()
        return t

    def tap_dtype(self, path: str, name: str) -> str:
        return _attr_str(self.file[f"taps/{path}/{name}"].attrs["dtype"])

    def sequence(self, key: str | int) -> SequenceInfo:
        if isinstance(key, int):
            return self.sequences[key]
        for s in self.sequences:
            if s.id == key:
                return s
        raise TracerError(f"no sequence {key!r} in {self.path}; it has: {', '.join(s.id for s in self.sequences)}")

    def token_slice(self, key: str | int) -> slice:
        """Canonical rows of one sequence's tokens (``<cls>``, residues, ``<eos>``)."""
        return self.sequence(key).rows

    def embeddings(self, path: str) -> np.ndarray | None:
        """Pooled final embeddings ``(S, E)`` float64 of ``path`` (:mod:`tracer.embeddings`), or ``None``."""
        key = f"embeddings/{path}"
        return self.file[key][()] if key in self.file else None

    def metric_groups(self) -> list[str]:
        return [g for g in ("metrics", "local") if g in self.file]


def _attr_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _json_attr(file: h5py.File, key: str, path: Path) -> dict:
    try:
        return json.loads(file.attrs[key])
    except (KeyError, ValueError, TypeError):
        raise TracerError(f"{path} is damaged: its {key} record is missing or unreadable") from None


def open_trace(path: str | Path) -> Trace:
    """Open a trace for reading, refusing anything that is not a complete trace we understand."""
    path = Path(path)
    if not path.exists():
        hint = ""
        if partial_path(path).exists():
            hint = f" (only the partial {partial_path(path).name} of an interrupted run is there)"
        raise TracerError(f"{path} does not exist{hint}")
    if path.is_dir():
        raise TracerError(f"{path} is a directory, not a trace file")
    if path.name.endswith(".partial"):
        raise TracerError(f"{path} is the partial file of an interrupted run, not a trace")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as e:
        raise TracerError(f"cannot read {path}: {e}") from None
    if not is_hdf5:
        raise TracerError(f"{path} is not an HDF5 file, so not a tracer trace")
    try:
        file = h5py.File(path, "r")
    except OSError as e:
        raise TracerError(f"{path} is a damaged or truncated HDF5 file ({str(e).splitlines()[0]})") from None
    try:
        fmt = _attr_str(file.attrs.get("format", ""))
        if fmt != FORMAT:
            raise TracerError(f"{path} is an HDF5 file but not a tracer trace (no format={FORMAT!r} attribute)")
        version = int(file.attrs.get("schema_version", -1))
        if version > SCHEMA_VERSION:
            raise TracerError(
                f"{path} was written with trace schema {version}, newer than this tracer reads "
                f"({SCHEMA_VERSION}); upgrade tracer"
            )
        if version < 1:
            raise TracerError(f"{path} has no valid schema_version")
        if not bool(file.attrs.get("complete", False)):
            raise TracerError(f"{path} is incomplete (the run that wrote it did not finish)")
        if "sequences" not in file:
            raise TracerError(f"{path} is damaged: it has no sequences group")
        return Trace(path, file)
    except TracerError:
        file.close()
        raise
    except (OSError, KeyError, ValueError) as e:
        file.close()
        raise TracerError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
