"""The HDF5 trace: one self-describing file per run, written atomically; and its read API.

Layout (schema version 4)::

    /                          attrs: format="tracer-trace", schema_version, complete, run_id,
                               meta (JSON: command line, versions, model, weights, dtypes,
                               device, backend, run_id, ...), summary (JSON, the comparator's
                               verdict), manifest (JSON: every dataset and record written)
    /sequences/ids             (S,) str     input order ("canonical")
    /sequences/residues        (S,) str
    /sequences/lengths         (S,) int64   residues L per sequence
    /sequences/offsets         (S+1,) int64 canonical row where each sequence starts (tokens = L+2)
    /sequences/pack_order      (S,) int64   canonical index of the j-th packed sequence
    /sequences/cu_seqlens      (S+1,) int32 boundaries of the packed stream, as the kernel saw them
    /taps/<path>/<tap>         (N, ...)     path in unpacked|packed|control|reference, tap like
                                            "layers.3.q_rope"; rows are canonical tokens;
                                            attrs: dtype, encoding
    /metrics/taps              (T,) str     tap names, walk order
    /metrics/<pair>/<metric>   (T, N) float32 per-token metrics (pair like "packed-vs-unpacked")
    /local/...                 same shape, per-layer re-runs (tracer.run --local)
    /embeddings/<path>         (S, E) float64 final_norm averaged over each sequence's residues
                               (tracer.judging.embeddings), when final_norm was traced

Tensors are stored losslessly in the dtype they were computed in. HDF5 has no bfloat16, so a
bfloat16 tap is stored as its raw 16-bit patterns in a ``uint16`` dataset with attributes
``dtype="bfloat16"`` and ``encoding="bfloat16-bits-as-uint16"``. Decode with
``torch.from_numpy(a).view(torch.bfloat16)``, or without torch with
``(a.astype(np.uint32) << 16).view(np.float32)`` (exact). :func:`open_trace` does this for you.

A trace is written to a partial file unique to the run (``<path>.<pid>-<random>.partial``,
created exclusively) and moved into place only once complete, flushed and fsynced, without
replacing a file that appeared meanwhile (unless ``force``; :mod:`tracer.store.files`), so a file at
the final path is always whole; readers refuse files without ``complete=True``.

Checksums and the manifest (schema 4) bind every dataset and record to the run and to its name
(:mod:`tracer.store.binding`). Readers check the manifest on open, small datasets and records
when read, a tap whenever it is read whole; :meth:`Trace.verify` checks everything (``tracer.compare
--verify``). The control path (:mod:`tracer.capture.control`, schema 3 on) stores its taps under
``/taps/control`` when it ran as a separate stream and its metrics as
``/metrics/control-vs-reference``. Files of schemas 1 to 3 are refused with one line.

Example::

    >>> import tracer
    >>> t = tracer.open_trace("traces/trace.h5")          # doctest: +SKIP
    >>> q = t.tap("packed", "layers.0.q_rope")            # doctest: +SKIP
    >>> t.token_slice("large")                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from tracer.store import binding, files
from tracer.errors import TracerError
from tracer.inputs.packing import Layout

FORMAT = "tracer-trace"
SCHEMA_VERSION = 4
"""4: checksums bound to the run id and the dataset name, and a manifest; 3: the control path
(``/taps/control``, ``/metrics/control-vs-reference``, ``meta["control"]``); 2: plain per-dataset
CRC-32; 1: no checksums. Older schemas are refused, not read unverified."""
BF16_ENCODING = "bfloat16-bits-as-uint16"
COMPRESSIONS = ("none", "lzf", "gzip")
_STR = h5py.string_dtype()


def partial_path(path: Path) -> Path:
    """The fixed partial name of schema-1 writers (``<path>.partial``); runs use unique names
    (:func:`tracer.store.files.partials_of` lists them)."""
    return path.with_name(path.name + ".partial")


def checksum(a, start: int = 0) -> int:
    """CRC-32 of an array's bytes (C order), continued from ``start`` (a run-bound
    :func:`tracer.store.binding.seed`); string arrays: their UTF-8 texts joined by NUL."""
    return binding.bound_checksum(a, start)


def tap_checksum(tensor: torch.Tensor, start: int = 0) -> int:
    """CRC-32 of a CPU tap's bytes exactly as :meth:`TraceWriter.write_tap` stores them,
    continued from ``start`` (the writer's :meth:`TraceWriter.seed` of the tap's dataset)."""
    data, _ = to_numpy(tensor)
    data = np.ascontiguousarray(data)
    return zlib.crc32(memoryview(data).cast("B"), start) if data.size else start


NUMPY_DTYPES = {"bfloat16": np.dtype("<u2"), "float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
"""The on-disk numpy dtype of a tap of each trace dtype (little-endian, as tracer writes them)."""


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
        force: overwrite an existing file at ``path`` (checked again at commit, without a
            window: the commit never replaces a file that appeared meanwhile unless ``force``).
        compression: ``none``, ``lzf`` or ``gzip`` (level 4) for tap tensors.

    The work goes to :attr:`partial`, unique to this writer. Use as a context manager: leaving
    it with an exception (Ctrl-C, SIGTERM and SIGHUP included) removes the partial file. A full
    disk is one :class:`TracerError` line. Every checksum is bound to :attr:`run_id` (drawn here)
    and to the dataset's name; :meth:`commit` records the manifest of what was written.
    """

    def __init__(self, path: str | Path, force: bool = False, compression: str = "none"):
        self.path = Path(path)
        self.force = force
        if compression not in COMPRESSIONS:
            raise TracerError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
        self.compression = None if compression == "none" else compression
        if str(path) == "":
            raise TracerError("--out is empty; give a file path")
        if self.path.is_dir():
            raise TracerError(f"{self.path} is a directory; --out takes a file path")
        files.refuse_existing(self.path, force)
        self._fd = None
        self.partial = files.create_partial(self.path)  # ours alone (O_EXCL)
        try:
            self.file = h5py.File(self.partial, "w")
        except OSError as e:
            self.partial.unlink(missing_ok=True)
            raise TracerError(f"cannot write {self.partial}: {e.strerror or e}") from None
        self.file.attrs["format"] = FORMAT
        self.file.attrs["schema_version"] = SCHEMA_VERSION
        self.file.attrs["complete"] = False
        self.run_id = binding.new_run_id()
        self.file.attrs["run_id"] = self.run_id
        self._records: list[str] = []
        self.bytes_written = 0
        self._fd = os.open(self.partial, os.O_WRONLY)  # raw data of uncompressed taps (write_tap)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            if isinstance(exc, OSError):
                message = files.no_space_message(exc, self.partial, self.path)
                if message:
                    raise TracerError(message) from None
        return False

    def seed(self, key: str) -> int:
        """Start value of the run-bound checksum of dataset or record ``key``."""
        return binding.seed(self.run_id, key)

    def set_json(self, key: str, value) -> None:
        """A JSON record (``meta``, ``summary``); the ``meta`` record gets this run's ``run_id``."""
        if key == "meta":
            value = {**value, "run_id": self.run_id}
        self.set_json_text(key, json.dumps(value, sort_keys=True))
        if key not in self._records:
            self._records.append(key)

    def write_array(self, key: str, data, **kwargs):
        """A dataset with its run-bound ``crc32`` (of ``data`` as given); returns the h5py dataset."""
        ds = self.file.create_dataset(key, data=data, **kwargs)
        ds.attrs["crc32"] = checksum(data, self.seed(key))
        return ds

    def write_sequences(self, ids, residues, lengths, layout: Layout) -> None:
        g = "sequences/"
        self.write_array(g + "ids", np.array(ids, dtype=object), dtype=_STR)
        self.write_array(g + "residues", np.array(residues, dtype=object), dtype=_STR)
        self.write_array(g + "lengths", np.array(lengths, dtype=np.int64))
        self.write_array(g + "offsets", layout.offsets.numpy())
        self.write_array(g + "pack_order", np.array(layout.order, dtype=np.int64))
        self.write_array(g + "cu_seqlens", layout.cu_seqlens.numpy())

    def write_tap(self, path: str, name: str, tensor: torch.Tensor, crc32: int | None = None) -> None:
        """Store one tap (a CPU tensor, canonical layout), losslessly, with its run-bound CRC-32
        (``crc32``, if the caller computed it already with :func:`tap_checksum` from
        :meth:`seed` of ``taps/<path>/<name>``).

        Uncompressed taps are contiguous datasets allocated up front; HDF5 writes their
        metadata and tracer writes their bytes at the dataset's file offset with one
        ``os.pwrite`` (the use ``H5Dget_offset`` exists for), which skips HDF5's per-write
        overhead and never holds the GIL. Compressed taps go through h5py's chunked path. The
        checksum is computed on the same host bytes (zlib releases the GIL; ~4 GB/s).
        """
        data, dtype = to_numpy(tensor)
        data = np.ascontiguousarray(data)
        key = f"taps/{path}/{name}"
        view = memoryview(data).cast("B") if data.size else b""
        crc = zlib.crc32(view, self.seed(key)) if crc32 is None else crc32
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
            done = 0
            while offset is not None and done < len(view):  # pwrite may write less than asked
                done += os.pwrite(self._fd, view[done:], offset + done)
            if offset is not None and done and hasattr(os, "posix_fadvise"):
                # start writeback of this range now (asynchronously) rather than leaving
                # gigabytes of dirty pages for the final fsync, and keep them out of the cache
                os.posix_fadvise(self._fd, offset, done, os.POSIX_FADV_DONTNEED)
        ds.attrs["dtype"] = dtype
        ds.attrs["encoding"] = BF16_ENCODING if dtype == "bfloat16" else "raw"
        ds.attrs["crc32"] = crc
        self.bytes_written += data.nbytes

    def write_metrics(self, group: str, taps: list[str], table: dict[str, dict[str, np.ndarray]], present=None) -> None:
        """``table[pair][metric]`` is ``(T, N)`` in the order of ``taps``; ``present[pair]``, if
        given, is ``(T,)`` bool (which taps both sides recorded), stored as ``<pair>/present``."""
        g = self.file.require_group(group)
        if "taps" not in g:
            self.write_array(f"{group}/taps", np.array(taps, dtype=object), dtype=_STR)
        for pair, metrics in table.items():
            for metric, values in metrics.items():  # uncompressed: gzip cost 0.4 s per 3B trace (bundles compress)
                self.write_array(f"{group}/{pair}/{metric}", np.asarray(values, dtype=np.float32))
            if present and pair in present:
                self.write_array(f"{group}/{pair}/present", np.asarray(present[pair], dtype=bool))

    def write_embeddings(self, pooled: dict[str, np.ndarray], pooling: str) -> None:
        """Per-sequence pooled final embeddings, ``/embeddings/<path>`` ``(S, E)`` float64."""
        g = self.file.require_group("embeddings")
        g.attrs["pooling"] = pooling
        for path, values in pooled.items():
            self.write_array(f"embeddings/{path}", np.asarray(values, dtype=np.float64))

    def commit(self) -> Path:
        """Mark complete, flush, fsync, close and move into place (never replacing a file that
        appeared meanwhile unless ``force``); fsync the folder. Returns the final path."""
        t0 = time.perf_counter()
        self.set_json_text("manifest", binding.manifest_text(binding.datasets(self.file), self._records))
        self.file.attrs["complete"] = True
        self.file.flush()
        self.file.close()
        os.fsync(self._fd)  # the file's data and metadata, whichever descriptor wrote them
        self._close_fd()
        self.commit_seconds = time.perf_counter() - t0
        files.commit(self.partial, self.path, self.force)
        return self.path

    def set_json_text(self, key: str, text: str) -> None:
        """A JSON record as text, with its run-bound checksum (:meth:`set_json` also lists it as written)."""
        self.file.attrs[key] = text
        self.file.attrs[f"{key}_crc32"] = checksum(text, self.seed(key))

    def abort(self) -> None:
        """Close and delete this writer's partial file (idempotent)."""
        try:
            if self.file.id.valid:
                self.file.close()
        except Exception:  # a full disk can fail the close too; the file goes either way
            pass
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
        run_id: the id of the run that wrote it (every checksum is bound to it).
        meta: run metadata (dict).
        sequences: list of :class:`SequenceInfo`, canonical order.
        layout: :class:`tracer.inputs.packing.Layout` of the batch.
    """

    def __init__(self, path: Path, file: h5py.File):
        self.path = path
        self.file = file
        self.run_id = attr_str(file.attrs.get("run_id", ""))
        if not self.run_id:
            raise TracerError(f"{path} is damaged: it has no run_id")
        self.meta = self._record("meta")
        if not isinstance(self.meta, dict):
            raise TracerError(f"{path} is damaged: its meta record is not an object")
        if self.meta.get("run_id") != self.run_id:
            raise TracerError(f"{path} is damaged: its meta record belongs to another run (run_id {self.meta.get('run_id')!r}, file {self.run_id!r})")
        self._check_manifest()
        g = file["sequences"]
        read = {k: self.read_small(f"sequences/{k}") for k in ("ids", "residues", "lengths", "offsets", "pack_order", "cu_seqlens")}
        ids = [attr_str(s) for s in read["ids"]]
        residues = [attr_str(s) for s in read["residues"]]
        lengths = [int(n) for n in read["lengths"]]
        offsets = [int(n) for n in read["offsets"]]
        try:
            self.layout = Layout.from_lengths([n + 2 for n in lengths], [int(i) for i in read["pack_order"]])
        except (ValueError, TypeError) as e:
            raise TracerError(f"{path} is damaged: its sequence records are inconsistent ({e})") from None
        if not (len(ids) == len(residues) == len(lengths) and offsets == self.layout.offsets.tolist()
                and [int(x) for x in read["cu_seqlens"]] == self.layout.cu_seqlens.tolist()
                and min(lengths) >= 1):
            raise TracerError(f"{path} is damaged: its sequence records (ids, lengths, offsets, cu_seqlens) disagree")
        del g
        self.sequences = [
            SequenceInfo(i, ids[i], residues[i], lengths[i], slice(offsets[i], offsets[i + 1]))
            for i in range(len(ids))
        ]

    def has(self, key: str) -> bool:
        """Whether the file holds ``key`` (a group or dataset path, e.g. ``metrics`` or ``local``)."""
        return key in self.file

    def seed(self, key: str) -> int:
        """Start value of the run-bound checksum of dataset or record ``key``."""
        return binding.seed(self.run_id, key)

    def _record(self, key: str):
        return _json_attr(self.file, key, self.path, self.seed(key))

    def _check_manifest(self) -> None:
        """Refuse a file whose datasets differ from its manifest, or whose manifest lacks what
        the meta record promises (:func:`tracer.store.binding.manifest_problem`)."""
        problem = binding.manifest_problem(self._record("manifest"), self.file, self.meta)
        if problem:
            raise TracerError(f"{self.path} {problem}; no verdict is given from an incomplete or altered trace")

    def read_small(self, key: str) -> np.ndarray:
        """A small dataset read whole and checked against its checksum."""
        if key not in self.file:
            raise TracerError(f"{self.path} is damaged: it has no {key}")
        ds = self.file[key]
        data = ds[()]
        self.check(ds, data)
        return data

    def check(self, ds, data) -> None:
        """Raise :class:`TracerError` unless ``data`` (all of dataset ``ds``, as read) matches
        the dataset's stored checksum, bound to this run and to the dataset's name."""
        stored = ds.attrs.get("crc32")
        if stored is None:
            raise TracerError(f"{self.path} is damaged: {ds.name} has no checksum")
        actual = checksum(data, self.seed(ds.name))
        if int(stored) & 0xFFFFFFFF != actual:
            raise TracerError(checksum_failure(self.path, ds.name))

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
        return self._record("summary") if "summary" in self.file.attrs else None

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
        dtype = self.checked_dtype(ds)
        if rows is None:
            data = ds[()]
            self.check(ds, data)
        else:
            data = ds[rows]
        t = from_numpy(data, dtype)
        if as_numpy:
            return t.float().numpy() if dtype == "bfloat16" else t.numpy()
        return t

    def checked_dtype(self, ds) -> str:
        """The trace dtype of tap dataset ``ds``, after checking its stored type and row count."""
        dtype = attr_str(ds.attrs.get("dtype", ""))
        expected = NUMPY_DTYPES.get(dtype)
        if expected is None or ds.dtype != expected:
            raise TracerError(f"{self.path} is damaged: {ds.name} is stored as {ds.dtype}, not as a {dtype or 'known'} tap")
        rows = ds.attrs.get("rows")
        n = (int(rows[1]) - int(rows[0])) if rows is not None and len(rows) == 2 else self.n_tokens
        if not ds.shape or ds.shape[0] != n:
            raise TracerError(f"{self.path} is damaged: {ds.name} has shape {ds.shape}, expected {n} token rows")
        return dtype

    def verify(self, taps: bool = True) -> int:
        """Check every checksum in the file (all tap data read once; ``taps=False``: all but the tap
        tensors, which the caller reads and checks anyway); returns the datasets checked. Raises
        :class:`TracerError` naming the first damaged dataset."""
        self._check_manifest()
        names = [n for n in binding.datasets(self.file) if taps or not n.startswith("taps/")]
        for name in names:
            ds = self.file[name]
            if name.startswith("taps/"):
                self.checked_dtype(ds)
            self.check(ds, ds[()])
        self.summary  # noqa: B018 -- checks the record's checksum
        return len(names)

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

    def embedding_paths(self) -> list[str]:
        """The paths whose pooled embeddings the trace holds."""
        return sorted(self.file["embeddings"].keys()) if "embeddings" in self.file else []

    def embeddings(self, path: str) -> np.ndarray | None:
        """Pooled final embeddings ``(S, E)`` float64 of ``path`` (:mod:`tracer.judging.embeddings`), or ``None``."""
        key = f"embeddings/{path}"
        return self.read_small(key) if key in self.file else None

    def metric_groups(self) -> list[str]:
        return [g for g in ("metrics", "local") if g in self.file]


def attr_str(v) -> str:
    """An HDF5 string attribute as ``str`` (h5py gives ``bytes`` for some)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def checksum_failure(path, name: str) -> str:
    """The one line for a dataset whose bytes do not match its run-bound checksum."""
    return (
        f"{path} is damaged: {name} fails its checksum (its bytes were altered, or it was copied from another "
        "trace or from another name); no verdict is given from damaged data"
    )


def _json_attr(file: h5py.File, key: str, path: Path, start: int):
    try:
        text = file.attrs[key]
        if int(file.attrs[f"{key}_crc32"]) & 0xFFFFFFFF != checksum(attr_str(text), start):
            raise TracerError(f"{path} is damaged: its {key} record fails its checksum (altered, or from another trace)")
        return json.loads(text)
    except (KeyError, ValueError, TypeError, OSError):
        raise TracerError(f"{path} is damaged: its {key} record is missing or unreadable") from None


def open_trace(path: str | Path) -> Trace:
    """Open a trace for reading, refusing anything that is not a complete trace we understand.

    The structure is checked on open (format, schema, completeness, the meta record, the
    manifest against the file's datasets and the meta's promises, the sequence records and their
    checksums); other data is checked when read.
    """
    path = Path(path)
    if not path.exists():
        hint = ""
        partials = files.partials_of(path) + ([partial_path(path)] if partial_path(path).exists() else [])
        if partials:
            hint = f" (only the partial {partials[0].name} of an interrupted run is there)"
        raise TracerError(f"{path} does not exist{hint}")
    if path.is_dir():
        raise TracerError(f"{path} is a directory, not a trace file")
    if path.name.endswith(files.PARTIAL_SUFFIX):
        raise TracerError(f"{path} is the partial file of an interrupted run, not a trace")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as e:
        raise TracerError(f"cannot read {path}: {e}") from None
    if not is_hdf5:
        raise TracerError(f"{path} is not an HDF5 file, so not a tracer trace")
    try:
        file = h5py.File(path, "r")
    except Exception as e:  # h5py raises OSError, but damaged superblocks have given others
        raise TracerError(f"{path} is a damaged or truncated HDF5 file ({_first(e)})") from None
    try:
        fmt = attr_str(file.attrs.get("format", ""))
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
        if version < SCHEMA_VERSION:
            raise TracerError(
                f"{path} is a trace of schema {version}, whose checksums are not bound to its run; this tracer "
                f"reads schema {SCHEMA_VERSION} only: trace again with the command recorded in its meta"
            )
        if not bool(file.attrs.get("complete", False)):
            raise TracerError(f"{path} is incomplete (the run that wrote it did not finish)")
        if "sequences" not in file:
            raise TracerError(f"{path} is damaged: it has no sequences group")
        return Trace(path, file)
    except TracerError:
        file.close()
        raise
    except Exception as e:  # whatever h5py raises on damaged metadata
        file.close()
        raise damaged(path, e) from None


def damaged(path, e: BaseException) -> TracerError:
    """The one-line error for a file whose HDF5 structure failed while being read."""
    return TracerError(f"{path} is damaged ({type(e).__name__}: {_first(e)})")


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


READ_ERRORS = (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError, OverflowError)
"""What h5py (and the records it returns) raise on a damaged file while reading it."""


@contextlib.contextmanager
def reading(*paths):
    """Inside, an error h5py raises while reading a trace that was accepted on open (damaged
    HDF5 metadata) becomes the one-line "is damaged" :class:`TracerError`."""
    try:
        yield
    except TracerError:
        raise
    except READ_ERRORS as e:
        raise damaged(" or ".join(str(p) for p in paths), e) from None
