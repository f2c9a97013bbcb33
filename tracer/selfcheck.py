"""Validate the tracer on your model and machine: ``python -m tracer.selfcheck``.

Plants each known bug (:mod:`tracer.inputs.faults`) in turn, on the model, device, dtype and attention
backend you choose, under every pack order (``--pack-order`` picks some), and checks that the comparator names the exact first layer, tap, sequence
and token, and for single-token perturbations that attribution names the faulty path. The
model is loaded once; each case is a ``--metrics-only`` run (nothing large is written). The
packed path uses fair-esm's own RoPE in 16-bit runs (``--packed-rope model``) so that the only
difference between the paths is the planted bug plus kernel rounding. With a reference (the
default in 16-bit runs), each case also checks which path is beyond the noise bar at the
divergence point. Single-token perturbations are sized from the fault-free run's bar at their
tap: 3 x the bar must be found at the planted token, 0.3 x the bar must not be reported (the
table states each size).

Exit status 0 when every case matches, 1 otherwise.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports("nothing was written")

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tracer.esm import models
from tracer.cli import Parser, main_guard
from tracer.runner.progress import Progress
from tracer.errors import TracerError
from tracer.inputs.faults import Faults, Perturbation
from tracer.inputs.packing import PACK_ORDERS, pack_order
from tracer.inputs.sequences import debug_batch
from tracer.runner.config import RunConfig
from tracer.runner.execute import trace

TINY, SMALL, MEDIUM, LARGE = range(4)


@dataclass(frozen=True)
class Case:
    """A planted bug and where it must be found: ``(layer, tap, sequence, token)`` and the path to blame."""

    label: str
    faults: Faults
    expected: tuple
    blame: str | None = None


def cases(num_layers: int, low_precision: bool, order: tuple[int, ...], bars: dict[str, float]) -> list[Case]:
    """The cases for a model and a pack order (``order[j]``: the canonical index of the j-th packed
    sequence). ``low_precision`` drops 'positions rounded to bf16', which in a 16-bit run with
    fair-esm's RoPE is exactly what fair-esm itself does (not a difference). ``bars`` holds the
    fault-free run's relative-L2 bar per tap: single-token perturbations are planted at 3 x the
    bar (must be found, at the planted token) and at 0.3 x (must not be reported)."""
    mid, last = num_layers // 2, num_layers - 1
    ids = ("tiny", "small", "medium", "large")
    # positions running on across the stream are wrong from the second packed sequence on
    not_first = ids[min(i for i in range(len(ids)) if i != order[0])]
    rounded = [] if low_precision else [
        Case("positions rounded to bf16", Faults(positions_low_precision=True), (0, "q_rope", "large", 257), "packed")
    ]
    out = [
        Case("positions not restarted", Faults(positions_not_restarted=True), (0, "q_rope", not_first, 0), "packed"),
        *rounded,
        Case(f"softmax scale twice, layer {mid}", Faults(double_scale=True, layers=(mid,)), (mid, "ctx", "tiny", 0), "packed"),
        Case("attention across sequences", Faults(leak_across_sequences=True), (0, "ctx", "tiny", 0), "packed"),
        Case("token-dropout rescale skipped", Faults(skip_token_dropout_rescale=True), (None, "embed", "tiny", 0), "packed"),
    ]
    for path, tap, seq, token in (("packed", f"layers.{last}.ffn_out", LARGE, 20), ("unpacked", f"layers.{mid}.attn_out", MEDIUM, 15)):
        layer, site = int(tap.split(".")[1]), tap.split(".")[2]
        for factor in (3.0, 0.3):
            eps = factor * bars[tap]
            found = factor > 1
            out.append(Case(
                f"{path} perturbation {factor:g} x bar (rel L2 {eps:.3g}), layer {layer}",
                Faults(perturbations=(Perturbation(path, tap, seq, token, eps=eps),)),
                (layer, site, ids[seq], token) if found else None,
                path if found else None,
            ))
    return out


def run_checks(model, weights, seed, device, dtype, attn, seq_len, say=print, pack_orders=PACK_ORDERS) -> list[dict]:
    """Every case under every pack order in ``pack_orders``; one row per run."""
    if seq_len < 260:
        raise TracerError("--seq-len must be at least 260 (one case needs tokens past position 256)")
    loaded = models.load_model(model, weights, seed, progress=say)
    arch = loaded[1]
    seqs = debug_batch(seq_len)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        low = dtype in ("bfloat16", "float16")
        for order in pack_orders:
            base = dict(model=arch.name if arch.name != "custom" else None, weights=weights, seed=seed, device=device, dtype=dtype,
                        attn=attn, packed_rope="model" if low else "fp32", pack_order=order, metrics_only=True, force=True)
            clean = trace(RunConfig(**base, out=str(Path(tmp) / "clean.h5")), seqs, quiet=True, loaded=loaded)
            rows.append({"pack_order": order, "case": "no fault", "expected": None, "found": _found(clean.summary),
                         "blamed": None, "ok": clean.summary.first_divergence is None})
            say(f"selfcheck: {order}: no fault -> {'no divergence' if rows[-1]['ok'] else 'DIVERGENCE'}")
            bars = {t.name: t.threshold for t in clean.summary.taps}
            packed_order = tuple(pack_order([s.n_tokens for s in seqs], order))
            for case in cases(arch.num_layers, low, packed_order, bars):
                t = time.perf_counter()
                r = trace(RunConfig(**base, faults=case.faults, out=str(Path(tmp) / "case.h5")), seqs, quiet=True, loaded=loaded)
                found = _found(r.summary)
                att = r.summary.attribution
                blamed = att.at_divergence["off"] if att is not None and att.at_divergence else None
                ok = found == case.expected and (blamed is None or blamed == case.blame)
                rows.append({"pack_order": order, "case": case.label, "expected": case.expected, "found": found, "blamed": blamed,
                             "ok": ok, "seconds": round(time.perf_counter() - t, 2)})
                say(f"selfcheck: {order}: {case.label}: expected {case.expected}, found {found}, "
                    f"off at the divergence: {blamed} -> {'ok' if ok else 'FAIL'}")
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
    p.add_argument("--pack-order", action="append", choices=PACK_ORDERS, default=None,
                   help="pack order(s) to check (repeatable; default: every one of " + ", ".join(PACK_ORDERS) + ")")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


@main_guard(unwritten="nothing was written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rows = run_checks(args.model, args.weights, args.seed, args.device, args.dtype, args.attn, args.seq_len,
                      say=Progress(), pack_orders=args.pack_order or PACK_ORDERS)
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def format_rows(rows: list[dict]) -> str:
    """One block per pack order: each case, where it was expected, where it was found."""
    lines = []
    for order in dict.fromkeys(r["pack_order"] for r in rows):
        lines.append(f"pack order {order}:")
        for r in (r for r in rows if r["pack_order"] == order):
            blame = f"  off: {r['blamed']}" if r.get("blamed") else ""
            expected = "none" if r["expected"] is None else ", ".join(str(x) for x in r["expected"] if x is not None)
            found = "none" if r["found"] is None else ", ".join(str(x) for x in r["found"] if x is not None)
            lines.append(f"  {'ok  ' if r['ok'] else 'FAIL'} {r['case']:<58} expected {expected:<24} found {found}{blame}")
    lines.append(f"{sum(r['ok'] for r in rows)}/{len(rows)} cases found exactly (pack orders: {', '.join(dict.fromkeys(r['pack_order'] for r in rows))})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
