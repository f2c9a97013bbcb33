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

It prints the ratios the README's targets are stated in. Not a test: timings on shared machines
vary, so nothing here asserts.
"""

from __future__ import annotations

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

from tracer import attention, models
from tracer.cli import Parser, main_guard
from tracer.env import dtype_name, environment, resolve_device, resolve_dtype
from tracer.packed import PackedESM2
from tracer.paths import encode
from tracer.sequences import debug_batch
from tracer.tracing import RunConfig, reference_dtype, trace

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
    from tracer.capture import AsyncTapWriter
    from tracer.store import TraceWriter

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
        "from tracer.store import open_trace;"
        "base = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize();"
        "t = time.perf_counter();"
        "tr = open_trace(sys.argv[1]); s = c.summarize(tr, recompute=True); tr.close();"
        "dt = time.perf_counter() - t;"
        "peak = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0];"
        "print(json.dumps({'seconds': dt, 'baseline_rss': base, 'peak_rss': peak, 'verdict': s.verdict}))"
    )
    r = subprocess.run([sys.executable, "-c", code, str(trace_path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ratios(trace_path: Path) -> dict:
    from tracer.compare import stored_table
    from tracer.store import open_trace
    from tracer.verdict import noise_ratios

    with open_trace(trace_path) as t:
        return noise_ratios(stored_table(t))


def one_layer_bytes(trace_path: Path) -> int:
    with h5py.File(trace_path) as f:
        return sum(ds.nbytes for path in f["taps"] for name, ds in f["taps"][path].items() if name.startswith("layers.0."))


def run_bench(model_name, seq_len, device_name, dtype_name_, repeats, folder: Path, attn="auto", say=print) -> dict:
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name_)
    ref_dtype = reference_dtype("auto", dtype)
    backend = attention.resolve(attn, device, dtype)
    say(f"bench: loading {model_name} (random weights)")
    loaded = models.load_model(model_name, "random", 0)
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
        say("bench: noise calibration (packed RoPE fp32 and model)")
        calibration["packed_rope_fp32"] = _ratios(full.path)
        cal = trace(RunConfig(**base, metrics_only=True, packed_rope="model", out=str(folder / "bench-cal.h5")), seqs, quiet=True, loaded=loaded)
        calibration["packed_rope_model"] = {**_ratios(cal.path), "verdict": cal.summary.verdict}
        cal.path.unlink(missing_ok=True)
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
    for label, ratios in r.get("calibration", {}).items():
        parts = [f"{pair} {v['max_ratio']}" for pair, v in ratios.items() if isinstance(v, dict)]
        lines.append(f"noise calibration ({label}): worst token / noise level: " + ", ".join(parts))
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(prog="python -m tracer.bench", description="Benchmark tracing speed and memory; prints ratios against bare forwards and raw disk writes.")
    p.add_argument("--model", default="esm2_t6_8M_UR50D", help="ESM-2 architecture (random weights; default esm2_t6_8M_UR50D, use esm2_t36_3B_UR50D for the targets)")
    p.add_argument("--seq-len", type=int, default=400, help="length of the 'large' sequence (default 400)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="auto", choices=attention.BACKENDS)
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each bare forward (default 3)")
    p.add_argument("--dir", default=None, help="folder for the temporary traces (default: a temporary folder under traces/)")
    p.add_argument("--json", action="store_true", help="print the measurements as JSON")
    return p


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dir:
        folder = Path(args.dir)
        folder.mkdir(parents=True, exist_ok=True)
        ctx = None
    else:
        Path("traces").mkdir(exist_ok=True)
        ctx = tempfile.TemporaryDirectory(dir="traces", prefix="bench-")
        folder = Path(ctx.name)
    try:
        result = run_bench(args.model, args.seq_len, args.device, args.dtype, args.repeats, folder, args.attn,
                           say=lambda m: print(f"tracer: {m}", file=sys.stderr, flush=True))
    finally:
        if ctx is not None:
            ctx.cleanup()
    result["peak_rss_bench_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
