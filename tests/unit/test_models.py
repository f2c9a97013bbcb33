"""Model loading: seeded random init, fair-esm checkpoints on this torch, precision switching."""

import argparse
import urllib.error

import esm
import pytest
import torch

from tracer.esm import models
from tracer.errors import TracerError
from tracer.esm.models import Architecture, build_random, load_model, set_precision

TINY = Architecture("custom", 2, 64, 4)


def write_checkpoint(path, model, arch, legacy=False, extra=None):
    """A checkpoint in fair-esm's released on-disk format (cfg.model Namespace, prefixed keys)."""
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("contact_head."):
            continue  # released files keep the contact regression in a separate file
        prefix = "encoder." if k.startswith("lm_head.") else "encoder.sentence_encoder."
        state[prefix + k] = v.clone()
    cfg = argparse.Namespace(
        encoder_layers=arch.num_layers, encoder_embed_dim=arch.embed_dim,
        encoder_attention_heads=arch.heads, token_dropout=True,
    )
    data = {"cfg": {"model": cfg}, "model": state}
    if extra is not None:
        data["extra"] = extra
    torch.save(data, path, _use_new_zipfile_serialization=not legacy)
    return data


class Opaque:  # an arbitrary pickled class: weights_only must refuse it
    pass


def test_random_init_is_seeded_and_leaves_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_random(TINY, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_random(TINY, seed=5)
    c = build_random(TINY, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers[0].fc1.weight, c.layers[0].fc1.weight)


@pytest.mark.filterwarnings("ignore:Regression weights not found")  # fair-esm's loader, contacts unused
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_checkpoint_loads_like_fair_esm(tmp_path, legacy):
    src = build_random(TINY, seed=1)
    path = tmp_path / "esm2_custom.pt"
    data = write_checkpoint(path, src, TINY, legacy=legacy)
    model, arch, weights = load_model(None, str(path))
    assert arch.same_shape(TINY) and weights.source == "checkpoint" and weights.path == str(path)
    # fair-esm's own loader on the same data gives the same weights
    ref, _ = esm.pretrained.load_model_and_alphabet_core("esm2_custom", data, None)
    got = model.state_dict()
    for k, v in ref.state_dict().items():
        if not k.startswith("contact_head."):
            assert torch.equal(got[k], v), k
    assert weights.fingerprint == models.fingerprint(ref)


def test_checkpoint_with_foreign_objects_needs_trust(tmp_path):
    path = tmp_path / "c.pt"
    write_checkpoint(path, build_random(TINY, 0), TINY, extra=Opaque())
    with pytest.raises(TracerError, match="beyond tensors .*Opaque.*--trust-checkpoint"):
        load_model(None, str(path))
    load_model(None, str(path), trust_checkpoint=True)


def test_checkpoint_architecture_mismatch(tmp_path):
    path = tmp_path / "c.pt"
    write_checkpoint(path, build_random(TINY, 0), TINY)
    with pytest.raises(TracerError, match="has 2 layers, 64 dims, 4 heads, but esm2_t6_8M_UR50D has 6 layers"):
        load_model("esm2_t6_8M_UR50D", str(path))


def test_known_checkpoint_names_its_model(tmp_path):
    arch = models.ARCHITECTURES["esm2_t6_8M_UR50D"]
    path = tmp_path / "c.pt"
    write_checkpoint(path, build_random(arch, 0), arch)
    with pytest.raises(TracerError, match="is esm2_t6_8M_UR50D .*pass --model esm2_t6_8M_UR50D"):
        load_model("esm2_t12_35M_UR50D", str(path))


@pytest.mark.parametrize(
    "content, fragment",
    [(b"", "not a readable PyTorch checkpoint"), (b"hello world", "not a readable PyTorch checkpoint")],
    ids=["empty", "text"],
)
def test_unreadable_checkpoints(tmp_path, content, fragment):
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    with pytest.raises(TracerError, match=fragment):
        load_model(None, str(path))


def test_missing_checkpoint_and_directory(tmp_path):
    with pytest.raises(TracerError, match="does not exist"):
        load_model(None, str(tmp_path / "nope.pt"))
    with pytest.raises(TracerError, match="is a directory"):
        load_model(None, str(tmp_path))


def test_not_an_esm2_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(TracerError, match="not a fair-esm ESM-2 checkpoint"):
        load_model(None, str(path))


def test_auto_uses_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    arch = models.ARCHITECTURES["esm2_t6_8M_UR50D"]
    cached = models.hub_checkpoint_path(arch.name)
    assert cached == tmp_path / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt"
    cached.parent.mkdir(parents=True)
    write_checkpoint(cached, build_random(arch, 3), arch)
    monkeypatch.setattr(models, "download_checkpoint", lambda *a: pytest.fail("must not download"))
    _, _, weights = load_model(arch.name, "auto")
    assert weights.source == "hub-cache" and weights.path == str(cached)


def test_auto_without_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(name, dest):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(models, "download_checkpoint", offline)
    with pytest.raises(TracerError, match="could not get the esm2_t6_8M_UR50D checkpoint .*--weights random"):
        load_model("esm2_t6_8M_UR50D", "auto")


def test_unknown_model_lists_known_ones():
    with pytest.raises(TracerError, match="unknown model 'esm3'; known ESM-2 models: esm2_t6_8M_UR50D, "):
        load_model("esm3", "random")


def test_precision_switch_leaves_no_stale_rotary_state():
    model = build_random(TINY, 0)
    rot = model.layers[0].self_attn.rot_emb
    fresh = rot.inv_freq.clone()
    assert torch.equal(fresh, models.canonical_inv_freq(16))  # a random init holds the definition
    cpu = torch.device("cpu")
    x = torch.zeros(1, 4, 300, 16)
    rot(x.view(-1, 300, 16), x.view(-1, 300, 16))  # builds a float32 cos/sin cache for length 300
    set_precision(model, cpu, torch.bfloat16)
    assert rot.inv_freq.dtype == torch.bfloat16 and torch.equal(rot.inv_freq, fresh.to(torch.bfloat16))
    assert rot._cos_cached is None  # the float32 table must not leak into the bfloat16 run
    q, _ = rot(x.view(-1, 300, 16).bfloat16(), x.view(-1, 300, 16).bfloat16())
    assert q.dtype == torch.bfloat16
    set_precision(model, cpu, torch.float32)
    assert torch.equal(rot.inv_freq, fresh)  # exact again, not the up-cast bfloat16 values
    set_precision(model, cpu, torch.float64)
    assert torch.equal(rot.inv_freq, fresh.double())  # the loaded values up-cast, not the float64 definition


def test_fair_esm_cache_hazard_is_real():
    """Why reset_rotary_caches exists: fair-esm reuses a float32 table in a bfloat16 run."""
    model = build_random(TINY, 0)
    rot = model.layers[0].self_attn.rot_emb
    x = torch.randn(4, 50, 16)
    rot(x, x)
    model.to(torch.bfloat16)  # what users do; the cache survives
    q, _ = rot(x.bfloat16(), x.bfloat16())
    assert q.dtype == torch.float32  # silently promoted


def fp16_rounded_release(tmp_path, arch=TINY, half_dtype=False):
    """A checkpoint in the released format whose rotary ``inv_freq`` is fp16-rounded, as in the
    released ESM-2 files (stored as float32 holding fp16 values, or as a float16 tensor)."""
    src = build_random(arch, seed=2)
    for layer in src.layers:
        rot = layer.self_attn.rot_emb
        rot.inv_freq = rot.inv_freq.half() if half_dtype else rot.inv_freq.half().float()
    path = tmp_path / "esm2_release.pt"
    return path, write_checkpoint(path, src, arch)


@pytest.mark.filterwarnings("ignore:Regression weights not found")
@pytest.mark.parametrize("half_dtype", [False, True], ids=["fp32-buffer", "fp16-buffer"])
def test_loaded_inv_freq_is_kept_through_precision_switches(tmp_path, half_dtype):
    path, data = fp16_rounded_release(tmp_path, half_dtype=half_dtype)
    model, _, _ = load_model(None, str(path))
    ref, _ = esm.pretrained.load_model_and_alphabet_core("esm2_custom", data, None)  # fair-esm's own loader
    rounded = models.canonical_inv_freq(16).half()
    assert not torch.equal(rounded.float(), models.canonical_inv_freq(16))  # the file really differs from the definition
    cpu = torch.device("cpu")
    for dtype in (torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float32):
        set_precision(model, cpu, dtype)
        want = ref.layers[1].self_attn.rot_emb.inv_freq.to(dtype)  # what model.to(dtype) gives fair-esm's model
        got = model.layers[1].self_attn.rot_emb.inv_freq
        assert got.dtype == dtype and torch.equal(got, want), dtype
        assert torch.equal(got.double(), rounded.double().to(dtype).double())


@pytest.mark.filterwarnings("ignore:Regression weights not found")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_traced_unpacked_path_is_fair_esm_as_loaded(tmp_path, dtype):
    """The traced unpacked final_norm is bitwise fair-esm's own loader + forward on a released-format
    checkpoint with an fp16-rounded inv_freq (rewriting the buffer from its definition moved it)."""
    from tests.conftest import mixed_batch, run
    from tracer.store.trace_file import open_trace

    path, data = fp16_rounded_release(tmp_path)
    seqs = mixed_batch(long=300)
    result = run(tmp_path, seqs, model=None, weights=str(path), dtype=dtype, reference="none")
    ref, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2_custom", data, None)
    ref = ref.eval().to(getattr(torch, dtype))
    _, _, tokens = alphabet.get_batch_converter()([(s.id, s.residues) for s in seqs])
    with torch.inference_mode():
        out = ref(tokens, repr_layers=[TINY.num_layers])["representations"][TINY.num_layers]  # (B, T, E)
    want = torch.cat([out[i, : s.length + 2] for i, s in enumerate(seqs)])  # canonical rows
    with open_trace(result.path) as t:
        got = t.tap("unpacked", "final_norm")
        assert got.dtype == want.dtype and torch.equal(got, want)
        if dtype == "float32":  # the packed path's float32 RoPE uses the same loaded frequencies
            assert torch.equal(t.tap("packed", "layers.0.q_rope"), t.tap("unpacked", "layers.0.q_rope"))
def test_upcast_twin_computes_what_the_model_converted_in_place_computes():
    """The reference's twin (one up-cast layer at a time) == the whole model up-cast in place, bit for bit."""
    from tracer.esm.models import upcast_twin
    from tracer.capture.paths import encode, run_unpacked
    from tracer.inputs.sequences import debug_batch
    from tracer.taps import tap_names

    model, arch, _ = load_model("esm2_t6_8M_UR50D", "random", seed=0)
    cpu = torch.device("cpu")
    batch = encode(debug_batch(60), model.alphabet)
    names = tap_names(arch.num_layers)
    set_precision(model, cpu, torch.bfloat16)
    twin_taps, full_taps = {}, {}
    with torch.inference_mode(), upcast_twin(model, torch.float32) as twin:
        run_unpacked(twin, batch, names, twin_taps.__setitem__)
        assert all(p.is_meta for layer in twin.layers for p in layer.parameters())  # each layer let go after use
    assert model.layers[0].fc1.weight.dtype == torch.bfloat16  # the model itself untouched
    set_precision(model, cpu, torch.float32)
    with torch.inference_mode():
        run_unpacked(model, batch, names, full_taps.__setitem__)
    for n in names:
        assert twin_taps[n].dtype == torch.float32 and torch.equal(twin_taps[n], full_taps[n]), n
