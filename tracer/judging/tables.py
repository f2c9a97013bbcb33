"""Metrics tables of a trace file: the ones the run stored, and ones recomputed from the stored
tensors (streaming, one tap of each path in memory at a time), cross-checked against each other;
and :func:`summarize`, which judges a trace from the file alone.

Example::

    with open_trace("traces/run.h5") as t:
        print(summarize(t).format_text())
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import torch

from tracer.env import resolve_dtype, return_freed_memory
from tracer.errors import TracerError
from tracer.judging.embeddings import stored_against_reference
from tracer.judging.metrics import METRICS, metrics_table, norms, token_metrics, work_dtype
from tracer.judging.consistency import stored_rule, summary_disagreement
from tracer.store.binding import bound_checksum
from tracer.store.trace_file import Trace, checksum_failure, from_numpy
from tracer.judging.pairs import batch_description, control_pairs, default_rule, summary_context
from tracer.judging.verdict import CONTROL, PAIR, ROUNDED, MetricsTable, Rule, Summary, judge


def stored_table(trace: Trace) -> MetricsTable:
    """The metrics the run stored (``/metrics``, ``/local``)."""
    if not trace.has("metrics"):
        raise TracerError(f"{trace.path} has no stored metrics")

    def read(group: str) -> tuple[list[str], dict, dict]:
        g = trace.file[group]
        taps = [t.decode() if isinstance(t, bytes) else t for t in trace.read_small(f"{group}/taps")]
        pairs = {p: {m: trace.read_small(f"{group}/{p}/{m}") for m in METRICS} for p in g if p != "taps"}
        present = {p: trace.read_small(f"{group}/{p}/present").astype(bool) for p in g if p != "taps" and "present" in g[p]}
        for p, by_metric in pairs.items():
            for m, values in by_metric.items():
                if values.shape != (len(taps), trace.n_tokens):
                    raise TracerError(f"{trace.path} is damaged: {group}/{p}/{m} has shape {values.shape}, expected {(len(taps), trace.n_tokens)}")
        return taps, pairs, present

    taps, pairs, present = read("metrics")
    local = read("local")[1] if trace.has("local") else {}
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
    crc32: int
    seed: int
    path: str


def _layout(trace: Trace, path: str, name: str) -> _Stored:
    ds = trace.file[f"taps/{path}/{name}"]
    dtype = trace.checked_dtype(ds)
    offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
    if offset is not None and offset + ds.dtype.itemsize * int(np.prod(ds.shape)) > os.path.getsize(trace.path):
        raise TracerError(f"{trace.path} is truncated or damaged (tap {ds.name} lies beyond the end of the file)")
    crc = ds.attrs.get("crc32")
    if crc is None:
        raise TracerError(f"{trace.path} is damaged: {ds.name} has no checksum")
    return _Stored(ds.name, ds.shape, ds.dtype, dtype, offset, int(crc) & 0xFFFFFFFF, trace.seed(ds.name), str(trace.path))


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
        if bound_checksum(raw, st.seed) != st.crc32:
            raise TracerError(checksum_failure(st.path, st.key))
        return from_numpy(raw, st.dtype).reshape(st.shape[0], -1)


def _tap_metrics(reader: _Reader, stored: dict[str, _Stored], pairs: dict, run_dtype, w: _Worker) -> dict[str, np.ndarray]:
    """Every pair's ``(3, N)`` metrics of one tap (all paths read, up-cast exactly, compared)."""
    up = {}
    for p, st in stored.items():
        raw = reader.read(st, w, p)
        work = work_dtype(raw.dtype)
        up[p] = raw if raw.dtype == work else w.tensor(("up", p), raw.shape, work).copy_(raw)
        if p == "reference":  # the reference rounded to the run dtype, and back
            low = w.tensor("low", raw.shape, run_dtype).copy_(raw)
            up["rounded"] = w.tensor("rounded", raw.shape, work).copy_(low)
    size = {p: norms(t) for p, t in up.items()}
    out = {}
    for pair, (a, b) in pairs.items():
        x = up[a]
        m = token_metrics(x, up[b], size[a], size[b], w.tensor("d", x.shape, x.dtype))
        out[pair] = np.stack([m[k].float().numpy() for k in METRICS])
    return out


def comparator_workers() -> int:
    """Threads of the streaming comparator: one tap each, single-threaded ops (coarse-grained
    parallelism beats intra-op threads on these few-MB tensors). ``TRACER_COMPARE_WORKERS``
    overrides; memory grows by about one tap of every path per worker."""
    env = os.environ.get("TRACER_COMPARE_WORKERS")
    return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


def recomputed_table(trace: Trace, workers: int | None = None, local: dict | None = None) -> MetricsTable:
    """Per-token metrics recomputed from the stored tensors, a few taps at a time.

    ``workers`` threads each take one tap at a time (read, up-cast, compare) into their own
    reused buffers, so peak memory is about ``workers`` taps of every path, whatever the
    number of layers. ``local``: the stored ``--local`` table when the caller has read it
    (it is not recomputed; else it is read here).
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
    pairs = {k: v for k, v in control_pairs(trace.meta).items() if set(v) <= set(paths)}
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
    if local is None:
        local = stored_table(trace).local if trace.has("local") else {}
    return MetricsTable(list(names), table, local)


def recomputes(trace: Trace, recompute: bool = True) -> bool:
    """Whether :func:`summarize` recomputes the metrics from (and so reads and checks) every tap tensor."""
    return recompute and trace.meta.get("tensors", "full") == "full" and {"unpacked", "packed"} <= set(trace.paths)


@dataclass(frozen=True)
class Verified:
    """What :func:`verify` checked, for the readers that go on to use it.

    Attributes:
        stored: the stored metric table (checked against its checksums, and against the
            tensors when the trace has them).
        table: the table to judge: recomputed from the tensors when the trace has them, else
            ``stored``.
        pooled: the pooled embeddings against the reference, each checked.
        summary: the stored summary as the stored metrics give it, and the rule it was made with.
    """

    stored: MetricsTable
    table: MetricsTable
    pooled: dict
    summary: Summary
    rule: Rule


def verify(trace: Trace, recompute: bool = True) -> Verified:
    """Every check a report makes before reading a trace: the checksums, the stored metrics
    against the tensors (when it has them and ``recompute``), and the stored summary against the
    stored metrics (:func:`check_summary`). Raises :class:`TracerError` (one line) when any fails."""
    stored = stored_table(trace)
    table = stored
    if recomputes(trace, recompute):  # tensors -> stored metrics -> stored summary, each checked
        table = recomputed_table(trace, local=stored.local)
        cross_check(trace, table, stored)
    pooled = stored_against_reference(trace)  # read and checked once, for both judgements
    checked, checked_rule = check_summary(trace, stored, pooled)
    return Verified(stored, table, pooled, checked, checked_rule)


def summarize(trace: Trace, rule: Rule | None = None, recompute: bool = True) -> Summary:
    """Judge one trace (recomputing metrics from tensors when it has them), after :func:`verify`;
    the judgement reads every stored pooled embedding, each checked against its checksum.

    Every reader that reports from a trace (``compare``, ``plot``, ``bundle``, the campaigns'
    resume) verifies through :func:`verify`, so each is as strict as ``tracer.compare``.
    """
    v = verify(trace, recompute)
    has_ref = v.table.has("packed-vs-reference")
    rule = rule or default_rule(trace.meta["dtype"], has_ref)
    if rule.kind == "noise" and not has_ref:
        raise TracerError(f"{trace.path} has no reference path, so the noise rule cannot apply; use --rule plain")
    if rule.kind == "noise" and not v.table.has(CONTROL):
        raise TracerError(
            f"{trace.path} has no control-path metrics (written before tracer's control path set the noise level), "
            "so the noise rule cannot judge it; use --rule plain, or re-run the trace"
        )
    if v.table is v.stored and rule == v.rule:  # the very judgement check_summary made
        return v.summary
    return _judge(trace, v.table, rule, v.pooled)


def _judge(trace: Trace, table: MetricsTable, rule: Rule, pooled: dict) -> Summary:
    batch = batch_description(trace.sequences, trace.meta.get("pack_order", "given"))
    ids = [s.id for s in trace.sequences]
    return judge(table, trace.layout, ids, rule, summary_context(trace.meta, batch), trace=str(trace.path), pooled_cos=pooled)


def check_summary(trace: Trace, stored: MetricsTable, pooled: dict | None = None) -> tuple[Summary, Rule]:
    """Raise :class:`TracerError` unless the stored summary is what the stored metrics give
    under the stored rule (:mod:`tracer.judging.consistency`); returns that judgement and rule.
    ``pooled``: :func:`stored_against_reference` of the trace, when the caller has it."""
    summary = trace.summary
    if summary is None:
        raise TracerError(f"{trace.path} has no stored summary; no verdict is given from an incomplete trace")
    rule = stored_rule(summary, trace.path)
    judged = _judge(trace, stored, rule, stored_against_reference(trace) if pooled is None else pooled)
    problem = summary_disagreement(summary, judged)
    if problem:
        raise TracerError(f"{trace.path} is damaged: {problem}; no verdict is given from inconsistent data")
    return judged, rule


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



