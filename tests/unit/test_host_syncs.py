"""The lockstep never waits for the device per layer (cheap invariant, no timing).

On a GPU every host round trip (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(tensor)``,
``torch.equal``, a copy of a host tensor to the device) makes the host wait until the device has
drained its queue, so the next kernels are launched on an idle device (the 3B's metrics-only run
had 72 such waits per run, one per layer in the packed and the reference path:
``torch.cuda.set_sync_debug_mode`` on the H200, 2026-12-01). Here every
such call made inside the streams' threads is counted on the CPU (where the same calls happen),
for 2 and 4 layers: the count must not grow with the layers.
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

from tracer.capture import lockstep
from tracer.esm.models import Architecture, Weights, build_random, fingerprint
from tracer.inputs.sequences import debug_batch
from tracer.runner.execute import RunConfig, trace

REAL_STREAM_MAIN = lockstep._stream_main
ROUND_TRIPS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
               torch.Tensor.nonzero, torch.equal}


def _tracer_caller() -> str | None:
    """``file:line`` of the first caller outside torch when it is tracer's code, else ``None``
    (fair-esm's own calls happen in the bare forwards too)."""
    f = sys._getframe(2)
    while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename.endswith(__file__)):
        f = f.f_back
    if f is None or "/tracer/" not in f.f_code.co_filename:
        return None
    return f"{f.f_code.co_filename.split('/tracer/')[-1]}:{f.f_lineno}"


class CountRoundTrips(TorchFunctionMode):
    """Counts tracer's host round trips, and its copies of tensors to a device (``.to(device)``,
    ``.cuda()``: from the host, each waits for the device)."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device_copy = func in (torch.Tensor.to, torch.Tensor.cuda) and (
            "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:]))
        where = _tracer_caller() if func in ROUND_TRIPS or device_copy else None
        if where is not None:
            self.seen.append(f"{getattr(func, '__name__', func)} at {where}")
        return func(*args, **kwargs)


def round_trips(tmp_path, monkeypatch, layers: int) -> list:
    seen: list = []
    real = REAL_STREAM_MAIN

    def counted(stream, inference, device):
        with CountRoundTrips(seen):  # modes are per thread: entered in each stream's own
            real(stream, inference, device)

    monkeypatch.setattr(lockstep, "_stream_main", counted)
    arch = Architecture("custom", layers, 64, 4)
    model = build_random(arch, 0)
    loaded = (model, arch, Weights("random", None, 0, fingerprint(model)))
    config = RunConfig(model="esm2_t6_8M_UR50D", weights="random", device="cpu", metrics_only=True, out=str(tmp_path / f"t{layers}.h5"))
    trace(config, debug_batch(12), quiet=True, loaded=loaded)
    return seen


def test_no_host_round_trip_per_layer_in_metrics_only(tmp_path, monkeypatch):
    two, four = round_trips(tmp_path, monkeypatch, 2), round_trips(tmp_path, monkeypatch, 4)
    assert sorted(four) == sorted(two), (two, four)  # nothing per layer
    assert len(four) <= 20, four  # per run, not per layer: each stream copies its batch and bookkeeping once, the pooled embeddings come back

