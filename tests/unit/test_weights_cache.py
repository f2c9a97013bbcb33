"""Seeded random weights are cached in fair-esm's checkpoint format and load bit for bit."""

import pytest
import torch

import tracer.esm.models as models
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
