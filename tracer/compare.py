"""The comparator, working from trace files alone: ``python -m tracer.compare TRACE.h5 [B.h5]``.

One trace: per-token metrics are recomputed from the stored tensors (streaming: one tap of each
path in memory at a time, so peak memory does not grow with the number of layers), or read from
the stored metrics for ``--metrics-only`` traces and slim bundles; then judged by the rule the
run used or the one given here, and printed as text or (``--json``) the same JSON object that
``tracer.run --json`` prints.

Two traces (before/after a fix, or the same command twice): refused unless model, weights,
sequences and taps match; otherwise, for every path in both, the first token that is not
bit-identical and the first that differs by more than the plain threshold.

Example::

    python -m tracer.compare traces/run.h5 --table
    python -m tracer.compare before.h5 after.h5 --json
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports("nothing was written")

import json
import sys


from tracer.cli import Parser, add_rule_options, global_threshold, main_guard, rule_from_args

from tracer.errors import TracerError
from tracer.store.trace_file import Trace, open_trace, reading


from tracer.judging.tables import recomputes, summarize
from tracer.judging.two_traces import compare_traces, format_two


def build_parser() -> Parser:
    p = Parser(
        prog="python -m tracer.compare",
        description="Judge a tracer trace (first divergence, attribution, per-layer table), "
        "or compare two traces of the same model and sequences.",
    )
    p.add_argument("traces", nargs="+", metavar="TRACE.h5", help="one trace, or two to compare with each other")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of text")
    p.add_argument("--table", action="store_true", help="also print the per-tap table (text output)")
    p.add_argument("--stored", action="store_true", help="use the metrics stored at run time instead of recomputing them from the tensors")
    p.add_argument("--verify", action="store_true", help="first check every checksum in the file(s) (all data read once); damaged files are named")
    add_rule_options(p)
    return p


def _verify(trace: Trace, taps: bool = True) -> None:
    """``--verify``; ``taps=False`` when the recompute reads, and so checks, every tap anyway."""
    n = trace.verify(taps=taps)
    also = "" if taps else " (tap tensors: checked as the metrics are recomputed from them)"
    print(f"tracer: {trace.path}: {n} checksums verified{also}", file=sys.stderr)


@main_guard(unwritten="nothing was written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.traces) > 2:
        raise TracerError("give one trace to judge, or two to compare with each other")
    if len(args.traces) == 2:
        with open_trace(args.traces[0]) as a, open_trace(args.traces[1]) as b, reading(a.path, b.path):
            if args.verify:
                _verify(a), _verify(b)
            result = compare_traces(a, b, global_threshold(args))
        print(json.dumps(result, indent=2) if args.json else format_two(result))
        return 0
    with open_trace(args.traces[0]) as t, reading(t.path):
        if args.verify:
            _verify(t, taps=not recomputes(t, not args.stored))
        rule = rule_from_args(args, t.meta["dtype"], has_reference="reference_dtype" in t.meta and t.meta["reference_dtype"] is not None)
        summary = summarize(t, rule, recompute=not args.stored)
    print(json.dumps(summary.to_json(), indent=2) if args.json else summary.format_text(table=args.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
