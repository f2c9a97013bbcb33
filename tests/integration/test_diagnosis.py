"""The diagnosis of planted faults on whole runs: pattern and propagation of each fault, under
every pack order where the pack order matters, the absorbed and propagated cases, fault-free runs.

Runs are float32 with a float64 reference on the CPU, on a 2-layer seeded random ESM-2 (64 dims,
4 heads) so the whole file stays fast; the batch crosses position 256 (the bfloat16 limit).
"""

import json

import pytest

from tracer.esm.models import Architecture, Weights, build_random, fingerprint
from tracer.inputs.faults import Faults, Perturbation
from tracer.inputs.packing import PACK_ORDERS
from tracer.inputs.sequences import make_batch, motif_sequence
from tracer.judging.diagnosis import Diagnoses
from tracer.judging.records import Summary
from tracer.runner.execute import RunConfig, trace

TWO = Architecture("custom", 2, 64, 4)
TINY, SMALL, MEDIUM, LARGE = range(4)


@pytest.fixture(scope="module")
def loaded():
    model = build_random(TWO, seed=0)
    return model, TWO, Weights("random", None, 0, fingerprint(model))


def _run(tmp_path, loaded, faults=Faults(), order="given"):
    seqs = make_batch([("tiny", motif_sequence(3)), ("small", motif_sequence(8)), ("medium", motif_sequence(120)),
                       ("large", motif_sequence(280))])
    config = RunConfig(weights="random", device="cpu", dtype="float32", reference="fp64", pack_order=order, faults=faults,
                       metrics_only=True, force=True, out=str(tmp_path / "t.h5"))
    return trace(config, seqs, quiet=True, loaded=loaded).summary


ORDER_CASES = {
    # fault: (tap, pattern, propagates) of both the divergence and the packed path's drift
    "positions not restarted": (Faults(positions_not_restarted=True), ("layers.0.q_rope", "sequence-offset", False)),
    "positions rounded to bf16": (Faults(positions_low_precision=True), ("layers.0.q_rope", "step-at-position", True)),
    "attention across sequences": (Faults(leak_across_sequences=True), ("layers.0.ctx", "sequence-boundary", True)),
}


@pytest.mark.parametrize("order", PACK_ORDERS)
def test_sequence_and_position_faults_under_every_pack_order(tmp_path, loaded, order):
    for label, (faults, expected) in ORDER_CASES.items():
        s = _run(tmp_path, loaded, faults, order)
        for d in (s.diagnosis.divergence, s.diagnosis.packed):
            assert (d.tap, d.pattern, d.propagates) == expected, (label, d.to_json())
        assert s.diagnosis.unpacked is None, label
        if expected[1] == "step-at-position":
            assert s.diagnosis.packed.evidence["step_position"] == 257
        if expected[1] == "sequence-offset":
            first = ["tiny", "small", "medium", "large"][{"given": 0, "reversed": 3, "longest-first": 3, "shortest-first": 0}[order]]
            assert s.diagnosis.packed.evidence["first_packed"] == first


@pytest.mark.parametrize("faults, subject, expected", [
    (Faults(double_scale=True, layers=(1,)), "packed", ("layers.1.ctx", "uniform", True)),
    (Faults(perturbations=(Perturbation("packed", "layers.1.ffn_out", LARGE, 20, eps=0.01),)), "packed", ("layers.1.ffn_out", "isolated", True)),
    (Faults(perturbations=(Perturbation("unpacked", "layers.0.v", MEDIUM, 7, eps=0.01),)), "unpacked", ("layers.0.v", "isolated", True)),
], ids=["softmax scale twice", "packed perturbation", "unpacked perturbation"])
def test_other_faults(tmp_path, loaded, faults, subject, expected):
    s = _run(tmp_path, loaded, faults)
    d = getattr(s.diagnosis, subject)
    assert (d.tap, d.pattern, d.propagates) == expected, d.to_json()
    assert s.diagnosis.divergence.pattern == expected[1]


def test_constant_position_offset_is_absorbed_with_attention_within_noise(tmp_path, loaded):
    d = _run(tmp_path, loaded, Faults(positions_not_restarted=True)).diagnosis.packed
    assert d.pattern == "sequence-offset" and "not restarted" in d.cause
    assert d.propagates is False and d.absorbed_at == "layers.0.ctx"
    assert d.attention.tap == "layers.0.attn_out" and d.attention.within
    assert d.final.within


def test_dropout_rescale_propagates_and_costs_pooled_cosine(tmp_path, loaded):
    s = _run(tmp_path, loaded, Faults(skip_token_dropout_rescale=True))
    d = s.diagnosis.packed
    assert (d.tap, d.pattern, d.evidence["scale_only"], d.propagates, d.absorbed_at) == ("embed", "uniform", True, True, None)
    assert "token-dropout rescale" in d.cause
    # the healthy side: the control path where the trace has one, else the unpacked path
    healthy = s.diagnosis.divergence.pooled_cos.get("control") or s.diagnosis.divergence.pooled_cos["unpacked"]
    assert set(d.pooled_cos["packed"]) == set(healthy) == {"tiny", "small", "medium", "large"}
    for seq, cos in d.pooled_cos["packed"].items():
        assert cos < healthy[seq], seq


def test_fault_free_run_has_no_diagnosis_and_json_round_trips(tmp_path, loaded):
    s = _run(tmp_path, loaded)
    assert s.first_divergence is None and not s.diagnosis
    doc = s.to_json()
    assert doc["diagnosis"] == {"divergence": None, "packed": None, "unpacked": None}
    assert "diagnosis" not in s.format_text()
    planted = _run(tmp_path, loaded, Faults(leak_across_sequences=True))
    doc = json.loads(json.dumps(planted.to_json()))
    assert Diagnoses.from_json(doc["diagnosis"]) == planted.diagnosis
    assert Summary.from_json(doc).diagnosis == planted.diagnosis and Summary.from_json(doc).to_json() == doc
    assert "diagnosis divergence at layers.0.ctx: sequence-boundary" in planted.format_text()
