"""Reading fair-esm checkpoints safely: the released on-disk format, its architecture, and one-line errors for damaged files."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import socket
import sys
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from esm.model.esm2 import ESM2

from tracer.errors import TracerError, first_line
from tracer.esm import integrity
from tracer.esm.catalogue import MODEL_URL, Architecture, empty_esm2
from tracer.esm.precision import canonical_inv_freq, remember_loaded



def hub_checkpoint_path(name: str) -> Path:
    """Where fair-esm's loader caches ``name``: ``$TORCH_HOME/hub/checkpoints/<name>.pt``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def read_checkpoint(path: str | Path, trust: bool = False, tensors: bool = True, zip_crcs: bool = True, crcs: dict | None = None) -> dict:
    """Read a fair-esm checkpoint file once, into private memory, and check what was read.

    Unpickled with ``weights_only=True``, allowing only ``argparse.Namespace`` beyond tensors and
    containers (ESM-2 checkpoints keep their config in one); ``trust=True`` falls back to a full
    unpickle for files that need more. The tensors are read into the process's own memory
    (:func:`private_copy`: the file is memory-mapped only to learn its structure, never read
    through the map): a file overwritten or truncated during the run cannot change the weights
    under it or kill it with ``SIGBUS`` (:mod:`tracer.esm.integrity`). ``zip_crcs``: check every
    tensor's bytes as loaded against the zip's CRC-32 (from memory, no second read; the random
    cache checks its own digest instead). ``tensors=False``: only the config is wanted
    (memory-mapped, no tensor byte is read or checked). ``crcs``: filled with the CRC-32 of every
    storage read, by its address (:func:`private_copy`), for a digest check without a second pass.
    """
    path = Path(path)
    if not path.exists():
        raise TracerError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise TracerError(f"checkpoint {str(path)!r} is a directory, not a .pt file")
    if not os.access(path, os.R_OK):
        raise TracerError(f"checkpoint {str(path)!r} is not readable (permissions)")
    is_zip = zipfile.is_zipfile(path)  # mmap and CRCs need the zip format of torch >= 1.6
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", mmap=is_zip, weights_only=not trust)  # structure only: no tensor byte read yet
    except pickle.UnpicklingError as e:
        detail = re.search(r"Unsupported (global|class)[^\n]*", str(e))
        if trust or detail is None:  # not about foreign objects: the bytes are not a checkpoint
            raise TracerError(f"{path} is not a readable PyTorch checkpoint ({last_line(e)})") from None
        raise TracerError(
            f"{path} holds Python objects beyond tensors ({detail.group(0).rstrip('.')}); "
            "if you trust the file, add --trust-checkpoint"
        ) from None
    except Exception as e:  # whatever torch.load raises on a file that is not a checkpoint
        raise TracerError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first_line(e)})") from None
    read_crcs = {} if crcs is None else crcs
    if is_zip and tensors:
        try:
            data = private_copy(path, data, trust, read_crcs)
        except OSError as e:
            raise TracerError(f"{path} could not be read ({e.strerror or first_line(e)})") from None
    if is_zip and tensors and zip_crcs:
        integrity.check_zip_records(path, data, read_crcs)  # torch.load does not check them
    if not isinstance(data, dict):
        raise TracerError(f"{path} is not a fair-esm checkpoint (top level is {type(data).__name__})")
    return data


READ_CHUNK = 64 << 20
"""Bytes per read job of a checkpoint's tensor records (parallel reads of 64 MB reach ~17 GB/s on
the H200 machine from the page cache; ``torch.load`` without ``mmap`` read 1.6 GB/s there)."""

CRC_STEP = 2 << 20
"""Bytes per ``preadv`` within a job: each step's CRC-32 is taken while its bytes are still in
the processor's cache, so the checksum costs no second pass over memory."""


def private_copy(path: Path, data, trust: bool = False, crcs: dict | None = None):
    """``data`` (``torch.load(path, mmap=True)``) with every tensor's storage read into private
    memory, by parallel ``pread`` s at the offsets the zip lists; the memory map is never read.
    ``crcs``: filled with ``{storage address: CRC-32 of its bytes}``, computed as they are read.

    So the weights are the file's bytes as they were read, whatever happens to the file later,
    a truncation is a short read (one line), never a ``SIGBUS`` in a memory map, and the reads
    run at the disk's or the page cache's speed instead of ``torch.load``'s single-threaded
    copy. Storages are matched to their records by address: the map places record ``r`` at
    ``base + offset(r)``, and every storage must sit exactly at one (else the plain
    ``torch.load`` is used).
    """
    storages: dict = {}
    try:
        integrity.storages_of(data, storages)
    except integrity.Unusual:  # sparse or meta: refused by name when the model is built
        return _plain_load(path, trust)
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        offsets = sorted(reader.get_record_offset(r) for r in reader.get_all_records() if integrity.is_data_record(r))
    except RuntimeError as e:  # it loaded a moment ago: the file changed since
        raise TracerError(f"{path} is damaged ({first_line(e)}); did it change while it was read?") from None
    mapped = [(s.data_ptr(), s) for s in storages.values() if s.nbytes()]
    base = _map_base([ptr for ptr, _ in mapped], offsets)
    if base is None:
        return _plain_load(path, trust)
    copies = {s._cdata: torch.UntypedStorage(s.nbytes()) for _, s in mapped}
    jobs = [(copies[s._cdata], ptr - base, start) for ptr, s in mapped for start in range(0, s.nbytes(), READ_CHUNK)]
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            done = list(pool.map(lambda job: _pread(fd, *job), jobs))
    finally:
        os.close(fd)
    short = [missing for missing, _ in done if missing]
    if short:
        raise TracerError(f"{path} is damaged: it ended {short[0]} bytes early while it was read (truncated, or changed during the read)")
    if crcs is not None:
        crcs.update(_storage_crcs(jobs, done))
    return _swap_storages(data, copies)


def _storage_crcs(jobs: list, done: list) -> dict[int, int]:
    """``{storage address: CRC-32}`` from the jobs' chunk CRCs (jobs of a storage are in order)."""
    out: dict[int, int] = {}
    for (storage, _, start), (_, crc) in zip(jobs, done):
        key = storage.data_ptr()
        length = min(READ_CHUNK, storage.nbytes() - start)
        out[key] = crc if start == 0 else integrity.crc32_combine(out[key], crc, length)
    return out


def _map_base(pointers: list[int], offsets: list[int]) -> int | None:
    """The address the memory map starts at: the one that puts every storage exactly at a
    record's offset (empty records have offsets too, and no storage); ``None`` if none does."""
    if not pointers:
        return None
    listed = set(offsets)
    for off in offsets:
        base = pointers[0] - off
        if all(ptr - base in listed for ptr in pointers):
            return base
    return None


def _pread(fd: int, storage: torch.UntypedStorage, offset: int, start: int) -> tuple[int, int]:
    """Read bytes ``start:start + READ_CHUNK`` of a record at ``offset`` into ``storage``;
    returns ``(bytes missing (0: all read), CRC-32 of the bytes read)``."""
    view = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()[start:start + READ_CHUNK]
    done, crc = 0, 0
    while done < len(view):
        step = view[done:done + CRC_STEP]
        n = os.preadv(fd, [step], offset + start + done)
        if n == 0:
            return len(view) - done, crc
        crc = zlib.crc32(step[:n], crc)
        done += n
    return 0, crc


def _swap_storages(obj, copies: dict):
    """``obj`` with every tensor rebuilt on its storage's private copy (same offset, shape,
    strides, dtype; tensors that shared a storage still do)."""
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        if s._cdata not in copies:  # an empty tensor
            return obj.clone()
        return torch.empty(0, dtype=obj.dtype).set_(copies[s._cdata], obj.storage_offset(), obj.shape, obj.stride())
    if isinstance(obj, dict):
        return type(obj)((k, _swap_storages(v, copies)) for k, v in obj.items())
    if type(obj) in (list, tuple):  # not a namedtuple: it is rebuilt by field, not from one iterable
        return type(obj)(_swap_storages(v, copies) for v in obj)
    return obj


def _plain_load(path: Path, trust: bool):
    """``torch.load`` into private memory (the slower, single-threaded read)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", mmap=False, weights_only=not trust)
    except Exception as e:  # it loaded memory-mapped a moment ago: the file changed, or its records are damaged
        raise TracerError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first_line(e)})") from None


def checkpoint_architecture(data: dict, path: str | Path) -> Architecture:
    """The ESM-2 architecture a fair-esm checkpoint declares in ``cfg['model']``."""
    cfg = data.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if model_cfg is None or "model" not in data:
        kind = "an ESM-1/ESM-1b checkpoint" if "args" in data else "not a fair-esm ESM-2 checkpoint"
        raise TracerError(f"{path} is {kind} (no cfg.model and model entries); tracer traces ESM-2")
    try:
        shape = (
            int(_cfg(model_cfg, "encoder_layers")),
            int(_cfg(model_cfg, "encoder_embed_dim")),
            int(_cfg(model_cfg, "encoder_attention_heads")),
        )
        token_dropout = bool(_cfg(model_cfg, "token_dropout", True))
    except (KeyError, AttributeError, TypeError, ValueError):
        raise TracerError(f"{path} has an incomplete ESM-2 config in cfg.model") from None
    return Architecture("custom", *shape, token_dropout).known()


def _cfg(cfg, key, default=KeyError):
    if isinstance(cfg, dict):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    if value is KeyError:
        raise KeyError(key)
    return value


def build_from_checkpoint(data: dict, arch: Architecture, path: str | Path) -> ESM2:
    """ESM-2 with the checkpoint's tensors assigned in place (no random init, no second copy).

    Contact-regression weights (a separate file in fair-esm) are not needed for tracing and are
    zero-filled when absent. A rotary ``inv_freq`` the file lacks gets what fair-esm's
    constructor computes; one the file has is kept exactly as stored.
    """
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")  # fair-esm's upgrade_state_dict
    state = {prefix.sub("", k): v for k, v in data["model"].items()}
    model = empty_esm2(arch, skeleton=True)  # no data, no init: the checkpoint's tensors are assigned
    expected = set(model.state_dict())
    optional = {k for k in expected if k.startswith("contact_head.") or k.endswith("rot_emb.inv_freq")}
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise TracerError(
            f"{path} does not match ESM-2 ({arch.describe()}): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TracerError(f"{path}: {k} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided:
            raise TracerError(f"{path}: {k} is a {str(v.layout).removeprefix('torch.')} tensor; tracer needs dense weights (convert with .to_dense())")
        if v.is_meta:
            raise TracerError(f"{path}: {k} is a meta tensor (a shape with no data); the file holds no weights for it")
        if v.shape != shapes[k]:
            bad = [n for n, t in state.items() if t.shape != shapes[n]]
            raise TracerError(
                f"{path} does not match ESM-2 ({arch.describe()}): {k} has shape {tuple(v.shape)} in the file, "
                f"{tuple(shapes[k])} expected ({len(bad)} tensor(s) of the wrong shape)"
            )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3]) or first_line(e)
        raise TracerError(f"{path} does not match ESM-2 ({arch.describe()}): {detail}") from None
    for module_name, module in model.named_modules():  # what the file may lack is still on the meta device
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.is_meta:
                key = f"{module_name}.{name}" if module_name else name
                if key not in optional:
                    raise TracerError(f"{path}: {key} has no data after loading")  # pragma: no cover (missing keys are refused above)
                if name == "inv_freq":  # what fair-esm's constructor puts there
                    filled = canonical_inv_freq(2 * t.shape[0]).to(t.dtype)
                else:
                    filled = torch.zeros(t.shape, dtype=t.dtype)
                if isinstance(t, torch.nn.Parameter):
                    setattr(module, name, torch.nn.Parameter(filled, requires_grad=False))
                else:
                    setattr(module, name, filled)
    remember_loaded(model)
    return model.eval().requires_grad_(False)


def download_checkpoint(name: str, dest: Path) -> None:
    """fair-esm's normal download, into fair-esm's own cache location (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        # download_url_to_file writes a temporary file and renames it when complete.
        torch.hub.download_url_to_file(MODEL_URL.format(name=name), str(dest), progress=sys.stderr.isatty())
    finally:
        socket.setdefaulttimeout(old_timeout)


def last_line(e: BaseException) -> str:
    text = [t for t in str(e).strip().splitlines() if t.strip()]
    return text[-1].strip() if text else type(e).__name__
