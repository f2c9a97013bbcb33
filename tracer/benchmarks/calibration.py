"""Noise calibration of the benchmark: how far a fault-free run stays below K, and how far a
cause both paths share lands above it (worst token / noise level, per pair)."""

from __future__ import annotations

from pathlib import Path

from tracer.runner.config import RunConfig
from tracer.runner.execute import trace


def ratios(trace_path: Path) -> dict:
    """Per pair: the worst token's error over its tap's noise level (``noise_ratios``)."""
    from tracer.judging.tables import stored_table
    from tracer.judging.verdict import noise_ratios
    from tracer.store.trace_file import open_trace

    with open_trace(trace_path) as t:
        return noise_ratios(stored_table(t))


def noise_calibration(full_trace: Path, base: dict, seqs, loaded, folder: Path) -> dict:
    """``packed_rope_fp32``: the fault-free full trace's ratios; ``packed_rope_model``: a
    ``--metrics-only`` run with fair-esm's RoPE on both paths (a shared cause), and its verdict."""
    out = {"packed_rope_fp32": ratios(full_trace)}
    cal = trace(RunConfig(**base, metrics_only=True, packed_rope="model", out=str(folder / "bench-cal.h5")), seqs, quiet=True, loaded=loaded)
    out["packed_rope_model"] = {**ratios(cal.path), "verdict": cal.summary.verdict}
    cal.path.unlink(missing_ok=True)
    return out
