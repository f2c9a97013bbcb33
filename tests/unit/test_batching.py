import pytest
import torch

from tracer.inputs.batching import plan_sub_batches, sub_faults
from tracer.inputs.faults import Faults, Perturbation
from tracer.inputs.packing import Layout


def test_zero_or_a_budget_the_batch_fits_keeps_the_batch_as_given():
    for k in (0, 4 * 402, 10**9):
        plan = plan_sub_batches([5, 10, 402, 162], k)
        assert plan.groups == ((0, 1, 2, 3),)


def test_length_sorted_greedy_split_under_the_budget():
    plan = plan_sub_batches([5, 10, 402, 162, 160], 500)
    assert plan.groups == ((2,), (3, 4, 1), (0,))  # longest first; 3 x 162 = 486 <= 500, a 4th would not fit
    assert all(plan.padded_tokens(k) <= 500 for k in range(3))
    assert sorted(i for g in plan.groups for i in g) == list(range(5))
    assert plan.to_meta()["padded_tokens"] == [402, 486, 5]


def test_a_sequence_longer_than_the_budget_gets_its_own_sub_batch():
    plan = plan_sub_batches([800, 3, 3], 100)
    assert plan.groups == ((0,), (1, 2))


def test_rows_cover_every_canonical_token_once():
    lengths = [5, 10, 402, 162]
    plan = plan_sub_batches(lengths, 400)
    rows = torch.cat(plan.rows(Layout.from_lengths(lengths)))
    assert sorted(rows.tolist()) == list(range(sum(lengths)))


def test_sub_faults_renumbers_perturbations_within_the_sub_batch():
    f = Faults(double_scale=True, perturbations=(Perturbation("unpacked", "layers.0.v", 2, 7), Perturbation("unpacked", "embed", 0, 1)))
    sub = sub_faults(f, (3, 2))
    assert sub.double_scale and [(p.sequence, p.token) for p in sub.perturbations] == [(1, 7)]


def test_negative_budget_is_rejected():
    with pytest.raises(ValueError):
        plan_sub_batches([3], -1)
