"""What binds a trace's contents to the run that wrote them: a run id, run-bound checksums and
a manifest (trace schema 4).

* **Run id.** A writer draws a random 128-bit id (``uuid4().hex``) when it opens; it is the
  root attribute ``run_id`` and is repeated in the ``meta`` record.
* **Run-bound checksums.** Every dataset's ``crc32`` attribute, and the ``meta_crc32``,
  ``summary_crc32`` and ``manifest_crc32`` attributes of the records, are the CRC-32 of
  ``"tracer:<run_id>:<name>\\0"`` followed by the bytes (:func:`seed` gives the CRC-32 of that
  prefix, which zlib continues over the data). So a dataset copied from another trace, or
  renamed or swapped with another one inside the same trace, fails its checksum even though its
  bytes are intact. A CRC-32 detects accidents and copies, not forgery: anyone who has the file
  can recompute it (there is no secret key).
* **Manifest.** The root attribute ``manifest`` (JSON) lists every dataset and record the run
  wrote. Readers refuse a file holding a dataset the manifest does not list, or missing one it
  lists, and a manifest missing something the ``meta`` record promises (:func:`promised`: the
  taps of every path, the metrics of every pair, ``/local`` for ``--local`` runs and the
  pooled embeddings when ``final_norm`` was traced).

Example::

    >>> s = seed("0f" * 16, "taps/packed/embed")
    >>> bound_checksum(b"abc", s) == zlib.crc32(b"abc", s)
    True
"""

from __future__ import annotations

import json
import uuid
import zlib

import numpy as np

from tracer.judging.metrics import METRICS
from tracer.judging.rule import PAIR, ROUNDED, VS_REF

RECORDS = ("meta", "summary")
"""The JSON records (root attributes) a complete trace holds."""
SEQUENCES = ("ids", "residues", "lengths", "offsets", "pack_order", "cu_seqlens")
REFERENCE_PAIRS = (VS_REF["unpacked"], VS_REF["packed"], ROUNDED)
"""The metric pairs :func:`promised` requires of a trace with a reference, besides :data:`PAIR`."""


def new_run_id() -> str:
    """A fresh random run id (32 hex digits)."""
    return uuid.uuid4().hex


def seed(run_id: str, name: str) -> int:
    """The CRC-32 of ``"tracer:<run_id>:<name>\\0"``: the start value of ``name``'s checksum."""
    return zlib.crc32(f"tracer:{run_id}:{name.lstrip('/')}\0".encode())


def bound_checksum(a, start: int) -> int:
    """CRC-32 continued from ``start`` over an array's bytes (C order); for strings and string
    arrays, their UTF-8 texts joined by NUL."""
    if isinstance(a, (str, bytes)):
        return zlib.crc32(a.encode() if isinstance(a, str) else a, start)
    a = np.asarray(a)
    if a.dtype.kind in "OSU":
        return zlib.crc32(b"\0".join(x.encode() if isinstance(x, str) else bytes(x) for x in a.reshape(-1).tolist()), start)
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8), start)


def manifest_text(datasets: list[str], records=RECORDS) -> str:
    """The ``manifest`` record: every dataset (sorted, no leading slash) and record written."""
    return json.dumps({"datasets": sorted(d.lstrip("/") for d in datasets), "records": sorted(records)}, sort_keys=True)


def trace_paths(meta: dict) -> list[str]:
    """The paths a run traced, from its meta: unpacked, packed and, with a reference, reference."""
    return ["unpacked", "packed"] + (["reference"] if meta.get("reference_dtype") else [])


def promised(meta: dict) -> set[str]:
    """The datasets a trace's ``meta`` record promises (a subset of what its manifest must list).

    A meta record without ``taps`` (a hand-written test trace) promises only the sequences.
    """
    out = {f"sequences/{k}" for k in SEQUENCES}
    names = meta.get("taps")
    if not isinstance(names, list) or "dtype" not in meta:
        return out
    paths = trace_paths(meta)
    tensors = meta.get("tensors", "full")
    stored = names if tensors == "full" else (meta.get("slim") or {}).get("taps", []) if tensors == "partial" else []
    out |= {f"taps/{p}/{n}" for p in paths for n in stored}
    pairs = [PAIR] + (list(REFERENCE_PAIRS) if meta.get("reference_dtype") else [])
    out.add("metrics/taps")
    out |= {f"metrics/{pair}/{m}" for pair in pairs for m in METRICS}
    if meta.get("local"):
        out.add("local/taps")
        out |= {f"local/{PAIR}/{m}" for m in METRICS}
    if "final_norm" in names:
        out |= {f"embeddings/{p}" for p in paths}
    return out


def describe_missing(key: str) -> str:
    """``tap layers.3.ctx of path packed`` for a tap, else the dataset name."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "taps":
        return f"tap {parts[2]} of path {parts[1]}"
    return key


def datasets(file) -> list[str]:
    """Every dataset of an open h5py file (names without the leading slash)."""
    import h5py

    names: list[str] = []
    file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def manifest_problem(listed, file, meta: dict) -> str | None:
    """What is wrong between a trace's manifest (``listed``, as :func:`manifest_text` wrote it),
    the datasets and records in the open h5py ``file`` and what the meta promises (one clause),
    or ``None``."""
    if not isinstance(listed, dict) or not isinstance(listed.get("datasets"), list):
        return "is damaged: its manifest record is not a manifest"
    present = set(datasets(file))
    datasets_listed = set(listed["datasets"])
    missing = sorted(datasets_listed - present)
    if missing:
        more = f" ({len(missing)} datasets its manifest lists are gone)" if len(missing) > 1 else ""
        return f"is missing {describe_missing(missing[0])}{more}; its run wrote it"
    extra = sorted(present - datasets_listed)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return f"holds /{extra[0]}{more}, which its run did not write (not in its manifest)"
    unlisted = sorted(promised(meta) - datasets_listed)
    if unlisted:
        return f"is missing {describe_missing(unlisted[0])}, which its meta record promises (not in its manifest)"
    records = set(listed.get("records", []))
    needed = {"meta", "summary"} if isinstance(meta.get("taps"), list) else {"meta"}
    if not needed <= records:
        return f"has a manifest without the {', '.join(sorted(needed - records))} record"
    gone = sorted(r for r in records if r not in file.attrs)
    return f"is missing its {gone[0]} record" if gone else None
