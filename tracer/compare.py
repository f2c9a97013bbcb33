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

    quiet_during_imports()

import json
import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tracer.cli import Parser, add_rule_options, global_threshold, main_guard, rule_from_args
import torch

from tracer.env import resolve_dtype, return_freed_memory
from tracer.errors import TracerError
from tracer.judging.metrics import METRICS, metrics_table, norms, token_metrics
from tracer.store.trace_file import Trace, from_numpy, open_trace, reading
from tracer.judging.pairs import PAIRS, batch_description, default_rule, summary_context
from tracer.judging.verdict import PAIR, ROUNDED, MetricsTable, Point, Rule, Summary, judge
from tracer.taps import parse_tap


def stored_table(trace: Trace) -> MetricsTable:
    """The metrics the run stored (``/metrics``, ``/local``)."""
    if "metrics" not in trace.file:
        raise TracerError(f"{trace.path} has no stored metrics")

    def read(group: str) -> tuple[list[str], dict, dict]:
        g = trace.file[group]
        taps = [t.decode() if isinstance(t, bytes) else t for t in trace._small(f"{group}/taps")]
        pairs = {p: {m: trace._small(f"{group}/{p}/{m}") for m in METRICS} for p in g if p != "taps"}
        present = {p: trace._small(f"{group}/{p}/present").astype(bool) for p in g if p != "taps" and "present" in g[p]}
        for p, by_metric in pairs.items():
            for m, values in by_metric.items():
                if values.shape != (len(taps), trace.n_tokens):
                    raise TracerError(f"{trace.path} is damaged: {group}/{p}/{m} has shape {values.shape}, expected {(len(taps), trace.n_tokens)}")
        return taps, pairs, present

    taps, pairs, present = read("metrics")
    local = read("local")[1] if "local" in trace.file else {}
    if PAIR not in pairs:
        raise TracerError(f"{trace.path} is missing its {PAIR} metrics")
    return MetricsTable(taps, pairs, local, present)


@dataclass(frozen=True)
class _Stored:
    """Where one stored tap lives: shape, numpy dtype, trace dtype, and its file offset
    (``None`` for chunked/compressed datasets, which must go through h5py)."""

    key: str
    shape: tuple
    np_dtype: np.dtype
    dtype: str
    offset: int | None
    crc32: int | None
    path: str


def _layout(trace: Trace, path: str, name: str) -> _Stored:
    ds = trace.file[f"taps/{path}/{name}"]
    dtype = trace.checked_dtype(ds)
    offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
    if offset is not None and offset + ds.dtype.itemsize * int(np.prod(ds.shape)) > os.path.getsize(trace.path):
        raise TracerError(f"{trace.path} is truncated or damaged (tap {ds.name} lies beyond the end of the file)")
    crc = ds.attrs.get("crc32")
    if trace.checksums and crc is None:
        raise TracerError(f"{trace.path} is damaged: {ds.name} has no checksum")
    return _Stored(ds.name, ds.shape, ds.dtype, dtype, offset, None if crc is None else int(crc) & 0xFFFFFFFF, str(trace.path))


class _Worker:
    """Per-thread reusable buffers (the loop allocates nothing after its first tap: fresh
    multi-MB allocations per tap fragment the heap or page-fault on every first touch)."""

    def __init__(self):
        self.store: dict[tuple, object] = {}

    def array(self, tag, shape, dtype) -> np.ndarray:
        key = ("np", tag, tuple(shape), np.dtype(dtype).str)
        if key not in self.store:
            self.store[key] = np.empty(shape, dtype=dtype)
        return self.store[key]

    def tensor(self, tag, shape, dtype) -> torch.Tensor:
        key = (tag, tuple(shape), dtype)
        if key not in self.store:
            self.store[key] = torch.empty(shape, dtype=dtype)
        return self.store[key]


class _Reader:
    """Reads stored taps into worker buffers: ``os.preadv`` at the dataset's file offset for
    contiguous datasets (no h5py lock, no GIL), h5py under a lock otherwise."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self.fd = os.open(trace.path, os.O_RDONLY)
        self.lock = threading.Lock()

    def close(self) -> None:
        os.close(self.fd)

    def read(self, st: _Stored, w: _Worker, tag) -> torch.Tensor:
        raw = w.array(tag, st.shape, st.np_dtype)
        if st.offset is not None:
            view, done = memoryview(raw).cast("B"), 0
            while done < len(view):
                n = os.preadv(self.fd, [view[done:]], st.offset + done)
                if n == 0:
                    raise TracerError(f"{self.trace.path} is truncated (tap {st.key} ends early)")
                done += n
        else:
            with self.lock:
                self.trace.file[st.key].read_direct(raw)
        if st.crc32 is not None and zlib.crc32(raw.reshape(-1).view(np.uint8)) != st.crc32:
            raise TracerError(
                f"{st.path} is damaged: {st.key} fails its checksum (stored crc32 {st.crc32:08x}); "
                "no verdict is given from damaged data"
            )
        return from_numpy(raw, st.dtype).reshape(st.shape[0], -1)


def _tap_metrics(reader: _Reader, stored: dict[str, _Stored], pairs: dict, run_dtype, w: _Worker) -> dict[str, np.ndarray]:
    """Every pair's ``(3, N)`` metrics of one tap (all paths read, up-cast exactly, compared)."""
    up = {}
    for p, st in stored.items():
        raw = reader.read(st, w, p)
        work = torch.float64 if raw.dtype == torch.float64 else torch.float32
        up[p] = raw if raw.dtype == work else w.tensor(("up", p), raw.shape, work).copy_(raw)
        if p == "reference":  # the reference rounded to the run dtype, and back
            low = w.tensor("low", raw.shape, run_dtype).copy_(raw)
            up["rounded"] = w.tensor("rounded", raw.shape, work).copy_(low)
    size = {p: norms(t) for p, t in up.items()}
    out = {}
    for pair, (a, b) in pairs.items():
        x = up[a]
        scratch = (w.tensor("d", x.shape, x.dtype), w.tensor("db", x.shape, x.dtype))
        m = token_metrics(x, up[b], size[a], size[b], scratch)
        out[pair] = np.stack([m[k].float().numpy() for k in METRICS])
    return out


def comparator_workers() -> int:
    """Threads of the streaming comparator: one tap each, single-threaded ops (coarse-grained
    parallelism beats intra-op threads on these few-MB tensors). ``TRACER_COMPARE_WORKERS``
    overrides; memory grows by about one tap of every path per worker."""
    env = os.environ.get("TRACER_COMPARE_WORKERS")
    return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


def recomputed_table(trace: Trace, workers: int | None = None) -> MetricsTable:
    """Per-token metrics recomputed from the stored tensors, a few taps at a time.

    ``workers`` threads each take one tap at a time (read, up-cast, compare) into their own
    reused buffers, so peak memory is about ``workers`` taps of every path, whatever the
    number of layers.
    """
    return_freed_memory()
    paths = trace.paths
    for needed in ("unpacked", "packed"):
        if needed not in paths:
            raise TracerError(f"{trace.path} has no {needed} tensors to compare (it has: {', '.join(paths) or 'none'})")
    names = trace.meta.get("taps") or trace.taps("unpacked")
    missing = [(p, n) for p in paths for n in names if not trace.has_tap(p, n)]
    if missing:
        p, n = missing[0]
        raise TracerError(f"{trace.path} is missing tap {n} of path {p} ({len(missing)} taps missing in all)")
    run_dtype = resolve_dtype(trace.meta["dtype"])
    pairs = {k: v for k, v in PAIRS.items() if set(v) <= set(paths)}
    if "reference" in paths:
        pairs[ROUNDED] = ("rounded", "reference")
    stored = [{p: _layout(trace, p, n) for p in paths} for n in names]  # h5py metadata, main thread only
    rows: dict[str, dict[str, np.ndarray]] = {p: {} for p in pairs}
    reader = _Reader(trace)
    local_state = threading.local()

    def work(i: int):
        if not hasattr(local_state, "worker"):
            local_state.worker = _Worker()
        return i, _tap_metrics(reader, stored[i], pairs, run_dtype, local_state.worker)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers or comparator_workers(), thread_name_prefix="tracer-compare") as pool:
            for i, by_pair in pool.map(work, range(len(names))):
                for pair, m in by_pair.items():
                    rows[pair][names[i]] = m
    finally:
        torch.set_num_threads(threads)
        reader.close()
    table = {p: metrics_table(names, by_tap, trace.n_tokens) for p, by_tap in rows.items()}
    local = stored_table(trace).local if "local" in trace.file else {}
    return MetricsTable(list(names), table, local)


def summarize(trace: Trace, rule: Rule | None = None, recompute: bool = True) -> Summary:
    """Judge one trace (recomputing metrics from tensors when it has them)."""
    has_tensors = trace.meta.get("tensors", "full") == "full" and {"unpacked", "packed"} <= set(trace.paths)
    if recompute and has_tensors:
        table = recomputed_table(trace)
        cross_check(trace, table, stored_table(trace))
    else:
        table = stored_table(trace)
    meta = trace.meta
    has_ref = table.has("packed-vs-reference")
    rule = rule or default_rule(meta["dtype"], has_ref)
    if rule.kind == "noise" and not has_ref:
        raise TracerError(f"{trace.path} has no reference path, so the noise rule cannot apply; use --rule plain")
    ids = [s.id for s in trace.sequences]
    seqs = trace.sequences
    batch = batch_description(seqs, meta.get("pack_order", "given"))
    return judge(table, trace.layout, ids, rule, summary_context(meta, batch), trace=str(trace.path))


CROSS_CHECK = {"rtol": 1e-3, "atol": 1e-6}
"""How closely recomputed metrics must match the stored run-time ones. On the CPU they are
bit-identical; on CUDA the run-time sums are reduced on the device in another order."""


def cross_check(trace: Trace, recomputed: MetricsTable, stored: MetricsTable) -> None:
    """Raise :class:`TracerError` where metrics recomputed from the tensors disagree with the
    ones the run stored (same NaN/Inf pattern, values within :data:`CROSS_CHECK`)."""
    if list(recomputed.taps) != list(stored.taps):
        raise TracerError(f"{trace.path} is damaged: its stored metrics list other taps than its tensors")
    for pair, by_metric in recomputed.pairs.items():
        if pair not in stored.pairs:
            raise TracerError(f"{trace.path} is damaged: it has tensors for {pair} but no stored metrics")
        for metric, values in by_metric.items():
            a, b = np.asarray(values, np.float64), np.asarray(stored.pairs[pair][metric], np.float64)
            with np.errstate(invalid="ignore"):
                same = (a == b) | (np.isnan(a) & np.isnan(b)) | np.isclose(a, b, **CROSS_CHECK)
            if not same.all():
                i, col = (int(x[0]) for x in np.nonzero(~same))
                seq, tok = trace.layout.token(col)
                raise TracerError(
                    f"{trace.path} is damaged: the stored {pair} {metric} of {recomputed.taps[i]}, sequence "
                    f"{trace.sequences[seq].id}, token {tok} is {b[i, col]:.6g} but the tensors give {a[i, col]:.6g}; "
                    "no verdict is given from inconsistent data"
                )



def check_comparable(a: Trace, b: Trace) -> list[str]:
    """Raise :class:`TracerError` with the reason when two traces cannot be compared; return common paths."""
    ma, mb = a.meta, b.meta
    if ma["model"] != mb["model"] or ma.get("architecture") != mb.get("architecture"):
        raise TracerError(f"the traces are of different models: {ma['model']} vs {mb['model']}")
    fa, fb = ma["weights"]["fingerprint"], mb["weights"]["fingerprint"]
    if fa != fb:
        raise TracerError(
            f"the traces used different weights ({ma['weights']['source']} {fa} vs {mb['weights']['source']} {fb})"
        )
    sa = [(s.id, s.residues) for s in a.sequences]
    sb = [(s.id, s.residues) for s in b.sequences]
    if sa != sb:
        ia, ib = [s[0] for s in sa], [s[0] for s in sb]
        why = f"ids {ia} vs {ib}" if ia != ib else "the same ids hold different residues"
        raise TracerError(f"the traces are of different sequences: {why}")
    common = [p for p in a.paths if p in b.paths]
    if not common:
        raise TracerError(
            f"the traces share no path with tensors ({a.path.name}: {', '.join(a.paths) or 'metrics only'}; "
            f"{b.path.name}: {', '.join(b.paths) or 'metrics only'})"
        )
    for p in common:
        ta, tb = a.taps(p), b.taps(p)
        if ta != tb:
            only_a = sorted(set(ta) - set(tb))[:3]
            only_b = sorted(set(tb) - set(ta))[:3]
            raise TracerError(
                f"the traces recorded different taps for {p}: only in {a.path.name}: {only_a or 'none'}; "
                f"only in {b.path.name}: {only_b or 'none'}"
            )
    return common


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tap's raw bit patterns, ``(N, F)`` integers (NaN and -0.0 compare by their bits)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.reshape(t.shape[0], -1).view(ints[t.element_size()])


def compare_traces(a: Trace, b: Trace, max_rel_l2: float | None = None) -> dict:
    """First difference and first divergence of each common path between two traces.

    *Difference*: the first token whose stored values are not bit-identical. *Divergence*: the
    first token that is not bit-identical and whose relative L2 error exceeds the threshold, or
    that holds a NaN or Inf (NaN never passes; identical NaNs are not a difference).
    """
    paths = check_comparable(a, b)
    thr = max_rel_l2 if max_rel_l2 is not None else default_rule(a.meta["dtype"], False).max_rel_l2
    ids = [s.id for s in a.sequences]
    result = {"traces": [str(a.path), str(b.path)], "max_rel_l2": thr, "paths": {}}
    for p in paths:
        first_diff = first_div = None
        for name in a.taps(p):
            ta, tb = a.tap(p, name), b.tap(p, name)
            if ta.dtype != tb.dtype:
                raise TracerError(f"{p} {name} is {ta.dtype} in one trace and {tb.dtype} in the other")
            differs = (_bits(ta) != _bits(tb)).any(dim=1).numpy()
            if not differs.any():
                continue
            m = token_metrics(ta, tb)
            if first_diff is None:
                first_diff = _two_trace_point(name, int(np.argmax(differs)), m, 0.0, a, ids)
            over = ~(m["rel_l2"].numpy() <= thr) & differs
            if over.any():
                first_div = _two_trace_point(name, int(np.argmax(over)), m, thr, a, ids)
                break
        result["paths"][p] = {
            "identical": first_diff is None,
            "first_difference": first_diff.to_json() if first_diff else None,
            "first_divergence": first_div.to_json() if first_div else None,
        }
    return result


def _two_trace_point(name, col, m, thr, trace, ids) -> Point:
    layer, site = parse_tap(name)
    seq, tok = trace.layout.token(col)
    cd, rel, mx = (float(m[k][col]) for k in METRICS)
    return Point(name, layer, site, ids[seq], seq, tok, 1.0 - cd if np.isfinite(cd) else None,
                 rel if not np.isnan(rel) else None, mx if np.isfinite(mx) else None, thr, non_finite=bool(np.isnan(rel)))


def format_two(result: dict) -> str:
    lines = [f"comparing {result['traces'][0]} (A) with {result['traces'][1]} (B), threshold rel L2 {result['max_rel_l2']:g}"]
    for p, r in result["paths"].items():
        if r["identical"]:
            lines.append(f"{p:<10} bit-identical at every tap and token")
            continue
        d = r["first_difference"]
        lines.append(f"{p:<10} first difference at {_where(d)} ({_value(d)})")
        v = r["first_divergence"]
        lines.append(f"{'':<10} first divergence at {_where(v)} ({_value(v)})" if v else f"{'':<10} no divergence above the threshold")
    return "\n".join(lines)


def _value(d: dict) -> str:
    if d.get("non_finite"):
        return "a NaN or Inf value"
    return "rel L2 inf" if d["rel_l2"] is None else f"rel L2 {d['rel_l2']:.3g}"


def _where(d: dict) -> str:
    at = f"layer {d['layer']}, {d['tap']}" if d["layer"] is not None else d["tap"]
    return f"{at}, sequence {d['sequence']}, token {d['token']}"


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


def _verify(trace: Trace) -> None:
    n = trace.verify()
    print(f"tracer: {trace.path}: {n} checksums verified", file=sys.stderr)


@main_guard
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
            _verify(t)
        rule = rule_from_args(args, t.meta["dtype"], has_reference="reference_dtype" in t.meta and t.meta["reference_dtype"] is not None)
        summary = summarize(t, rule, recompute=not args.stored)
    print(json.dumps(summary.to_json(), indent=2) if args.json else summary.format_text(table=args.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
