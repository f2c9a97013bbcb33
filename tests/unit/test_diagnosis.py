"""The diagnosis of a divergence from synthetic metrics tables: one test per pattern, planted in
either path, plus propagation, the fault-free case and the JSON schema.

Tables hold a healthy error of about 1e-3 (log-normal, spread 1.3x) at every tap and token (the
control path's too), and a planted profile on one path at one tap; the noise rule judges them as
a run would.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tracer.judging import diagnosis as dg
from tracer.judging.diagnosis import Diagnoses, Diagnosis, Judged, classify, diagnose_all
from tracer.inputs.packing import PACK_ORDERS, Layout, pack_order
from tracer.taps import tap_names
from tracer.judging.verdict import CONTROL, PAIR, ROUNDED, VS_REF, MetricsTable, Rule, judge, thresholds

HEALTHY = 1e-3
IDS = ["tiny", "small", "medium", "large"]
LENGTHS = [5, 10, 162, 402]  # the debug batch at --seq-len 400: tokens = residues + 2


def _table(lengths, planted: dict | None = None, seed: int = 0) -> MetricsTable:
    """Healthy errors everywhere; ``planted``: ``{(path, tap): (N,) rel_l2}`` added on that path.

    Packed vs unpacked is the larger of the two paths' errors (a planted error in one path shows
    in the pair at the same size), cos distance is rel^2 / 2 (an error in a random direction)."""
    rng = np.random.default_rng(seed)
    taps = tap_names(2)
    n = sum(lengths)
    err = {p: HEALTHY * rng.lognormal(0, 0.25, (len(taps), n)) for p in ("packed", "unpacked", "control")}
    for (path, tap), profile in (planted or {}).items():
        err[path][taps.index(tap)] = np.maximum(err[path][taps.index(tap)], profile)
    pairs = {VS_REF[p]: _metrics(err[p]) for p in ("packed", "unpacked")}
    pairs[CONTROL] = _metrics(err["control"])  # the healthy control sets the noise level
    pairs[PAIR] = _metrics(np.maximum(err["packed"], err["unpacked"]))
    pairs[ROUNDED] = _metrics(np.full((len(taps), n), 0.5 * HEALTHY))
    return MetricsTable(taps, pairs)


def _metrics(rel):
    rel = rel.astype(np.float32)
    return {"rel_l2": rel, "cos_dist": rel**2 / 2, "max_abs": rel}


def _positions(lengths):
    return np.concatenate([np.arange(n) for n in lengths])


def _judged(table, layout, pooled=None):
    rule = Rule()
    s = judge(table, layout, IDS[: len(layout.lengths)], rule, {"reference": "float32"})
    bars, noise, _ = thresholds(table, rule)
    a = s.attribution
    diags = diagnose_all(Judged(table, layout, IDS[: len(layout.lengths)], bars, noise), s.first_divergence,
                         {"packed": a.packed, "unpacked": a.unpacked}, pooled)
    assert diags == s.diagnosis if pooled is None else True  # judge runs the same diagnosis
    return diags


def _one(diags: Diagnoses, subject: str) -> Diagnosis:
    d = getattr(diags, subject)
    assert d is not None, f"no diagnosis of {subject}: {diags}"
    return d


@pytest.mark.parametrize("path", ["packed", "unpacked"])
def test_step_at_the_bfloat16_integer_limit(path):
    pos = _positions(LENGTHS)
    # fair-esm's RoPE in bf16: grows with position, odd positions from 257 on rounded (257 -> 256)
    profile = HEALTHY * (1 + pos / 40) * np.where((pos >= 257) & (pos % 2 == 1), 12, 1)
    d = _one(_judged(_table(LENGTHS, {(path, "layers.0.q_rope"): profile}), Layout.from_lengths(LENGTHS)), path)
    assert (d.pattern, d.evidence["step_position"], d.evidence["step_dtype"]) == ("step-at-position", 257, "bfloat16")
    assert d.evidence["step_ratio"] >= dg.STEP_MIN_RATIO
    assert d.cause == "positions or frequencies of RoPE computed in bfloat16"
    assert d.tap == "layers.0.q_rope" and d.pair == VS_REF[path]


def test_step_at_the_float16_integer_limit():
    lengths = [12, 2102]
    pos = _positions(lengths)
    profile = HEALTHY * np.where((pos >= 2049) & (pos % 2 == 1), 30, 1)
    d = _one(_judged(_table(lengths, {("packed", "layers.1.k_rope"): profile}), Layout.from_lengths(lengths)), "packed")
    assert (d.pattern, d.evidence["step_position"], d.evidence["step_dtype"]) == ("step-at-position", 2049, "float16")
    assert "float16" in d.cause and "RoPE" in d.cause


@pytest.mark.parametrize("path", ["packed", "unpacked"])
def test_error_growing_with_position_restarting_at_each_sequence(path):
    pos = _positions(LENGTHS)
    profile = HEALTHY * (1 + pos / 15)  # the rounded-inv_freq defect: smooth, no step (0.0034 -> 0.046 at 400)
    d = _one(_judged(_table(LENGTHS, {(path, "layers.0.q_rope"): profile}), Layout.from_lengths(LENGTHS)), path)
    assert d.pattern == "grows-with-position"
    assert d.evidence["position_rho"] >= dg.GROWTH_RHO and d.evidence["growth_ratio"] >= dg.GROWTH_RATIO
    assert d.evidence["slope_per_100"] == pytest.approx(100 * HEALTHY / 15, rel=0.05)
    assert "RoPE" in d.cause and "step" not in d.cause


def test_a_smooth_growth_is_not_a_step():
    pos = _positions(LENGTHS)
    e = HEALTHY * (1 + pos / 15)
    pattern, ev = classify(e, 8 * HEALTHY, HEALTHY, Layout.from_lengths(LENGTHS), IDS)
    assert pattern == "grows-with-position" and "step_position" not in ev


@pytest.mark.parametrize("order", PACK_ORDERS)
def test_sequence_offset_first_packed_sequence_clean(order):
    """Positions not restarted: every sequence but the first of the pack is off, at its own level."""
    lay = Layout.from_lengths(LENGTHS, pack_order(LENGTHS, order))
    seq = np.repeat(np.arange(4), LENGTHS)
    level = np.array([300.0, 200.0, 500.0, 400.0]) * HEALTHY
    profile = np.where(seq == lay.order[0], 0.0, level[seq])
    d = _one(_judged(_table(LENGTHS, {("packed", "layers.0.q_rope"): profile}), lay), "packed")
    assert d.pattern == "sequence-offset", d.evidence
    assert d.evidence["first_packed"] == IDS[lay.order[0]]
    assert "not restarted" in d.cause


@pytest.mark.parametrize("path", ["packed", "unpacked"])
def test_sequence_boundary_neighbours(path):
    """Attention across sequences: every sequence off, the shorter ones (most foreign neighbours) most."""
    seq = np.repeat(np.arange(4), LENGTHS)
    profile = HEALTHY * 6000.0 / np.asarray(LENGTHS, float)[seq]  # large 15x, tiny 1200x (measured: 11x, 250x)
    d = _one(_judged(_table(LENGTHS, {(path, "layers.1.ctx"): profile}), Layout.from_lengths(LENGTHS)), path)
    assert (d.pattern, d.evidence["kind"]) == ("sequence-boundary", "neighbours")
    assert d.evidence["level_vs_length_rho"] <= dg.NEIGHBOUR_RHO
    assert "other sequences" in d.cause


def test_sequence_boundary_edges():
    pos = _positions(LENGTHS)
    last = np.concatenate([np.arange(n) == n - 1 for n in LENGTHS])
    profile = np.where((pos == 0) | last, 50 * HEALTHY, 0.0)
    d = _one(_judged(_table(LENGTHS, {("unpacked", "layers.0.v"): profile}), Layout.from_lengths(LENGTHS)), "unpacked")
    assert (d.pattern, d.evidence["kind"]) == ("sequence-boundary", "edges")
    assert d.evidence["edge_ratio"] >= dg.EDGE_RATIO


def test_uniform_scale_at_the_embedding():
    """Token-dropout rescale skipped: every token 0.88 x, no change of direction (cos distance 0)."""
    table = _table(LENGTHS, {("packed", "embed"): np.full(sum(LENGTHS), 0.136)})
    table.pairs[VS_REF["packed"]]["cos_dist"][0] = 0.0
    d = _one(_judged(table, Layout.from_lengths(LENGTHS)), "packed")
    assert d.pattern == "uniform" and d.evidence["scale_only"] is True
    assert d.evidence["spread_p90_p10"] <= dg.UNIFORM_SPREAD
    assert "scaled by the same factor (1.14 or 0.864)" in d.cause and "token-dropout" in d.cause


def test_widespread():
    rng = np.random.default_rng(3)
    profile = HEALTHY * 10 ** rng.uniform(1, 3, sum(LENGTHS))  # 10x..1000x, no structure
    d = _one(_judged(_table(LENGTHS, {("unpacked", "layers.1.attn_out"): profile}), Layout.from_lengths(LENGTHS)), "unpacked")
    assert d.pattern == "widespread", d.evidence


@pytest.mark.parametrize("path", ["packed", "unpacked"])
def test_isolated(path):
    profile = np.zeros(sum(LENGTHS))
    profile[5 + 10 + 162 + 20] = 0.2  # large, token 20
    d = _one(_judged(_table(LENGTHS, {(path, "layers.1.ffn_out"): profile}), Layout.from_lengths(LENGTHS)), path)
    assert d.pattern == "isolated" and d.evidence["tokens"] == [["large", 20]]
    assert (d.sequence, d.token) == ("large", 20)


def test_non_finite():
    profile = np.zeros(sum(LENGTHS))
    profile[7] = np.nan
    d = _one(_judged(_table(LENGTHS, {("packed", "layers.0.ctx"): profile}), Layout.from_lengths(LENGTHS)), "packed")
    assert d.pattern == "non-finite" and d.evidence["tokens"] == [["small", 2]]
    json.dumps(d.to_json(), allow_nan=False)  # strict JSON: NaN/Inf are null
    assert d.lines()[0].startswith("packed at layers.0.ctx: non-finite")


def test_non_finite_pooled_embedding_is_null_and_printed_nan():
    profile = np.zeros(sum(LENGTHS))
    profile[7] = np.nan
    pooled = {"packed": dict(zip(IDS, [np.nan, 1.0, 1.0, 1.0])), "unpacked": dict(zip(IDS, [1.0] * 4))}
    d = _one(_judged(_table(LENGTHS, {("packed", "layers.0.ctx"): profile}), Layout.from_lengths(LENGTHS), pooled), "packed")
    assert d.pooled_cos["packed"]["tiny"] is None
    json.dumps(d.to_json(), allow_nan=False)
    assert "pooled cos vs reference (worst sequence): packed nan" in d.lines()[1]


def test_absorbed_error_names_the_first_tap_back_within_noise():
    """A RoPE error that attention cancels: over at q_rope, within from ctx on."""
    seq = np.repeat(np.arange(4), LENGTHS)
    profile = np.where(seq == 0, 0.0, 0.5)
    d = _one(_judged(_table(LENGTHS, {("packed", "layers.0.q_rope"): profile}), Layout.from_lengths(LENGTHS)), "packed")
    assert d.propagates is False and d.absorbed_at == "layers.0.ctx"
    assert d.attention.tap == "layers.0.attn_out" and d.attention.within
    assert d.final.tap == "final_norm" and d.final.within


def test_propagated_error_reaches_the_final_representation():
    n = sum(LENGTHS)
    planted = {("packed", t): np.full(n, 0.1) for t in ("embed", *tap_names(2, globals_=False), "final_norm")}
    pooled = {"packed": dict(zip(IDS, [0.97, 0.98, 0.99, 0.99])), "unpacked": dict(zip(IDS, [0.99999] * 4))}
    d = _one(_judged(_table(LENGTHS, planted), Layout.from_lengths(LENGTHS), pooled), "packed")
    assert d.propagates is True and d.absorbed_at is None
    assert d.attention.tap == "layers.0.attn_out" and not d.attention.within  # embed meets attention in layer 0
    assert d.final.max_ratio > 8
    assert d.pooled_cos == {"packed": pooled["packed"]}


def test_fault_free_has_no_diagnosis():
    diags = _judged(_table(LENGTHS), Layout.from_lengths(LENGTHS))
    assert not diags and list(diags) == []
    assert diags.to_json() == {"divergence": None, "packed": None, "unpacked": None}


def test_divergence_and_drift_each_get_one_and_json_round_trips():
    pos = _positions(LENGTHS)
    profile = HEALTHY * (1 + pos / 40) * np.where((pos >= 257) & (pos % 2 == 1), 12, 1)
    pooled = {"packed": dict(zip(IDS, [1.0, 1.0, 1.0, 0.9999])), "unpacked": dict(zip(IDS, [1.0, 1.0, 1.0, 0.999])),
              "control": dict(zip(IDS, [1.0, 1.0, 1.0, 0.99995]))}
    diags = _judged(_table(LENGTHS, {("unpacked", "layers.0.q_rope"): profile}), Layout.from_lengths(LENGTHS), pooled)
    assert diags.divergence.pattern == diags.unpacked.pattern == "step-at-position" and diags.packed is None
    assert set(diags.divergence.pooled_cos) == {"packed", "unpacked", "control"}
    assert set(diags.unpacked.pooled_cos) == {"unpacked", "control"}
    text = json.dumps(diags.to_json(), allow_nan=False)
    assert Diagnoses.from_json(json.loads(text)) == diags
    assert "step-at-position 257" in diags.unpacked.lines()[0]


def test_json_schema_is_documented_and_held():
    """Every field of a diagnosis object is in docs/diagnosis.md's schema table, with the type it has."""
    pos = _positions(LENGTHS)
    diags = _judged(_table(LENGTHS, {("packed", "layers.0.q_rope"): HEALTHY * (1 + pos / 15)}), Layout.from_lengths(LENGTHS),
                    {"packed": dict(zip(IDS, [1.0] * 4))})
    obj = json.loads(json.dumps(diags.to_json()))
    assert set(obj) == {"divergence", "packed", "unpacked"}
    doc = (Path(__file__).parents[2] / "docs" / "diagnosis.md").read_text()
    schema = doc[doc.index("## JSON schema"):]
    documented = dict(re.findall(r"^\| `(\w+)` \| (\w+(?: or null)?) \|", schema, flags=re.M))
    types = {"string": str, "integer": int, "boolean": bool, "object": dict}
    d = obj["packed"]
    assert set(d) == set(dg.JSON_FIELDS) == set(documented), (set(d), set(documented))
    for key, value in d.items():
        kind = documented[key]
        if value is None:
            assert kind.endswith("or null"), key
        else:
            assert isinstance(value, types[kind.split()[0]]), (key, value)
    assert d["pattern"] in dg.PATTERNS
    for p in dg.PATTERNS:
        assert f"`{p}`" in doc
