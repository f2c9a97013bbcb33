"""The collector's two schedules give the same metrics; the per-layer one (a GPU's) costs a
fixed number of kernels per layer, whatever the number of taps (cheap invariant, no timing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tracer.capture.collector import Collector
from tracer.judging.verdict import ROUNDED
from tracer.taps import tap_names

PATHS = ["unpacked", "packed", "reference"]


def _taps(names, n=37, e=24, ref_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        ref = torch.randn(n, e, generator=g, dtype=torch.float64)
        ref[3] = 0.0  # a zero token: cosine distance of a zero vector
        low = ref + 1e-2 * torch.randn(n, e, generator=g, dtype=torch.float64)
        packed = ref + 3e-3 * torch.randn(n, e, generator=g, dtype=torch.float64)
        packed[5, 2] = torch.nan  # NaN is data
        shape = (n, 4, e // 4) if name.endswith(("q_rope", "ctx")) else (n, e)
        out[name] = {"unpacked": low.to(torch.bfloat16).view(shape), "packed": packed.to(torch.bfloat16).view(shape),
                     "reference": ref.to(ref_dtype).view(shape)}
    return out


def _collect(names, taps, per_layer, skip=()):
    c = Collector(names, PATHS, torch.bfloat16, per_layer=per_layer)
    for layer in sorted({n.split(".")[1] for n in names}):
        for path in PATHS:
            for name in names:
                if name.split(".")[1] == layer and (path, name) not in skip:
                    c.add(path, name, taps[name][path])
        c.flush()  # what the lockstep does after each layer
    left = {(path, name) for path, held in c.held.items() for name in held}
    assert {name for _, name in left} == {name for _, name in skip}, left  # let go once its pairs are done (a pair never made: kept)
    return c.table()


@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.float64])
def test_per_layer_schedule_gives_the_per_pair_metrics(ref_dtype):
    names = tap_names(3, globals_=False)
    taps = _taps(names, ref_dtype=ref_dtype)
    skip = {("packed", "layers.0.q_rope"), ("packed", "layers.1.v"), ("packed", "layers.2.ctx")}  # a plug-in that does not expose every tap (a layer's first one too)
    per_pair, per_layer = _collect(names, taps, False, skip), _collect(names, taps, True, skip)
    assert set(per_pair) == set(per_layer) == {"packed-vs-unpacked", "unpacked-vs-reference", "packed-vs-reference", ROUNDED}
    for pair, table in per_pair.items():
        for metric, values in table.items():
            np.testing.assert_allclose(per_layer[pair][metric], values, rtol=2e-6, atol=1e-12, equal_nan=True, err_msg=f"{pair} {metric}")
    row = names.index("layers.1.v")
    assert np.isnan(per_layer["packed-vs-unpacked"]["rel_l2"][row]).all()  # not recorded: NaN rows
    assert np.isnan(per_layer["packed-vs-reference"]["max_abs"][names.index("layers.0.v"), 5])  # NaN token
    assert np.isfinite(per_layer["unpacked-vs-reference"]["max_abs"][names.index("layers.0.v"), 5])


class CountOps(TorchDispatchMode):
    """Counts the ops that launch a kernel on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten.empty.memory_format:  # views and allocations launch no kernel
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops_per_layer(sites: int) -> int:
    names = tap_names(2, globals_=False)[:sites]  # layer 0's first ``sites`` taps
    taps = _taps(names)
    c = Collector(names, PATHS, torch.bfloat16, per_layer=True)
    for path in PATHS:
        for name in names:
            c.add(path, name, taps[name][path])
    with CountOps() as count:
        c.flush()
    return count.ops


def test_per_layer_kernels_do_not_grow_with_taps():
    one, eight = _ops_per_layer(1), _ops_per_layer(8)
    assert one == eight, (one, eight)
    assert eight <= 40, eight  # 3 stacks + 2 casts + a rounding (2) + 4 norms + 4 pairs x 6 ops (token_sums)


def test_per_layer_schedule_stacks_one_chunk_at_a_time(monkeypatch):
    """Taps larger than a chunk are stacked one chunk at a time for every pair, and a chunk's
    stacks are gone before the next is made (the pre-flight's workspace: one chunk per operand);
    the metrics are those of one stack for the whole layer."""
    import weakref

    from tracer.capture import collector

    names = tap_names(2, globals_=False)
    taps = _taps(names, ref_dtype=torch.float64)
    whole = _collect(names, taps, True)
    made, peak, operand, sums = [], [0], Collector._operand, collector.token_sums

    def tracked(self, stacks, side, chunk, work):  # every operand stack, watched without keeping it alive
        out = operand(self, stacks, side, chunk, work)
        made.append(weakref.ref(out[0]))
        return out

    def counting(xa, xb, na, nb):  # while a pair is summed: the operand stacks still alive
        peak[0] = max(peak[0], len({id(r()) for r in made if r() is not None}))
        return sums(xa, xb, na, nb)

    monkeypatch.setattr(Collector, "chunk_bytes", 1)  # one tap per chunk
    monkeypatch.setattr(Collector, "_operand", tracked)
    monkeypatch.setattr(collector, "token_sums", counting)
    chunked = _collect(names, taps, True)
    # one stack per operand and working dtype: unpacked and packed in float32 (their own pair) and
    # float64 (against the float64 reference), the reference and the rounded reference
    assert 0 < peak[0] <= 6, peak
    for pair, table in whole.items():
        for metric, values in table.items():
            np.testing.assert_array_equal(chunked[pair][metric], values, err_msg=f"{pair} {metric}")


def test_per_layer_schedule_with_a_first_tap_one_path_lacks():
    """Whatever order the paths arrive in, a pair's working dtype comes from a tap it has."""
    names = ["layers.0.resid_mid", "layers.0.resid_out"]
    c = Collector(names, PATHS, torch.bfloat16, per_layer=True)
    x = torch.randn(5, 8)
    for name in names:
        c.add("reference", name, x.double())
    for name in names:
        c.add("unpacked", name, x.bfloat16())
    c.add("packed", "layers.0.resid_out", x.bfloat16())  # the plug-in did not capture resid_mid
    c.flush()
    assert sorted(c.metrics["packed-vs-unpacked"]) == ["layers.0.resid_out"]
    assert sorted(c.metrics["unpacked-vs-reference"]) == names
