"""Weights read from disk are checked on the bytes the run uses, read once.

Checkpoints are read into private memory (``torch.load(mmap=False)``): a run never computes from
a file mapping that another process could overwrite (values change under the run) or truncate
(``SIGBUS``). The bytes are checked as they are read, with no second read of the file and no
second pass over memory (the read jobs' CRC-32s, joined per record by :func:`crc32_combine`;
computed from memory only where a load did not take them):

* **a checkpoint** (``--weights`` or fair-esm's hub cache): the CRC-32 of every tensor storage
  against the CRC-32 its zip directory records for that record
  (:func:`check_zip_records`); the small non-tensor records (``data.pkl``, ``version``) are read
  and CRC-checked by :mod:`zipfile`. A damaged byte, or a file that changed while it was read,
  is refused.
* **tracer's random-weights cache**: the digest tracer wrote into the file
  (:func:`cache_record`), which binds the file to its cache key (shape, seed, fair-esm and torch
  versions) and lists every tensor's dtype, shape and CRC-32 (:func:`check_cache_record`).

The digest record, ``data["tracer"]`` of a cache file (format ``tracer-random-cache-v1``)::

    {"random_seed_cache": True,
     "format": "tracer-random-cache-v1",
     "key": "6L-320E-20H-td1-seed0-fair-esm2.0.0-torch2.5.1",   # models.random_cache_key
     "tensors": {"embed_tokens.weight": ["float32", [33, 320], 1234567890], ...}}  # name: dtype, shape, CRC-32

A reader trusts the file when the key is the one it asked for, the names are exactly those of
``data["model"]`` (prefix ``encoder.`` removed) and every dtype, shape and CRC-32 of the
tensors as loaded matches. CRC-32 (``zlib.crc32`` over the tensor's bytes) finds every
accidental change (a flipped bit, a NaN written in, a layer copied or scaled, a file swapped),
not a deliberate forgery; it runs at the speed of memory, in parallel threads.

Example::

    data = torch.load(path, mmap=False, weights_only=True)
    check_zip_records(path, data)
"""

from __future__ import annotations

import functools
import os
import re
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch

from tracer.errors import TracerError, first_line

CACHE_FORMAT = "tracer-random-cache-v1"
_DATA_RECORD = re.compile(r"(^|/)data/\d+$")


def tensor_bytes(t: torch.Tensor):
    """The bytes of a CPU tensor, as a NumPy ``uint8`` view (a copy only if not contiguous)."""
    x = t.detach().contiguous().reshape(-1)
    return x.view(torch.uint8).numpy() if x.numel() else b""


def _storage_bytes(storage: torch.UntypedStorage):
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,)).numpy()


def crc32s(buffers: list) -> list[int]:
    """``zlib.crc32`` of each buffer, in parallel threads (zlib releases the GIL)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(buffers)))
    if workers == 1:
        return [zlib.crc32(b) for b in buffers]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(zlib.crc32, buffers))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``a + b`` from ``crc1 = crc32(a)``, ``crc2 = crc32(b)`` and ``len2 = len(b)``
    (zlib's ``crc32_combine``, which Python's :mod:`zlib` does not expose): ``crc1`` is carried
    over ``len2`` zero bytes by a GF(2) operator, cached per length."""
    return _gf2_apply(_zeros_operator(len2), crc1) ^ crc2


def _gf2_apply(matrix: tuple[int, ...], vector: int) -> int:
    """``matrix`` (32 columns, column ``n`` = image of bit ``n``) times ``vector``."""
    out, n = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[n]
        vector >>= 1
        n += 1
    return out


def _gf2_compose(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """The operator ``a`` after ``b``."""
    return tuple(_gf2_apply(a, column) for column in b)


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The operator that advances a CRC-32 register over ``nbytes`` zero bytes."""
    power = (0xEDB88320,) + tuple(1 << n for n in range(31))  # one zero bit (reflected polynomial)
    for _ in range(3):
        power = _gf2_compose(power, power)  # -> one zero byte
    result = tuple(1 << n for n in range(32))  # identity
    while nbytes:
        if nbytes & 1:
            result = _gf2_compose(power, result)
        power = _gf2_compose(power, power)
        nbytes >>= 1
    return result


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a CPU tensor's bytes as stored."""
    return zlib.crc32(tensor_bytes(t))


def cache_record(state: dict[str, torch.Tensor], key: str) -> dict:
    """The digest record written into a random-weights cache file (module docstring)."""
    names = list(state)
    crcs = crc32s([tensor_bytes(state[n]) for n in names])
    return {
        "random_seed_cache": True,
        "format": CACHE_FORMAT,
        "key": key,
        "tensors": {n: [str(state[n].dtype).removeprefix("torch."), list(state[n].shape), c] for n, c in zip(names, crcs)},
    }


def check_cache_record(record, state: dict[str, torch.Tensor], key: str, known: dict[int, int] | None = None) -> str | None:
    """``None`` if ``state`` (as loaded) is what ``record`` says tracer wrote for ``key``; else why not.

    ``known``: ``{storage address: CRC-32}`` taken as the bytes were read
    (:func:`tracer.esm.checkpoints.private_copy`); used for a tensor that is its whole storage.
    """
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT:
        return "it has no tracer digest (written by another tool or an older tracer)"
    if record.get("key") != key:
        return f"it was written for {record.get('key')!r}, not {key!r}"
    listed = record.get("tensors")
    if not isinstance(listed, dict) or set(listed) != set(state):
        return "its tensors are not the ones its digest lists"
    names = list(state)
    crcs = _crcs(state, names, known or {})
    for name, crc in zip(names, crcs):
        t = state[name]
        if listed[name] != [str(t.dtype).removeprefix("torch."), list(t.shape), crc]:
            return f"{name} does not match its digest"
    return None


def _crcs(state: dict[str, torch.Tensor], names: list[str], known: dict[int, int]) -> list[int]:
    """CRC-32 of each named tensor's bytes: from ``known`` where the tensor is its whole storage,
    else computed (in parallel threads)."""
    def whole(t):
        s = t.untyped_storage()
        return t.storage_offset() == 0 and t.is_contiguous() and s.nbytes() == t.numel() * t.element_size() and s.data_ptr() in known
    out = {n: known[state[n].untyped_storage().data_ptr()] for n in names if whole(state[n])}
    rest = [n for n in names if n not in out]
    out.update(zip(rest, crc32s([tensor_bytes(state[n]) for n in rest])))
    return [out[n] for n in names]


class Unusual(Exception):
    """A sparse or meta tensor: refused by name when the model is built, not here."""


def storages_of(obj, out: dict) -> None:
    """Every distinct tensor storage reachable in a loaded checkpoint object."""
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.device.type == "meta":
            raise Unusual()
        s = obj.untyped_storage()
        out.setdefault(s._cdata, s)  # one entry per storage (empty ones share address 0)
    elif isinstance(obj, dict):
        for v in obj.values():
            storages_of(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            storages_of(v, out)


def is_data_record(name: str) -> bool:
    """Whether a zip record of a torch checkpoint holds a tensor storage (``.../data/<n>``)."""
    return _DATA_RECORD.search(name) is not None


def check_zip_records(path, data, known: dict[int, int] | None = None) -> None:
    """Raise :class:`TracerError` unless the tensors of ``data`` (loaded from ``path``, not
    memory-mapped) are byte for byte the records the zip directory lists, by size and CRC-32.

    The CRC-32 of each storage is taken from ``known`` (``{storage address: CRC-32}``, computed
    as the bytes were read) or else computed from memory: never a second read of the file. The
    non-tensor records are small and are read and checked by :mod:`zipfile`.
    """
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            for info in members:
                if not _DATA_RECORD.search(info.filename):
                    z.read(info)  # zipfile checks the CRC-32 of what it reads
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise TracerError(f"{path} is damaged ({first_line(e)})") from None
    expected = Counter((i.file_size, i.CRC) for i in members if _DATA_RECORD.search(i.filename))
    found: dict = {}
    try:
        storages_of(data, found)
    except Unusual:  # the model build refuses it with a line naming the tensor (sparse, meta)
        return
    known = known or {}
    storages = list(found.values())
    todo = [s for s in storages if s.data_ptr() not in known]
    computed = dict(zip((s.data_ptr() for s in todo), crc32s([_storage_bytes(s) for s in todo])))
    got = Counter((s.nbytes(), known.get(s.data_ptr(), computed.get(s.data_ptr()))) for s in storages)
    if got != expected:
        bad = sum((got - expected).values()) or sum((expected - got).values())
        raise TracerError(
            f"{path} is damaged: {bad} of its {sum(expected.values())} weight records fail their zip CRC-32 check "
            "(a corrupted download or disk, or the file changed while it was read)"
        )
