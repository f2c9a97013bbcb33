"""A bug-report bundle from a trace: ``python -m tracer.bundle TRACE.h5 -o report/``.

Writes a folder, and the same content as one ``.zip`` next to it, to attach to an issue:

* ``report.md`` -- command line, environment and versions, GPU, verdict, attribution, diagnosis, the
  sequences and a per-layer table.
* the plots of :mod:`tracer.plot` (PNG and SVG).
* ``trace-slim.h5`` -- a valid trace (with its own run id and checksums, written only after the
  source trace verified as ``tracer.compare`` verifies it) holding the per-token metrics of every layer and tap, plus
  the full tensors (all paths) of the taps around the first divergence, for the sequence it is
  in, chosen in order of relevance (the diverging tap, the layer's input, the rest of that layer,
  then the layer before) until the size budget is spent.

The whole bundle, and the archive, stay under ``--max-mb`` (25 MB by default, a common
attachment limit); the slim trace re-reads with ``tracer.compare`` and ``tracer.plot``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports("no bundle was written")

import math
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from tracer.cli import Parser, main_guard
from tracer.judging.tables import verify
from tracer.errors import TracerError
from tracer.judging.pairs import control_label
from tracer.judging.diagnosis import Diagnoses
from tracer.plot import MARKER as PLOT_MARKER, plot_trace, use_file_backend
from tracer.store import files
from tracer.store.trace_file import TraceWriter, attr_str, open_trace, reading, to_numpy
from tracer.taps import EMBED, SITES, parse_tap, tap_name

SLIM = "trace-slim.h5"
MB = 1_000_000
MAX_MB = 1_000_000.0
"""The largest --max-mb taken (1 TB; a bundle is an attachment)."""


def _anchor(summary: dict, trace, table) -> tuple[str, int]:
    """(tap name, sequence index) to centre the tensors on: the first divergence, else the
    first drift, else the worst token of the last layer (of ``table``, the stored metrics)."""
    point = summary.get("first_divergence") or ((summary.get("attribution") or {}).get("first"))
    if point:
        return point["name"], point["sequence_index"]
    rel = table.pairs["packed-vs-unpacked"]["rel_l2"]
    last = max(range(len(table.taps)), key=lambda i: (parse_tap(table.taps[i])[0] or -1, i))
    col = int(np.nanargmax(np.where(np.isfinite(rel[last]), rel[last], np.inf)))
    return table.taps[last], trace.layout.token(col)[0]


def candidates(anchor: str, num_layers: int, available: list[str]) -> list[str]:
    """Tap names in order of relevance around ``anchor``."""
    layer, site = parse_tap(anchor)
    order = [anchor]
    if layer is not None:
        order.append(EMBED if layer == 0 else tap_name(layer - 1, "resid_out"))
        order += [tap_name(layer, s) for s in SITES]
        if layer > 0:
            order += [tap_name(layer - 1, s) for s in reversed(SITES)]
        if layer + 1 < num_layers:
            order += [tap_name(layer + 1, s) for s in SITES]
    seen, out = set(), []
    for name in order:
        if name in available and name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _write_slim(trace, dest: Path, budget: int, anchor: tuple[str, int]) -> list[str]:
    """Write the slim trace within ``budget`` bytes of tensors around ``anchor`` (:func:`_anchor`);
    returns the taps included."""
    summary = trace.summary
    anchor, seq = anchor
    rows = trace.sequence(seq).rows
    paths = trace.paths
    names = candidates(anchor, trace.meta["architecture"]["num_layers"], trace.taps(paths[0]) if paths else [])
    chosen, used = [], 0
    for name in names:
        cost = sum(trace.file[f"taps/{p}/{name}"].dtype.itemsize * int(np.prod(trace.file[f"taps/{p}/{name}"].shape[1:])) * (rows.stop - rows.start) for p in paths)
        if used + cost > budget:
            break
        chosen.append(name)
        used += cost
    meta = dict(trace.meta)
    meta["tensors"] = "partial"
    meta["slim"] = {"source": str(trace.path), "source_run_id": trace.run_id, "taps": chosen,
                    "sequence": trace.sequence(seq).id, "rows": [rows.start, rows.stop]}
    with TraceWriter(dest, force=True) as w:
        s = trace.sequences
        w.write_sequences([x.id for x in s], [x.residues for x in s], [x.length for x in s], trace.layout)
        for name in chosen:
            for p in paths:
                data, dtype = to_numpy(trace.tap(p, name)[rows])  # read whole: checked against its checksum
                ds = w.write_array(f"taps/{p}/{name}", data, compression="gzip", compression_opts=4)
                ds.attrs["dtype"] = dtype
                ds.attrs["encoding"] = "bfloat16-bits-as-uint16" if dtype == "bfloat16" else "raw"
                ds.attrs["rows"] = [rows.start, rows.stop]
        for group in trace.metric_groups():  # read checked, rewritten with the slim trace's own checksums
            keys: list[str] = []
            trace.file[group].visititems(lambda name, obj: keys.append(f"{group}/{name}") if hasattr(obj, "shape") else None)
            for key in keys:
                w.write_array(key, trace.read_small(key), dtype=trace.file[key].dtype)
        pooled = {p: trace.embeddings(p) for p in trace.embedding_paths()}  # checked
        if pooled:
            w.write_embeddings(pooled, attr_str(trace.file["embeddings"].attrs.get("pooling", "")))
        w.set_json("meta", meta)
        w.set_json("summary", summary)
        w.commit()
    return chosen


def _fmt(x, digits=3) -> str:
    return "nan" if x is None else f"{x:.{digits}g}"  # a metric is null in the summary when it is NaN/Inf


def _worst_of(values) -> float | None:
    """Largest value; ``None`` (NaN/Inf, printed ``nan``) if any is, never skipped."""
    values = list(values)
    return None if any(v is None for v in values) else max(values, default=None)


EVIDENCE_SHOWN = ("step_position", "step_ratio", "position_rho", "growth_ratio", "slope_per_100", "eta2", "first_packed",
                  "level_vs_length_rho", "edge_ratio", "spread_p90_p10", "scale_only", "fraction_over", "median_ratio", "max_ratio")
"""Evidence numbers the report shows (the rest is in the summary's JSON)."""


def _diagnosis_markdown(summary: dict) -> list[str]:
    """``## Diagnosis``: pattern, cause, evidence, propagation and pooled cosines of each diagnosis."""
    diags = Diagnoses.from_json(summary.get("diagnosis"))
    if not diags:
        return []
    lines = ["## Diagnosis", ""]
    for d in diags:
        what, fate = d.lines()
        ev = ", ".join(f"{k} {d.evidence[k]}" for k in EVIDENCE_SHOWN if d.evidence.get(k) is not None)
        lines += [f"- **{d.subject}** at `{d.tap}` (sequence `{d.sequence}`, token {d.token}): **{d.pattern}**: {d.cause}.",
                  f"  {fate[0].upper() + fate[1:]}.", f"  Evidence ({d.pair}, errors in units of the noise level): {ev}."]
        for path, cos in d.pooled_cos.items():
            lines.append(f"  Pooled-embedding cosine of {path} vs the reference: " + ", ".join(f"`{i}` {'nan' if c is None else f'{c:.6f}'}" for i, c in cos.items()) + ".")
    return lines + [""]


def report_markdown(summary: dict, meta: dict, trace, slim_taps: list[str], plots: list[str]) -> str:
    env = meta["environment"]
    fd = summary.get("first_divergence")
    att = summary.get("attribution")
    lines = [f"# tracer report: {meta['model']}, {meta['dtype']}, {summary['verdict']}", ""]
    if fd:
        at = f"layer {fd['layer']}, {fd['tap']}" if fd["layer"] is not None else fd["tap"]
        noise = f" = {summary['rule']['noise_factor']:g} x noise {fd['noise']:.3g}" if fd.get("noise") else ""
        values = ("a NaN or Inf value" if fd.get("non_finite") else
                  f"cos {_fmt(fd['cos'], 6)}, rel L2 {_fmt(fd['rel_l2'])}, max abs {_fmt(fd['max_abs'])}")
        lines.append(
            f"**First divergence**: {at}, sequence `{fd['sequence']}`, token {fd['token']} "
            f"(packed vs unpacked: {values}; threshold {_fmt(fd['threshold'])}{noise})."
        )
    else:
        lines.append("**No divergence**: packed and unpacked agree at every traced tap and token.")
    if att:
        lines += ["", f"**Attribution**: {att['sentence']}."]
        if att.get("explained_by") and fd:
            lines.append(f"The divergence is explained by: **{att['explained_by']}**.")
    lines += ["", f"Rule: {summary['rule']['description']}.", ""]
    lines += _diagnosis_markdown(summary)
    lines += ["## Run", "", f"```\n{' '.join(meta.get('command') or ['(API call)'])}\n```", ""]
    w = meta["weights"]
    rows = [
        ("model", f"{meta['model']} ({meta['architecture']['num_layers']} layers, {meta['architecture']['embed_dim']} dims, {meta['architecture']['heads']} heads)"),
        ("weights", f"{w['source']} {w['path'] or ''} seed={w['seed']} fingerprint={w['fingerprint']}"),
        ("dtype / reference", f"{meta['dtype']} / {meta['reference_dtype'] or 'none'}"),
        ("attention", f"{meta['attention']['backend']} {meta['attention']['version'] or ''}"),
        ("packed RoPE / pack order", f"{meta['packed_rope']} / {meta['pack_order']}"),
        ("planted faults", meta.get("faults_description", "none")),
        *[(f"{side} path", info["label"]) for side, info in (meta.get("paths") or {}).items()],
        *([("control (sets the noise level)", control_label(meta["control"]))] if meta.get("control") else []),
        *[(f"not captured ({side})", f"{len(gone)} taps: {', '.join(gone[:4])}{', ...' if len(gone) > 4 else ''}") for side, gone in (meta.get("uncaptured") or {}).items()],
        ("device", f"{env['device']} ({env['device_name']})"),
        ("python / torch / fair-esm", f"{env['python']} / {env['torch']} / {env['fair_esm']}"),
        ("flash-attn / CUDA / cuDNN", f"{env['flash_attn']} / {env['cuda']} / {env['cudnn']}"),
        ("TF32 matmul / bf16 reduced-precision reduction", f"{env['allow_tf32_matmul']} / {env['allow_bf16_reduced_precision_reduction']}"),
        ("tool / schema", f"tracer {meta['tool_version']}"),
    ]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += ["## Sequences", "", "| id | residues | tokens | rows in trace |", "|---|---|---|---|"]
    for s in trace.sequences:
        lines.append(f"| `{s.id}` | {s.length} | {s.length + 2} | {s.rows.start}-{s.rows.stop - 1} |")
    lines += ["", "Token positions: 0 = `<cls>`, residues 1..L, L+1 = `<eos>`.", ""]
    lines += ["## Per layer (packed vs unpacked)", ""]
    has_ref = bool(meta.get("reference_dtype"))
    head = "| layer | worst tap | max rel L2 | min cos | diverged tokens |" + (" unpacked vs ref | packed vs ref |" if has_ref else "")
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for entry in summary["layers"]:
        taps = entry["taps"]
        if not taps:  # a trace of a subset of taps: this layer has none
            continue
        worst = max(taps, key=lambda t: taps[t]["max_rel_l2"] if taps[t]["max_rel_l2"] is not None else np.inf)
        t = taps[worst]
        row = f"| {entry['layer']} | {worst} | {_fmt(t['max_rel_l2'])} | {_fmt(t['min_cos'], 6)} | {sum(x['diverged_tokens'] for x in taps.values())} |"
        if has_ref:
            u = _worst_of(x["vs_reference"]["unpacked"]["max_rel_l2"] for x in taps.values())
            p = _worst_of(x["vs_reference"]["packed"]["max_rel_l2"] for x in taps.values())
            row += f" {_fmt(u)} | {_fmt(p)} |"
        lines.append(row)
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots if p.endswith(".png")]
    lines += [
        "", "## Files", "",
        f"- `{SLIM}`: per-token metrics of every layer and tap; full tensors (all paths) of "
        f"{', '.join(f'`{t}`' for t in slim_taps) or 'none (over the size budget)'} for the anchor sequence. "
        f"Re-read with `python -m tracer.compare {SLIM}` and `python -m tracer.plot {SLIM}`.",
    ]
    return "\n".join(lines) + "\n"


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_destination(trace_path: Path, out: Path, archive: Path, force: bool) -> None:
    """Refuse, before anything is written, a destination that would lose something."""
    if str(out) in ("", "."):
        raise TracerError("-o is empty; give the bundle folder to create")
    src = trace_path.resolve()
    dest = out.resolve()
    if dest == src or dest in src.parents or archive.resolve() == src:
        raise TracerError(f"the input trace {trace_path} is inside the bundle's destination {out}; choose another -o")
    if files.exists(out) and not out.is_dir():
        raise TracerError(f"{out} exists and is not a folder; -o names the bundle folder to create")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TracerError(
            f"{out} exists and is not empty; pass --force to write the bundle into it (files of the same "
            "names are replaced, nothing else is touched) or choose another -o"
        )
    files.check_target(archive, force, inputs=[trace_path], what="-o")
    if out.is_dir():  # what --force would replace in it: regular files only, never the input
        for name in ("report.md", SLIM):
            files.check_target(out / name, True, inputs=[trace_path], what="-o")


def make_bundle(trace_path: str | Path, out_dir: str | Path, max_mb: float = 25.0, quiet: bool = True,
                force: bool = False) -> tuple[Path, Path]:
    """Write the bundle folder and ``<folder>.zip``; returns both paths.

    Everything is built in a private folder next to the destination and moved into place at
    the end; the archive is written to a unique partial file and committed without replacing
    anything (unless ``force``). Nothing that existed before is deleted; an interrupted or
    failed bundle leaves nothing behind.
    """
    if not (math.isfinite(max_mb) and 1 < max_mb <= MAX_MB):
        raise TracerError(f"--max-mb must be a number above 1 and at most {MAX_MB:g} (1 TB), got {max_mb:g}")
    out, trace_path = Path(out_dir), Path(trace_path)
    if out.name.lower().endswith(".zip") and len(out.name) > 4:  # "-o report.zip": folder report, archive report.zip
        out = out.with_name(out.name[:-4])
    archive = out.with_name(out.name + ".zip")  # not with_suffix: "-o proj.v2" must not give proj.zip
    _check_destination(trace_path, out, archive, force)
    limit = int(max_mb * MB)
    with open_trace(trace_path) as trace, reading(trace_path):
        verified = verify(trace)  # as tracer.compare does (every checksum, the stored summary); nothing is copied before
        summary = trace.summary
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=files.PARTIAL_SUFFIX, dir=out.parent))
        except OSError as e:
            raise TracerError(f"cannot write the bundle in {out.parent}: {e.strerror or e}") from None
        zip_partial = None
        try:
            plot_trace(trace_path, stage, quiet=quiet, verified=verified)
            (stage / PLOT_MARKER).unlink(missing_ok=True)  # the bundle's plots are its own
            plots = sorted(p.name for p in stage.glob("*.png")) + sorted(p.name for p in stage.glob("*.svg"))
            (stage / "report.md").write_text("placeholder")
            budget = limit - _size(stage) - 4 * 1024 * 1024 - trace.file["metrics"]["packed-vs-unpacked"]["rel_l2"].nbytes * 12
            zip_partial = files.create_partial(archive)
            anchor = _anchor(summary, trace, verified.stored)
            while True:
                taps = _write_slim(trace, stage / SLIM, max(budget, 0), anchor)
                (stage / "report.md").write_text(report_markdown(summary, trace.meta, trace, taps, plots))
                _zip(stage, out.name, zip_partial)
                if (_size(stage) <= limit and zip_partial.stat().st_size <= limit) or not taps:
                    break
                budget = int(budget * 0.8)
            if _size(stage) > limit:
                raise TracerError(f"the bundle is {_size(stage) / MB:.1f} MB even without tensors; raise --max-mb")
            with files.signals_held():  # the archive and the folder, or neither
                files.commit(zip_partial, archive, force)
                _place(stage, out, force, trace_path)
        except OSError as e:
            raise TracerError(f"cannot write the bundle {out}: {e.strerror or e}") from None
        finally:  # only what this run created: its private folder and its partial archive
            shutil.rmtree(stage, ignore_errors=True)
            if zip_partial is not None:
                zip_partial.unlink(missing_ok=True)
    return out, archive


def _place(stage: Path, out: Path, force: bool, source: Path) -> None:
    """Move the finished files from ``stage`` into ``out`` (created if absent); only regular
    files that are not the ``source`` trace are replaced."""
    try:
        out.mkdir()
    except FileExistsError:
        if not force and any(out.iterdir()):
            raise TracerError(f"{out} appeared while the bundle was written; pass --force or choose another -o") from None
    for f in sorted(stage.iterdir()):
        files.check_target(out / f.name, True, inputs=[source], what="-o")
        os.replace(f, out / f.name)
    files.fsync_dir(out)


def _zip(folder: Path, root: str, dest: Path) -> None:
    """The files of ``folder`` into the zip ``dest``, under ``root/``."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, Path(root) / f.relative_to(folder))
    with open(dest, "rb") as fh:
        os.fsync(fh.fileno())


def build_parser() -> Parser:
    p = Parser(prog="python -m tracer.bundle", description="Write a bug-report bundle (report.md, plots, slim trace) and one .zip of it.")
    p.add_argument("trace", metavar="TRACE.h5")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="bundle folder; DIR.zip is written next to it")
    p.add_argument("--max-mb", type=float, default=25.0, help=f"size limit of the bundle and of the archive, in MB, above 1 and at most {MAX_MB:g} (default 25)")
    p.add_argument("--force", action="store_true", help="write into an existing non-empty DIR (same-named files replaced) and replace DIR.zip")
    return p


@main_guard(unwritten="no bundle was written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    use_file_backend()
    folder, archive = make_bundle(args.trace, args.out, args.max_mb, quiet=False, force=args.force)
    print(f"bundle  {folder} ({_size(folder) / MB:.1f} MB)\narchive {archive} ({archive.stat().st_size / MB:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
