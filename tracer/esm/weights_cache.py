"""Seeded random weights for an architecture, and their on-disk cache in fair-esm's checkpoint format."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import torch
from esm.model.esm2 import ESM2

from tracer.errors import TracerError
from tracer.esm import integrity
from tracer.esm.catalogue import Architecture, empty_esm2
from tracer.esm.checkpoints import read_checkpoint
from tracer.esm.precision import remember_loaded
from tracer.store import files




def build_random(arch: Architecture, seed: int) -> ESM2:
    """fair-esm's ESM-2 with its own default initialisation, seeded, in float32 on the CPU.

    The global RNG state is left as it was. Built on the CPU whatever the run's device, so the
    same seed gives the same weights everywhere.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = empty_esm2(arch)
    remember_loaded(model)
    return model.eval().requires_grad_(False)


def random_cache_path(arch: Architecture, seed: int) -> Path | None:
    """Where the seeded random weights of ``arch`` are cached (``None``: caching is off).

    ``$TRACER_CACHE_DIR`` (``off`` disables), else ``$XDG_CACHE_HOME/tracer``, else
    ``~/.cache/tracer``. The key holds everything the values depend on: the shape, the seed, and
    the fair-esm and torch versions (fair-esm's init code and torch's CPU generator).
    """
    root = os.environ.get("TRACER_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "off", "none", "0"):
        return None
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tracer")
    return Path(root) / "random-weights" / f"esm2-{random_cache_key(arch, seed)}.pt"


def random_cache_key(arch: Architecture, seed: int) -> str:
    """What the seeded random weights depend on: shape, seed, fair-esm and torch versions."""
    from importlib.metadata import version

    return (
        f"{arch.num_layers}L-{arch.embed_dim}E-{arch.heads}H-td{int(arch.token_dropout)}-seed{seed}-"
        f"fair-esm{version('fair-esm')}-torch{torch.__version__.split('+')[0]}"
    )


_CACHE_WRITES: dict[Path, threading.Thread] = {}


def save_random_cache(model: ESM2, arch: Architecture, path: Path, background: bool = False, seed: int = 0) -> None:
    """Store ``model``'s weights (seeded random init ``seed``) at ``path`` in fair-esm's
    checkpoint format, atomically, with tracer's digest record
    (:func:`tracer.esm.integrity.cache_record`: the cache key and every tensor's CRC-32, checked
    on the bytes loaded before the file is used: :func:`read_random_cache`).

    Written to a temporary file in the same folder, fsynced and renamed, so a reader never sees a
    partial file; any failure (disk full, read-only cache) leaves no file and only costs the
    next run a fresh build. The file loads with the same code as real checkpoints
    (:func:`read_checkpoint`, :func:`build_from_checkpoint`). ``background``: write in a thread
    (not a daemon: the interpreter waits for it at exit; :func:`wait_for_cache_writes`). The
    tensors are taken now: a later in-place precision change of the model swaps its
    parameters' data, not these tensors.
    """
    data = {
        "model": {f"encoder.{k}": v for k, v in model.state_dict().items()},
        "cfg": {"model": {"encoder_layers": arch.num_layers, "encoder_embed_dim": arch.embed_dim,
                          "encoder_attention_heads": arch.heads, "token_dropout": arch.token_dropout}},
    }
    key = random_cache_key(arch, seed)
    if not background:
        _write_cache(data, key, path)
        return
    thread = threading.Thread(target=_write_cache, args=(data, key, path), name="tracer-weights-cache")
    thread.start()
    _CACHE_WRITES[path] = thread


def join_cache_write(path: Path) -> None:
    """Wait for this process's background write of ``path``, if one is under way."""
    if path in _CACHE_WRITES:
        _CACHE_WRITES.pop(path).join()


def wait_for_cache_writes() -> None:
    """Wait until this process's background cache writes are on disk."""
    while _CACHE_WRITES:
        _CACHE_WRITES.popitem()[1].join()


def read_random_cache(path: Path, arch: Architecture, seed: int) -> tuple[dict | None, str | None]:
    """``(checkpoint data, None)`` if the cache entry at ``path`` is what tracer wrote for
    ``arch`` and ``seed`` (its digest checked on the bytes loaded), else ``(None, why not)``."""
    try:
        crcs: dict[int, int] = {}
        data = read_checkpoint(path, zip_crcs=False, crcs=crcs)  # its own digest is checked instead, on the CRCs taken as it was read
    except TracerError:
        return None, "it is unreadable"
    state = data.get("model")
    why = integrity.check_cache_record(data.get("tracer"), state if isinstance(state, dict) else {}, random_cache_key(arch, seed), crcs)
    return (data, None) if why is None else (None, why)


def _write_cache(data: dict, key: str, path: Path) -> None:
    data["tracer"] = integrity.cache_record(data["model"], key)
    _write_atomically(data, path)


def _write_atomically(data: dict, path: Path) -> None:
    """``torch.save`` through the one atomic writer (:func:`tracer.store.files.write_atomic`);
    a failure (disk full, read-only cache) leaves no file."""
    with contextlib.suppress(OSError, TracerError):
        files.write_atomic(path, lambda f: torch.save(data, f), what="the weights cache", output=False)
