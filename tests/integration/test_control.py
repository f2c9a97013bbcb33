"""The control path sets the noise level: the verdict does not depend on the paths it judges.

The 8M model with seeded random weights, bfloat16 on the CPU, the debug batch with a
400-residue sequence (the issue's figures). Four packed paths are traced once per module:
the built-in one (the control's own configuration, so it is reused), the built-in one with
fair-esm's RoPE (``--packed-rope model``, a cause both paths share), the exact-frequency
example plug-in, and the rounded-frequency copy of it (``tests/plugins/rounded_freq_esm2.py``).
"""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import mixed_batch, one_line_error, run
from tracer.inputs.faults import Faults, Perturbation
from tracer.inputs.sequences import debug_batch
from tracer.judging.verdict import CONTROL, NOISE_FACTOR
from tracer.runner.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
EXACT = f"{ROOT / 'examples' / 'packed_esm2_adapter.py'}:make_forward"
ROUNDED = f"{ROOT / 'tests' / 'plugins' / 'rounded_freq_esm2.py'}:make_forward"
Q0 = "layers.0.q_rope"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control")
    configs = {"builtin": {}, "rope-model": {"packed_rope": "model"}, "exact": {"packed": EXACT}, "rounded": {"packed": ROUNDED}}
    return {name: run(folder, debug_batch(400), name=f"{name}.h5", dtype="bfloat16", metrics_only=True, **kw)
            for name, kw in configs.items()}


def noise(result) -> np.ndarray:
    return np.array([t.noise for t in result.summary.taps])


def tap(result, name):
    return next(t for t in result.summary.taps if t.name == name)


def test_rounded_frequency_plugin_is_blamed_with_both_and_packed_drifts_at_layer0_q_rope(runs):
    att = runs["rounded"].summary.attribution
    assert att.drifting == "both"
    assert (att.packed.layer, att.packed.tap, att.packed.sequence) == (0, "q_rope", "large")
    assert "both paths drift from the float32 reference" in att.sentence()
    # its error grows with position: the worst q_rope token is far out in the long sequence
    assert tap(runs["rounded"], Q0).vs_reference["packed"]["max_rel_l2"] > NOISE_FACTOR * tap(runs["rounded"], Q0).noise


def test_exact_frequency_plugin_is_not_blamed(runs):
    att = runs["exact"].summary.attribution
    assert att.drifting == "unpacked" and att.packed is None
    assert "packed stays within noise" in att.sentence()


def test_noise_level_does_not_move_when_the_path_under_test_is_swapped(runs):
    base = noise(runs["builtin"])
    for name in ("rope-model", "exact", "rounded"):
        assert np.array_equal(noise(runs[name]), base), name  # the same control, bit for bit, on the CPU
    q0 = [tap(runs[name], Q0).noise for name in ("exact", "rounded")]
    assert abs(q0[1] - q0[0]) <= 0.25 * q0[0]  # the bound (here they are equal)


def test_packed_rope_model_is_a_shared_cause_far_above_the_bar(runs):
    s = runs["rope-model"].summary
    att = s.attribution
    assert s.verdict == "agree"  # both paths compute RoPE the same way: they agree with each other
    assert att.drifting == "both" and (att.first.layer, att.first.tap) == (0, "q_rope")
    worst = max(t.vs_reference[p]["max_rel_l2"] / t.noise for t in s.taps for p in ("packed", "unpacked"))
    assert worst >= 3 * NOISE_FACTOR


def test_control_identity_is_recorded(runs):
    from tracer.store.trace_file import open_trace

    expected = {"builtin": True, "rope-model": False, "exact": False, "rounded": False}
    for name, reused in expected.items():
        with open_trace(runs[name].path) as t:
            control = t.meta["control"]
            assert control["reused"] is reused and control["backend"] == "math" and control["rope"] == "fp32", name
            assert CONTROL in t.file["metrics"]  # stored in every trace (here metrics-only)
    assert "control" in runs["exact"].summary.context and "separate" in runs["exact"].summary.context["control"]


@pytest.fixture(scope="module")
def clean_f32(tmp_path_factory):
    return run(tmp_path_factory.mktemp("clean"), mixed_batch(), dtype="float32", reference="fp64", metrics_only=True)


@pytest.mark.parametrize("path", ["packed", "unpacked"])
@pytest.mark.parametrize("whole", [False, True], ids=["one-token", "whole-tap"])
def test_a_fault_in_either_path_is_found_and_blamed(tmp_path, clean_f32, path, whole):
    """float32 with a float64 reference: a change of 1 % at one token of layer 3's attn_out, or at
    every token of it, is the first divergence and is blamed on the planted path alone."""
    p = Perturbation(path, "layers.3.attn_out", 2, 260, eps=0.01, whole_tap=whole)
    s = run(tmp_path, mixed_batch(), dtype="float32", reference="fp64", metrics_only=True, faults=Faults(perturbations=(p,))).summary
    fd, att = s.first_divergence, s.attribution
    assert (fd.layer, fd.tap) == (3, "attn_out")
    assert (fd.sequence, fd.token) == (("one", 0) if whole else ("long", 260))
    assert att.drifting == path and att.at_divergence["off"] == path
    assert [t.noise for t in s.taps] == [t.noise for t in clean_f32.summary.taps]  # the fault cannot move the bar


def test_a_whole_tap_fault_both_paths_share_is_found(tmp_path):
    """The same 1 % change at every token of layer 1's ffn_out in both paths: they agree with each
    other, and under a bar cut from the paths themselves nothing drifted; the control's bar sees both."""
    shared = tuple(Perturbation(p, "layers.1.ffn_out", 0, 0, eps=0.01, whole_tap=True) for p in ("packed", "unpacked"))
    s = run(tmp_path, mixed_batch(), dtype="float32", reference="fp64", metrics_only=True, faults=Faults(perturbations=shared)).summary
    att = s.attribution
    assert att.drifting == "both"
    assert {(x.layer, x.tap, x.sequence, x.token) for x in (att.packed, att.unpacked)} == {(1, "ffn_out", "one", 0)}


def test_a_trace_without_its_control_metrics_is_refused(tmp_path, capsys):
    from tracer import compare

    result = run(tmp_path, mixed_batch(40), dtype="bfloat16", metrics_only=True)
    with h5py.File(result.path, "r+") as f:  # traces are bound to their run: a deleted group is refused whatever the rule
        del f[f"metrics/{CONTROL}"]
    one_line_error(capsys, compare.main, [str(result.path)], f"is missing metrics/{CONTROL}/")
    one_line_error(capsys, compare.main, [str(result.path), "--rule", "plain"], f"is missing metrics/{CONTROL}/")


@pytest.mark.parametrize("packed_rope, reused", [("fp32", True), ("model", False)], ids=["reused", "separate"])
def test_compare_recomputes_the_control_pair_from_the_tensors(tmp_path, packed_rope, reused):
    from tracer.judging.tables import recomputed_table, stored_table
    from tracer.store.trace_file import open_trace

    result = run(tmp_path, mixed_batch(40), dtype="bfloat16", packed_rope=packed_rope)
    with open_trace(result.path) as t:
        assert ("control" in t.paths) is not reused  # a separate control's taps are stored like any path's
        fresh, stored = recomputed_table(t), stored_table(t)
    np.testing.assert_array_equal(fresh.pairs[CONTROL]["rel_l2"], stored.pairs[CONTROL]["rel_l2"])  # CPU: bit-identical
    assert compare_main([str(result.path)]) == 0


def compare_main(argv):
    from tracer import compare

    return compare.main([*argv, "--json"])


def _rounded_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rounded_freq_esm2", ROOT / "tests" / "plugins" / "rounded_freq_esm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def refuses_float32(model, alphabet):
    """The rounded-frequency copy behind a FlashAttention-style dtype check."""
    forward = _rounded_module().make_forward(model, alphabet)

    def checked(tokens, cu_seqlens, max_seqlen):
        if model.embed_tokens.weight.dtype == torch.float32:
            raise RuntimeError("FlashAttention only supports fp16 and bf16 data type")
        return forward(tokens, cu_seqlens, max_seqlen)

    return checked


def test_state_row_clears_the_rounded_frequency_plugin_and_a_refused_row_is_reported(tmp_path, monkeypatch):
    """experiments with the rounded copy as the packed path: the state-rotary-fp32 row (float32
    rotary buffers for the plug-in only) moves the packed side back to the reference; the float32
    row, which the plug-in refuses, is 'not run: ...' and the matrix is still reported."""
    from tracer import experiments
    from tracer.esm.models import load_model

    keep = ("baseline", "state-rotary-fp32", "precision-float32")
    plan = experiments.plan
    monkeypatch.setattr(experiments, "plan", lambda b, s: [v for v in plan(b, s) if v.name in keep])
    loaded = load_model("esm2_t6_8M_UR50D", "random", 0)
    config = RunConfig(model="esm2_t6_8M_UR50D", weights="random", device="cpu", dtype="bfloat16", packed=refuses_float32)
    record = experiments.run_matrix(config, debug_batch(400), tmp_path / "exp", quiet=True, loaded=loaded)
    rows = {r["name"]: r for r in record["rows"]}
    assert rows["baseline"]["drifting"] == "both"
    assert rows["state-rotary-fp32"]["drifting"] == "unpacked" and rows["state-rotary-fp32"]["moved_back"] == "packed"
    refused = rows["precision-float32"]
    assert refused["kind"] == "not run" and refused["note"].startswith("not run: packed plug-in")
    assert "FlashAttention only supports fp16 and bf16" in refused["note"]
    md = experiments.format_markdown(record)
    assert "| state-rotary-fp32 |" in md and "not run: packed plug-in" in md
    # the other paths ran on the model as loaded: the unpacked side is bit-identical to the baseline's
    assert rows["state-rotary-fp32"]["cos"]["unpacked-vs-reference"] == rows["baseline"]["cos"]["unpacked-vs-reference"]
