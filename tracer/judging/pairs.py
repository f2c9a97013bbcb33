"""What a run and the read-only tools share about presenting a verdict: the compared pairs,
the default rule, and the run facts a summary prints.

Kept apart from the run orchestration (:mod:`tracer.runner.execute`) so that ``compare``, ``plot``
and ``bundle`` read traces without importing fair-esm or model loading.
"""

from __future__ import annotations

from tracer.judging.verdict import CONTROL, PAIR, PLAIN_MAX_REL_L2, VS_REF, Rule

PAIRS = {
    PAIR: ("packed", "unpacked"),
    VS_REF["unpacked"]: ("unpacked", "reference"),
    VS_REF["packed"]: ("packed", "reference"),
    CONTROL: ("control", "reference"),
}
"""The compared pairs, ``(a, b)``: metrics of ``a`` against the baseline ``b``. Besides these,
:data:`tracer.judging.verdict.ROUNDED` compares the reference rounded to the run dtype with itself
(the floor). When the packed path under test is the control's configuration, no separate
``control`` path runs and :data:`tracer.judging.verdict.CONTROL` is ``packed`` against ``reference``
(:func:`control_pairs`)."""


def control_pairs(meta: dict) -> dict:
    """``{pair: (a, b)}`` over the paths a trace holds, given its meta: :data:`PAIRS`, with the
    control pair read from ``packed`` when the packed path served as the control."""
    pairs = dict(PAIRS)
    if (meta.get("control") or {}).get("reused"):
        pairs[CONTROL] = ("packed", "reference")
    return pairs


def default_rule(dtype: str, has_reference: bool) -> Rule:
    """The noise rule when a reference was traced, the plain per-dtype threshold otherwise."""
    if has_reference:
        return Rule(kind="noise", max_rel_l2=PLAIN_MAX_REL_L2[dtype])
    return Rule(kind="plain", max_rel_l2=PLAIN_MAX_REL_L2[dtype])


def batch_description(sequences, pack_order: str) -> str:
    """``tiny (3), small (8), ... residues; packed in given order`` (anything with ``.id``, ``.length``)."""
    shown = ", ".join(f"{s.id} ({s.length})" for s in sequences[:6])
    more = f", ... {len(sequences)} sequences" if len(sequences) > 6 else ""
    return f"{shown}{more} residues; packed in {pack_order} order"


def summary_context(meta: dict, batch: str) -> dict:
    """The run facts a summary prints (no timestamps: summaries diff cleanly)."""
    w = meta["weights"]
    weights = f"random init, seed {w['seed']}" if w["source"] == "random" else f"{w['source']} {w['path']}"
    paths = meta.get("paths", {})
    packed = paths.get("packed", {}).get("label")
    unpacked = paths.get("unpacked", {}).get("label")
    context = {
        "model": meta["model"],
        "weights": weights,
        "dtype": meta["dtype"],
        "reference": meta["reference_dtype"],
        "device": f"{meta['environment']['device']} ({meta['environment']['device_name']})",
        "backend": meta["attention"]["backend"],
        "packed_rope": meta["packed_rope"],
        "batch": batch,
        "faults": meta.get("faults_description", "none"),
    }
    if meta.get("control"):
        context["control"] = control_label(meta["control"])
    if packed and not packed.startswith("builtin"):
        context["packed_path"] = packed
    if unpacked and unpacked != "fair-esm ESM2.forward":
        context["unpacked_path"] = unpacked
    return context


def control_label(control: dict) -> str:
    """What set the noise level, for reports: ``<what> (attention math); the packed path under test``
    (or ``; a separate lockstep stream``)."""
    how = "the packed path under test" if control.get("reused") else "a separate lockstep stream"
    return f"{control.get('what', 'control')} (attention {control.get('backend')}); {how}"
