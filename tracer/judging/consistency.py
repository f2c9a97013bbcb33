"""A trace's stored summary must be what its stored metrics give.

A run judges its metrics table and stores both; judging is a pure function of the table and the
rule, so re-judging the stored (float32) metrics with the stored rule reproduces the stored
summary exactly. :func:`summary_disagreement` compares the two on everything a verdict is made
of (verdict, first divergence, attribution, the per-layer and per-tap statistics, the local
split); the readers (``tracer.compare``, ``plot``, ``bundle``, the campaigns' resume) refuse a
trace where they differ, so an edited or transplanted summary is never reported.

Example::

    rule = stored_rule(trace.summary, trace.path)
    problem = summary_disagreement(trace.summary, judge(stored_table(trace), ..., rule, ...))
"""

from __future__ import annotations

import json

from tracer.errors import TracerError
from tracer.judging.verdict import Rule, Summary

COMPARED = ("verdict", "first_divergence", "attribution", "rule", "worst_layers", "layers", "embed", "final_norm", "local")
"""The summary keys that must match (not ``trace``, the file's path, nor the run facts)."""


def stored_rule(summary: dict, path) -> Rule:
    """The :class:`Rule` a stored summary was judged by (strict: a missing field is damage)."""
    try:
        r = summary["rule"]
        return Rule(kind=r["kind"], noise_factor=float(r["noise_factor"]), max_rel_l2=float(r["max_rel_l2"]),
                    site_max_rel_l2=dict(r["site_max_rel_l2"]), min_cos=None if r["min_cos"] is None else float(r["min_cos"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise TracerError(f"{path} is damaged: its stored summary has no readable rule") from None


def _where(summary: dict) -> str:
    point = summary.get("first_divergence")
    if not point:
        return f"verdict {summary.get('verdict')}, no first divergence"
    try:
        at = f"layer {point['layer']}, {point['tap']}" if point.get("layer") is not None else point["tap"]
        return f"verdict {summary.get('verdict')}, first divergence at {at}, sequence {point['sequence']}, token {point['token']}"
    except (KeyError, TypeError, AttributeError):
        return f"verdict {summary.get('verdict')}, an unreadable first divergence"


def summary_disagreement(stored: dict, judged: Summary) -> str | None:
    """Where a stored summary differs from the summary judged from the stored metrics with the
    stored rule (one clause), or ``None`` when they agree on every key of :data:`COMPARED`."""
    if not isinstance(stored, dict):
        return "its stored summary is not a summary record"
    fresh = json.loads(json.dumps(judged.to_json()))  # the stored form (tuples -> lists, NaN -> null)
    for key in COMPARED:
        if stored.get(key) != fresh.get(key):
            if key in ("verdict", "first_divergence") or _where(stored) != _where(fresh):
                return f"its stored summary says {_where(stored)}, but its stored metrics give {_where(fresh)}"
            return f"its stored summary's {key.replace('_', ' ')} disagrees with what its stored metrics give"
    return None
