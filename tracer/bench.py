"""Speed and memory benchmark, printed as ratios against their targets: ``python -m tracer.bench``.

Examples::

    python -m tracer.bench --model esm2_t6_8M_UR50D --device cpu --json bench.json
    python -m tracer.bench --model esm2_t36_3B_UR50D --production 64 --json bench-3b.json
    python -m tracer.bench --markdown bench-3b.json      # the docs' speed table, from the JSON

On one model and the debug batch (:mod:`tracer.benchmarks.debug_batch`): the bare forward of
every path a traced run runs, against the traced run with full tensors and with
``--metrics-only``, every side timed the same way (a fresh thread per call, repeats interleaved
across sides, medians); tracer's writer against a raw sequential write of the same bytes; the
comparator in a fresh process; a compression study; the noise calibration (the margins of K,
:mod:`tracer.campaigns.calibration`; ``--calibrate-only`` measures just that). With
``--production N`` (:mod:`tracer.benchmarks.production`): a production batch of N sequences,
time to verdict of ``tracer.run`` (weights built and cached), building the random weights, and
the checkpoint load against a file read plus a pinned copy.

Every ratio is marked ``ok`` or ``MISSED`` against its target (:mod:`tracer.benchmarks.report`).
Not a test: timings on shared machines vary, so nothing here asserts.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports("no results were written")

import json
import os
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tracer.cli import Parser, bounded_int, main_guard
from tracer.runner.progress import Progress
from tracer.inputs.sequences import MAX_RESIDUES
from tracer.store import files
from tracer.errors import TracerError

DTYPES = ["bfloat16", "float16", "float32"]


def run_bench(model, seq_len, device, dtype, repeats, folder, attn, say, packed_specs=()):  # lazy: --markdown needs no torch
    from tracer.benchmarks.debug_batch import run_bench as run

    return run(model, seq_len, device, dtype, repeats, folder, attn, say=say, packed_specs=packed_specs)


def run_production(model, n, device, dtype, attn, folder, repeats, say, built=None):
    from tracer.benchmarks.production import run_production as run

    return run(model, n, device, dtype, attn, folder, repeats, say=say, built=built)


def raw_write(folder: Path, nbytes: int) -> float:
    from tracer.benchmarks.disk import raw_write as write

    return write(folder, nbytes)


MAX_REPEATS = 1000
"""Timed repetitions: more measure nothing new."""

MAX_PRODUCTION = 100_000
"""Sequences of the production batch (--production); 0 = not measured."""


def build_parser() -> Parser:
    from tracer.esm.attention import BACKENDS

    p = Parser(prog="python -m tracer.bench", description="Benchmark tracing speed and memory; prints ratios against bare forwards and raw disk writes, each marked ok or MISSED against its target.")
    p.add_argument("--model", default="esm2_t6_8M_UR50D", help="ESM-2 architecture (random weights; default esm2_t6_8M_UR50D, use esm2_t36_3B_UR50D for the targets)")
    p.add_argument("--seq-len", type=bounded_int("--seq-len", 1, MAX_RESIDUES), default=400, help="length of the 'large' sequence (default 400)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--attn", default="auto", choices=BACKENDS)
    p.add_argument("--repeats", type=bounded_int("--repeats", 1, MAX_REPEATS), default=3, help="timed repeats of every side, interleaved (default 3; medians)")
    p.add_argument("--dir", default=None, help="where to make this run's temporary folder of traces and scratch files, removed at the end (default traces/)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the measurements as JSON to FILE (or stdout when FILE is left out or '-')")
    p.add_argument("--markdown", default=None, metavar="FILE",
                   help="print the speed table as Markdown from a JSON file this benchmark wrote, and measure nothing")
    p.add_argument("--production", type=bounded_int("--production", 0, MAX_PRODUCTION), default=0, metavar="N",
                   help="also measure a production batch of N sequences of 100-700 residues, time to verdict and load time")
    p.add_argument("--time-to-verdict", action="store_true", help="measure time to verdict and load time (as --production) without a production batch")
    p.add_argument("--production-repeats", type=bounded_int("--production-repeats", 1, MAX_REPEATS), default=1, help="timed repeats of the production batch and its bare forwards (default 1, after a warm-up)")
    p.add_argument("--skip-debug", action="store_true", help="skip the debug-batch measurements")
    p.add_argument("--calibrate-only", action="store_true", help="measure only the noise calibration (margins of K), no timings")
    p.add_argument("--calibrate-packed", action="append", default=[], metavar="SPEC",
                   help="also calibrate on this packed plug-in (repeatable), e.g. a shared-cause forward: its worst token in units of K")
    return p


def _markdown(path: str) -> int:
    from tracer.benchmarks.report import format_markdown

    try:
        r = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TracerError(f"cannot read benchmark JSON {path!r}: {e}") from None
    print(format_markdown(r))
    return 0


def _machine(device: str) -> dict:
    from tracer.env import environment, resolve_device

    env = environment(resolve_device(device))
    return {"device": env["device_name"], "host": platform.node(), "cpus": os.cpu_count(), "torch": env.get("torch"),
            "load_average": round(os.getloadavg()[0], 1)}


def _folder(dir_: str | None) -> tempfile.TemporaryDirectory:
    parent = Path(dir_ or "traces")
    try:  # a folder of this run's own inside --dir: only what this run created is removed
        parent.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(dir=parent, prefix="bench-")
    except OSError as e:
        raise TracerError(f"cannot write in {parent}: {e.strerror or e}") from None


@main_guard(unwritten="no results were written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.json and args.json != "-":  # before minutes of measuring
        files.check_target(Path(args.json), True, what="--json")
    if args.markdown:
        return _markdown(args.markdown)
    for flag, value in (("--repeats", args.repeats), ("--production-repeats", args.production_repeats)):
        if value < 1:
            raise TracerError(f"{flag} must be at least 1, got {value}")
    if args.seq_len < 1:
        raise TracerError(f"--seq-len must be a positive number of residues, got {args.seq_len}")
    ctx = _folder(args.dir)
    folder = Path(ctx.name)
    say = Progress()
    result: dict = {"command": "python -m tracer.bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d"), "machine": _machine(args.device)}
    t0 = time.perf_counter()
    try:
        if args.calibrate_only:
            from tracer.campaigns.calibration import run_calibration

            result["calibration"] = run_calibration(args.model, args.seq_len, args.device, args.dtype, args.attn, folder,
                                                    args.calibrate_packed, say)
        elif not args.skip_debug:
            result["debug"] = run_bench(args.model, args.seq_len, args.device, args.dtype, args.repeats, folder, args.attn, say,
                                        args.calibrate_packed)
        if args.production or args.time_to_verdict:
            load = result.get("debug", {}).get("load", {})
            result["production"] = run_production(args.model, args.production, args.device, args.dtype, args.attn, folder,
                                                  args.production_repeats, say, built=load if load.get("built") else None)
    finally:
        ctx.cleanup()
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_bench_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.json and args.json != "-":  # atomically; never onto a folder or a device
        files.write_atomic(Path(args.json), json.dumps(result, indent=2), what="--json")
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.calibrate_only:
        from tracer.campaigns.calibration import format_calibration

        c = result["calibration"]
        print(f"tracer bench: {c['model']}, {c['dtype']} on {c['device']}, attention {c['backend']}; calibration took {c['seconds']:.0f} s")
        print("\n".join(format_calibration(c["calibration"])))
    else:
        from tracer.benchmarks.report import format_text

        print(format_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
