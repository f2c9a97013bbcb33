"""Pooled final embeddings: stored per path, residues only, float64, right under every pack order."""

import numpy as np
import pytest
import torch

from tests.conftest import run
from tracer.judging.embeddings import cosines, mean_pool, pooled_cosines
from tracer.inputs.packing import Layout
from tracer.store.trace_file import open_trace


def test_mean_pool_leaves_out_cls_and_eos():
    layout = Layout.from_lengths([3, 5])  # 1 and 3 residues
    x = torch.arange(8 * 2, dtype=torch.bfloat16).view(8, 2)
    pooled = mean_pool(x, layout)
    assert pooled.dtype == np.float64
    np.testing.assert_array_equal(pooled[0], [2.0, 3.0])  # row 1 only
    np.testing.assert_array_equal(pooled[1], x[4:7].double().mean(0).numpy())  # rows 4..6


def test_cosines_are_exact_and_nan_for_zero_rows():
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[1.0, 1.0], [1.0, 0.0]])
    c = cosines(a, b)
    assert c[0] == pytest.approx(2 ** -0.5, rel=0, abs=1e-15) and np.isnan(c[1])


@pytest.mark.parametrize("order", ["given", "reversed"])
def test_run_stores_pooled_embeddings_of_every_path(tmp_path, order):
    result = run(tmp_path, dtype="bfloat16", pack_order=order, layers=(0, 5))
    with open_trace(result.path) as t:
        for path in ("unpacked", "packed", "reference"):
            final = t.tap(path, "final_norm")
            want = np.stack([final[s.rows][1:-1].double().mean(0).numpy() for s in t.sequences])
            np.testing.assert_array_equal(t.embeddings(path), want)
        cos = pooled_cosines(t)
    assert set(cos) == {"packed-vs-unpacked", "packed-vs-reference", "unpacked-vs-reference"}
    assert set(cos["packed-vs-unpacked"]) == {"one", "short", "long"}
    assert all(0.99 < v <= 1.0 + 1e-12 for pair in cos.values() for v in pair.values())


def test_no_final_norm_no_embeddings(tmp_path):
    result = run(tmp_path, taps=("resid_out",), layers=(0,))
    with open_trace(result.path) as t:
        assert t.embeddings("packed") is None and pooled_cosines(t) == {}
