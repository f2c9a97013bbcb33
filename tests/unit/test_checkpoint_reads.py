"""Weights that change under a run: a checkpoint is read once into private memory and checked
on the bytes the run uses (:mod:`tracer.esm.integrity`).

A float32 run of a float32 file used to compute straight from the file's mapping: overwriting
the file during the run changed the weights under it, truncating it killed the run with SIGBUS
(that case runs in a subprocess: tests/integration/test_isolation.py).
"""

import zipfile

import pytest
import torch

import tracer.esm.models as models
from tracer.errors import TracerError
from tracer.esm.models import architecture, build_random, load_model, save_random_cache

SMALL = "esm2_t6_8M_UR50D"


def checkpoint(tmp_path, seed: int, name: str):
    path = tmp_path / name
    save_random_cache(build_random(architecture(SMALL), seed), architecture(SMALL), path, seed=seed)
    return path


def overwrite_in_place(path, data: bytes):
    with open(path, "r+b") as f:  # same inode: what a mapping of the file would see
        f.write(data)
        f.truncate()


@pytest.mark.parametrize("source", ["checkpoint", "random-cache"])
def test_a_file_overwritten_after_loading_does_not_change_the_weights(tmp_path, monkeypatch, source):
    other = checkpoint(tmp_path, 1, "other.pt").read_bytes()
    if source == "checkpoint":
        path = checkpoint(tmp_path, 0, "ck.pt")
        model, _, _ = load_model(SMALL, str(path))
    else:
        monkeypatch.setenv("TRACER_CACHE_DIR", str(tmp_path / "cache"))
        load_model(SMALL, "random", 0)
        models.wait_for_cache_writes()
        path = models.random_cache_path(architecture(SMALL), 0)
        model, _, _ = load_model(SMALL, "random", 0)
    models.set_precision(model, torch.device("cpu"), torch.float32)  # the stored dtype: nothing is converted
    overwrite_in_place(path, other)
    fresh = build_random(architecture(SMALL), 0).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]), k


def test_a_flipped_weight_byte_is_found_from_memory_without_a_second_read(tmp_path, monkeypatch):
    path = checkpoint(tmp_path, 0, "ck.pt")
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100  # inside the record's bytes
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda self: pytest.fail("a second full read of the file"))
    with pytest.raises(TracerError, match="is damaged: 1 of its .* weight records fail their zip CRC-32 check"):
        load_model(SMALL, str(path))


def test_a_healthy_checkpoint_loads_bit_for_bit(tmp_path):
    path = checkpoint(tmp_path, 2, "ck.pt")
    model, _, weights = load_model(None, str(path))
    fresh = build_random(architecture(SMALL), 2).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())
    assert weights.source == "checkpoint"


def test_shared_and_empty_storages_match_their_zip_records(tmp_path):
    from tracer.esm import integrity

    base = torch.arange(12.0)
    data = {"a": base, "a_view": base[3:], "e1": torch.zeros(0), "e2": torch.zeros(0, 4), "b": torch.ones(3, dtype=torch.bfloat16)}
    path = tmp_path / "x.pt"
    torch.save(data, path)
    integrity.check_zip_records(path, torch.load(path, weights_only=True))  # no error: same records, same CRCs
