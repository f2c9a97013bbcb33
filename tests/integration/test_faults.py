"""Planted faults: the comparator must name the exact first layer, tap and token.

Runs are float32 on the CPU (math backend), where a healthy packed path agrees with fair-esm
to ~5e-7, so the plain rule's 1e-3 bar sees nothing but the planted fault.
"""

import pytest

from tests.conftest import run
from tracer.judging.tables import stored_table
from tracer.inputs.faults import Faults, Perturbation
from tracer.inputs.packing import PACK_ORDERS
from tracer.inputs.sequences import debug_batch, make_batch, motif_sequence
from tracer.store.trace_file import open_trace

TINY, SMALL, MEDIUM, LARGE = range(4)

CASES = [
    # fault, (layer, tap, sequence, token)
    (Faults(positions_not_restarted=True), (0, "q_rope", "small", 0)),  # tiny's positions are right
    (Faults(positions_low_precision=True), (0, "q_rope", "large", 257)),  # bf16 positions exact up to 256
    (Faults(double_scale=True), (0, "ctx", "tiny", 0)),
    (Faults(leak_across_sequences=True), (0, "ctx", "tiny", 0)),
    (Faults(skip_token_dropout_rescale=True), (None, "embed", "tiny", 0)),
    (Faults(double_scale=True, layers=(3,)), (3, "ctx", "tiny", 0)),
    (Faults(leak_across_sequences=True, layers=(5,)), (5, "ctx", "tiny", 0)),
    (Faults(perturbations=(Perturbation("packed", "layers.2.ffn_out", LARGE, 300),)), (2, "ffn_out", "large", 300)),
    (Faults(perturbations=(Perturbation("unpacked", "layers.4.v", MEDIUM, 77),)), (4, "v", "medium", 77)),
    (Faults(perturbations=(Perturbation("unpacked", "layers.1.q_rope", LARGE, 5),)), (1, "q_rope", "large", 5)),
    (Faults(perturbations=(Perturbation("unpacked", "layers.1.resid_mid", SMALL, 9),)), (1, "resid_mid", "small", 9)),
]


@pytest.mark.parametrize("faults, expected", CASES, ids=lambda x: x.describe() if isinstance(x, Faults) else None)
def test_planted_fault_is_found_exactly(tmp_path, faults, expected):
    result = run(tmp_path, debug_batch(400), dtype="float32", faults=faults)
    fd = result.summary.first_divergence
    assert fd is not None, "the planted fault was not found"
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == expected


def test_no_fault_no_divergence_float32(tmp_path):
    result = run(tmp_path, debug_batch(400), dtype="float32")
    assert result.summary.verdict == "agree" and result.summary.first_divergence is None
    worst = max(s.max_rel_l2 for s in result.summary.taps)
    assert worst < 1e-5  # what 'agree' means here: float32 rounding only (measured 5e-7)


ORDER_BATCH = [("a", 5), ("b", 30), ("c", 12)]  # every pack order puts them differently: abc, cba, bca, acb


@pytest.mark.parametrize("order", PACK_ORDERS)
@pytest.mark.parametrize("path", ["packed", "unpacked"])
def test_perturbation_lands_on_the_planted_token_under_every_pack_order(tmp_path, order, path):
    seqs = make_batch([(name, motif_sequence(n)) for name, n in ORDER_BATCH])
    faults = Faults(perturbations=(Perturbation(path, "layers.1.ffn_out", 2, 4), Perturbation(path, "layers.3.v", 1, 10)))
    s = run(tmp_path, seqs, dtype="float32", pack_order=order, reference="fp64", faults=faults).summary
    fd = s.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (1, "ffn_out", "c", 4)
    assert s.attribution.drifting == path
    first = getattr(s.attribution, path)
    assert (first.layer, first.tap, first.sequence, first.token) == (1, "ffn_out", "c", 4)
    # the second perturbation, at a later layer: its own tap and token diverge, alone among b's tokens there
    v = next(t for t in s.taps if t.name == "layers.3.v")
    assert v.diverged_tokens >= 1
    with open_trace(s.trace) as t:
        rel = stored_table(t).pairs["packed-vs-unpacked"]["rel_l2"][t.meta["taps"].index("layers.3.v"), t.token_slice("b")]
    assert int(rel.argmax()) == 10
