"""Seeded random weights are cached in fair-esm's checkpoint format and load bit for bit."""

import pytest
import torch

import tracer.esm.models as models
from tracer.esm import integrity
from tracer.esm.models import architecture, build_random, load_model, random_cache_path

SMALL = "esm2_t6_8M_UR50D"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cached_weights_are_bitwise_the_fresh_ones(cache, monkeypatch):
    fresh = build_random(architecture(SMALL), 5).state_dict()
    first, _, w1 = load_model(SMALL, "random", 5)  # builds, writes the cache in the background
    models.set_precision(first, torch.device("cpu"), torch.bfloat16)  # the run goes on while it writes
    models.wait_for_cache_writes()
    path = random_cache_path(architecture(SMALL), 5)
    assert path.exists() and path.parent.parent == cache
    monkeypatch.setattr(models, "build_random", lambda *a: pytest.fail("rebuilt despite the cache"))
    again, _, w2 = load_model(SMALL, "random", 5)
    state = again.state_dict()
    assert set(state) == set(fresh)
    for k, v in fresh.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
    assert w1 == w2 and w2.source == "random" and w2.seed == 5
    assert not list(path.parent.glob(".*partial"))  # written atomically, nothing left over


def test_seed_and_shape_are_in_the_key(cache):
    a = random_cache_path(architecture(SMALL), 0)
    assert a != random_cache_path(architecture(SMALL), 1)
    assert a != random_cache_path(architecture("esm2_t12_35M_UR50D"), 0)


def test_a_damaged_cache_entry_is_rebuilt(cache):
    path = random_cache_path(architecture(SMALL), 2)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    model, _, _ = load_model(SMALL, "random", 2)
    assert torch.equal(model.embed_tokens.weight, build_random(architecture(SMALL), 2).embed_tokens.weight)


def test_cache_off(monkeypatch):
    monkeypatch.setenv("TRACER_CACHE_DIR", "off")
    assert random_cache_path(architecture(SMALL), 0) is None


# A cache entry is used only if it matches the digest tracer wrote into it, for this key.


def _cached(seed: int):
    models.wait_for_cache_writes()
    path = random_cache_path(architecture(SMALL), seed)
    assert path.exists()
    return path


def _rebuilt_and_right(monkeypatch, seed: int, fragment: str):
    said, built = [], []
    real = models.build_random
    monkeypatch.setattr(models, "build_random", lambda *a: built.append(a) or real(*a))
    model, _, weights = load_model(SMALL, "random", seed, progress=said.append)
    assert built, "the changed cache entry was used"
    assert any(fragment in line for line in said), said
    fresh = real(architecture(SMALL), seed).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh[k]), k
    models.wait_for_cache_writes()  # the entry is written again, right this time
    monkeypatch.setattr(models, "build_random", lambda *a: pytest.fail("rebuilt a second time"))
    assert load_model(SMALL, "random", seed)[2] == weights


def test_another_seeds_file_under_this_seeds_name_is_not_used(cache, monkeypatch):
    load_model(SMALL, "random", 1)
    seed1 = _cached(1)
    load_model(SMALL, "random", 0)
    seed0 = _cached(0)
    seed0.write_bytes(seed1.read_bytes())
    _rebuilt_and_right(monkeypatch, 0, "seed1")


@pytest.mark.parametrize("damage", ["layer-x3", "nan-in-embedding", "no-digest"])
def test_a_changed_cache_entry_is_rebuilt_never_used(cache, monkeypatch, damage):
    load_model(SMALL, "random", 3)
    path = _cached(3)
    data = torch.load(path, weights_only=True)
    if damage == "layer-x3":
        for k in [k for k in data["model"] if ".layers.2." in k]:
            data["model"][k] = data["model"][k] * 3
    elif damage == "nan-in-embedding":
        data["model"]["encoder.embed_tokens.weight"][5, 7] = float("nan")
    else:
        del data["tracer"]
    torch.save(data, path)
    _rebuilt_and_right(monkeypatch, 3, "no tracer digest" if damage == "no-digest" else "does not match its digest")


def test_the_digest_record_lists_key_and_every_tensor(cache):
    load_model(SMALL, "random", 4)
    data = torch.load(_cached(4), weights_only=True)
    record = data["tracer"]
    assert record["format"] == "tracer-random-cache-v1" and record["key"] == models.random_cache_key(architecture(SMALL), 4)
    assert set(record["tensors"]) == set(data["model"])
    dtype, shape, crc = record["tensors"]["encoder.embed_tokens.weight"]
    assert (dtype, shape) == ("float32", [33, 320]) and crc == integrity.tensor_crc32(data["model"]["encoder.embed_tokens.weight"])
