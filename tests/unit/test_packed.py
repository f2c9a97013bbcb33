"""The packed path against fair-esm's own forward, and the taps that record them."""

import torch

from tests.conftest import mixed_batch
from tracer.esm.attention import resolve
from tracer.inputs.faults import Faults
from tracer.esm.models import loaded_inv_freq, set_precision
from tracer.esm.packed_forward import PackedESM2, Rope
from tracer.capture.paths import encode, run_packed, run_unpacked
from tracer.taps import tap_names

CPU = torch.device("cpu")


def _both(model, dtype, rope="fp32", order="given", faults=None, batch=None):
    set_precision(model, CPU, dtype)
    batch = encode(batch or mixed_batch(), model.alphabet, order)
    names = tap_names(model.num_layers)
    u, p = {}, {}
    with torch.inference_mode():
        fu = run_unpacked(model, batch, names, u.__setitem__)
        packed = PackedESM2(model, resolve("math", CPU, dtype), rope=rope, faults=faults)
        fp = run_packed(packed, batch, names, p.__setitem__)
    return batch, u, p, fu, fp


def _max_rel(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def test_float32_agreement_on_mixed_batch(small_model):
    model, _ = small_model
    batch, u, p, _, _ = _both(model, torch.float32)
    assert set(u) == set(p) == set(tap_names(model.num_layers))
    worst = max(_max_rel(p[n], u[n]) for n in u)
    # float32 unit roundoff is 6e-8; GEMMs over (N, E) vs (T, B, E) and masked vs unmasked
    # softmax sums differ in rounding order only: measured 5e-7 after 6 layers.
    assert worst < 1e-5
    for n in ("embed", "layers.0.q_rope", "layers.0.k_rope", "layers.0.v"):
        assert torch.equal(p[n], u[n]), n  # identical ops on identical inputs


def test_bfloat16_with_fair_esm_rope_is_bit_identical(small_model):
    model, _ = small_model
    _, u, p, _, _ = _both(model, torch.bfloat16, rope="model")
    for n in u:
        assert torch.equal(p[n], u[n]), n


def test_model_rope_matches_fair_esm_rotary_module(small_model):
    model, _ = small_model
    set_precision(model, CPU, torch.bfloat16)
    rot = model.layers[0].self_attn.rot_emb
    torch.manual_seed(0)
    q = torch.randn(400, 20, 16).bfloat16()  # (N, H, d) one sequence
    want_q, _ = rot(q.transpose(0, 1), q.transpose(0, 1))  # fair-esm: (B*H, T, d)
    rope = Rope("model", torch.arange(400), rot.inv_freq)
    assert torch.equal(rope(q).transpose(0, 1), want_q)
    fp32 = Rope("fp32", torch.arange(400), loaded_inv_freq(rot))
    assert not torch.equal(fp32(q).transpose(0, 1), want_q)  # bf16 positions/frequencies differ


def test_taps_do_not_change_the_forward(small_model):
    model, _ = small_model
    set_precision(model, CPU, torch.float32)
    batch = encode(mixed_batch(), model.alphabet)
    packed = PackedESM2(model, resolve("math", CPU, torch.float32))
    with torch.inference_mode():
        bare_u = model(batch.padded, repr_layers=[model.num_layers])["representations"][model.num_layers]
        bare_p = packed(batch.packed, batch.layout)
        _, _, _, fu, fp = _both(model, torch.float32)
    assert torch.equal(fu, bare_u) and torch.equal(fp, bare_p)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not m._forward_hooks for m in packed.modules())


def test_pack_order_does_not_change_canonical_taps(small_model):
    model, _ = small_model
    _, _, given, _, _ = _both(model, torch.float32)
    b, _, rev, _, _ = _both(model, torch.float32, order="reversed")
    assert b.layout.order == (2, 1, 0)
    worst = max(_max_rel(rev[n], given[n]) for n in given)
    assert worst < 1e-5  # same per-sequence math; GEMM row blocking may differ in the last bits


def test_packed_tokens_come_from_fair_esm_converter(small_model):
    model, _ = small_model
    batch = encode(mixed_batch(), model.alphabet, "reversed")
    a = model.alphabet
    assert batch.packed[0].item() == a.cls_idx
    assert batch.packed[batch.layout.cu_seqlens[1] - 1].item() == a.eos_idx
    assert batch.padded.shape == (3, 302)
    _, _, want = a.get_batch_converter()([("x", "M")])
    assert torch.equal(batch.packed[-3:], want[0])


def test_token_dropout_rescale_with_masks(small_model):
    model, _ = small_model
    seqs = mixed_batch()
    from tracer.inputs.sequences import make_batch

    masked = make_batch([(s.id, s.residues[:3] + "<mask>" + s.residues[3:]) for s in seqs])
    _, u, p, _, _ = _both(model, torch.float32, batch=masked)
    assert torch.equal(p["embed"], u["embed"])  # per-sequence mask ratio, same ops as fair-esm
    _, u2, p2, _, _ = _both(model, torch.float32, batch=masked, faults=Faults(skip_token_dropout_rescale=True))
    assert not torch.equal(p2["embed"], u2["embed"])
