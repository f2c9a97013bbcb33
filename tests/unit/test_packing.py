"""Packing invariants, property-based over random batches of lengths 1..1024 tokens."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tracer.inputs.packing import PACK_ORDERS, Layout, pack, pack_order, unpack

lengths_st = st.lists(st.integers(min_value=1, max_value=1024), min_size=1, max_size=12)


@st.composite
def layouts(draw):
    lengths = draw(lengths_st)
    how = draw(st.sampled_from(PACK_ORDERS + ("random",)))
    if how == "random":
        order = draw(st.permutations(range(len(lengths))))
    else:
        order = pack_order(lengths, how)
    return Layout.from_lengths(lengths, list(order))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_cu_seqlens(lay):
    cu = lay.cu_seqlens
    assert cu.dtype == torch.int32
    assert cu[0] == 0 and cu[-1] == lay.n_tokens == sum(lay.lengths)
    assert torch.equal(cu[1:] - cu[:-1], torch.tensor([lay.lengths[i] for i in lay.order], dtype=torch.int32))
    assert lay.max_seqlen == max(lay.lengths)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_positions_restart_per_sequence(lay):
    pos = lay.positions
    cu = lay.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        assert torch.equal(pos[a:b], torch.arange(b - a))


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_token_to_sequence_map(lay):
    seq = lay.packed_seq_index
    cu = lay.cu_seqlens.tolist()
    for j, i in enumerate(lay.order):
        assert (seq[cu[j] : cu[j + 1]] == i).all()
    # canonical rows map back to (sequence, position)
    for row in {0, lay.n_tokens - 1, lay.n_tokens // 2}:
        i, p = lay.token(row)
        assert int(lay.offsets[i]) + p == row and 0 <= p < lay.lengths[i]


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(min_value=1, max_value=3))
def test_pack_unpack_round_trip(lay, width):
    per_seq = [torch.randn(n, width) for n in lay.lengths]
    packed = pack(per_seq, lay)
    canonical = torch.cat(per_seq)
    # the index maps agree with explicit packing
    assert torch.equal(packed, canonical[lay.canonical_row_of_packed])
    assert torch.equal(canonical, packed[lay.packed_row_of_canonical])
    back = unpack(packed[lay.packed_row_of_canonical], lay)
    assert all(torch.equal(a, b) for a, b in zip(back, per_seq))


@settings(max_examples=40, deadline=None)
@given(layouts(), st.integers(min_value=0, max_value=5))
def test_padded_index(lay, extra):
    t = lay.max_seqlen + extra
    padded = torch.full((len(lay.lengths), t), -1)
    for b, n in enumerate(lay.lengths):
        padded[b, :n] = torch.arange(n) + 10_000 * b
    flat = padded.reshape(-1)[lay.canonical_from_padded(t)]
    assert torch.equal(flat, torch.cat([torch.arange(n) + 10_000 * b for b, n in enumerate(lay.lengths)]))


def test_pack_orders():
    assert pack_order([5, 9, 3], "given") == [0, 1, 2]
    assert pack_order([5, 9, 3], "reversed") == [2, 1, 0]
    assert pack_order([5, 9, 3], "longest-first") == [1, 0, 2]
    assert pack_order([5, 9, 3], "shortest-first") == [2, 0, 1]
