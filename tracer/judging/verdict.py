"""Judging per-token metrics: the first-divergence rule, attribution, and their records.

Input is a :class:`MetricsTable` (per pair, per tap, per token metrics); output is a
:class:`Summary`. Two rules decide whether a token has diverged at a tap:

**noise** (default whenever a reference was traced). The noise level of tap ``s`` is::

    noise(s) = max( floor(s), median_t e_control(s, t) )

where ``e_control(s, t)`` is the relative L2 error, at token ``t``, of the *control path*
against the high-precision reference, and ``floor(s)`` is the median relative L2 error of the
reference itself rounded to the run dtype (the error of merely *storing* the exact values in
the run dtype). The control is tracer's own healthy low-precision forward (the built-in packed
forward with no faults, in the run dtype, fair-esm's numerics op for op, RoPE in float32 on the
reference's own frequencies, the run's attention kernel; :mod:`tracer.capture.control`); it runs
in lockstep with the paths under test, or *is* the packed path when that path is exactly this
configuration. So the bar is set by an independent healthy implementation, never by the paths
it judges: an error that both paths carry over every token cannot raise it. The median over
tokens makes the level independent of batch size and sequence length (a maximum grows with
both), so one ``K`` serves every run. A token *diverges* (packed vs unpacked) when
``rel_l2(packed, unpacked) > K * noise(s)``, and a path *drifts* when ``e_path(s, t) > K *
noise(s)``. This is the rule of FlashAttention's own test suite (the kernel's error against a
float32 reference may be at most 2x the error of a plain low-precision implementation),
applied per token against a median, with ``K`` calibrated on fault-free and shared-cause runs
(docs/control-path.md). A trace without the control's metrics (written before the control path
existed) cannot be judged by this rule.

**plain**: ``rel_l2(packed, unpacked) > max_rel_l2`` (per-dtype default, per-site overrides),
optionally also ``cos < min_cos``.

Walk order: taps in data-flow order (``embed``, layer 0 ``q_rope`` ... ``resid_out``, layer 1
..., ``final_norm``), then sequences in input order, then tokens. The *first divergence* is
the first diverging (tap, token) in that order.

Non-finite values: a token whose values hold a NaN or Inf (in either side of a pair) has NaN
metrics (:mod:`tracer.judging.metrics`), and NaN never passes: it is a divergence (packed vs
unpacked) or a drift (path vs reference) at its own tap and token, like any other. A tap that
one side did not record is *missing*, which is not the same thing: :attr:`MetricsTable.present`
marks the rows that were compared, and missing rows are never judged.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tracer.errors import TracerError
from tracer.judging.diagnosis import Judged, diagnose_all
from tracer.judging.records import Attribution, LocalLayer, Point, Summary, TapStats, _num, _order  # noqa: F401 (records re-exported)
from tracer.judging.rule import CONTROL, NOISE_FACTOR, PAIR, PLAIN_MAX_REL_L2, ROUNDED, VS_REF, Rule  # noqa: F401 (re-exported)
from tracer.taps import parse_tap



@dataclass
class MetricsTable:
    """Per-token metrics of one trace.

    Attributes:
        taps: tap names, walk order (rows of every array).
        pairs: ``{pair: {metric: (T, N) float array}}``; metrics ``cos_dist``, ``max_abs``, ``rel_l2``.
        local: same for the per-layer re-runs (``tracer.run --local``), or empty.
        present: ``{pair: (T,) bool}``, whether both sides of the pair recorded each tap (a
            pair not listed had every tap). Rows of missing taps are NaN but never judged: a
            missing tap is not a non-finite value.
    """

    taps: list[str]
    pairs: dict[str, dict[str, np.ndarray]]
    local: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    present: dict[str, np.ndarray] = field(default_factory=dict)

    def has(self, pair: str) -> bool:
        return pair in self.pairs

    def compared(self, pair: str) -> np.ndarray:
        """``(T,)`` bool: the taps both sides of ``pair`` recorded."""
        if pair in self.present:
            return np.asarray(self.present[pair], dtype=bool)
        return np.ones(len(self.taps), dtype=bool)


PARALLEL_MEDIAN_ELEMENTS = 1 << 20
"""Tables at least this large have their per-row medians taken in parallel blocks of rows
(NumPy's partition releases the GIL; the 3B production table, 290 taps x 25,498 tokens, took
80 ms per median in one thread); smaller ones in one call, where threads cost more than they save."""


def _median(rows: np.ndarray) -> np.ndarray:
    """Per-row median over the finite values (NaN for a row with none); identical whether the
    rows are taken in one call or in parallel blocks."""
    workers = min(8, os.cpu_count() or 1, len(rows))
    if rows.size < PARALLEL_MEDIAN_ELEMENTS or workers < 2:
        return _median_rows(rows)
    cuts = np.linspace(0, len(rows), 2 * workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(lambda i: _median_rows(rows[cuts[i]:cuts[i + 1]]), range(2 * workers))))


def _median_rows(rows: np.ndarray) -> np.ndarray:
    if not rows.size:
        return np.full(len(rows), np.nan)
    finite = np.isfinite(rows)
    if finite.all():
        return np.median(rows, axis=1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows with no finite value: NaN, on purpose
        return np.nanmedian(np.where(finite, rows, np.nan), axis=1)


def thresholds(table: MetricsTable, rule: Rule) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Per-tap relative-L2 bars ``(T,)``, and the noise level and floor they came from (noise rule).

    Noise rule: ``noise = max(floor, median_t e_control)`` (module docstring); a tap where the
    control has no finite token falls back to the floor. Raises :class:`TracerError` for a
    table without the control's metrics (a trace written before the control path).
    """
    floor = _median(table.pairs[ROUNDED]["rel_l2"]) if table.has(ROUNDED) else None
    if rule.kind == "noise":
        if not table.has(CONTROL):
            raise TracerError(
                "the noise rule needs the control path's metrics (control-vs-reference), which this trace lacks "
                "(written before tracer had a control path, or without a reference); use --rule plain, or re-run it"
            )
        healthy = _median(table.pairs[CONTROL]["rel_l2"])  # (T,) the control's typical error, float64
        # fmax skips NaN: a control with no finite token at a tap leaves the floor
        noise = np.nan_to_num(np.fmax(floor if floor is not None else np.nan, healthy), nan=0.0)
        return rule.noise_factor * noise, noise, floor
    sites = [parse_tap(n)[1] for n in table.taps]
    bars = np.array([rule.site_max_rel_l2.get(s, rule.max_rel_l2) for s in sites], dtype=np.float64)
    return bars, None, floor


def noise_ratios(table: MetricsTable, rule: Rule | None = None) -> dict[str, dict]:
    """For calibrating K: per pair, the largest ``rel_l2 / noise(tap)`` over taps and tokens, and where."""
    _, noise, _ = thresholds(table, rule or Rule())
    out = {}
    for pair in (PAIR, *VS_REF.values(), CONTROL):
        if table.has(pair):
            with np.errstate(all="ignore"):
                r = table.pairs[pair]["rel_l2"] / noise[:, None]
            r = np.where(np.isfinite(r), r, -1)
            i, j = np.unravel_index(int(np.argmax(r)), r.shape)
            out[pair] = {"max_ratio": _num(r[i, j]), "tap": table.taps[i], "row": int(j),
                         "p99_ratio": _num(np.percentile(r[r >= 0], 99)) if (r >= 0).any() else None}
    return out


def _exceeds(rel: np.ndarray, bars: np.ndarray, cos_dist: np.ndarray | None = None, min_cos: float | None = None) -> np.ndarray:
    bad = ~(rel <= bars[:, None])  # NaN never passes
    if min_cos is not None and cos_dist is not None:
        bad |= ~(1.0 - cos_dist >= min_cos)
    return bad


def _first(mask: np.ndarray) -> tuple[int, int] | None:
    if not mask.any():
        return None
    flat = int(np.argmax(mask.reshape(-1)))
    return divmod(flat, mask.shape[1])


def _point(table, pair, row, col, bars, noise, layout, ids, path=None) -> Point:
    metrics = table.pairs[pair]
    name = table.taps[row]
    layer, site = parse_tap(name)
    seq, tok = layout.token(col)
    cd, rel, mx = (float(metrics[k][row, col]) for k in ("cos_dist", "rel_l2", "max_abs"))
    return Point(
        name=name, layer=layer, tap=site, sequence=ids[seq], sequence_index=seq, token=tok,
        cos=1.0 - cd if np.isfinite(cd) else None,
        rel_l2=rel if not np.isnan(rel) else None,  # inf stays: finite values, |b| = 0
        max_abs=mx if np.isfinite(mx) else None,
        threshold=float(bars[row]),
        noise=float(noise[row]) if noise is not None else None,
        path=path,
        non_finite=bool(np.isnan(rel)),  # NaN metrics mean a NaN/Inf in the token's values
    )


def judge(table: MetricsTable, layout, ids: list[str], rule: Rule, context: dict, trace: str = "",
          pooled_cos: dict | None = None) -> Summary:
    """Apply ``rule`` to ``table``: first divergence, attribution, diagnosis, per-tap stats, local split.

    ``pooled_cos``: ``{path: {sequence id: cosine}}`` of each path's pooled final embedding against
    the reference (:func:`tracer.judging.embeddings.against_reference`), reported by the diagnosis."""
    bars, noise, floor = thresholds(table, rule)
    pair = table.pairs[PAIR]
    min_cos = rule.min_cos if rule.kind == "plain" else None
    diverged = _exceeds(pair["rel_l2"], bars, pair["cos_dist"], min_cos) & table.compared(PAIR)[:, None]
    hit = _first(diverged)
    first = _point(table, PAIR, *hit, bars, noise, layout, ids) if hit else None

    attribution = None
    drift_masks = {}
    if table.has(VS_REF["packed"]) and table.has(VS_REF["unpacked"]):
        points = {}
        for path, key in VS_REF.items():
            drift_masks[path] = _exceeds(table.pairs[key]["rel_l2"], bars) & table.compared(key)[:, None]
            h = _first(drift_masks[path])
            points[path] = _point(table, key, *h, bars, noise, layout, ids, path=path) if h else None
        found = [p for p in points.values() if p is not None]
        drifting = {0: "neither", 1: found[0].path if found else "neither", 2: "both"}[len(found)]
        earliest = min(found, key=_order) if found else None
        explained = at = None
        if hit is not None:
            row, col = hit
            by_then = [
                path for path, m in drift_masks.items()
                if m[:row].any() or m[row, : col + 1].any()
            ]
            explained = {0: "neither", 1: by_then[0] if by_then else "neither", 2: "both"}[len(by_then)]
            errs = {path: float(table.pairs[key]["rel_l2"][row, col]) for path, key in VS_REF.items()}
            off = [path for path in VS_REF if drift_masks[path][row, col]]
            at = {
                "packed_rel_l2": _num(errs["packed"]),
                "unpacked_rel_l2": _num(errs["unpacked"]),
                "threshold": _num(bars[row]),
                "off": {0: "neither", 1: off[0] if off else "neither", 2: "both"}[len(off)],
            }
        attribution = Attribution(drifting, earliest, points["packed"], points["unpacked"], explained,
                                  context.get("reference") or "reference", at)

    stats = _tap_stats(table, pair, diverged, bars, noise, floor, drift_masks, table.compared(PAIR))

    local = {}
    for lpair, metrics in table.local.items():
        rows = []
        layers = sorted({parse_tap(n)[0] for n in table.taps if parse_tap(n)[0] is not None})
        acc_key = lpair if lpair in table.pairs else None
        for layer in layers:
            idx = [i for i, n in enumerate(table.taps) if parse_tap(n)[0] == layer]
            loc = metrics["rel_l2"][idx]
            acc = table.pairs[acc_key]["rel_l2"][idx] if acc_key else np.full_like(loc, np.nan)
            born = bool(_exceeds(loc, bars[idx]).any())
            rows.append(LocalLayer(layer, _nanmax(loc), _nanmax(acc), born))
        local[lpair] = rows

    return Summary(
        trace=trace,
        context=context,
        rule=rule,
        verdict="diverged" if first else "agree",
        first_divergence=first,
        attribution=attribution,
        taps=stats,
        local=local,
        diagnosis=diagnose_all(Judged(table, layout, ids, bars, noise), first,
                               {"packed": attribution.packed, "unpacked": attribution.unpacked} if attribution else {}, pooled_cos),
    )


def _worst(rows: np.ndarray) -> np.ndarray:
    """Per-row max, NaN when any token is NaN (a NaN/Inf value is shown, never skipped)."""
    if not rows.shape[-1]:
        return np.full(len(rows), np.nan)
    return np.max(rows, axis=1)  # NumPy's max propagates NaN: one pass


def _tap_stats(table, pair, diverged, bars, noise, floor, drift_masks, compared) -> list[TapStats]:
    """Per-tap summaries, vectorised over the (taps, tokens) arrays."""
    max_rel, med_rel = _worst(pair["rel_l2"]), _median(pair["rel_l2"])
    min_cos = 1.0 - _worst(pair["cos_dist"])
    max_abs = _worst(pair["max_abs"])
    n_div = diverged.sum(axis=1)
    ref = {}
    for path, key in VS_REF.items():
        if drift_masks:
            rel = table.pairs[key]["rel_l2"]
            ref[path] = (_worst(rel), _median(rel), drift_masks[path].sum(axis=1))
    stats = []
    for i, name in enumerate(table.taps):
        layer, site = parse_tap(name)
        vs_ref = {p: {"max_rel_l2": _num(v[0][i]), "median_rel_l2": _num(v[1][i]), "drift_tokens": int(v[2][i])} for p, v in ref.items()} or None
        stats.append(TapStats(
            name=name, layer=layer, tap=site,
            min_cos=float(min_cos[i]), max_rel_l2=float(max_rel[i]), median_rel_l2=float(med_rel[i]),
            max_abs=float(max_abs[i]), diverged_tokens=int(n_div[i]), threshold=float(bars[i]),
            noise=float(noise[i]) if noise is not None else None,
            floor=float(floor[i]) if floor is not None else None,
            vs_reference=vs_ref,
            compared=bool(compared[i]),
        ))
    return stats


def _nanmax(a: np.ndarray) -> float:
    if not np.isfinite(a).all():
        return float("nan") if np.isnan(a).any() else float("inf")
    return float(a.max()) if a.size else float("nan")

