"""Settle the usual hypotheses in one command: ``python -m tracer.experiments``.

Runs a matrix of traced variants of one configuration and prints one verdict table. Each row
is a hypothesis from the debug log (RoPE, attention kernel, packing, order, precision), what was
changed for it, the first divergence of packed vs unpacked (or none), which side drifts from the
high-precision reference, and the cosine of the mean-pooled final embeddings (mean over
residues, as ESM-2 users pool them; :mod:`tracer.judging.embeddings`) of packed vs unpacked and of each
vs the reference, for the longest sequence. The last line names the variant(s) that remove the
divergence.

Rows (``V`` = the baseline's value):

* ``baseline`` -- the configuration as given.
* ``rope-packed-model`` / ``rope-packed-fp32`` -- the packed path's RoPE in the other mode.
* ``rope-module`` -- the packed path's rotation vs fair-esm's own rotary module on the very Q/K
  fair-esm's layer 0 produced (a direct module comparison, float64 reference; no embeddings).
* ``rope-unpacked-fp32`` -- fair-esm's padded path with its RoPE computed in float32 for this run
  (:func:`tracer.campaigns.probes.fair_esm_rope_fp32`; the model's buffers are not touched).
* ``attn-<backend>`` -- each other available attention backend of the packed path.
* ``attn-module`` -- the packed kernel vs fair-esm's attention on identical Q/K/V (first and
  last layer; float64 reference; no embeddings).
* ``packing-alone`` -- the longest sequence traced alone.
* ``order-long-first`` / ``order-long-last`` -- the longest sequence first / last in the pack.
* ``precision-<dtype>`` -- both paths in bfloat16, float16, float32 (float64 reference for float32).
* ``state-<state>`` -- a plug-in's factory receives a changed model state, nothing else changes
  (:mod:`tracer.capture.plugin_state`; the other paths keep the model as loaded). ``state-rotary-fp32``:
  the rotary ``inv_freq`` buffers kept in float32; if the plug-in's drift disappears, its RoPE
  reads the cast buffer.

Every traced row says which side(s) it *moved back* to the reference: the paths that drift in
the baseline and no longer drift in the row. A row that cannot run (a plug-in that refuses
float32, a backend that fails) is reported as ``not run: <its one-line error>``, and the matrix
goes on with the other rows.

Rows specific to the built-in packed path (packed RoPE, backends, the module probes) say
"does not apply" for a plug-in packed path (``--packed SPEC``). One model is loaded and reused
by every variant of the baseline's dtype; each trace sets its own precision, in place, so rows in
another dtype run on a fresh load (a cast of rounded weights is not the cast a user makes). Traces are kept under ``OUT/traces/``
(per-token metrics and pooled embeddings; ``--tensors`` keeps the full tensors), so any row can
be plotted (``tracer.plot``) or bundled (``tracer.bundle``). ``OUT/manifest.json`` records the
finished variants: an interrupted run resumes where it stopped, reusing a finished row only if
its trace verifies and its configuration (plug-in sources included) is unchanged, and reporting
it from its trace (:mod:`tracer.campaigns.campaign`); module probes run again. ``OUT/summary.md`` and
``OUT/summary.json`` are the table for a bug report.

Example::

    python -m tracer.experiments --seq-len 400                         # 3B, bfloat16, CUDA
    python -m tracer.experiments --seq-len 400 --model esm2_t6_8M_UR50D --weights random --device cpu
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports("no variant was finished")

import contextlib
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from tracer.esm import attention


from tracer.esm import models


from tracer.campaigns import probes
from tracer.campaigns.campaign import Campaign, check_folder, run_and_report, TraceFacts, fingerprint, fmt_cos, where, write_atomic, write_json_atomic
from tracer.cli import Parser, add_run_options, bounded_int, main_guard
from tracer.store import files
from tracer.env import resolve_device, resolve_dtype
from tracer.errors import TracerError, first_line
from tracer.inputs.faults import FAULT_NAMES
from tracer.esm.models import DEFAULT_MODEL
from tracer.inputs.packing import PACK_ORDERS
from tracer.capture.paths import encode
from tracer.capture.plugin_state import STATES
from tracer.capture.provenance import label
from tracer.inputs.sequences import MAX_RESIDUES, Sequence, debug_batch, read_fasta
from tracer.runner.config import RunConfig, config_from_args, output_stem
from tracer.runner.execute import trace
from tracer.runner.progress import Progress, Steps

TOOL = "tracer.experiments"
FLASH_BACKENDS = ("flash-attn", "torch-varlen", "math")
PAIRS = ("packed-vs-unpacked", "packed-vs-reference", "unpacked-vs-reference")


@dataclass(frozen=True)
class Variant:
    """One row of the matrix.

    Attributes:
        name: row name (also the trace's file name).
        hypothesis: the question the row answers.
        change: what differs from the baseline, in words.
        kind: ``trace`` (a traced run), ``probe-rope`` / ``probe-attention`` (module comparisons),
            ``same`` (identical to the baseline: its result is reused) or ``n/a`` (does not apply).
        config: the run's configuration (``trace`` rows).
        sequences: the run's sequences (``trace`` rows).
        rope_fp32_unpacked: run under :func:`tracer.campaigns.probes.fair_esm_rope_fp32`.
        note: why a row does not apply, or remarks.
    """

    name: str
    hypothesis: str
    change: str
    kind: str = "trace"
    config: RunConfig | None = None
    sequences: tuple[Sequence, ...] | None = None
    rope_fp32_unpacked: bool = False
    note: str = ""


@dataclass
class Row:
    """A finished row (what the table, ``summary.json`` and the manifest hold)."""

    name: str
    hypothesis: str
    change: str
    kind: str
    verdict: str
    first_divergence: dict | None = None
    drifting: str | None = None
    off_at_divergence: str | None = None
    cos: dict = field(default_factory=dict)
    trace: str | None = None
    note: str = ""
    seconds: float | None = None
    moved_back: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def packed_spec(config: RunConfig) -> str:
    """The packed path as words: ``builtin``, the plug-in SPEC, or ``callable <name>``."""
    return label(config.packed)


def unpacked_spec(config: RunConfig) -> str:
    """The unpacked path as words: ``fair-esm``, the plug-in SPEC, or ``callable <name>``."""
    return label(config.unpacked)


def longest(sequences) -> Sequence:
    return max(sequences, key=lambda s: s.length)  # the first of the longest


def _backend_ok(name: str, device, dtype) -> str | None:
    """``None`` if backend ``name`` runs on ``device``/``dtype``, else the reason it does not."""
    try:
        attention.resolve(name, device, resolve_dtype(dtype))
    except TracerError as e:
        return str(e)
    return None


def plan(base: RunConfig, sequences: list[Sequence]) -> list[Variant]:
    """The matrix of variants for ``base`` on ``sequences`` (see the module docstring)."""
    device = resolve_device(base.device)
    builtin = packed_spec(base) == "builtin"
    plugin_na = f"does not apply: the packed path is the plug-in {packed_spec(base)}, not the built-in one"
    seqs = tuple(sequences)
    long = longest(sequences)
    base_backend = attention.resolve(base.attn, device, resolve_dtype(base.dtype)).name

    def run(name, hypothesis, change, **kw) -> Variant:
        seq = kw.pop("sequences", seqs)
        rope32 = kw.pop("rope_fp32_unpacked", False)
        config = dataclasses.replace(base, **kw)
        return Variant(name, hypothesis, change, "trace", config, seq, rope32)

    def na(name, hypothesis, change, note) -> Variant:
        return Variant(name, hypothesis, change, "n/a", note=note)

    inside = f"attention {base_backend}, packed RoPE {base.packed_rope}" if builtin else "its own RoPE and attention"
    v = [Variant("baseline", "(the configuration as given)", f"as given: {base.dtype}, packed path {packed_spec(base)} ({inside}), "
                 f"pack order {base.pack_order}", "trace", base, seqs)]

    other_rope = "model" if base.packed_rope == "fp32" else "fp32"
    h_rope = "packed RoPE precision: fp32 vs the model dtype"
    c_rope = f"packed RoPE {other_rope}" + (" (exactly fair-esm's rotary module, model dtype)" if other_rope == "model" else " (float32)")
    v.append(run(f"rope-packed-{other_rope}", h_rope, c_rope, packed_rope=other_rope) if builtin else na(f"rope-packed-{other_rope}", h_rope, c_rope, plugin_na))
    h_mod = "the packed RoPE differs from fair-esm's rotary module"
    c_mod = "module level: packed rotation vs fair-esm's rot_emb on the same Q/K of layer 0; float64 reference"
    v.append(Variant("rope-module", h_mod, c_mod, "probe-rope") if builtin else na("rope-module", h_mod, c_mod, plugin_na))
    h_u = "fair-esm's RoPE in the model dtype (the fix a user would try)"
    c_u = "unpacked: fair-esm's RoPE in float32 for this run (buffers untouched)"
    if unpacked_spec(base) == "fair-esm":
        v.append(run("rope-unpacked-fp32", h_u, c_u, rope_fp32_unpacked=True))
    else:
        v.append(na("rope-unpacked-fp32", h_u, c_u, f"does not apply: the unpacked path is the plug-in {unpacked_spec(base)}, not fair-esm's"))

    h_attn = "the attention kernel"
    for name in FLASH_BACKENDS:
        if name == base_backend and builtin:
            continue
        why = _backend_ok(name, device, base.dtype)
        if not builtin:
            v.append(na(f"attn-{name}", h_attn, f"packed attention {name}", plugin_na))
        elif why:
            v.append(na(f"attn-{name}", h_attn, f"packed attention {name}", f"not available here: {why}"))
        else:
            v.append(run(f"attn-{name}", h_attn, f"packed attention {name}", attn=name))
    c_am = "module level: packed kernel vs fair-esm's attention on the same Q/K/V (first and last layer); float64 reference"
    v.append(Variant("attn-module", "the attention kernel, on identical inputs", c_am, "probe-attention") if builtin
             else na("attn-module", "the attention kernel, on identical inputs", c_am, plugin_na))

    h_pack = "packing several sequences together"
    if len(sequences) > 1:
        alone_faults = dataclasses.replace(base.faults, perturbations=tuple(  # planted perturbations of the long one follow it
            dataclasses.replace(p, sequence=0) for p in base.faults.perturbations if p.sequence == seqs.index(long)))
        v.append(run("packing-alone", h_pack, f"{long.id} traced alone", sequences=(long,), faults=alone_faults))
    else:
        v.append(na("packing-alone", h_pack, "longest sequence alone", "the batch has one sequence"))
    h_order = "the sequence's place in the pack"
    for name, order, what in (("order-long-first", "longest-first", "first"), ("order-long-last", "shortest-first", "last")):
        if len(sequences) > 1:
            v.append(run(name, h_order, f"{long.id} {what} in the pack (pack order {order})", pack_order=order))
        else:
            v.append(na(name, h_order, f"longest sequence {what}", "the batch has one sequence"))

    h_prec = "precision of both paths"
    for dtype in ("bfloat16", "float16", "float32"):
        name = f"precision-{dtype}"
        if dtype == base.dtype:
            v.append(Variant(name, h_prec, f"both paths {dtype} (the baseline's)", "same"))
            continue
        attn = base.attn if not builtin or not _backend_ok(base.attn, device, dtype) else "math"
        ref = "fp64" if dtype == "float32" and base.reference in ("auto", "fp32") else base.reference
        change = f"both paths {dtype}" + (f", reference {ref}" if ref != base.reference else "") + (f", attention {attn}" if attn != base.attn else "")
        v.append(run(name, h_prec, change, dtype=dtype, attn=attn, reference=ref))

    h_state = "the plug-in's RoPE reads the rotary inv_freq buffer the run dtype rounded"
    c_state = f"plug-in factory receives: {STATES['rotary-fp32']}; other paths as loaded"
    if not builtin or unpacked_spec(base) != "fair-esm":
        v.append(run("state-rotary-fp32", h_state, c_state, plugin_state="rotary-fp32"))
    else:
        v.append(na("state-rotary-fp32", h_state, c_state, "does not apply: no plug-in path (the built-in paths read the loaded frequencies or the module's own)"))
    return v


def plan_key(base: RunConfig, sequences, variants: list[Variant], weights_fingerprint: str, tensors: bool) -> dict:
    """What determines the results (a manifest with another key is not resumed)."""
    digest = hashlib.sha256(json.dumps([(s.id, s.residues) for s in sequences]).encode()).hexdigest()[:16]
    return {
        "model": base.model, "weights": base.weights, "weights_fingerprint": weights_fingerprint, "seed": base.seed,
        "device": base.device, "dtype": base.dtype, "attn": base.attn, "packed_rope": base.packed_rope,
        "reference": base.reference, "pack_order": base.pack_order, "packed": packed_spec(base),
        "unpacked": unpacked_spec(base), "faults": base.faults.to_dict(), "sequences": digest, "variants": [x.name for x in variants], "tensors": tensors,
    }


def row_fingerprint(v: Variant) -> dict:
    """What a traced row's result depends on (:func:`tracer.campaigns.campaign.fingerprint`)."""
    return fingerprint(v.config, {"variant": v.name, "sequences": [(s.id, s.residues) for s in v.sequences],
                                  "rope_fp32_unpacked": v.rope_fp32_unpacked})


def _traced_row(v: Variant, f: TraceFacts, seconds=None) -> Row:
    """A traced row, from its verified trace."""
    return Row(v.name, v.hypothesis, v.change, v.kind, f.verdict, f.first, f.drifting, f.off_at_divergence, f.cos, f.trace, v.note, seconds)


def _run_variant(v: Variant, loaded, path: Path, base_batch_seqs) -> tuple[Row, TraceFacts | None]:
    model = loaded[0]
    if v.kind == "trace":
        config = dataclasses.replace(v.config, out=str(path), force=True)  # our own file, in our folder
        with probes.fair_esm_rope_fp32(model) if v.rope_fp32_unpacked else contextlib.nullcontext():
            trace(config, list(v.sequences), quiet=True, loaded=loaded)
        f = TraceFacts.read(path)
        return _traced_row(v, f), f
    if v.kind in ("probe-rope", "probe-attention"):
        base = v.config
        device = resolve_device(base.device)
        dtype = resolve_dtype(base.dtype)
        backend = attention.resolve(base.attn, device, dtype)
        models.set_precision(model, device, dtype)
        batch = encode(list(base_batch_seqs), model.alphabet, base.pack_order)
        if v.kind == "probe-rope":
            s = probes.rope_probe(model, batch, backend, base.packed_rope, base.faults, layer=0)
        else:
            s = probes.attention_probe(model, batch, backend, base.faults, sorted({0, model.num_layers - 1}))
        att = s.attribution
        return Row(v.name, v.hypothesis, v.change, v.kind, s.verdict,
                   s.first_divergence.to_json() if s.first_divergence else None,
                   att.drifting if att else None, (att.at_divergence or {}).get("off") if att else None,
                   note=f"{backend.name}, {base.dtype}; no embeddings (module level)"), None
    raise AssertionError(v.kind)


def _by_dtype(work: list[Variant], first: str) -> list[Variant]:
    """Rows grouped by run dtype, the baseline's first (each model cast is then made from the
    weights as loaded: see :func:`_reload`); within a group, in matrix order."""
    dtype = [(v.config.dtype if v.config else first) for v in work]
    return [v for _, v in sorted(zip(dtype, work), key=lambda p: (p[0] != first, p[0]))]


def _reload(loaded, base: RunConfig, say):
    """The model as loaded, again. Precision is set in place, and a cast of already-rounded
    weights (bfloat16 -> float32, or bfloat16 -> float16) is not the cast of the loaded weights
    that a user makes, so a row in another dtype starts from a fresh load (random weights come from
    the cache or are rebuilt from their seed). The fresh weights must have the same fingerprint."""
    _, arch, weights = loaded
    say(f"reloading {arch.name} for a row in another dtype (each row's cast starts from the weights as loaded)")
    if weights.source == "random":
        fresh = models.load_model(arch.name, "random", weights.seed) if arch.name in models.ARCHITECTURES else None
        model = fresh[0] if fresh else models.build_random(arch, weights.seed)
    else:
        model = models.load_model(base.model, base.weights, base.seed, base.trust_checkpoint, progress=say)[0]
    if models.fingerprint(model) != weights.fingerprint:
        raise TracerError(f"reloading {arch.name} gave other weights than the first load (fingerprint changed): did the checkpoint change?")
    return model, arch, weights


def run_matrix(base: RunConfig, sequences: list[Sequence], out: Path, force: bool = False, tensors: bool = False,
               quiet: bool = False, loaded=None) -> dict:
    """Run (or resume) the matrix into ``out``; returns the summary record (also written to ``out``)."""
    variants = plan(base, sequences)
    check_folder(Path(out), TOOL, force)  # before a long model load
    say = Progress(quiet)
    if loaded is None:
        loaded = models.load_model(base.model, base.weights, base.seed, base.trust_checkpoint, progress=say)
    _, arch, weights = loaded  # the model itself is only reached through `loaded` (it may be reloaded)
    camp = Campaign(out, TOOL, plan_key(base, sequences, variants, weights.fingerprint, tensors), force)
    base = dataclasses.replace(base, metrics_only=not tensors)
    variants = [dataclasses.replace(v, config=dataclasses.replace(v.config, metrics_only=not tensors)) if v.config else v for v in variants]
    work = [v for v in variants if v.kind in ("trace", "probe-rope", "probe-attention")]
    done: dict[str, dict] = {}  # rows reported: from verified traces (reused or new) and probes run now
    for v in work:  # a resume reuses a traced row only if its trace verifies and its fingerprint matches
        if v.kind == "trace":
            facts = camp.reuse(v.name, row_fingerprint(v), say)
            if facts is not None:
                done[v.name] = _traced_row(v, facts, (camp.done[v.name] or {}).get("seconds")).to_json()
        elif camp.is_done(v.name):
            camp.forget(v.name)  # a module probe keeps no trace to verify: it is run again (seconds)
    progress = Steps(say, len(work), len(done))
    cast = None  # the run dtype the model was cast to in place, by the rows run so far
    for v in _by_dtype(work, base.dtype):  # a module probe runs in the baseline's dtype
        if v.name in done:
            continue
        if v.kind != "trace":
            v = dataclasses.replace(v, config=base)
        if cast is not None and v.config.dtype != cast:  # a second cast would start from rounded weights
            loaded = _reload(loaded, base, say)
        cast = v.config.dtype
        started = progress.start(f"{v.name}: {v.change}")
        t0 = time.perf_counter()
        facts = None
        try:
            row, facts = _run_variant(v, loaded, camp.trace_path(v.name), sequences)
        except TracerError as e:  # this row cannot run (e.g. a plug-in refuses float32): report it, go on
            if v.name == "baseline":  # the configuration as given must run
                raise
            row = Row(v.name, v.hypothesis, v.change, "not run", "not run", note=f"not run: {first_line(e)}")
        row.seconds = round(time.perf_counter() - t0, 2)
        if row.kind != "not run":  # a row that could not run is tried again on a resume
            camp.finish(v.name, row.to_json(), facts, row_fingerprint(v) if facts else None)
        done[v.name] = row.to_json()
        progress.finish(started, f"{row.verdict}; first divergence {where(row.first_divergence)}" if row.kind != "not run" else row.note)
    rows = []
    for v in variants:
        if v.name in done:
            rows.append(done[v.name])
        elif v.kind == "same":
            rows.append({**done["baseline"], "name": v.name, "hypothesis": v.hypothesis, "change": v.change, "kind": "same", "note": "the baseline's configuration"})
        else:
            rows.append(Row(v.name, v.hypothesis, v.change, "n/a", "n/a", note=v.note).to_json())
    _moved_back(rows)
    record = summary_record(base, arch, weights, sequences, rows)
    write_json_atomic(Path(out) / "summary.json", record)
    write_atomic(Path(out) / "summary.md", format_markdown(record))
    return record


def _drift_set(drifting: str | None) -> set[str]:
    return {"packed": {"packed"}, "unpacked": {"unpacked"}, "both": {"packed", "unpacked"}}.get(drifting or "", set())


def _moved_back(rows: list[dict]) -> None:
    """Set each traced row's ``moved_back``: the sides drifting in the baseline that no longer
    drift in the row (``packed``, ``unpacked``, ``both`` or ``none``)."""
    base = next((r for r in rows if r["name"] == "baseline"), None)
    if base is None or base.get("drifting") is None:
        return
    before = _drift_set(base["drifting"])
    for r in rows:
        if r["kind"] in ("trace", "same") and r.get("drifting") is not None and r["name"] != "baseline":
            back = sorted(before - _drift_set(r["drifting"]))
            r["moved_back"] = {0: "none", 1: back[0] if back else "none", 2: "both"}[len(back)]


def removers(rows: list[dict]) -> list[str]:
    """Traced variants that agree where the baseline diverged."""
    base = next(r for r in rows if r["name"] == "baseline")
    if base["verdict"] != "diverged":
        return []
    return [r["name"] for r in rows if r["kind"] == "trace" and r["verdict"] == "agree"]


def conclusion(rows: list[dict]) -> str:
    """The last line: which variants remove the divergence, and whether they do it by fixing or by sharing the error."""
    base = next(r for r in rows if r["name"] == "baseline")
    if base["verdict"] != "diverged":
        return "the baseline agrees: there is no divergence to remove"
    names = removers(rows)
    if not names:
        return "no variant removes the divergence"
    parts = []
    for n in names:
        r = next(r for r in rows if r["name"] == n)
        how = {"neither": "both paths on the reference", None: "no reference"}.get(
            r["drifting"], f"the paths agree but {r['drifting']} drift{'s' if r['drifting'] != 'both' else ''} from the reference")
        parts.append(f"{n} ({r['change']}; {how})")
    return "removes the divergence: " + "; ".join(parts)


def summary_record(base: RunConfig, arch, weights, sequences, rows: list[dict]) -> dict:
    long = longest(sequences)
    return {
        "tool": TOOL,
        "model": arch.name,
        "weights": weights.describe(),
        "weights_fingerprint": weights.fingerprint,
        "device": str(resolve_device(base.device)),
        "dtype": base.dtype,
        "reference": base.reference,
        "packed": packed_spec(base),
        "unpacked": unpacked_spec(base),
        "faults": base.faults.describe(),
        "sequences": [{"id": s.id, "length": s.length} for s in sequences],
        "focus": long.id,
        "cosine": "mean-pooled final embeddings (residues only), float64; columns are the focus sequence's",
        "rows": rows,
        "removes_divergence": removers(rows),
        "conclusion": conclusion(rows),
    }


def format_markdown(record: dict) -> str:
    """The verdict table (Markdown; also what the command prints)."""
    focus = record["focus"]
    seqs = ", ".join(f"{s['id']} ({s['length']})" for s in record["sequences"])
    lines = [
        f"model {record['model']} ({record['weights']}), {record['dtype']}, device {record['device']}, "
        f"reference {record['reference']}, packed path {record['packed']}, unpacked path {record['unpacked']}; faults: {record['faults']}",
        f"sequences {seqs}; cosines: mean-pooled final embeddings of {focus}",
        "",
        "| variant | hypothesis | what changed | first divergence | drifting | moved back to the reference | cos P-U | cos P-ref | cos U-ref |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        if r["kind"] in ("n/a", "not run"):
            lines.append(f"| {r['name']} | {r['hypothesis']} | {r['change']} | {r['note']} | | | | | |")
            continue
        drift = r["drifting"] or "n/a"
        if r["first_divergence"] and r.get("off_at_divergence"):
            drift += f" (off at it: {r['off_at_divergence']})"
        cos = [fmt_cos(r["cos"].get(p, {}).get(focus)) if r["cos"] else "n/a" for p in PAIRS]
        fd = where(r["first_divergence"]) if r["first_divergence"] else "none"
        back = r.get("moved_back") or ("(baseline)" if r["name"] == "baseline" else "n/a")
        lines.append(f"| {r['name']} | {r['hypothesis']} | {r['change']} | {fd} | {drift} | {back} | {' | '.join(cos)} |")
    lines += ["", record["conclusion"]]
    return "\n".join(lines) + "\n"


def build_parser() -> Parser:
    p = Parser(
        prog="python -m tracer.experiments",
        description="Trace a matrix of variants (RoPE, attention kernel, packing, order, precision) and print one "
        "verdict table: first divergence, drifting side and pooled final-embedding cosines per hypothesis.",
    )
    s = p.add_argument_group("sequences (default: the debug-log batch tiny 3, small 8, medium 160, large N)")
    s.add_argument("--seq-len", type=bounded_int("--seq-len", 1, MAX_RESIDUES), default=400, metavar="N", help=f"residues of the 'large' sequence, 1 to {MAX_RESIDUES:,} (default 400)")
    s.add_argument("--fasta", metavar="FILE", help="use the sequences of a FASTA file instead")
    add_run_options(p, "baseline dtype (default bfloat16)")
    m = p.add_argument_group("baseline")
    m.add_argument("--pack-order", choices=PACK_ORDERS, default="given", help="baseline pack order (default given)")
    m.add_argument("--fault", action="append", default=[], metavar="NAME[@LAYERS]", help=f"plant a known bug in every variant (validation): {', '.join(FAULT_NAMES)}")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, metavar="DIR", help="output folder (default experiments/<model>-<dtype>-L<lengths>); rerun to resume")
    o.add_argument("--force", action="store_true", help="write into a folder that holds something else, or start over")
    o.add_argument("--tensors", action="store_true", help="keep every variant's full tensors (default: metrics and pooled embeddings only)")
    o.add_argument("--json", action="store_true", help="print the summary as JSON")
    o.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def base_config(args, sequences, command: tuple[str, ...]) -> RunConfig:
    return config_from_args(args, [s.id for s in sequences], command)


def sequences_from(args) -> list[Sequence]:
    if args.fasta:
        return read_fasta(args.fasta)
    return debug_batch(args.seq_len)


def default_out(args, sequences) -> Path:
    model = args.model or (Path(args.weights).stem if args.weights not in ("auto", "random") else DEFAULT_MODEL)
    return Path("experiments") / output_stem(model, args.dtype, [s.length for s in sequences])


@main_guard(unwritten="no variant was finished")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sequences = sequences_from(args)
    command = tuple(["python", "-m", TOOL, *(sys.argv[1:] if argv is None else argv)])
    base = base_config(args, sequences, command)
    out = Path(args.out) if args.out else default_out(args, sequences)
    files.refuse_inputs_inside(out, [args.fasta, args.weights if args.weights not in ("auto", "random") else None])
    return run_and_report(
        lambda: run_matrix(base, sequences, out, force=args.force, tensors=args.tensors, quiet=args.quiet),
        out, "variants", args.json, format_markdown, f"{out / 'summary.md'}, {out / 'summary.json'}; traces in {out / 'traces'}",
    )


if __name__ == "__main__":
    sys.exit(main())
