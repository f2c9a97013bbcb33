import math
from decimal import Decimal, getcontext

import pytest
import torch

from tracer.judging.metrics import cos_dist, max_abs, rel_l2, token_metrics


def test_values_on_known_vectors():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    m = token_metrics(a, b)
    assert m["rel_l2"].tolist() == pytest.approx([0.0, math.sqrt(2), 0.0, 1.0], rel=1e-6)  # float32 sums
    assert m["max_abs"].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert m["cos_dist"].tolist() == pytest.approx([0.0, 1.0, 0.0, 1.0], abs=1e-15)


def test_rel_l2_when_baseline_is_zero():
    assert rel_l2(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])).item() == math.inf


def test_cosine_distance_resolves_float32_rounding():
    # two float32 vectors one ulp apart: 1 - cos must be tiny but not 0, and accurate
    torch.manual_seed(0)
    b = torch.randn(1, 2560)
    a = b.clone()
    a[0, 0] = torch.nextafter(a[0, 0], torch.tensor(math.inf))
    d = cos_dist(a, b).item()
    getcontext().prec = 60  # the exact value, in 60-digit decimal arithmetic
    xa = [Decimal(float(v)) for v in a[0]]
    xb = [Decimal(float(v)) for v in b[0]]
    dot = sum(p * q for p, q in zip(xa, xb))
    exact = 1 - dot / (sum(p * p for p in xa).sqrt() * sum(q * q for q in xb).sqrt())
    naive = 1 - torch.nn.functional.cosine_similarity(a.double(), b.double()).item()
    assert 0 < d < 1e-12
    assert d == pytest.approx(float(exact), rel=1e-6)
    assert abs(naive - float(exact)) > 100 * abs(d - float(exact))  # what the naive formula loses


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_tokens_are_nan(bad):
    a = torch.ones(3, 4)
    b = torch.ones(3, 4)
    a[1, 2] = bad
    for metric in (cos_dist, max_abs, rel_l2):
        out = metric(a, b)
        assert out[0].item() == 0 and out[2].item() == 0 and math.isnan(out[1].item())


def test_head_layout_is_flattened_per_token():
    a = torch.randn(5, 4, 8)
    b = a + 0.01
    assert rel_l2(a, b).shape == (5,)
    assert max_abs(a, b).max().item() == pytest.approx(0.01, abs=1e-6)  # b = a + 0.01 rounded in float32


def test_bfloat16_inputs_are_upcast_exactly():
    a = torch.tensor([[1.0, 2.0]], dtype=torch.bfloat16)
    b = torch.tensor([[1.0, 2.015625]], dtype=torch.bfloat16)  # one bf16 ulp above 2
    assert rel_l2(a, b).dtype == torch.float64
    assert rel_l2(a, b).item() == pytest.approx(0.015625 / math.hypot(1.0, 2.015625), rel=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        token_metrics(torch.zeros(2, 3), torch.zeros(3, 3))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["a", "b", "both"])
def test_non_finite_never_passes_even_when_equal(bad, where):
    """Polygraphy's rule (NaNs always fail), extended to Inf: a NaN/Inf on either side, or the
    same NaN/Inf on both sides, gives NaN metrics, and NaN fails every threshold."""
    a, b = torch.ones(2, 4), torch.ones(2, 4)
    if where in ("a", "both"):
        a[0, 1] = bad
    if where in ("b", "both"):
        b[0, 1] = bad
    m = token_metrics(a, b)
    for name in ("cos_dist", "max_abs", "rel_l2"):
        assert math.isnan(m[name][0].item()) and m[name][1].item() == 0
    assert not (m["rel_l2"][0] <= 1e30)  # the comparison every rule makes
