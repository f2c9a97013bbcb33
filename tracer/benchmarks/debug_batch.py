"""The debug-batch benchmark: bare forwards against traced runs, the writer and the comparator.

Every timed side runs in a fresh thread, the sides take turns repeat after repeat, and the
medians are compared (:mod:`tracer.benchmarks.timing`):

* ``bare <path>``: the forward of each path the traced run runs, no hooks (the reference in its
  own precision with full-float32 matmuls; a separate control path is the built-in packed
  forward again);
* ``metrics-only`` and ``full``: ``trace()`` on the same batch and model, timed from its call to
  its return, less the model's precision conversion (which the bare sides do off the clock).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tracer.benchmarks import disk
from tracer.benchmarks.report import GB, check
from tracer.benchmarks.timing import Excluding, bare_medians, interleaved, median
from tracer.capture.paths import encode
from tracer.env import dtype_name, environment, resolve_device, resolve_dtype
from tracer.esm import attention, models
from tracer.esm.packed_forward import PackedESM2
from tracer.inputs.sequences import debug_batch
from tracer.runner.config import RunConfig
from tracer.runner.execute import trace
from tracer.runner.plan import reference_dtype

REFERENCE = "reference"


def bare_sides(model, batch, device, dtype, ref_dtype, backend, paths: list[str]) -> tuple[dict, callable]:
    """``({"bare <path>": fn}, before)``: each path's hook-free forward, and the untimed
    preparation that puts the model in that path's precision."""
    padded, packed_tokens = batch.padded.to(device), batch.packed.to(device)
    packed = PackedESM2(model, backend, rope="fp32")

    def fair_esm():
        with torch.inference_mode():
            model(padded, repr_layers=[model.num_layers])

    def built_in_packed():
        with torch.inference_mode():
            packed(packed_tokens, batch.layout)

    def reference():
        with torch.inference_mode(), models.strict_fp32_matmul():
            model(padded, repr_layers=[model.num_layers])

    runs = {"unpacked": fair_esm, "packed": built_in_packed, "control": built_in_packed, REFERENCE: reference}
    sides = {f"bare {p}": runs[p] for p in paths if p in runs}
    state = {"dtype": None}

    def before(side: str) -> None:
        want = ref_dtype if side == f"bare {REFERENCE}" else dtype
        if side.startswith("bare") and state["dtype"] != want:
            with torch.inference_mode():  # as trace() converts it: the weights stay inference tensors
                models.set_precision(model, device, want)
            state["dtype"] = want
        elif not side.startswith("bare"):
            state["dtype"] = None  # the traced run sets its own precision

    return sides, before


def traced_side(config: RunConfig, seqs, loaded):
    """The timed call of a traced run: ``trace()``, less the model's conversion (the bare sides
    convert it off the clock)."""

    def run():
        r = trace(config, seqs, quiet=True, loaded=loaded)
        return Excluding(r, r.timings.get("to_device", 0.0) + r.timings.get("load", 0.0))

    return run


def run_bench(model_name, seq_len, device_name, dtype_name_, repeats, folder: Path, attn="auto", say=print, packed_specs=()) -> dict:
    """The debug-batch measurements (module docstring) as a JSON-ready dict with its checks;
    ``packed_specs``: plug-ins the noise calibration also measures."""
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name_)
    ref_dtype = reference_dtype("auto", dtype)
    backend = attention.resolve(attn, device, dtype)
    say(f"bench: loading {model_name} (random weights)")
    cached = models.random_cache_path(models.architecture(model_name), 0)
    built = cached is None or not cached.exists()
    t0 = time.perf_counter()
    loaded = models.load_model(model_name, "random", 0)
    load_seconds = time.perf_counter() - t0
    models.wait_for_cache_writes()  # a first build writes the weights cache (GBs) in the background: not while timing
    model, arch, _ = loaded
    seqs = debug_batch(seq_len)
    batch = encode(seqs, model.alphabet)
    base = dict(model=model_name, weights="random", device=device_name, dtype=dtype_name_, attn=attn, force=True)
    say("bench: which paths a traced run runs")
    probe = trace(RunConfig(**base, metrics_only=True, out=str(folder / "bench-probe.h5")), seqs, quiet=True, loaded=loaded)
    probe.path.unlink(missing_ok=True)
    paths = [p for p in ("unpacked", "packed", "control", REFERENCE) if p in probe.timings]
    sides, before = bare_sides(model, batch, device, dtype, ref_dtype, backend, paths)
    sides["metrics-only"] = traced_side(RunConfig(**base, metrics_only=True, out=str(folder / "bench-metrics.h5")), seqs, loaded)
    sides["full"] = traced_side(RunConfig(**base, out=str(folder / "bench-full.h5")), seqs, loaded)
    say(f"bench: {len(sides)} sides x ({repeats} repeats + 1 warm-up), interleaved, each in a fresh thread: {', '.join(sides)}")
    times, last = interleaved(sides, repeats, device, before=before)
    bare_each, bare_total = bare_medians(times, repeats)
    mo_s, full_s = median(times["metrics-only"]), median(times["full"])
    full = last["full"]
    result = {
        "model": model_name, "layers": arch.num_layers, "tokens": batch.layout.n_tokens, "taps": len(full.summary.taps),
        "dtype": dtype_name_, "reference": dtype_name(ref_dtype) if ref_dtype is not None else None, "backend": backend.name,
        "device": environment(device)["device_name"], "device_type": device.type, "repeats": repeats, "times": times,
        "bare_seconds": bare_each, "bare_total_seconds": bare_total, "traced_seconds": full_s, "metrics_only_seconds": mo_s,
        "load": {"seconds": load_seconds, "built": built, "parameters": sum(p.numel() for p in model.parameters())},
        "traced_timings": full.timings, "metrics_only_timings": last["metrics-only"].timings,
        "verdict": full.summary.verdict, "first_divergence": full.summary.to_json()["first_divergence"],
    }
    last["metrics-only"].path.unlink(missing_ok=True)
    result.update(_disk_and_comparator(full, folder, say))
    if ref_dtype is not None:
        from tracer.campaigns.calibration import calibrate

        say("bench: noise calibration (the control, --packed-rope model, plug-ins)")
        result["calibration"] = calibrate(base, seqs, loaded, folder, packed_specs, say)
    full.path.unlink(missing_ok=True)
    result["checks"] = debug_checks(result)
    return result


def _disk_and_comparator(full, folder: Path, say) -> dict:
    nbytes = full.bytes_written
    say(f"bench: raw sequential write of {nbytes / GB:.2f} GB")
    raw = disk.raw_write(folder, nbytes)
    say("bench: tracer's writer, wall clock to durable data")
    write_seconds, write_bytes = disk.tracer_write(folder, full.path)
    say("bench: comparator (fresh process)")
    comp = disk.comparator_probe(full.path)
    say("bench: compression study")
    file_size = full.path.stat().st_size
    return {
        "bytes_written": nbytes, "trace_file_bytes": file_size, "raw_write_seconds": raw, "raw_write_gb_s": nbytes / raw / GB,
        "trace_write_seconds": write_seconds, "trace_write_gb_s": write_bytes / write_seconds / GB,
        "copy_seconds": full.write_stats.get("copy_seconds"), "comparator_seconds": comp["seconds"],
        "comparator_gb_s": file_size / comp["seconds"] / GB, "comparator_peak_rss": comp["peak_rss"],
        "comparator_baseline_rss": comp["baseline_rss"], "one_layer_bytes": disk.one_layer_bytes(full.path),
        "compression": disk.compression_study(full.path, folder),
    }


def debug_checks(r: dict) -> list[dict]:
    """The debug batch's measures against their targets."""
    dev, bare, raw = r["device_type"], r["bare_total_seconds"], r["raw_write_seconds"]
    growth = (r["comparator_peak_rss"] - r["comparator_baseline_rss"]) / r["one_layer_bytes"]
    paths = " + ".join(r["bare_seconds"])
    checks = [
        check("metrics_only_over_bare", f"--metrics-only / bare forwards ({paths})", r["metrics_only_seconds"] / bare,
              f"{r['metrics_only_seconds']:.3f} s / {bare:.3f} s", dev),
        check("traced_over_bare_plus_raw_write", "full trace / (bare forwards + raw write)", r["traced_seconds"] / (bare + raw),
              f"{r['traced_seconds']:.3f} s / ({bare:.3f} + {raw:.3f} s)", dev),
        check("write_throughput_over_raw", "tracer's writer / raw write (GB/s, wall to fsync)", r["trace_write_gb_s"] / r["raw_write_gb_s"],
              f"{r['trace_write_gb_s']:.2f} / {r['raw_write_gb_s']:.2f} GB/s of {r['bytes_written'] / GB:.2f} GB", dev),
        check("comparator_gb_s", "comparator, all metrics recomputed (GB of trace per s)", r["comparator_gb_s"],
              f"{r['trace_file_bytes'] / GB:.2f} GB in {r['comparator_seconds']:.3f} s", dev),
        check("comparator_rss_growth_over_one_layer", "comparator RSS growth / one layer's data", growth,
              f"{(r['comparator_peak_rss'] - r['comparator_baseline_rss']) / 1e6:.0f} MB / {r['one_layer_bytes'] / 1e6:.1f} MB", dev),
    ]
    return [c.to_json() for c in checks]
