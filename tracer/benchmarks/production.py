"""Production batches, time to verdict and checkpoint load time (``python -m tracer.bench --production N``).

Each in a fresh process where it matters:

* a production batch (N seeded sequences of 100-700 residues) traced with ``--metrics-only``,
  interleaved with its bare forwards, every side in a fresh thread: held taps and peak memory
  against one layer, the pre-flight estimate against what was measured, time against the bare
  forwards;
* time to verdict of ``python -m tracer.run --weights random --metrics-only`` on the debug batch
  with the weights built (first run, which writes the cache) and cached, the interpreter with
  tracer's imports alone, and building the random weights in this process;
* loading the cached checkpoint onto the device against reading its file plus a pinned copy of
  the same bytes (page cache warm for both).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tracer.benchmarks import disk
from tracer.benchmarks.debug_batch import bare_sides, traced_side
from tracer.benchmarks.report import GB, MB, check
from tracer.benchmarks.timing import bare_medians, interleaved, median, sync
from tracer.capture.paths import encode
from tracer.env import resolve_device, resolve_dtype
from tracer.esm import attention, models
from tracer.runner.config import RunConfig
from tracer.runner.execute import trace
from tracer.runner.plan import reference_dtype


def production_batch(n: int, seed: int = 0, lo: int = 100, hi: int = 700):
    """``n`` seeded random protein sequences of ``lo``-``hi`` residues."""
    from tracer.inputs.sequences import make_batch

    rng = np.random.default_rng(seed)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    return make_batch([(f"p{i}", "".join(rng.choice(letters, int(rng.integers(lo, hi + 1))))) for i in range(n)])


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return [int(line.split()[1]) * 1024 for line in f if line.startswith(key)][0]


def production_child(spec: str) -> None:
    """In a fresh process: trace the production batch (first run: memory), then time it against
    its bare forwards, interleaved; print the measurements as JSON."""
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
    r = trace(config, seqs, quiet=True, loaded=loaded)  # the memory figures come from this first run
    peak_rss = _status_bytes("VmHWM")
    est = r.estimate
    out = {
        "sequences": len(seqs), "tokens": sum(s.n_tokens for s in seqs), "padded_tokens": est.plan.total_padded_tokens,
        "sub_batches": len(est.plan.groups), "timings": r.timings, "memory": r.memory,
        "estimate": {k: v for k, v in est.to_dict().items() if k != "plan"}, "rss_before_load": rss0, "peak_rss": peak_rss,
        "verdict": r.summary.verdict, "weights_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
    }
    Path(a["out"]).unlink(missing_ok=True)
    paths = [p for p in ("unpacked", "packed", "control", "reference") if p in r.timings]
    backend = attention.resolve(a["attn"], device, dtype)
    sides, before = bare_sides(model, encode(seqs, model.alphabet), device, dtype, ref_dtype, backend, paths)
    sides["metrics-only"] = traced_side(config, seqs, loaded)
    times, _ = interleaved(sides, a["repeats"], device, warmup=False, before=before)  # the first run above warmed up
    Path(a["out"]).unlink(missing_ok=True)
    out["times"] = times
    out["bare_seconds"], out["bare_total_seconds"] = bare_medians(times, a["repeats"])
    out["metrics_only_seconds"] = median(times["metrics-only"])
    print(json.dumps(out))


def production_probe(model_name, n, device_name, dtype_name_, attn, folder: Path, repeats: int = 1, max_batch_tokens=None) -> dict:
    spec = json.dumps({"model": model_name, "n": n, "device": device_name, "dtype": dtype_name_, "attn": attn, "repeats": repeats,
                       "out": str(folder / "bench-production.h5"), "max_batch_tokens": max_batch_tokens})
    code = "import sys; from tracer.benchmarks.production import production_child; production_child(sys.argv[1])"
    env = {**os.environ, "TRACER_CACHE_DIR": str(folder / "cache")}  # the weights time_to_verdict cached
    r = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _wall(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def time_to_verdict(model_name, device_name, dtype_name_, folder: Path) -> dict:
    """Wall seconds of ``tracer.run --weights random --metrics-only`` in fresh processes (weights
    built, then cached), of an interpreter that only imports ``tracer.run``, and of an empty one."""
    env = {**os.environ, "TRACER_CACHE_DIR": str(folder / "cache")}
    cmd = [sys.executable, "-m", "tracer.run", "--model", model_name, "--weights", "random", "--metrics-only",
           "--device", device_name, "--dtype", dtype_name_, "--quiet", "--force", "--out", str(folder / "ttv.h5")]
    out = {"first_run_seconds": _wall(cmd, env), "cached_run_seconds": _wall(cmd, env)}
    out["python_seconds"] = _wall([sys.executable, "-c", "pass"], env)
    out["import_seconds"] = _wall([sys.executable, "-c", "import tracer.run"], env) - out["python_seconds"]
    (folder / "ttv.h5").unlink(missing_ok=True)
    return out


def build_seconds(model_name: str) -> dict:
    """Seconds to build the seeded random weights in this process, and their rate."""
    arch = models.architecture(model_name)
    t = time.perf_counter()
    model = models.build_random(arch, 0)
    seconds = time.perf_counter() - t
    n = sum(p.numel() for p in model.parameters())
    return {"build_seconds": seconds, "parameters": n, "parameters_per_second": n / seconds}


def load_vs_limit(checkpoint: Path, device_name: str, dtype_name_: str) -> dict:
    """Checkpoint load + move to the device vs reading the file + a pinned host-to-device copy."""
    device, dtype = resolve_device(device_name), resolve_dtype(dtype_name_)
    size = checkpoint.stat().st_size
    disk.read_file(checkpoint)  # warm the page cache for both measurements
    read_s = min(disk.read_file(checkpoint) for _ in range(2))
    copy_s = 0.0
    if device.type == "cuda":
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(size, dtype=torch.uint8, device=device)
        dev.copy_(host, non_blocking=True)
        sync(device)
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        sync(device)
        copy_s = time.perf_counter() - t
        del host, dev
    models.load_model(None, str(checkpoint))  # warm-up: torch.load's one-time imports are not load time
    t = time.perf_counter()
    model, _, _ = models.load_model(None, str(checkpoint))
    read_done = time.perf_counter() - t
    models.set_precision(model, device, dtype)
    sync(device)
    load_s = time.perf_counter() - t
    return {"file_bytes": size, "read_seconds": read_s, "pinned_copy_seconds": copy_s, "load_seconds": load_s,
            "load_build_seconds": read_done, "load_over_limit": load_s / (read_s + copy_s)}


def run_production(model_name, n, device_name, dtype_name_, attn, folder: Path, repeats: int = 1, say=print, built: dict | None = None) -> dict:
    """``built``: the debug batch's own build of the weights (``{"seconds", "parameters"}``), if it built them."""
    say("bench: time to verdict (fresh processes: weights built, then cached)")
    ttv = time_to_verdict(model_name, device_name, dtype_name_, folder)
    if built is not None:
        build = {"build_seconds": built["seconds"], "parameters": built["parameters"], "parameters_per_second": built["parameters"] / built["seconds"]}
    else:
        say("bench: building the random weights in this process (the first run's extra work)")
        build = build_seconds(model_name)
    prod = None
    if n:
        say(f"bench: production batch of {n} sequences, --metrics-only (fresh process, cached weights)")
        prod = production_probe(model_name, n, device_name, dtype_name_, attn, folder, repeats)
    arch = models.architecture(model_name)
    ckpt = folder / "cache" / "random-weights" / f"esm2-{models.random_cache_key(arch, 0)}.pt"  # what time_to_verdict cached
    say("bench: checkpoint load vs disk read + pinned copy")
    load = load_vs_limit(ckpt, device_name, dtype_name_) if ckpt.exists() else {"error": "no cached checkpoint"}
    p = {"batch": prod, "time_to_verdict": ttv, "build": build, "load": load, "device_type": resolve_device(device_name).type}
    p["checks"] = production_checks(p)
    return p


def production_checks(p: dict) -> list[dict]:
    """Production-batch, time-to-verdict and load measures against their targets."""
    prod, ttv, load, build, dev = p["batch"], p["time_to_verdict"], p["load"], p["build"], p["device_type"]
    checks = []
    if prod is not None and "error" not in prod:
        mem, est = prod["memory"], prod["estimate"]
        layer, bare = mem["layer_tap_bytes"], prod["bare_total_seconds"]
        if mem["device_peak_allocated"] is not None:  # CUDA: device memory above the weights
            above = mem["device_peak_allocated"] - mem["device_allocated_before_paths"]
            measured_peak, estimated_peak = mem["device_peak_allocated"], est["device_peak"]
        else:  # CPU: host RSS growth over the process before loading, minus the weights in the run dtype
            above = prod["peak_rss"] - prod["rss_before_load"] - est["weights_bytes"]
            measured_peak, estimated_peak = prod["peak_rss"] - prod["rss_before_load"], est["host_peak"]
        checks += [
            check("production_metrics_only_over_bare", f"--metrics-only / bare forwards ({' + '.join(prod['bare_seconds'])}), "
                  f"{prod['sequences']} sequences, {prod['tokens']} tokens", prod["metrics_only_seconds"] / bare,
                  f"{prod['metrics_only_seconds']:.3f} s / {bare:.3f} s", dev),
            check("held_taps_over_one_layer", "taps held at once / one layer of all paths", mem["peak_held_tap_bytes"] / layer,
                  f"{mem['peak_held_tap_bytes'] / MB:.1f} / {layer / MB:.1f} MB", dev),
            check("peak_above_weights_over_layer_plus_workspace", "peak memory above weights / (one layer + workspace)",
                  above / (layer + est["workspace_bytes"]), f"{above / MB:.0f} / {(layer + est['workspace_bytes']) / MB:.0f} MB", dev),
            check("estimate_over_measured_held", "pre-flight estimate / measured, held taps", est["held_tap_bytes"] / max(1, mem["peak_held_tap_bytes"]),
                  f"{est['held_tap_bytes'] / MB:.1f} / {mem['peak_held_tap_bytes'] / MB:.1f} MB", dev),
            check("estimate_over_measured_peak", "pre-flight estimate / measured, peak memory", estimated_peak / max(1, measured_peak),
                  f"{estimated_peak / MB:.0f} / {measured_peak / MB:.0f} MB", dev),
        ]
    checks += [
        check("cached_time_to_verdict_seconds", "time to verdict, cached weights (s)", ttv["cached_run_seconds"],
              f"{ttv['cached_run_seconds']:.2f} s, of which imports {ttv['import_seconds']:.2f} s, interpreter {ttv['python_seconds']:.2f} s", dev),
        check("first_run_over_cached_plus_build", "time to verdict, weights built / (cached + build)",
              ttv["first_run_seconds"] / (ttv["cached_run_seconds"] + build["build_seconds"]),
              f"{ttv['first_run_seconds']:.2f} s / ({ttv['cached_run_seconds']:.2f} + {build['build_seconds']:.2f} s; "
              f"{build['parameters_per_second'] / 1e6:.0f} M parameters/s)", dev),
    ]
    if "error" not in load:
        checks.append(check("load_over_limit", "checkpoint load + to device / (file read + pinned copy)", load["load_over_limit"],
                            f"{load['load_seconds']:.3f} s / ({load['read_seconds']:.3f} + {load['pinned_copy_seconds']:.3f} s) "
                            f"of {load['file_bytes'] / GB:.2f} GB", dev))
    return [c.to_json() for c in checks]
