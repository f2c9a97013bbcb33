"""Which side is wrong: attribution against a high-precision reference, and the noise-aware verdict."""

import pytest

from tests.conftest import mixed_batch, run
from tracer.inputs.faults import Faults, Perturbation
from tracer.inputs.sequences import debug_batch

SHORT, LONG = 1, 2


@pytest.mark.parametrize("path", ["packed", "unpacked"])
def test_attribution_names_the_faulty_path(tmp_path, path):
    fault = Perturbation(path, "layers.3.attn_out", LONG, 260, eps=0.01)
    result = run(tmp_path, mixed_batch(), dtype="float32", reference="fp64", faults=Faults(perturbations=(fault,)))
    s = result.summary
    fd, att = s.first_divergence, s.attribution
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (3, "attn_out", "long", 260)
    assert att.drifting == path and att.explained_by == path
    assert (att.first.path, att.first.layer, att.first.tap, att.first.sequence, att.first.token) == (path, 3, "attn_out", "long", 260)
    other = "unpacked" if path == "packed" else "packed"
    assert getattr(att, other) is None
    assert f"{path} drifts from the float64 reference first at layer 3, attn_out, sequence long, token 260" in att.sentence()


def test_both_paths_drifting(tmp_path):
    faults = Faults(perturbations=(
        Perturbation("packed", "layers.4.ffn_out", SHORT, 3, eps=0.01),
        Perturbation("unpacked", "layers.2.v", LONG, 100, eps=0.01),
    ))
    s = run(tmp_path, mixed_batch(), dtype="float32", reference="fp64", faults=faults).summary
    att = s.attribution
    assert att.drifting == "both"
    assert (att.unpacked.layer, att.unpacked.tap, att.unpacked.token) == (2, "v", 100)
    assert (att.packed.layer, att.packed.tap, att.packed.token) == (4, "ffn_out", 3)
    assert att.first.path == "unpacked"


def test_no_fault_float32_long_batch_agrees_under_noise_rule(tmp_path):
    s = run(tmp_path, debug_batch(600), dtype="float32", reference="fp64").summary
    assert s.rule.kind == "noise"
    assert s.verdict == "agree" and s.attribution.drifting == "neither"


@pytest.mark.parametrize("path", ["packed", "unpacked"])
def test_noise_rule_sensitivity_around_the_bar(tmp_path, path):
    """bfloat16, packed RoPE like fair-esm's: a perturbation of 0.3 x the tap's bar is not
    reported, one of 3 x the bar is, at the planted tap and token, blamed on the planted path.
    (Sizes are relative L2 of the change; the bar is the fault-free run's K x noise.)"""
    common = dict(dtype="bfloat16", packed_rope="model", metrics_only=True, force=True)
    tap, medium, token = "layers.5.ffn_out", 2, 15
    clean = run(tmp_path, debug_batch(40), **common).summary
    assert clean.rule.kind == "noise" and clean.verdict == "agree"
    bar = next(t.threshold for t in clean.taps if t.name == tap)
    assert 0 < bar < 0.1  # a real bar: bfloat16 noise times K, not zero, not blind
    for factor in (0.3, 3.0):
        fault = Faults(perturbations=(Perturbation(path, tap, medium, token, eps=factor * bar),))
        s = run(tmp_path, debug_batch(40), faults=fault, **common).summary
        fd = s.first_divergence
        if factor < 1:
            assert fd is None, f"0.3 x bar reported at {fd.where()}"
        else:
            assert (fd.layer, fd.tap, fd.sequence, fd.token) == (5, "ffn_out", "medium", token)
            assert fd.rel_l2 == pytest.approx(factor * bar, rel=0.2)  # bfloat16 rounding of the planted change
            assert s.attribution.at_divergence["off"] == path


def test_bfloat16_fair_esm_rope_is_what_drifts(tmp_path):
    """The debug-log situation: fair-esm's padded forward in bf16 computes RoPE positions and
    frequencies in bf16; the packed path's float32 RoPE stays with the float32 reference."""
    s = run(tmp_path, debug_batch(400), dtype="bfloat16").summary
    fd, att = s.first_divergence, s.attribution
    assert (fd.layer, fd.tap) == (0, "q_rope")
    assert att.drifting == "unpacked" and att.explained_by == "unpacked"
    assert (att.first.layer, att.first.tap) == (0, "q_rope")


def test_reported_noise_level_and_threshold(tmp_path):
    s = run(tmp_path, mixed_batch(), dtype="bfloat16", packed_rope="model").summary
    for t in s.taps:
        assert t.threshold == pytest.approx(s.rule.noise_factor * t.noise)
        assert t.noise >= t.floor > 0
