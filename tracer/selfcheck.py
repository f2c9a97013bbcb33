"""Validate the tracer on your model and machine: ``python -m tracer.selfcheck``.

Plants each known bug (:mod:`tracer.faults`) in turn, on the model, device, dtype and attention
backend you choose, and checks that the comparator names the exact first layer, tap, sequence
and token, and for single-token perturbations that attribution names the faulty path. The
model is loaded once; each case is a ``--metrics-only`` run (nothing large is written). The
packed path uses fair-esm's own RoPE in 16-bit runs (``--packed-rope model``) so that the only
difference between the paths is the planted bug plus kernel rounding. With a reference (the
default in 16-bit runs), each case also checks which path is beyond the noise bar at the
divergence point.

Exit status 0 when every case matches, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tracer import models
from tracer.cli import Parser, main_guard
from tracer.errors import TracerError
from tracer.faults import Faults, Perturbation
from tracer.sequences import debug_batch
from tracer.tracing import RunConfig, trace

TINY, SMALL, MEDIUM, LARGE = range(4)


@dataclass(frozen=True)
class Case:
    """A planted bug and where it must be found: ``(layer, tap, sequence, token)`` and the path to blame."""

    label: str
    faults: Faults
    expected: tuple
    blame: str | None = None


def cases(num_layers: int, low_precision: bool) -> list[Case]:
    """The cases for a model; ``low_precision`` drops 'positions rounded to bf16', which in a
    16-bit run with fair-esm's RoPE is exactly what fair-esm itself does (not a difference)."""
    mid, last = num_layers // 2, num_layers - 1
    rounded = [] if low_precision else [
        Case("positions rounded to bf16", Faults(positions_low_precision=True), (0, "q_rope", "large", 257), "packed")
    ]
    return [
        Case("positions not restarted", Faults(positions_not_restarted=True), (0, "q_rope", "small", 0), "packed"),
        *rounded,
        Case(f"softmax scale twice, layer {mid}", Faults(double_scale=True, layers=(mid,)), (mid, "ctx", "tiny", 0), "packed"),
        Case("attention across sequences", Faults(leak_across_sequences=True), (0, "ctx", "tiny", 0), "packed"),
        Case("token-dropout rescale skipped", Faults(skip_token_dropout_rescale=True), (None, "embed", "tiny", 0), "packed"),
        Case(f"packed perturbation, layer {last}", Faults(perturbations=(Perturbation("packed", f"layers.{last}.ffn_out", LARGE, 20, eps=1.0),)),
             (last, "ffn_out", "large", 20), "packed"),
        Case(f"unpacked perturbation, layer {mid}", Faults(perturbations=(Perturbation("unpacked", f"layers.{mid}.attn_out", MEDIUM, 15, eps=1.0),)),
             (mid, "attn_out", "medium", 15), "unpacked"),
    ]


def run_checks(model, weights, seed, device, dtype, attn, seq_len, say=print) -> list[dict]:
    loaded = models.load_model(model, weights, seed, progress=say)
    arch = loaded[1]
    seqs = debug_batch(seq_len)
    if seq_len < 260:
        raise TracerError("--seq-len must be at least 260 (one case needs tokens past position 256)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        low = dtype in ("bfloat16", "float16")
        base = dict(model=arch.name if arch.name != "custom" else None, weights=weights, seed=seed, device=device, dtype=dtype,
                    attn=attn, packed_rope="model" if low else "fp32", metrics_only=True, force=True)
        clean = trace(RunConfig(**base, out=str(Path(tmp) / "clean.h5")), seqs, quiet=True, loaded=loaded)
        rows.append({"case": "no fault", "expected": None, "found": _found(clean.summary), "ok": clean.summary.first_divergence is None})
        say(f"selfcheck: no fault -> {'no divergence' if rows[-1]['ok'] else 'DIVERGENCE'}")
        for case in cases(arch.num_layers, low):
            t = time.perf_counter()
            r = trace(RunConfig(**base, faults=case.faults, out=str(Path(tmp) / "case.h5")), seqs, quiet=True, loaded=loaded)
            found = _found(r.summary)
            att = r.summary.attribution
            blamed = att.at_divergence["off"] if att is not None and att.at_divergence else None
            ok = found == case.expected and (blamed is None or blamed == case.blame)
            rows.append({"case": case.label, "expected": case.expected, "found": found, "blamed": blamed, "ok": ok,
                         "seconds": round(time.perf_counter() - t, 2)})
            say(f"selfcheck: {case.label}: expected {case.expected}, found {found}, off at the divergence: {blamed} -> {'ok' if ok else 'FAIL'}")
    return rows


def _found(summary):
    fd = summary.first_divergence
    return None if fd is None else (fd.layer, fd.tap, fd.sequence, fd.token)


def build_parser() -> Parser:
    p = Parser(prog="python -m tracer.selfcheck", description="Plant each known bug and check the tracer names its exact layer, tap and token.")
    p.add_argument("--model", default=None, help=f"ESM-2 name (default {models.DEFAULT_MODEL})")
    p.add_argument("--weights", default="auto", help="auto, random or a checkpoint path (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", default="auto")
    p.add_argument("--seq-len", type=int, default=400)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rows = run_checks(args.model, args.weights, args.seed, args.device, args.dtype, args.attn, args.seq_len,
                      say=lambda m: print(f"tracer: {m}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            blame = f"  off: {r['blamed']}" if r.get("blamed") else ""
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']:<36} expected {r['expected']}  found {r['found']}{blame}")
        print(f"{sum(r['ok'] for r in rows)}/{len(rows)} cases found exactly")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
