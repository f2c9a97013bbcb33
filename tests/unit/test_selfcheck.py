"""selfcheck's expectations per pack order, and the sizes it states (no model runs here)."""

import pytest

from tracer.inputs.packing import PACK_ORDERS, pack_order
from tracer.selfcheck import cases, format_rows

LENGTHS = [5, 10, 162, 402]  # tokens of tiny, small, medium, large (debug batch, 400 residues)


@pytest.mark.parametrize("order, first_wrong", [("given", "small"), ("reversed", "tiny"), ("longest-first", "tiny"), ("shortest-first", "small")])
def test_positions_fault_expected_where_the_second_packed_sequence_is(order, first_wrong):
    bars = {"layers.5.ffn_out": 0.02, "layers.3.attn_out": 0.01}
    got = {c.label: c for c in cases(6, True, tuple(pack_order(LENGTHS, order)), bars)}
    assert got["positions not restarted"].expected == (0, "q_rope", first_wrong, 0)


def test_perturbations_are_sized_from_the_bar():
    bars = {"layers.5.ffn_out": 0.02, "layers.3.attn_out": 0.01}
    got = [c for c in cases(6, True, (0, 1, 2, 3), bars) if c.faults.perturbations]
    sizes = [(c.faults.perturbations[0].path, c.faults.perturbations[0].eps, c.expected) for c in got]
    assert sizes == [
        ("packed", pytest.approx(0.06), (5, "ffn_out", "large", 20)), ("packed", pytest.approx(0.006), None),
        ("unpacked", pytest.approx(0.03), (3, "attn_out", "medium", 15)), ("unpacked", pytest.approx(0.003), None),
    ]
    assert got[0].label == "packed perturbation 3 x bar (rel L2 0.06), layer 5"


def test_table_has_a_block_per_pack_order():
    rows = [{"pack_order": o, "case": "no fault", "expected": None, "found": None, "blamed": None, "ok": True} for o in PACK_ORDERS]
    text = format_rows(rows)
    assert [line for line in text.splitlines() if line.startswith("pack order")] == [f"pack order {o}:" for o in PACK_ORDERS]
    assert text.endswith("4/4 cases found exactly (pack orders: given, reversed, longest-first, shortest-first)")
