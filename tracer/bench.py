"""Speed and memory benchmark, printed as ratios: ``python -m tracer.bench [--model NAME]``.

In one run, on one model and the debug-log batch:

a. the bare forward of each path (no hooks; median of ``--repeats``),
b. the traced run (hooks, metrics, HDF5 writing, summary, atomic commit) with full tensors, and
   with ``--metrics-only``, after one untimed warm-up run,
c. bytes written and the writer's throughput, against a raw sequential write (16 MB blocks +
   fsync) of the same number of bytes to the same folder, both by wall clock from creating the
   file until its data is durable (fsync returned): tracer's writer (``TraceWriter`` +
   ``AsyncTapWriter``, the run's code path) stores taps of the traced run's names, shapes and
   dtypes and commits; plus a compression study on a sample of the trace's own tensors,
d. the comparator (``tracer.compare`` on the full trace, recomputing every metric from the
   tensors) in a fresh process: throughput in GB of trace per second and peak RSS, against one
   layer's data.

With ``--production N``, also, each in a fresh process:

e. a production batch (N sequences of 100-700 residues, seeded) traced with ``--metrics-only``:
   the most tap bytes held at once over one layer of all paths, peak memory (CUDA: peak
   allocated minus weights; CPU: peak RSS growth) over one layer of taps plus the attention
   workspace, the pre-flight estimate over what was measured, and ``--metrics-only`` time over
   the bare forwards of that batch;
f. time to verdict of ``python -m tracer.run --weights random --metrics-only`` on the debug
   batch, first run (builds the weights, writes the cache) and repeated run (loads the cache);
g. loading the cached checkpoint onto the device against reading the file at disk speed plus a
   pinned host-to-device copy of the same bytes (page cache warm for both).

With a reference (16-bit runs), also the noise calibration
(:func:`tracer.campaigns.calibration.calibrate`): the margins of
K of the noise rule, from the control path (healthy), ``--packed-rope model`` (a cause both
paths share) and any ``--calibrate-packed SPEC`` plug-in; ``--calibrate-only`` measures just
that (docs/control-path.md has measured ones).

It prints ratios (docs/performance.md has measured ones). Not a test: timings on shared machines
vary, so nothing here asserts.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports()

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from tracer.esm import attention

from tracer.esm import models
from tracer.cli import Parser, main_guard
from tracer.env import dtype_name, environment, resolve_device, resolve_dtype
from tracer.errors import TracerError
from tracer.esm.packed_forward import PackedESM2
from tracer.capture.paths import encode
from tracer.inputs.sequences import debug_batch
from tracer.runner.config import RunConfig
from tracer.runner.execute import trace
from tracer.runner.plan import reference_dtype
from tracer.campaigns.calibration import calibrate, format_calibration, run_calibration

GB = 1e9
MB = 1e6


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator, caches)
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bare_forwards(model, batch, device, dtype, ref_dtype, backend, rope, repeats) -> dict:
    """Median seconds of each path's forward with no hooks."""
    out = {}
    with torch.inference_mode():
        models.set_precision(model, device, dtype)
        padded, packed_tokens = batch.padded.to(device), batch.packed.to(device)
        out["unpacked"] = _timed(lambda: model(padded, repr_layers=[model.num_layers]), device, repeats)
        packed = PackedESM2(model, backend, rope=rope)
        out["packed"] = _timed(lambda: packed(packed_tokens, batch.layout), device, repeats)
        if ref_dtype is not None:
            models.set_precision(model, device, ref_dtype)
            with models.strict_fp32_matmul():
                out["reference"] = _timed(lambda: model(padded, repr_layers=[model.num_layers]), device, repeats)
    return out


def raw_write(folder: Path, nbytes: int, block: int = 16 << 20) -> float:
    """Seconds to write ``nbytes`` sequentially in ``block`` chunks and fsync (then delete)."""
    buf = np.random.default_rng(0).integers(0, 255, size=block, dtype=np.uint8).tobytes()
    path = folder / "raw-write.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            n = min(left, block)
            f.write(buf[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds


def tracer_write(folder: Path, trace_path: Path) -> tuple[float, int]:
    """Wall-clock seconds for tracer's writer to store taps of ``trace_path``'s names, shapes and
    dtypes and commit them durably (``TraceWriter`` fsyncs before its rename), and the bytes.

    Timed from creating the file to ``commit()`` returning: the same clock as :func:`raw_write`
    (busy time of the writer thread would leave out writeback still running in the kernel).
    Each distinct (shape, dtype) gets one tensor of random values, reused (contents do not
    change the speed of an uncompressed write).
    """
    from tracer.store.tap_writer import AsyncTapWriter
    from tracer.store.trace_file import TraceWriter

    with h5py.File(trace_path) as f:
        taps = [(p, n, ds.shape, ds.attrs["dtype"]) for p in f["taps"] for n, ds in f["taps"][p].items()]
    tensors = {(shape, dt): torch.randn(shape).to(getattr(torch, dt)) for _, _, shape, dt in taps}
    path = folder / "bench-write.h5"
    t = time.perf_counter()
    with TraceWriter(path, force=True) as writer:
        async_writer = AsyncTapWriter(writer)
        for p, n, shape, dt in taps:
            async_writer.submit(p, n, tensors[(shape, dt)])
        async_writer.close()
        nbytes = writer.bytes_written
        writer.commit()
    seconds = time.perf_counter() - t
    path.unlink()
    return seconds, nbytes


def compression_study(trace_path: Path, folder: Path, max_bytes: int = 256 << 20) -> list[dict]:
    """Write a sample of the trace's own taps with each compression; size and throughput."""
    sample, total = [], 0
    with h5py.File(trace_path) as f:
        paths = list(f["taps"])
        for path in paths:  # an equal share of each path (bf16 and fp32 compress differently)
            share = 0
            for ds in f["taps"][path].values():
                if share >= max_bytes // len(paths):
                    break
                arr = ds[()]
                sample.append(arr)
                share += arr.nbytes
            total += share
    rows = []
    for label, kwargs in [
        ("none", {}),
        ("lzf", {"compression": "lzf"}),
        ("gzip-1", {"compression": "gzip", "compression_opts": 1}),
        ("gzip-4", {"compression": "gzip", "compression_opts": 4}),
    ]:
        path = folder / f"compression-{label}.h5"
        t = time.perf_counter()
        with h5py.File(path, "w") as f:
            for i, arr in enumerate(sample):
                chunks = {"chunks": (max(1, min(len(arr), (4 << 20) // max(1, arr[0].nbytes))),) + arr.shape[1:]} if kwargs else {}
                f.create_dataset(f"t{i}", data=arr, **kwargs, **chunks)
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - t
        size = path.stat().st_size
        path.unlink()
        rows.append({"compression": label, "size_ratio": size / total, "write_gb_s": total / seconds / GB, "sample_gb": total / GB})
    return rows


def comparator_probe(trace_path: Path) -> dict:
    """Run the comparator in a fresh process; its time and memory.

    Peak memory is VmHWM of that process (``ru_maxrss`` would include the forking parent's
    pages: Linux keeps it across exec).
    """
    code = (
        "import json, resource, sys, time;"
        "import tracer.compare as c;"
        "from tracer.store.trace_file import open_trace;"
        "base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize();"
        "t = time.perf_counter();"
        "tr = open_trace(sys.argv[1]); s = c.summarize(tr, recompute=True); tr.close();"
        "dt = time.perf_counter() - t;"
        "peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "print(json.dumps({'seconds': dt, 'baseline_rss': base, 'peak_rss': peak, 'verdict': s.verdict}))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(trace_path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def one_layer_bytes(trace_path: Path) -> int:
    with h5py.File(trace_path) as f:
        return sum(ds.nbytes for path in f["taps"] for name, ds in f["taps"][path].items() if name.startswith("layers.0."))


def run_bench(model_name, seq_len, device_name, dtype_name_, repeats, folder: Path, attn="auto", say=print, packed_specs=()) -> dict:
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name_)
    ref_dtype = reference_dtype("auto", dtype)
    backend = attention.resolve(attn, device, dtype)
    say(f"bench: loading {model_name} (random weights)")
    loaded = models.load_model(model_name, "random", 0)
    models.wait_for_cache_writes()  # a first build writes the weights cache (GBs) in the background: not while timing
    model, arch, _ = loaded
    seqs = debug_batch(seq_len)
    batch = encode(seqs, model.alphabet)
    say("bench: bare forwards")
    bare = bare_forwards(model, batch, device, dtype, ref_dtype, backend, "fp32", repeats)
    base = dict(model=model_name, weights="random", device=device_name, dtype=dtype_name_, attn=attn, force=True)
    say("bench: warm-up traced run (not timed)")
    trace(RunConfig(**base, metrics_only=True, out=str(folder / "bench-warmup.h5")), seqs, quiet=True, loaded=loaded).path.unlink()
    say("bench: traced run (full tensors)")
    full = trace(RunConfig(**base, out=str(folder / "bench-full.h5")), seqs, quiet=True, loaded=loaded)
    say("bench: traced run (--metrics-only)")
    mo = trace(RunConfig(**base, metrics_only=True, out=str(folder / "bench-metrics.h5")), seqs, quiet=True, loaded=loaded)
    calibration = {}
    if ref_dtype is not None:
        say("bench: noise calibration (the control, --packed-rope model, plug-ins)")
        calibration = calibrate(base, seqs, loaded, folder, packed_specs, say)
    nbytes = full.bytes_written
    say(f"bench: raw sequential write of {nbytes / GB:.2f} GB")
    raw = raw_write(folder, nbytes)
    say("bench: tracer's writer, wall clock to durable data")
    write_seconds, write_bytes = tracer_write(folder, full.path)
    say("bench: comparator (fresh process)")
    comp = comparator_probe(full.path)
    layer = one_layer_bytes(full.path)
    say("bench: compression study")
    comp_study = compression_study(full.path, folder)
    file_size = full.path.stat().st_size
    ws = full.write_stats
    bare_total = sum(bare.values())
    result = {
        "model": model_name,
        "layers": arch.num_layers,
        "tokens": batch.layout.n_tokens,
        "taps": len(full.summary.taps),
        "dtype": dtype_name_,
        "reference": dtype_name(ref_dtype) if ref_dtype is not None else None,
        "backend": backend.name,
        "device": environment(device)["device_name"],
        "bare_seconds": bare,
        "bare_total_seconds": bare_total,
        "traced_seconds": full.timings["total"],
        "traced_timings": full.timings,
        "bytes_written": nbytes,
        "trace_file_bytes": file_size,
        "raw_write_seconds": raw,
        "raw_write_gb_s": nbytes / raw / GB,
        "trace_write_seconds": write_seconds,
        "trace_write_gb_s": write_bytes / write_seconds / GB,
        "copy_seconds": ws.get("copy_seconds"),
        "metrics_only_seconds": mo.timings["total"],
        "comparator_seconds": comp["seconds"],
        "comparator_gb_s": file_size / comp["seconds"] / GB,
        "comparator_peak_rss": comp["peak_rss"],
        "comparator_baseline_rss": comp["baseline_rss"],
        "one_layer_bytes": layer,
        "compression": comp_study,
        "calibration": calibration,
        "verdict": full.summary.verdict,
        "first_divergence": full.summary.to_json()["first_divergence"],
        "attribution": (full.summary.to_json()["attribution"] or {}).get("sentence"),
    }
    result["ratios"] = {
        "traced_over_bare_plus_raw_write": result["traced_seconds"] / (bare_total + raw),
        "write_throughput_over_raw": result["trace_write_gb_s"] / result["raw_write_gb_s"],
        "comparator_rss_growth_over_one_layer": (comp["peak_rss"] - comp["baseline_rss"]) / layer,
        "comparator_peak_rss_over_one_layer": comp["peak_rss"] / layer,
        "metrics_only_over_bare": result["metrics_only_seconds"] / bare_total,
    }
    for p in (full.path, mo.path):
        p.unlink(missing_ok=True)
    return result


def format_table(r: dict) -> str:
    q = r["ratios"]
    lines = [
        f"tracer bench: {r['model']} ({r['layers']} layers), {r['dtype']} + {r['reference']} reference, attention {r['backend']}, "
        f"{r['device']}, {r['tokens']} tokens, {r['taps']} taps",
        f"{'measure':<44}{'value':>14}   ratio [target]",
    ]
    for path, s in r["bare_seconds"].items():
        lines.append(f"{'bare forward, ' + path:<44}{s:>12.3f} s")
    lines += [
        f"{'bare forwards, total':<44}{r['bare_total_seconds']:>12.3f} s",
        f"{'raw sequential write of the same bytes':<44}{r['raw_write_seconds']:>12.3f} s   ({r['raw_write_gb_s']:.2f} GB/s, {r['bytes_written'] / GB:.2f} GB)",
        f"{'traced run, full tensors':<44}{r['traced_seconds']:>12.3f} s   traced / (bare + raw write) = {q['traced_over_bare_plus_raw_write']:.2f} [<= 1.2]",
        f"{'tracer writer, same taps, wall to fsync':<44}{r['trace_write_seconds']:>12.3f} s   ({r['trace_write_gb_s']:.2f} GB/s) / raw write = {q['write_throughput_over_raw']:.2f} [>= 0.70]",
        f"{'traced run, --metrics-only':<44}{r['metrics_only_seconds']:>12.3f} s   / bare forwards = {q['metrics_only_over_bare']:.2f} [<= 1.5]",
        f"{'comparator (recompute all metrics)':<44}{r['comparator_seconds']:>12.3f} s   {r['comparator_gb_s']:.2f} GB of trace per s [>= 1]",
        f"{'comparator peak RSS':<44}{r['comparator_peak_rss'] / MB:>11.0f} MB   (after imports {r['comparator_baseline_rss'] / MB:.0f} MB; "
        f"one layer's data {r['one_layer_bytes'] / MB:.1f} MB)",
        f"{'':<44}{'':>14}   growth / one layer = {q['comparator_rss_growth_over_one_layer']:.2f} [<= 3]; "
        f"peak / one layer = {q['comparator_peak_rss_over_one_layer']:.2f}",
        "compression of a sample of this trace's tensors:",
    ]
    for c in r["compression"]:
        lines.append(f"  {c['compression']:<8} size {c['size_ratio']:.3f} x   write {c['write_gb_s']:.2f} GB/s   (sample {c['sample_gb']:.2f} GB)")
    if r.get("calibration"):
        lines += format_calibration(r["calibration"])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# production batch, pre-flight accuracy, load time, time to verdict


def production_batch(n: int, seed: int = 0, lo: int = 100, hi: int = 700):
    """``n`` seeded random protein sequences of ``lo``-``hi`` residues."""
    from tracer.inputs.sequences import make_batch

    rng = np.random.default_rng(seed)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    return make_batch([(f"p{i}", "".join(rng.choice(letters, int(rng.integers(lo, hi + 1))))) for i in range(n)])


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return [int(line.split()[1]) * 1024 for line in f if line.startswith(key)][0]


def _production_child(spec: str) -> None:
    """In a fresh process: trace the production batch once, print measurements as JSON."""
    a = json.loads(spec)
    device, dtype = resolve_device(a["device"]), resolve_dtype(a["dtype"])
    ref_dtype = reference_dtype("auto", dtype)
    rss0 = _status_bytes("VmRSS")
    loaded = models.load_model(a["model"], "random", 0)
    models.wait_for_cache_writes()  # never time against the background cache write
    model, arch, _ = loaded
    seqs = production_batch(a["n"])
    config = RunConfig(model=a["model"], weights="random", device=a["device"], dtype=a["dtype"], attn=a["attn"],
                       metrics_only=True, out=a["out"], force=True, max_batch_tokens=a["max_batch_tokens"])
    r = trace(config, seqs, quiet=True, loaded=loaded)
    peak_rss = _status_bytes("VmHWM")
    est = r.estimate
    out = {
        "sequences": len(seqs),
        "tokens": sum(s.n_tokens for s in seqs),
        "padded_tokens": est.plan.total_padded_tokens,
        "sub_batches": len(est.plan.groups),
        "timings": r.timings,
        "memory": r.memory,
        "estimate": {k: v for k, v in est.to_dict().items() if k != "plan"},
        "rss_before_load": rss0,
        "peak_rss": peak_rss,
        "verdict": r.summary.verdict,
        "weights_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }
    Path(a["out"]).unlink(missing_ok=True)
    backend = attention.resolve(a["attn"], device, dtype)
    batch = encode(seqs, model.alphabet)
    out["bare_seconds"] = bare_forwards(model, batch, device, dtype, ref_dtype, backend, "fp32", 1)
    print(json.dumps(out))


def production_probe(model_name, n, device_name, dtype_name_, attn, folder: Path, max_batch_tokens=None) -> dict:
    spec = json.dumps({"model": model_name, "n": n, "device": device_name, "dtype": dtype_name_, "attn": attn,
                       "out": str(folder / "bench-production.h5"), "max_batch_tokens": max_batch_tokens})
    code = "import sys; from tracer.bench import _production_child; _production_child(sys.argv[1])"
    env = {**os.environ, "TRACER_CACHE_DIR": str(folder / "cache")}  # the weights time_to_verdict cached
    r = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    m = json.loads(r.stdout.strip().splitlines()[-1])
    layer = m["memory"]["layer_tap_bytes"]
    est = m["estimate"]
    attn_ws = est["workspace_bytes"]
    bare = sum(m["bare_seconds"].values())
    after_load = m["timings"]["total"] - m["timings"].get("to_device", 0.0)
    if m["memory"]["device_peak_allocated"] is not None:  # CUDA: device memory above the weights
        above = m["memory"]["device_peak_allocated"] - m["memory"]["device_allocated_before_paths"]  # weights on the device
        measured_peak, estimated_peak = m["memory"]["device_peak_allocated"], est["device_peak"]
    else:  # CPU: host RSS growth over the process before loading, minus the weights in the run dtype
        above = m["peak_rss"] - m["rss_before_load"] - est["weights_bytes"]
        measured_peak, estimated_peak = m["peak_rss"] - m["rss_before_load"], est["host_peak"]
    m["ratios"] = {
        "held_taps_over_one_layer": m["memory"]["peak_held_tap_bytes"] / layer,
        "peak_above_weights_over_layer_plus_workspace": above / (layer + attn_ws),
        "estimate_over_measured_held": est["held_tap_bytes"] / max(1, m["memory"]["peak_held_tap_bytes"]),
        "estimate_over_measured_peak": estimated_peak / max(1, measured_peak),
        "metrics_only_over_bare": after_load / bare,
    }
    return m


def time_to_verdict(model_name, device_name, dtype_name_, folder: Path) -> dict:
    """Wall seconds of ``tracer.run --weights random --metrics-only`` in fresh processes, cache cold then warm."""
    env = {**os.environ, "TRACER_CACHE_DIR": str(folder / "cache")}
    cmd = [sys.executable, "-m", "tracer.run", "--model", model_name, "--weights", "random", "--metrics-only",
           "--device", device_name, "--dtype", dtype_name_, "--quiet", "--force", "--out", str(folder / "ttv.h5")]
    out = {}
    for label in ("first_run_seconds", "cached_run_seconds"):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        out[label] = time.perf_counter() - t
    (folder / "ttv.h5").unlink(missing_ok=True)
    return out


def load_vs_limit(checkpoint: Path, device_name: str, dtype_name_: str) -> dict:
    """Checkpoint load + move to the device vs reading the file + a pinned host-to-device copy."""
    device, dtype = resolve_device(device_name), resolve_dtype(dtype_name_)
    size = checkpoint.stat().st_size
    read = lambda: _read_file(checkpoint)  # noqa: E731
    read()  # warm the page cache for both measurements
    read_s = min(read() for _ in range(2))
    copy_s = 0.0
    if device.type == "cuda":
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        dev.copy_(host, non_blocking=True)
        _sync(device)
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        _sync(device)
        copy_s = time.perf_counter() - t
        del host, dev
    models.load_model(None, str(checkpoint))  # warm-up: torch.load's one-time imports (~2 s) are not load time
    t = time.perf_counter()
    model, _, _ = models.load_model(None, str(checkpoint))
    read_done = time.perf_counter() - t
    models.set_precision(model, device, dtype)
    _sync(device)
    load_s = time.perf_counter() - t
    return {"file_bytes": size, "read_seconds": read_s, "pinned_copy_seconds": copy_s, "load_seconds": load_s,
            "load_build_seconds": read_done, "load_over_limit": load_s / (read_s + copy_s)}


def _read_file(path: Path, block: int = 16 << 20) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(block)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def run_production(model_name, n, device_name, dtype_name_, attn, folder: Path, say=print) -> dict:
    say("bench: time to verdict (fresh processes: weights built, then cached)")
    ttv = time_to_verdict(model_name, device_name, dtype_name_, folder)
    say(f"bench: production batch of {n} sequences, --metrics-only (fresh process, cached weights)")
    prod = production_probe(model_name, n, device_name, dtype_name_, attn, folder)
    arch = models.architecture(model_name)
    ckpt = next((folder / "cache" / "random-weights").glob(f"esm2-{arch.num_layers}L-{arch.embed_dim}E-*seed0-*.pt"), None)
    say("bench: checkpoint load vs disk read + pinned copy")
    load = load_vs_limit(ckpt, device_name, dtype_name_) if ckpt else {"error": "no cached checkpoint"}
    return {"production": prod, "time_to_verdict": ttv, "load": load}


def format_production(p: dict) -> str:
    prod, ttv, load = p["production"], p["time_to_verdict"], p["load"]
    lines = ["production batch", f"{'measure':<44}{'value':>14}   ratio [target]"]
    if "error" in prod:
        lines.append(f"{'production batch':<44}   failed: {prod['error']}")
    else:
        q, mem, est = prod["ratios"], prod["memory"], prod["estimate"]
        lines += [
            f"{'batch':<44}{prod['tokens']:>9} tok   {prod['sequences']} sequences, {prod['padded_tokens']} padded tokens, "
            f"{prod['sub_batches']} sub-batch(es), verdict {prod['verdict']}",
            f"{'taps held at once (--metrics-only)':<44}{mem['peak_held_tap_bytes'] / MB:>11.1f} MB   / one layer of all paths "
            f"({mem['layer_tap_bytes'] / MB:.1f} MB) = {q['held_taps_over_one_layer']:.2f} [<= 4]",
            f"{'peak memory above weights':<44}{'':>14}   / (one layer + attention workspace) = "
            f"{q['peak_above_weights_over_layer_plus_workspace']:.2f} [<= 4]",
            f"{'pre-flight estimate, held taps':<44}{est['held_tap_bytes'] / MB:>11.1f} MB   estimate / measured = "
            f"{q['estimate_over_measured_held']:.2f} [0.8-1.2]",
            f"{'pre-flight estimate, peak memory':<44}{max(est['device_peak'], est['host_peak']) / MB:>11.0f} MB   estimate / measured = "
            f"{q['estimate_over_measured_peak']:.2f} [0.8-1.2]",
            f"{'--metrics-only after load':<44}{prod['timings']['total'] - prod['timings'].get('to_device', 0):>12.3f} s   "
            f"/ bare forwards ({sum(prod['bare_seconds'].values()):.3f} s) = {q['metrics_only_over_bare']:.2f} [<= 1.5]",
        ]
    lines += [
        f"{'time to verdict, weights built (1st run)':<44}{ttv['first_run_seconds']:>12.3f} s",
        f"{'time to verdict, weights cached (repeat)':<44}{ttv['cached_run_seconds']:>12.3f} s",
    ]
    if "error" not in load:
        lines.append(
            f"{'checkpoint load + to device':<44}{load['load_seconds']:>12.3f} s   / (read {load['read_seconds']:.3f} s + pinned copy "
            f"{load['pinned_copy_seconds']:.3f} s of {load['file_bytes'] / GB:.2f} GB) = {load['load_over_limit']:.2f} [<= 1.5]"
        )
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(prog="python -m tracer.bench", description="Benchmark tracing speed and memory; prints ratios against bare forwards and raw disk writes.")
    p.add_argument("--model", default="esm2_t6_8M_UR50D", help="ESM-2 architecture (random weights; default esm2_t6_8M_UR50D, use esm2_t36_3B_UR50D for the targets)")
    p.add_argument("--seq-len", type=int, default=400, help="length of the 'large' sequence (default 400)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="auto", choices=attention.BACKENDS)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each bare forward (default 3)")
    p.add_argument("--dir", default=None, help="where to make this run's temporary folder of traces and scratch files, removed at the end (default traces/)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    p.add_argument("--production", type=int, default=0, metavar="N",
                   help="also measure a production batch of N sequences of 100-700 residues, time to verdict and load time")
    p.add_argument("--skip-debug", action="store_true", help="skip the debug-batch measurements (a-d)")
    p.add_argument("--json-out", default=None, metavar="FILE", help="also write the measurements as JSON to FILE")
    p.add_argument("--calibrate-only", action="store_true", help="measure only the noise calibration (margins of K), no timings")
    p.add_argument("--calibrate-packed", action="append", default=[], metavar="SPEC",
                   help="also calibrate on this packed plug-in (repeatable), e.g. a shared-cause forward: its worst token in units of K")
    return p


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise TracerError(f"--repeats must be at least 1, got {args.repeats}")
    if args.seq_len < 1:
        raise TracerError(f"--seq-len must be a positive number of residues, got {args.seq_len}")
    parent = Path(args.dir or "traces")
    try:  # a folder of this run's own inside --dir: only what this run created is removed
        parent.mkdir(parents=True, exist_ok=True)
        ctx = tempfile.TemporaryDirectory(dir=parent, prefix="bench-")
    except OSError as e:
        raise TracerError(f"cannot write in {parent}: {e.strerror or e}") from None
    folder = Path(ctx.name)
    say = lambda m: print(f"tracer: {m}", file=sys.stderr, flush=True)  # noqa: E731
    result: dict = {}
    try:
        if args.calibrate_only:
            result = run_calibration(args.model, args.seq_len, args.device, args.dtype, args.attn, folder, args.calibrate_packed, say)
        elif not args.skip_debug:
            result = run_bench(args.model, args.seq_len, args.device, args.dtype, args.repeats, folder, args.attn, say=say,
                               packed_specs=args.calibrate_packed)
        if args.production:
            result["production"] = run_production(args.model, args.production, args.device, args.dtype, args.attn, folder, say=say)
    finally:
        ctx.cleanup()
    result["peak_rss_bench_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if args.calibrate_only:
            tables = [f"tracer bench: {result['model']}, {result['dtype']} on {result['device']}, attention {result['backend']}; "
                      f"calibration took {result['seconds']:.0f} s", *format_calibration(result["calibration"])]
        else:
            tables = [] if args.skip_debug else [format_table(result)]
        tables += [format_production(result["production"])] if args.production else []
        print("\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
