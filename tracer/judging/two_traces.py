"""Two traces of the same run set-up (before/after a fix, or the same command twice): refused
unless model, weights, sequences and taps match; otherwise, for every path in both, the first
token that is not bit-identical and the first that differs by more than the plain threshold.
"""

from __future__ import annotations


import numpy as np

import torch

from tracer.errors import TracerError
from tracer.judging.metrics import METRICS, token_metrics
from tracer.store.trace_file import Trace
from tracer.judging.pairs import default_rule
from tracer.judging.verdict import Point
from tracer.taps import parse_tap


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
    return Point.from_json(d).where()


