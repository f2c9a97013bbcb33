"""Time to verdict, cheap invariants (no timing): a checkpoint's bytes are read once (its CRCs
are checked on the bytes the load read, :mod:`tracer.esm.integrity`), and building skeletons
imports no compiler stack."""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import sys

import torch

from tracer.esm import models
from tracer.esm.models import Architecture, build_random, load_model
from tests.unit.test_models import write_checkpoint

ARCH = Architecture("custom", 4, 128, 4)


class Counting:
    """A file object that counts the bytes read through it."""

    total = 0

    def __init__(self, f):
        self._f = f

    @staticmethod
    def add(n):
        Counting.total += n or 0
        return n

    def _count(self, n):
        return Counting.add(n)

    def read(self, *a):
        data = self._f.read(*a)
        self._count(len(data))
        return data

    def read1(self, *a):
        data = self._f.read1(*a)
        self._count(len(data))
        return data

    def readinto(self, b):
        return self._count(self._f.readinto(b))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def test_no_checkpoint_byte_is_read_twice(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    write_checkpoint(path, build_random(ARCH, 0), ARCH)
    size = path.stat().st_size
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        return Counting(f) if str(file) == str(path) else f

    real_preadv = os.preadv

    def counting_preadv(fd, buffers, offset, *args):
        return Counting.add(real_preadv(fd, buffers, offset, *args))  # the tensor records' parallel reads

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # zipfile opens through io.open
    monkeypatch.setattr(os, "preadv", counting_preadv)
    Counting.total = 0
    model, _, _ = load_model(None, str(path))
    models.set_precision(model, torch.device("cpu"), torch.bfloat16)
    # every byte is read once (the tensor records by parallel preads, the rest through Python
    # reads), plus the zip directory and the small records zipfile re-reads to check them; a
    # separate CRC pass, or torch.load reading what was already read, would read it again
    assert size <= Counting.total < 1.05 * size, (Counting.total, size)


def test_skeletons_and_deterministic_mode_import_no_compiler():
    code = (
        "import sys, torch\n"
        "from tracer.esm.skeleton import esm2_skeleton\n"
        "from tracer.runner.execute import _deterministic\n"
        "m = esm2_skeleton(num_layers=2, embed_dim=64, attention_heads=4)\n"
        "assert all(t.is_meta for t in m.state_dict().values())\n"
        "with _deterministic() as d: assert d['deterministic_algorithms']\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # torch._dynamo costs ~1 s of import on a CPU


def test_a_traced_run_imports_no_compiler_nor_sympy(tmp_path):
    """The reference's up-cast twin drops its layers to the meta device without ``to_empty``,
    whose ``empty_like`` of meta tensors imported sympy (2 s of the first 3B run on the H200)."""
    code = (
        "import sys, torch\n"
        "from tracer.esm.models import Architecture, Weights, build_random, fingerprint\n"
        "from tracer.inputs.sequences import debug_batch\n"
        "from tracer.runner.execute import RunConfig, trace\n"
        "arch = Architecture('custom', 2, 64, 4); model = build_random(arch, 0)\n"
        "loaded = (model, arch, Weights('random', None, 0, fingerprint(model)))\n"
        f"config = RunConfig(model='esm2_t6_8M_UR50D', weights='random', device='cpu', metrics_only=True, out={str(tmp_path / 't.h5')!r})\n"
        "trace(config, debug_batch(12), quiet=True, loaded=loaded)\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_private_copy_reads_the_records_and_keeps_shared_storages(tmp_path, monkeypatch):
    import pytest

    from tracer.errors import TracerError
    from tracer.esm import checkpoints
    from tracer.esm.checkpoints import private_copy

    base = torch.arange(12.0)
    obj = {"model": {"a": base, "tied": base, "view": base[2:8].view(2, 3), "half": torch.ones(5, dtype=torch.float16), "empty": torch.zeros(0)}}
    path = tmp_path / "c.pt"
    torch.save(obj, path)
    with monkeypatch.context() as m:
        m.setattr(checkpoints, "_plain_load", None)  # the records are found by address, not loaded again
        data = private_copy(path, torch.load(path, mmap=True))
    m = data["model"]
    for k, v in obj["model"].items():
        assert torch.equal(m[k], v) and m[k].dtype == v.dtype, k
    assert m["a"].untyped_storage().data_ptr() == m["tied"].untyped_storage().data_ptr() == m["view"].untyped_storage().data_ptr()
    mapped = torch.load(path, mmap=True)
    with monkeypatch.context() as m:  # the file ends while its records are read: a short read, one line
        m.setattr(os, "preadv", lambda *a: 0)
        with pytest.raises(TracerError, match=r"ended \d+ bytes early"):
            private_copy(path, mapped)
    with open(path, "r+b") as f:  # truncated after the structure was read: one line, and no SIGBUS from the map
        f.truncate(path.stat().st_size // 3)
    with pytest.raises(TracerError, match="damaged"):
        private_copy(path, mapped)


def test_crc32_combine_is_zlibs():
    import random
    import zlib

    from tracer.esm.integrity import crc32_combine

    rng = random.Random(0)
    data = rng.randbytes(300_000)
    for cut in (0, 1, 7, 4096, 123_457, len(data) - 1, len(data)):
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data), cut


def test_the_digest_is_taken_as_the_bytes_are_read(tmp_path, monkeypatch):
    """The CRC-32 of every record comes from the read itself (chunks of one record combined):
    no pass over the weights in memory after the read, for a checkpoint or the random cache,
    and a byte changed in the file is still refused."""
    import zlib

    import pytest

    from tracer.errors import TracerError
    from tracer.esm import checkpoints, integrity, weights_cache

    monkeypatch.setattr(checkpoints, "READ_CHUNK", 4096)  # records span several read jobs
    monkeypatch.setattr(checkpoints, "CRC_STEP", 1000)
    path = tmp_path / "c.pt"
    write_checkpoint(path, build_random(ARCH, 0), ARCH)
    passes = []
    monkeypatch.setattr(integrity, "crc32s", lambda buffers: passes.append(len(buffers)) or [zlib.crc32(b) for b in buffers])
    crcs: dict = {}
    data = checkpoints.read_checkpoint(path, crcs=crcs)  # zip CRCs checked
    state = data["model"]
    assert max(t.nbytes for t in state.values()) > 4 * 4096
    for t in state.values():
        assert crcs[t.untyped_storage().data_ptr()] == zlib.crc32(integrity.tensor_bytes(t))
    cache = tmp_path / "cache" / "w.pt"
    monkeypatch.setattr(weights_cache, "random_cache_path", lambda arch, seed: cache)
    cache.parent.mkdir()
    weights_cache.save_random_cache(build_random(ARCH, 0), ARCH, cache, seed=0)
    passes.clear()
    data, why = weights_cache.read_random_cache(cache, ARCH, 0)
    assert why is None and passes in ([], [0])  # every tensor's CRC came from the read
    raw = bytearray(cache.read_bytes())
    name = next(k for k in data["model"] if k.endswith("layers.1.fc1.weight"))
    offset = raw.index(integrity.tensor_bytes(data["model"][name]).tobytes()[:64]) + 5000
    raw[offset] ^= 1
    cache.write_bytes(bytes(raw))
    assert weights_cache.read_random_cache(cache, ARCH, 0)[1] == f"{name} does not match its digest"
    path.write_bytes(bytes(raw))  # the same damaged bytes as a checkpoint: its zip CRC check refuses them
    with pytest.raises(TracerError, match="fail their zip CRC-32 check"):
        checkpoints.read_checkpoint(path)
