"""Trace the packed and unpacked ESM-2 forwards and say where they part: ``python -m tracer.run``.

Example::

    python -m tracer.run --seq-len 400                       # the debug-log batch, 3B, bf16
    python -m tracer.run --seq-len 400 --model esm2_t6_8M_UR50D --weights random --device cpu
    python -m tracer.run --fasta my.fasta --json --plot
    python -m tracer.run --packed examples/packed_esm2_adapter.py:make_forward   # your own packed forward
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports()

import json
import sys
from pathlib import Path

from tracer.cli import Parser, add_rule_options, add_run_options, bounded_int, main_guard, parse_layers, parse_taps
from tracer.errors import TracerError
from tracer.inputs.faults import FAULT_NAMES
from tracer.inputs.packing import PACK_ORDERS
from tracer.inputs.sequences import MAX_RESIDUES, debug_batch, make_batch, motif_sequence, read_fasta
from tracer.runner.config import config_from_args
from tracer.runner.execute import trace
from tracer.store import files
from tracer.store.trace_file import COMPRESSIONS
from tracer.taps import EMBED, FINAL, SITES

MAX_BATCH_TOKENS = 10**12
"""No sub-batch budget above this is taken (a budget that large means one batch: pass 0)."""

seq_len = bounded_int("--seq-len", 1, MAX_RESIDUES, f"a sequence is at most {MAX_RESIDUES:,} residues; ESM-2 was trained on 1,022")

def build_parser() -> Parser:
    p = Parser(
        prog="python -m tracer.run",
        description="Run ESM-2's padded (fair-esm) and packed (varlen attention) forwards, hook every layer, "
        "write one HDF5 trace, and name the first layer, tap and token where the two paths part, and "
        "which one moved away from a high-precision reference.",
        epilog="Token positions are 0-based in the model's stream: 0 = <cls>, residues 1..L, L+1 = <eos>. "
        f"Taps: {EMBED}, layers.<i>.{{{','.join(SITES)}}}, {FINAL}.",
    )
    s = p.add_argument_group("sequences (default: the debug-log batch tiny 3, small 8, medium 160, large N)")
    s.add_argument("--seq-len", type=seq_len, default=400, metavar="N", help=f"residues of the 'large' sequence, 1 to {MAX_RESIDUES:,} (default 400)")
    s.add_argument("--alone", action="store_true", help="trace only the long sequence")
    s.add_argument("--fasta", metavar="FILE", help="trace the sequences of a FASTA file instead")
    s.add_argument("--pack-order", choices=PACK_ORDERS, default="given", help="order of sequences in the packed stream (default given)")

    add_run_options(p)

    t = p.add_argument_group("what to record")
    t.add_argument("--taps", default=None, metavar="A,B", help=f"sites to trace (default all): {', '.join([EMBED, *SITES, FINAL])}")
    t.add_argument("--layers", default=None, metavar="0,3,5-7", help="layers to trace (default all)")
    t.add_argument("--metrics-only", action="store_true", help="compute per-token metrics on the fly and store no tensors")
    t.add_argument("--local", action="store_true", help="also re-run each layer on the other side's input, to split error born in a layer from error inherited")
    t.add_argument(
        "--max-batch-tokens", type=bounded_int("--max-batch-tokens", 0, MAX_BATCH_TOKENS), default=None, metavar="K",
        help="run the padded unpacked and reference forwards on length-sorted sub-batches of at most K padded tokens "
        "(sequences x longest); 0 = the batch as given (default: the batch as given if the pre-flight estimate fits in "
        "free memory, else the largest K that does)",
    )
    t.add_argument("--compression", choices=COMPRESSIONS, default="none", help="HDF5 compression of tensors (default none: docs/performance.md has the measurements)")
    t.add_argument("--fault", action="append", default=[], metavar="NAME[@LAYERS]", help=f"plant a known bug to validate the tracer: {', '.join(FAULT_NAMES)}, or perturb:PATH:TAP:SEQ:TOKEN[:EPS]")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="PATH", help="trace file (default traces/<model>-<dtype>-L<lengths>-<time>.h5)")
    o.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    o.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress stays on stderr)")
    o.add_argument("--table", action="store_true", help="also print the per-tap table")
    o.add_argument("--plot", action="store_true", help="also write the plots next to the trace (tracer.plot)")
    o.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_rule_options(p)
    return p


def input_files(args) -> list[str]:
    """The files a run reads: the FASTA and a checkpoint given by path."""
    return [f for f in (args.fasta, args.weights if args.weights not in ("auto", "random") else None) if f]


def sequences_from(args):
    if args.fasta:
        if args.alone:
            raise TracerError("--alone selects the long sequence of the built-in batch; it does not apply to --fasta")
        return read_fasta(args.fasta)
    if args.seq_len < 1:
        raise TracerError(f"--seq-len must be a positive number of residues, got {args.seq_len}")
    if args.alone:
        return make_batch([("large", motif_sequence(args.seq_len))])
    return debug_batch(args.seq_len)


@main_guard
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out:  # an input is never an output, whatever the flags (checked again before the commit)
        files.check_target(Path(args.out), args.force, inputs=input_files(args))
    sequences = sequences_from(args)
    if args.max_batch_tokens is not None and args.max_batch_tokens < 0:
        raise TracerError(f"--max-batch-tokens must be 0 (one batch) or a positive number of padded tokens, got {args.max_batch_tokens}")
    config = config_from_args(
        args, [s.id for s in sequences], tuple(["python", "-m", "tracer.run", *(sys.argv[1:] if argv is None else argv)]),
        taps=parse_taps(args.taps) if args.taps is not None else None,
        layers=parse_layers(args.layers) if args.layers is not None else None,
        metrics_only=args.metrics_only, local=args.local, compression=args.compression,
        out=args.out, force=args.force, max_batch_tokens=args.max_batch_tokens,
    )
    result = trace(config, sequences, quiet=args.quiet)
    if args.json:  # the verdict first: a failing --plot must not hide it
        print(json.dumps(result.summary.to_json(), indent=2), flush=True)
    else:
        print(result.summary.format_text(table=args.table))
        print(f"trace     {result.path}", flush=True)
    if args.plot:
        from tracer.plot import plot_trace, use_file_backend

        use_file_backend()
        try:
            written = plot_trace(result.path, None, quiet=args.quiet, force=args.force)
        except TracerError as e:
            raise TracerError(f"the trace {result.path} was written, but its plots were not: {e}") from None
        if not args.quiet:
            print(f"tracer: plots in {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
