"""The verdict on synthetic metric tables: walk order, NaN/Inf, and missing taps.

Each table holds small noise (1e-3 relative L2 against the reference, 1e-4 between the
paths) and a few planted values, so every expectation below is exact.
"""

import json
import math

import numpy as np
import pytest

from tracer.inputs.packing import Layout
from tracer.taps import tap_names
from tracer.errors import TracerError
from tracer.judging.verdict import CONTROL, PAIR, ROUNDED, VS_REF, MetricsTable, Rule, Summary, judge, thresholds

LAYOUT = Layout.from_lengths([4, 6])  # sequences a (tokens 0..3) and b (0..5), N = 10
IDS = ["a", "b"]
NAMES = tap_names(2)  # embed, layers.0.*, layers.1.*, final_norm
CONTEXT = {"reference": "float32"}


def table(plant=()) -> MetricsTable:
    """Noise everywhere; ``plant`` is ``[(pair, tap, row, rel_l2)]``: that token's metrics become
    those of an error of that size (NaN: NaN in every metric, as for a non-finite token)."""
    shape = (len(NAMES), LAYOUT.n_tokens)
    levels = {PAIR: 1e-4, VS_REF["packed"]: 1e-3, VS_REF["unpacked"]: 1e-3, CONTROL: 1e-3, ROUNDED: 5e-4}
    pairs = {p: metrics_of(np.full(shape, v)) for p, v in levels.items()}
    for pair, tap, row, value in plant:
        for metric, planted in metrics_of(np.float64(value)).items():
            pairs[pair][metric][NAMES.index(tap), row] = planted
    return MetricsTable(NAMES, pairs)


def metrics_of(rel_l2):
    """The metrics of an error of relative size ``rel_l2`` (cosine distance ~ rel_l2**2 / 2)."""
    return {"rel_l2": rel_l2, "cos_dist": rel_l2 * rel_l2 / 2, "max_abs": rel_l2}


def row(seq: int, token: int) -> int:
    return int(LAYOUT.offsets[seq]) + token


def where(p):
    return (p.layer, p.tap, p.sequence, p.token)


def test_both_drift_sentence_follows_data_flow_order():
    # packed drifts late in data-flow order but early in (sequence, token); unpacked the reverse
    s = judge(table([(VS_REF["packed"], "layers.1.ffn_out", row(0, 1), 0.5),
                     (VS_REF["unpacked"], "layers.0.v", row(1, 4), 0.5)]), LAYOUT, IDS, Rule(), CONTEXT)
    att = s.attribution
    assert att.drifting == "both" and att.first.path == "unpacked"
    assert att.sentence().startswith(
        "both paths drift from the float32 reference: unpacked first at layer 0, v, sequence b, token 4 "
        "(rel L2 0.5 > 0.008), packed at layer 1, ffn_out, sequence a, token 1"
    )


@pytest.mark.parametrize("rule", [Rule(), Rule(kind="plain", max_rel_l2=1e-2)], ids=["noise", "plain"])
def test_nan_is_the_first_divergence_and_drift(rule):
    at = row(1, 2)
    s = judge(table([(PAIR, "layers.1.ctx", at, math.nan), (VS_REF["packed"], "layers.1.ctx", at, math.nan)]),
              LAYOUT, IDS, rule, CONTEXT)
    fd = s.first_divergence
    assert where(fd) == (1, "ctx", "b", 2) and fd.non_finite and fd.rel_l2 is None
    att = s.attribution
    assert where(att.first) == (1, "ctx", "b", 2) and att.drifting == "packed" and att.at_divergence["off"] == "packed"
    assert "packed drifts from the float32 reference first at layer 1, ctx, sequence b, token 2 (a NaN or Inf value)" in att.sentence()
    text = s.format_text(table=True)
    assert "packed vs unpacked: a NaN or Inf value at this token" in text
    assert "worst     layers by packed-vs-unpacked max rel L2: layer 1 nan, layer 0 0.0001" in text
    ctx_row = next(line for line in text.splitlines() if line.startswith("layers.1.ctx "))
    assert ctx_row.split()[1:3] == ["nan", "nan"]  # min cos, max rel L2: shown, not skipped
    doc = json.loads(json.dumps(s.to_json(), allow_nan=False))  # strict JSON: NaN becomes null
    assert doc["first_divergence"]["non_finite"] is True and doc["worst_layers"][0] == {"layer": 1, "max_rel_l2": None}


def test_a_missing_tap_is_not_a_nan():
    # layers.0.ctx was not recorded by one path: NaN row, marked missing; a real NaN later
    t = table([(PAIR, "layers.1.resid_out", row(0, 3), math.nan)])
    for p in (PAIR, VS_REF["packed"]):
        t.pairs[p]["rel_l2"][NAMES.index("layers.0.ctx")] = np.nan
    present = np.ones(len(NAMES), dtype=bool)
    present[NAMES.index("layers.0.ctx")] = False
    t.present = {PAIR: present, VS_REF["packed"]: present}
    s = judge(t, LAYOUT, IDS, Rule(), CONTEXT)
    assert where(s.first_divergence) == (1, "resid_out", "a", 3)
    assert s.attribution.drifting == "neither"
    stats = {x.name: x for x in s.taps}
    assert not stats["layers.0.ctx"].compared and stats["layers.0.ctx"].diverged_tokens == 0
    assert s.worst_layers() == [(1, pytest.approx(math.nan, nan_ok=True)), (0, 1e-4)]
    assert "missing (not recorded by both paths)" in s.format_table()


def test_one_path_all_nan_at_a_tap_does_not_move_the_bar():
    # every packed token at layers.0.k_rope is NaN: the bar is the control's, as everywhere
    t = table()
    t.pairs[VS_REF["packed"]]["rel_l2"][NAMES.index("layers.0.k_rope")] = np.nan
    s = judge(t, LAYOUT, IDS, Rule(), CONTEXT)
    k = next(x for x in s.taps if x.name == "layers.0.k_rope")
    assert k.noise == pytest.approx(1e-3) and s.attribution.unpacked is None


@pytest.mark.parametrize("plant", [(), [(PAIR, "layers.0.ctx", row(1, 2), 0.5), (VS_REF["packed"], "layers.0.ctx", row(1, 2), 0.5)],
                                   [(PAIR, "layers.1.v", row(0, 3), float("nan"))]], ids=["agree", "diverged", "nan"])
def test_summary_round_trips_through_json(plant):
    s = judge(table(plant), LAYOUT, IDS, Rule(), CONTEXT, trace="t.h5")
    again = Summary.from_json(json.loads(json.dumps(s.to_json())))
    assert again.to_json() == s.to_json()
    assert again.format_text(table=True) == s.format_text(table=True)
    assert (again.first_divergence is None) == (s.first_divergence is None)


@pytest.mark.parametrize("verdict", [None, "", "maybe"])
def test_summary_without_a_verdict_is_refused_not_read_as_agreement(verdict):
    d = judge(table(), LAYOUT, IDS, Rule(), CONTEXT).to_json()
    if verdict is None:
        del d["verdict"]
    else:
        d["verdict"] = verdict
    with pytest.raises(ValueError, match="no valid verdict"):
        Summary.from_json(d)


def test_noise_comes_from_the_control_alone():
    # both paths 20x the control's error at every token of layers.0.v (a cause they share):
    # the bar stays the control's, so both drift there; paths under test never move it
    t = table()
    for p in VS_REF.values():
        t.pairs[p]["rel_l2"][NAMES.index("layers.0.v")] = 2e-2
    s = judge(t, LAYOUT, IDS, Rule(), CONTEXT)
    v = next(x for x in s.taps if x.name == "layers.0.v")
    assert v.noise == pytest.approx(1e-3) and v.threshold == pytest.approx(8e-3)
    assert s.attribution.drifting == "both"
    assert where(s.attribution.packed) == where(s.attribution.unpacked) == (0, "v", "a", 0)
    assert np.array_equal(thresholds(t, Rule())[1], thresholds(table(), Rule())[1])


def test_the_floor_is_the_least_noise_level():
    t = table()
    t.pairs[CONTROL]["rel_l2"][NAMES.index("layers.1.ctx")] = 1e-5  # below the representation floor
    _, noise, floor = thresholds(t, Rule())
    assert noise[NAMES.index("layers.1.ctx")] == pytest.approx(5e-4) == floor[NAMES.index("layers.1.ctx")]


def test_a_table_without_the_control_is_refused_by_the_noise_rule_only():
    t = table()
    del t.pairs[CONTROL]
    with pytest.raises(TracerError, match="use --rule plain, or re-run it"):
        judge(t, LAYOUT, IDS, Rule(), CONTEXT)
    assert judge(t, LAYOUT, IDS, Rule(kind="plain", max_rel_l2=1e-2), CONTEXT).verdict == "agree"


def test_medians_in_parallel_blocks_are_the_single_call_ones(monkeypatch):
    """Large tables take their per-row medians in parallel row blocks: identical to one call,
    NaN/Inf tokens and rows with no finite value included; per-row worst values keep NaN."""
    import numpy as np

    from tracer.judging import verdict

    rng = np.random.default_rng(0)
    rows = rng.random((37, 4001)).astype(np.float32)
    rows[3, 7] = np.nan
    rows[5, :] = np.nan
    rows[8, 100] = np.inf
    whole = verdict._median_rows(rows)
    monkeypatch.setattr(verdict, "PARALLEL_MEDIAN_ELEMENTS", 1)
    np.testing.assert_array_equal(verdict._median(rows), whole)
    np.testing.assert_array_equal(verdict._median(rows[:, :4000]), verdict._median_rows(rows[:, :4000]))  # even count
    assert np.isnan(whole[5]) and np.isfinite(whole[3]) and np.isfinite(whole[8])
    worst = verdict._worst(rows)
    assert np.isnan(worst[3]) and np.isnan(worst[5]) and worst[8] == np.inf and worst[0] == rows[0].max()
