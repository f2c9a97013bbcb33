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

import argparse
import json
import sys

from tracer.esm.attention import BACKENDS
from tracer.cli import Parser, add_rule_options, main_guard, rule_from_args
from tracer.env import DTYPES
from tracer.errors import TracerError
from tracer.inputs.faults import FAULT_NAMES, parse_faults
from tracer.esm.models import ARCHITECTURES, DEFAULT_MODEL
from tracer.esm.packed_forward import ROPE_MODES
from tracer.inputs.packing import PACK_ORDERS
from tracer.inputs.sequences import debug_batch, make_batch, motif_sequence, read_fasta
from tracer.store.trace_file import COMPRESSIONS
from tracer.taps import EMBED, FINAL, SITES
from tracer.runner.execute import REFERENCES, RunConfig, trace


MAX_LAYER = 9999
"""No layer number above this is even looked up (ESM-2 models have at most 48 layers)."""

SEED_RANGE = (0, 2**64 - 1)
"""Seeds ``torch.manual_seed`` accepts (non-negative)."""


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,3,5-7"`` -> ``(0, 3, 5, 6, 7)``; empty parts, reversed ranges and absurd numbers are errors."""
    if not text.strip():
        raise TracerError("--layers is empty; give layer numbers like 0,3,5-7 (or leave it out for all layers)")
    out: set[int] = set()
    for part in text.split(","):
        lo_text, dash, hi_text = part.strip().partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text) if dash else int(lo_text)
        except ValueError:
            raise TracerError(f"--layers {text!r}: expected layer numbers like 0,3,5-7") from None
        if max(lo, hi) > MAX_LAYER:
            raise TracerError(f"--layers {text!r}: layer {max(lo, hi)} does not exist (ESM-2 models have at most 48 layers)")
        if hi < lo:
            raise TracerError(f"--layers {text!r}: the range {part.strip()} is empty (write low-high, e.g. {hi}-{lo})")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def parse_taps(text: str) -> tuple[str, ...]:
    """``"ctx,resid_out"`` -> ``("ctx", "resid_out")``; empty names are errors."""
    taps = tuple(t.strip() for t in text.split(","))
    if not any(taps):
        raise TracerError("--taps is empty; name sites like ctx,resid_out (or leave it out for all taps)")
    if not all(taps):
        raise TracerError(f"--taps {text!r} has an empty name; write names separated by single commas")
    return taps


def seed(text: str) -> int:
    """``--seed``: an integer ``torch.manual_seed`` accepts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{text} is out of range; seeds are integers from 0 to 2**64-1")
    return value


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
    s.add_argument("--seq-len", type=int, default=400, metavar="N", help="residues of the 'large' sequence (default 400)")
    s.add_argument("--alone", action="store_true", help="trace only the long sequence")
    s.add_argument("--fasta", metavar="FILE", help="trace the sequences of a FASTA file instead")
    s.add_argument("--pack-order", choices=PACK_ORDERS, default="given", help="order of sequences in the packed stream (default given)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, metavar="NAME", help=f"fair-esm ESM-2 name (default {DEFAULT_MODEL}); one of {', '.join(ARCHITECTURES)}")
    m.add_argument(
        "--weights", default="auto", metavar="auto|random|PATH",
        help="auto: fair-esm's checkpoint from the torch-hub cache, else download; random: the architecture with "
        "seeded random weights (no checkpoint needed); PATH: a fair-esm .pt file (default auto)",
    )
    m.add_argument("--seed", type=seed, default=0, help="seed of --weights random (default 0)")
    m.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary pickled objects in the checkpoint (only for files you trust)")

    w = p.add_argument_group("the two paths (default: tracer's own packed forward vs fair-esm's padded forward)")
    w.add_argument(
        "--packed", default="builtin", metavar="SPEC",
        help="packed side: builtin, package.module:factory or path/to/file.py:factory, where "
        "factory(model, alphabet) returns forward(tokens (N,), cu_seqlens (B+1,) int32, max_seqlen) -> (N, E) "
        "(the representation after emb_layer_norm_after); taps are captured from the fair-esm modules and "
        "the attention kernel it calls (docs/plugins.md)",
    )
    w.add_argument(
        "--unpacked", default="fair-esm", metavar="SPEC",
        help="unpacked side: fair-esm (ESM2.forward, default) or a factory SPEC returning forward(tokens (B, T)) -> (B, T, E)",
    )

    n = p.add_argument_group("numerics")
    n.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA if available)")
    n.add_argument("--dtype", choices=[d for d in DTYPES if d != "float64"], default="bfloat16", help="dtype of both paths (default bfloat16)")
    n.add_argument("--attn", choices=BACKENDS, default="auto", help="attention of the builtin packed path: flash-attn package, PyTorch's varlen FlashAttention, or exact math (default auto: best available)")
    n.add_argument("--packed-rope", choices=ROPE_MODES, default="fp32", help="RoPE of the builtin packed path: fp32, or 'model' = exactly fair-esm's rotary module in the model dtype (default fp32)")
    n.add_argument("--reference", choices=REFERENCES, default="auto", help="high-precision reference path (default auto: fp32 for 16-bit runs, none for float32)")

    t = p.add_argument_group("what to record")
    t.add_argument("--taps", default=None, metavar="A,B", help=f"sites to trace (default all): {', '.join([EMBED, *SITES, FINAL])}")
    t.add_argument("--layers", default=None, metavar="0,3,5-7", help="layers to trace (default all)")
    t.add_argument("--metrics-only", action="store_true", help="compute per-token metrics on the fly and store no tensors")
    t.add_argument("--local", action="store_true", help="also re-run each layer on the other side's input, to split error born in a layer from error inherited")
    t.add_argument(
        "--max-batch-tokens", type=int, default=None, metavar="K",
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
    sequences = sequences_from(args)
    if args.max_batch_tokens is not None and args.max_batch_tokens < 0:
        raise TracerError(f"--max-batch-tokens must be 0 (one batch) or a positive number of padded tokens, got {args.max_batch_tokens}")
    taps = parse_taps(args.taps) if args.taps is not None else None
    layers = parse_layers(args.layers) if args.layers is not None else None
    dtype = args.dtype
    has_ref = args.reference in ("fp32", "fp64") or (args.reference == "auto" and dtype in ("bfloat16", "float16"))
    config = RunConfig(
        model=args.model,
        weights=args.weights,
        seed=args.seed,
        trust_checkpoint=args.trust_checkpoint,
        device=args.device,
        dtype=dtype,
        attn=args.attn,
        packed_rope=args.packed_rope,
        reference=args.reference,
        pack_order=args.pack_order,
        taps=taps,
        layers=layers,
        metrics_only=args.metrics_only,
        local=args.local,
        compression=args.compression,
        out=args.out,
        force=args.force,
        faults=parse_faults(args.fault, [s.id for s in sequences]),
        rule=rule_from_args(args, dtype, has_ref),
        command=tuple(["python", "-m", "tracer.run", *(sys.argv[1:] if argv is None else argv)]),
        packed=args.packed,
        unpacked=args.unpacked,
        max_batch_tokens=args.max_batch_tokens,
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
            written = plot_trace(result.path, None, quiet=args.quiet)
        except TracerError as e:
            raise TracerError(f"the trace {result.path} was written, but its plots were not: {e}") from None
        if not args.quiet:
            print(f"tracer: plots in {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
