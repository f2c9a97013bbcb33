"""Production-size batches: memory bounded by one layer, sub-batching, pre-flight.

Memory is measured by the run's ledger (:class:`tracer.store.tap_writer.Ledger`): the exact bytes of tap
tensors held at once (collector, sub-batch assembly, writer in flight), which is what grew with
depth before the paths ran in lockstep, and which RSS on a shared machine would blur.
"""

import h5py
import pytest

from tests.conftest import SMALL, mixed_batch, run
from tracer.runner import preflight
from tracer.errors import TracerError
from tracer.inputs.faults import Faults, Perturbation
from tracer.esm.models import Architecture, Weights, build_random, fingerprint
from tracer.inputs.sequences import make_batch, motif_sequence
from tracer.runner.config import RunConfig
from tracer.runner.execute import trace


def _custom(layers: int, width: int = 64, heads: int = 4):
    arch = Architecture("custom", layers, width, heads)
    model = build_random(arch, 0)
    return model, arch, Weights("random", None, 0, fingerprint(model))


def _run_custom(tmp_path, layers, sequences, **kwargs):
    config = RunConfig(model="custom", weights="random", device="cpu", out=str(tmp_path / f"L{layers}.h5"), force=True, **kwargs)
    return trace(config, sequences, quiet=True, loaded=_custom(layers))


def _batch(n: int, length: int = 60):
    return make_batch([(f"s{i}", motif_sequence(length + 7 * i)) for i in range(n)])


def test_metrics_only_memory_grows_with_tokens_not_layers(tmp_path):
    peaks = {layers: _run_custom(tmp_path, layers, _batch(3), metrics_only=True).memory for layers in (6, 12, 30)}
    layer = peaks[6]["layer_tap_bytes"]
    assert {m["layer_tap_bytes"] for m in peaks.values()} == {layer}  # same width, same tokens
    for layers, m in peaks.items():
        # paths run one after another would hold the taps of every layer: ~ layers x one layer
        assert m["peak_held_tap_bytes"] <= 1.25 * layer, (layers, m)
    assert peaks[30]["peak_held_tap_bytes"] <= 1.05 * peaks[6]["peak_held_tap_bytes"]
    bigger = _run_custom(tmp_path, 6, _batch(6), metrics_only=True).memory
    assert bigger["peak_held_tap_bytes"] > 1.5 * peaks[6]["peak_held_tap_bytes"]  # grows with tokens


@pytest.mark.parametrize("layers", [6, 30])
def test_full_trace_held_memory_within_bound(tmp_path, layers):
    result = _run_custom(tmp_path, layers, _batch(3))
    m = result.memory
    assert m["peak_held_tap_bytes"] <= 4 * m["layer_tap_bytes"]  # the bound: 4 x one layer of all paths
    with h5py.File(result.path) as f:  # and every tap still reached the file
        assert len(f["taps/unpacked"]) == len(f["taps/reference"]) == len(result.summary.taps)


FAULTS = [
    Faults(perturbations=(Perturbation("unpacked", "layers.2.ffn_out", 2, 150),)),
    Faults(perturbations=(Perturbation("unpacked", "layers.1.v", 1, 9),)),
    Faults(positions_low_precision=True),
]


@pytest.mark.parametrize("faults", FAULTS, ids=lambda f: f.describe())
def test_sub_batches_give_the_same_verdict(tmp_path, faults):
    seqs = mixed_batch(300)  # 3, 14 and 302 tokens
    one = run(tmp_path, seqs, "one.h5", dtype="float32", faults=faults, max_batch_tokens=0)
    split = run(tmp_path, seqs, "split.h5", dtype="float32", faults=faults, max_batch_tokens=310)
    with h5py.File(split.path) as f:
        import json

        meta = json.loads(f.attrs["meta"])
    assert meta["batching"]["sub_batches"] == [[2], [1, 0]]  # longest first, then the rest
    a, b = one.summary.first_divergence, split.summary.first_divergence
    assert a is not None and b is not None
    assert (a.layer, a.tap, a.sequence, a.token) == (b.layer, b.tap, b.sequence, b.token)
    assert one.summary.verdict == split.summary.verdict


def test_sub_batches_match_one_batch_per_sequence(tmp_path):
    """Each sequence's taps from a sub-batch are fair-esm's for that sequence (same up to kernels)."""
    seqs = mixed_batch(120)
    one = run(tmp_path, seqs, "one.h5", dtype="float32", max_batch_tokens=0)
    split = run(tmp_path, seqs, "split.h5", dtype="float32", max_batch_tokens=130)
    import numpy as np

    with h5py.File(one.path) as f, h5py.File(split.path) as g:
        for name in ("embed", "layers.3.q_rope", "layers.5.resid_out"):
            np.testing.assert_allclose(f[f"taps/unpacked/{name}"][()], g[f"taps/unpacked/{name}"][()], rtol=1e-4, atol=1e-5)


def _free(disk=None, host=None, device=None):
    return lambda out, dev: preflight.Resources(disk, host, device)


def test_preflight_refuses_before_loading_and_names_what_fits(tmp_path, monkeypatch):
    seqs = mixed_batch(300)
    measured = run(tmp_path, seqs, "measure.h5").estimate
    monkeypatch.setattr(preflight, "free_resources", _free(disk=measured.trace_bytes // 2, host=1 << 40))
    import tracer.esm.models

    monkeypatch.setattr(tracer.esm.models, "load_model", lambda *a, **k: pytest.fail("model loaded before the pre-flight refusal"))
    with pytest.raises(TracerError, match="disk is free.*this would fit: --metrics-only"):
        run(tmp_path, seqs, "refused.h5")
    # nothing of the refused run: no trace and no partial file of any name (partials are unique per run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["measure.h5"]


def test_preflight_accepts_what_fits_and_splits_when_allowed(tmp_path, monkeypatch):
    seqs = make_batch([(f"s{i}", motif_sequence(40 + 200 * (i == 0))) for i in range(12)])  # one long, many short
    whole = run(tmp_path, seqs, "whole.h5", metrics_only=True).estimate
    split = preflight.estimate(whole_arch(), [s.n_tokens for s in seqs], whole_names(whole), *_dtypes(), metrics_only=True, max_batch_tokens=1024)
    assert split.host_peak < whole.host_peak
    budget = int((split.host_peak + whole.host_peak) / 2 / preflight.HEADROOM)
    monkeypatch.setattr(preflight, "free_resources", _free(disk=1 << 40, host=budget))
    auto = run(tmp_path, seqs, "auto.h5", metrics_only=True)  # --max-batch-tokens left to the pre-flight
    assert len(auto.estimate.plan.groups) > 1
    with pytest.raises(TracerError, match=r"this would fit: --max-batch-tokens \d+"):
        run(tmp_path, seqs, "fixed.h5", metrics_only=True, max_batch_tokens=0)  # the user asked for one batch


def whole_arch():
    from tracer.esm.models import architecture

    return architecture(SMALL)


def whole_names(est):
    from tracer.taps import tap_names

    return tap_names(whole_arch().num_layers)


def _dtypes():
    import torch

    return torch.bfloat16, torch.float32


@pytest.mark.parametrize("metrics_only", [False, True], ids=["full", "metrics-only"])
def test_trace_size_estimate_within_20_percent(tmp_path, metrics_only):
    seqs = mixed_batch(300)
    result = run(tmp_path, seqs, metrics_only=metrics_only)
    size = result.path.stat().st_size
    assert 0.8 <= result.estimate.trace_bytes / size <= 1.2, (result.estimate.trace_bytes, size)
    held, estimate = result.memory["peak_held_tap_bytes"], result.estimate
    if metrics_only:
        assert 0.8 <= estimate.held_tap_bytes / held <= 1.2, (estimate.held_tap_bytes, held)
    else:
        # a full trace adds the writer's back-pressure budget, one whole layer in flight to the disk:
        # a bound, which a fast disk never fills, so what is held lies between the collector's share
        # (the estimate without that layer, within 20%) and the whole estimate (plus 20%)
        collector = estimate.held_tap_bytes - estimate.layer_tap_bytes
        assert 0.8 * collector <= held <= 1.2 * estimate.held_tap_bytes, (collector, estimate.held_tap_bytes, held)


def test_preflight_estimate_is_printed_on_every_run(tmp_path, capsys):
    config = RunConfig(model=SMALL, weights="random", device="cpu", out=str(tmp_path / "t.h5"), metrics_only=True)
    trace(config, mixed_batch(30), quiet=False)
    assert "tracer: estimate: trace " in capsys.readouterr().err


def test_out_of_memory_does_not_suggest_what_was_already_given(tmp_path, monkeypatch):
    import torch

    import tracer.capture.paths as paths

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(paths, "run_packed", oom)
    with pytest.raises(TracerError) as e:
        run(tmp_path, mixed_batch(30), metrics_only=True)
    assert "--max-batch-tokens" in str(e.value) and "--metrics-only" not in str(e.value)
