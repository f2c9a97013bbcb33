"""Local vs accumulated error: re-running each layer on the other side's input."""

from tests.conftest import mixed_batch, run
from tracer.inputs.faults import Faults


def test_single_layer_fault_is_local_to_that_layer(tmp_path):
    s = run(tmp_path, mixed_batch(), dtype="float32", reference="fp64", local=True,
            faults=Faults(double_scale=True, layers=(2,))).summary
    assert s.first_divergence.layer == 2
    born = {pair: [r.layer for r in rows if r.born_here] for pair, rows in s.local.items()}
    assert born == {"packed-vs-unpacked": [2], "packed-vs-reference": [2], "unpacked-vs-reference": []}
    rows = {r.layer: r for r in s.local["packed-vs-unpacked"]}
    # accumulated error is carried into every later layer; local error is not
    assert all(rows[i].accumulated_max_rel_l2 > 1e-2 for i in range(2, 6))
    assert all(rows[i].local_max_rel_l2 < 1e-5 for i in (0, 1, 3, 4, 5))
    assert rows[2].local_max_rel_l2 > 1e-2


def test_local_needs_full_taps(tmp_path):
    import pytest

    from tracer.errors import TracerError

    with pytest.raises(TracerError, match="--local .* needs all layers"):
        run(tmp_path, mixed_batch(), dtype="float32", local=True, taps=("ctx",))
