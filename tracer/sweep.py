"""Sweep sequence length: ``python -m tracer.sweep --lengths 50:1000:50``.

Traces one sequence per length (the motif ``MKTAYIAK`` repeated and cut to length, alone) with
one loaded model, and reports per length the verdict, the first divergence, which side drifts,
per tap site the first layer where packed and unpacked diverge, and the cosine of the
mean-pooled final embeddings (:mod:`tracer.judging.embeddings`) of packed vs unpacked and of each vs
the reference. A **cliff** is a step between consecutive lengths where the verdict flips, where
``1 - cos`` (packed vs unpacked, pooled) grows by 10x or more, or where a site of interest's
worst-token relative L2 error (packed vs unpacked) grows by 3x or more; cliffs are listed in the
table and drawn as red lines in the plot (e.g. where bfloat16 can no longer represent integer
positions, 256: a sequence of 257+ residues has tokens beyond it).

Output folder (rerun the same command to resume; a finished length is reused only if its trace
verifies and its configuration is unchanged, and is reported from its trace):
``manifest.json``, ``traces/L00050.h5`` ..., ``summary.md``, ``summary.json``, ``sweep.png`` and
``sweep.svg`` (top: first diverging layer per site against length; middle: per site the worst
token's relative L2 error of packed vs unpacked; bottom: ``1 - cos`` of the pooled final
embeddings; log scales).

Example::

    python -m tracer.sweep --lengths 50:1000:50                     # 3B, bfloat16, CUDA
    python -m tracer.sweep --lengths 200:320:8 --model esm2_t6_8M_UR50D --weights random --device cpu
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports("no length was finished")

import dataclasses
import math
import sys
from pathlib import Path


from tracer.esm import models
from tracer.campaigns.campaign import Campaign, run_and_report, TraceFacts, check_folder, fingerprint, fmt_cos, where, write_atomic, write_json_atomic
from tracer.cli import Parser, add_run_options, main_guard
from tracer.env import resolve_device
from tracer.errors import TracerError
from tracer.store import files
from tracer.experiments import packed_spec, unpacked_spec
from tracer.inputs.faults import FAULT_NAMES
from tracer.esm.models import DEFAULT_MODEL
from tracer.inputs.sequences import MAX_RESIDUES, make_batch, motif_sequence
from tracer.taps import SITES
from tracer.runner.config import RunConfig, config_from_args
from tracer.runner.execute import trace
from tracer.runner.progress import Progress, Steps

TOOL = "tracer.sweep"
PAIRS = ("packed-vs-unpacked", "packed-vs-reference", "unpacked-vs-reference")
DEFAULT_SITES = ("q_rope", "ctx", "resid_out", "final_norm")
CLIFF_FACTOR = 10.0
"""A step in pooled ``1 - cos`` (packed vs unpacked) of at least this factor is a cliff."""
RELL2_CLIFF_FACTOR = 3.0
"""A step in a site's worst-token relative L2 error (packed vs unpacked) of at least this factor is a cliff."""
COS_FLOOR = 1e-16
"""``1 - cos`` below this (float64 resolution) is drawn and compared as this."""


MAX_LENGTHS = 1000
"""Rows (lengths) one sweep takes: each is a traced run of its own."""


def parse_lengths(text: str) -> list[int]:
    """``"50:1000:50"`` (start:stop:step, stop included) or ``"100,257,300"`` -> sorted lengths.

    Lengths are 1 to :data:`~tracer.inputs.sequences.MAX_RESIDUES` residues, at most
    :data:`MAX_LENGTHS` of them; a range is counted before it is built.
    """
    expected = f"--lengths {text!r}: expected START:STOP:STEP (e.g. 50:1000:50) or a list like 100,257,300"
    try:
        parts = [int(x) for x in text.split(":" if ":" in text else ",")]
    except ValueError:
        raise TracerError(expected) from None
    if ":" in text and (len(parts) != 3 or parts[2] <= 0):
        raise TracerError(expected)
    numbers = parts[:2] if ":" in text else parts
    count = (max(0, parts[1] - parts[0]) // parts[2] + 1 if parts[1] >= parts[0] else 0) if ":" in text else len(set(parts))
    if count > MAX_LENGTHS:
        raise TracerError(f"--lengths {text!r} asks for {count:,} lengths; a sweep takes at most {MAX_LENGTHS:,} (each is a traced run): raise STEP")
    if not numbers or min(numbers) < 1 or max(numbers) > MAX_RESIDUES:
        raise TracerError(f"--lengths {text!r}: lengths are positive numbers of residues, at most {MAX_RESIDUES:,}")
    lengths = list(range(parts[0], parts[1] + 1, parts[2])) if ":" in text else parts
    if not lengths:
        raise TracerError(f"--lengths {text!r}: the range is empty (STOP below START)")
    return sorted(set(lengths))


def one_minus(c) -> float | None:
    return None if c is None or not math.isfinite(c) else max(1.0 - c, COS_FLOOR)


def find_cliffs(rows: list[dict], sites=DEFAULT_SITES) -> list[dict]:
    """Steps between consecutive lengths where the verdict flips, pooled ``1 - cos`` jumps >= 10x, or
    a site's worst-token relative L2 error (packed vs unpacked) jumps >= 3x."""
    cliffs = []
    for a, b in zip(rows, rows[1:]):
        why = []
        for site in sites:
            ea, eb = a["max_rel_l2_by_site"].get(site), b["max_rel_l2_by_site"].get(site)
            if ea and eb and eb >= RELL2_CLIFF_FACTOR * ea:
                why.append(f"{site} worst rel L2 {ea:.2g} -> {eb:.2g}")
        if a["verdict"] != b["verdict"]:
            why.append(f"verdict {a['verdict']} -> {b['verdict']}")
        da, db = one_minus(a["cos"].get(PAIRS[0])), one_minus(b["cos"].get(PAIRS[0]))
        if da is not None and db is not None and db >= CLIFF_FACTOR * da:
            why.append(f"pooled 1-cos packed vs unpacked {da:.2g} -> {db:.2g}")
        if why:
            first = b["first_divergence"] if b["verdict"] == "diverged" else None
            cliffs.append({"between": [a["length"], b["length"]], "what": "; ".join(why),
                           "first_divergence": first, "where": where(first)})
    return cliffs


def _row(length: int, facts: TraceFacts) -> dict:
    seq = f"L{length}"
    return {
        "length": length, "verdict": facts.verdict, "first_divergence": facts.first, "drifting": facts.drifting,
        "off_at_divergence": facts.off_at_divergence, "first_layer_by_site": facts.first_layer_by_site,
        "max_rel_l2_by_site": facts.max_rel_l2_by_site,
        "cos": {pair: facts.cos.get(pair, {}).get(seq) for pair in PAIRS}, "trace": facts.trace,
    }


def run_sweep(base: RunConfig, lengths: list[int], out: Path, force: bool = False, tensors: bool = False,
              quiet: bool = False, sites=DEFAULT_SITES, loaded=None, plot: bool = True) -> dict:
    """Trace one sequence per length into ``out`` (resuming), write the summaries and the plot."""
    out = Path(out)
    check_folder(out, TOOL, force)
    say = Progress(quiet)
    if loaded is None:
        loaded = models.load_model(base.model, base.weights, base.seed, base.trust_checkpoint, progress=say)
    model, arch, weights = loaded
    base = dataclasses.replace(base, metrics_only=not tensors)
    key = {
        "model": base.model, "weights": base.weights, "weights_fingerprint": weights.fingerprint, "seed": base.seed,
        "device": base.device, "dtype": base.dtype, "attn": base.attn, "packed_rope": base.packed_rope,
        "reference": base.reference, "packed": packed_spec(base), "unpacked": unpacked_spec(base),
        "faults": base.faults.to_dict(), "lengths": lengths, "tensors": tensors,
    }
    camp = Campaign(out, TOOL, key, force)
    prints = {n: fingerprint(base, {"length": n, "sequence": motif_sequence(n)}) for n in lengths}
    done: dict[int, dict] = {}  # rows from verified traces only, never the manifest's copies
    for n in lengths:
        facts = camp.reuse(f"L{n:05d}", prints[n], say)
        if facts is not None:
            done[n] = _row(n, facts)
    progress = Steps(say, len(lengths), len(done))
    for n in lengths:
        name = f"L{n:05d}"
        if n in done:
            continue
        started = progress.start(f"length {n}")
        config = dataclasses.replace(base, out=str(camp.trace_path(name)), force=True)  # our own file
        trace(config, make_batch([(f"L{n}", motif_sequence(n))]), quiet=True, loaded=loaded)
        facts = TraceFacts.read(camp.trace_path(name))
        done[n] = row = _row(n, facts)
        camp.finish(name, row, facts, prints[n])
        progress.finish(started, f"{row['verdict']}; first divergence {where(row['first_divergence'])}; "
                                 f"pooled cos packed vs unpacked {fmt_cos(row['cos'][PAIRS[0]])}")
    rows = [done[n] for n in lengths]
    record = {
        "tool": TOOL, "model": arch.name, "num_layers": arch.num_layers, "weights": weights.describe(),
        "weights_fingerprint": weights.fingerprint, "device": str(resolve_device(base.device)), "dtype": base.dtype,
        "packed_rope": base.packed_rope, "attn": base.attn, "reference": base.reference, "packed": packed_spec(base),
        "unpacked": unpacked_spec(base), "faults": base.faults.describe(), "sites": list(sites), "rows": rows, "cliffs": find_cliffs(rows, sites),
        "cosine": "mean-pooled final embeddings (residues only), float64",
    }
    write_json_atomic(out / "summary.json", record)
    write_atomic(out / "summary.md", format_markdown(record))
    if plot:
        plot_sweep(record, out)
    return record


def format_markdown(record: dict) -> str:
    sites = record["sites"]
    lines = [
        f"model {record['model']} ({record['weights']}), {record['dtype']}, device {record['device']}, attention "
        f"{record['attn']}, packed RoPE {record['packed_rope']}, reference {record['reference']}, packed path "
        f"{record['packed']}, unpacked path {record['unpacked']}; faults: {record['faults']}",
        "one sequence per length (MKTAYIAK repeated), alone; 1-cos: mean-pooled final embeddings",
        "",
        "| length | verdict | first divergence | drifting | " + " | ".join(f"first layer {s}" for s in sites)
        + " | 1-cos P-U | 1-cos P-ref | 1-cos U-ref |",
        "|---" * (7 + len(sites)) + "|",
    ]
    for r in record["rows"]:
        layer = [_layer(r["first_layer_by_site"].get(s)) for s in sites]
        cos = [_om(r["cos"].get(p)) for p in PAIRS]
        lines.append(f"| {r['length']} | {r['verdict']} | {where(r['first_divergence'])} | {r['drifting'] or 'n/a'} | "
                     + " | ".join(layer) + " | " + " | ".join(cos) + " |")
    lines.append("")
    if record["cliffs"]:
        for c in record["cliffs"]:
            a, b = c["between"]
            at = f"; first divergence at {c['where']}" if c["first_divergence"] else ""
            lines.append(f"CLIFF between length {a} and {b}: {c['what']}{at}")
    else:
        lines.append("no cliff: no verdict flip and no 10x step in pooled 1-cos between consecutive lengths")
    return "\n".join(lines) + "\n"


def _layer(v) -> str:
    return "-" if v is None else ("diverged" if v == -1 else str(v))  # -1: embed / final_norm (no layer)


def _om(c) -> str:
    v = one_minus(c)
    return "n/a" if v is None else f"{v:.2e}"


def _savefig(fig, ext: str):
    return lambda f: fig.savefig(f, dpi=120, format=ext)


def plot_sweep(record: dict, out: Path) -> list[Path]:
    """``sweep.png``/``.svg``: first diverging layer per site, and pooled ``1 - cos``, against length."""
    import matplotlib.pyplot as plt

    rows = record["rows"]
    x = [r["length"] for r in rows]
    never = record["num_layers"]  # drawn above the last layer
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(10, 10), sharex=True, constrained_layout=True)
    colors = plt.get_cmap("tab10").colors
    for k, site in enumerate(record["sites"]):
        y = []
        for r in rows:
            v = r["first_layer_by_site"].get(site)
            y.append(never if v is None else (v if v != -1 else (0 if site == "embed" else never - 1)))
        shift = (k - (len(record["sites"]) - 1) / 2) * 0.07  # overlapping lines stay visible
        top.plot(x, [v + shift for v in y], marker="o", ms=4, lw=1.2, color=colors[k % 10], label=site)
        e = [r["max_rel_l2_by_site"].get(site) for r in rows]
        middle.plot(x, [max(v, 1e-12) if v is not None else float("nan") for v in e], marker="o", ms=4, lw=1.2,
                    color=colors[k % 10], label=site)
    top.set_ylim(-0.5, never + 0.8)
    top.set_yticks(sorted({0, never // 2, never - 1, never}))
    top.set_yticklabels([("none" if t == never else str(t)) for t in sorted({0, never // 2, never - 1, never})])
    top.set_ylabel("first layer where packed\nand unpacked diverge")
    top.legend(loc="lower left", fontsize=8, ncol=len(record["sites"]))
    middle.set_yscale("log")
    middle.set_ylabel("worst-token rel L2\npacked vs unpacked")
    labels = {"packed-vs-unpacked": "packed vs unpacked", "packed-vs-reference": "packed vs reference",
              "unpacked-vs-reference": "unpacked vs reference"}
    for k, pair in enumerate(PAIRS):
        y = [one_minus(r["cos"].get(pair)) for r in rows]
        if any(v is not None for v in y):
            bottom.plot(x, [v if v is not None else float("nan") for v in y], marker="o", ms=4, label=labels[pair],
                        color=("black", "tab:blue", "tab:orange")[k])
    bottom.set_yscale("log")
    bottom.set_ylabel("1 - cos of mean-pooled\nfinal embeddings")
    bottom.set_xlabel("sequence length (residues)")
    bottom.legend(loc="upper left", fontsize=8)
    for c in record["cliffs"]:
        a, b = c["between"]
        for ax in (top, middle, bottom):
            ax.axvline((a + b) / 2, color="red", ls="--", lw=1.5)
        top.annotate(f"cliff {a}->{b}", ((a + b) / 2, never + 0.4), color="red", fontsize=9, ha="center", va="center",
                     bbox=dict(fc="white", ec="red", lw=0.8))
    fig.suptitle(f"{record['model']} {record['dtype']} ({record['weights']}): length sweep; faults {record['faults']}", fontsize=10)
    try:  # both files, or neither, replace the last ones (one atomic writer: tracer.store.files)
        written = files.write_group([(out / f"sweep.{ext}", _savefig(fig, ext)) for ext in ("png", "svg")], what="--out")
    finally:
        plt.close(fig)
    return written


def build_parser() -> Parser:
    p = Parser(
        prog="python -m tracer.sweep",
        description="Trace one sequence per length and show, per tap site, the first diverging layer and the "
        "pooled final-embedding cosine against length; cliffs are listed and drawn.",
    )
    p.add_argument("--lengths", default="50:1000:50", metavar="START:STOP:STEP|A,B,...", help="lengths in residues, stop included (default 50:1000:50)")
    p.add_argument("--sites", default=",".join(DEFAULT_SITES), metavar="A,B", help=f"taps of interest in the plot and table (default {','.join(DEFAULT_SITES)}); any of {', '.join([*SITES, 'embed', 'final_norm'])}")
    add_run_options(p)
    m = p.add_argument_group("validation")
    m.add_argument("--fault", action="append", default=[], metavar="NAME[@LAYERS]", help=f"plant a known bug (validation): {', '.join(FAULT_NAMES)}")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help="output folder (default sweeps/<model>-<dtype>-<lengths>); rerun to resume")
    o.add_argument("--force", action="store_true", help="write into a folder that holds something else, or start over")
    o.add_argument("--tensors", action="store_true", help="keep full tensors in every trace (default: metrics and pooled embeddings)")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


@main_guard(unwritten="no length was finished")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    lengths = parse_lengths(args.lengths)
    sites = tuple(s.strip() for s in args.sites.split(",") if s.strip())
    bad = [s for s in sites if s not in (*SITES, "embed", "final_norm")]
    if bad or not sites:
        raise TracerError(f"--sites: unknown site {bad[0] if bad else args.sites!r}; sites: {', '.join([*SITES, 'embed', 'final_norm'])}")
    if any(f.startswith("perturb:") for f in args.fault):
        raise TracerError("--fault perturb:... names one sequence and token; the sweep traces a new sequence per length (plant a switch such as positions-bf16)")
    base = config_from_args(args, [f"L{n}" for n in lengths], tuple(["python", "-m", TOOL, *(sys.argv[1:] if argv is None else argv)]))
    model = args.model or (Path(args.weights).stem if args.weights not in ("auto", "random") else DEFAULT_MODEL)
    out = Path(args.out) if args.out else Path("sweeps") / f"{model}-{args.dtype}-{lengths[0]}-{lengths[-1]}-n{len(lengths)}"
    files.refuse_inputs_inside(out, [args.weights if args.weights not in ("auto", "random") else None])
    from tracer.plot import use_file_backend

    use_file_backend()
    return run_and_report(
        lambda: run_sweep(base, lengths, out, force=args.force, tensors=args.tensors, quiet=args.quiet, sites=sites),
        out, "lengths", args.json, format_markdown,
        f"{out / 'summary.md'}, {out / 'summary.json'}, plot {out / 'sweep.png'}; traces in {out / 'traces'}",
    )


if __name__ == "__main__":
    sys.exit(main())
