"""Targets, marks and the printed forms of a benchmark: text for the terminal, Markdown for the
docs' speed table (always generated from the JSON that ``python -m tracer.bench --json FILE``
writes: ``python -m tracer.bench --markdown FILE``).

A :class:`Check` is one measured ratio (or time) against its target, marked ``ok`` or
``MISSED``. A ratio of work that *includes* the bare forwards to those forwards cannot be below
1; if timing noise makes it so, the check is marked ``noise`` and prints no ratio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GB = 1e9
MB = 1e6

TARGETS = {
    "metrics_only_over_bare": ("<=", {"cuda": 1.3, "cpu": 1.5}),
    "traced_over_bare_plus_raw_write": ("<=", 1.2),
    "write_throughput_over_raw": (">=", 0.7),
    "comparator_gb_s": (">=", 1.0),
    "comparator_rss_growth_over_one_layer": ("<=", 3.0),
    "held_taps_over_one_layer": ("<=", 4.0),
    "peak_above_weights_over_layer_plus_workspace": ("<=", 4.0),
    "estimate_over_measured_held": ("in", (0.8, 1.2)),
    "estimate_over_measured_peak": ("in", (0.8, 1.2)),
    "production_metrics_only_over_bare": ("<=", {"cuda": 1.3, "cpu": 1.5}),
    "cached_time_to_verdict_seconds": ("<=", {"cuda": 10.0}),
    "first_run_over_cached_plus_build": ("<=", 1.5),
    "load_over_limit": ("<=", {"cuda": 1.5}),  # on a CPU "to device" is a dtype conversion, not staging
}
"""Target of each check: (comparison, bound); a bound per device type applies to that type only."""

AT_LEAST_ONE = {"metrics_only_over_bare", "traced_over_bare_plus_raw_write", "production_metrics_only_over_bare",
                "first_run_over_cached_plus_build"}
"""Ratios of work that includes their denominator's work: below 1 only by timing noise."""


@dataclass
class Check:
    """One measure against its target.

    Attributes:
        key: name in :data:`TARGETS`.
        label: what was measured, in words.
        value: the ratio (or seconds) compared with the target.
        detail: the figures it is made of, in words (``1.048 s / 0.284 s``).
        target: the target in words (``<= 1.3``), or ``""`` where none applies on this device.
        mark: ``ok``, ``MISSED``, ``noise`` (a ratio below 1 that cannot be) or ``""`` (no target).
    """

    key: str
    label: str
    value: float
    detail: str
    target: str = ""
    mark: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Check":
        return cls(**d)


def check(key: str, label: str, value: float, detail: str, device_type: str) -> Check:
    """:class:`Check` of ``value`` against :data:`TARGETS` ``[key]`` on ``device_type``."""
    op, bound = TARGETS[key]
    if isinstance(bound, dict):
        bound = bound.get(device_type)
    if bound is None:
        return Check(key, label, value, detail)
    if key in AT_LEAST_ONE and value < 1.0:
        return Check(key, label, value, detail, _words(op, bound), "noise")
    if op == "in":
        lo, hi = bound
        good = lo <= value <= hi
    else:
        good = value <= bound if op == "<=" else value >= bound
    return Check(key, label, value, detail, _words(op, bound), "ok" if good else "MISSED")


def _words(op: str, bound) -> str:
    return f"{bound[0]:g}-{bound[1]:g}" if op == "in" else f"{op} {bound:g}"


def _value(c: Check) -> str:
    if c.mark == "noise":
        return "below 1: timing noise"
    return f"{c.value:.2f}"


def format_checks(checks: list[dict]) -> list[str]:
    """Text lines, one per check: label, figures, ratio, target and mark."""
    lines = []
    for d in checks:
        c = Check.from_json(d)
        target = f" [{c.target}] {c.mark}" if c.target else ""
        lines.append(f"  {c.label:<52} {c.detail:<44} = {_value(c)}{target}")
    return lines


def format_text(r: dict) -> str:
    """The whole report as text (the JSON's ``debug`` and ``production`` parts)."""
    lines = [f"tracer bench {r.get('date', '')} on {r.get('machine', {}).get('device', '?')} "
             f"(load average {r.get('machine', {}).get('load_average', '?')})"]
    d = r.get("debug")
    if d:
        lines += [
            f"debug batch: {d['model']} ({d['layers']} layers), {d['dtype']} + {d['reference']} reference, attention {d['backend']}, "
            f"{d['tokens']} tokens, {d['taps']} taps; medians of {d['repeats']} interleaved repeats, each side in a fresh thread",
            "  bare forwards (s): " + ", ".join(f"{p} {s:.3f}" for p, s in d["bare_seconds"].items()) + f"; total {d['bare_total_seconds']:.3f}",
            f"  traced: full {d['traced_seconds']:.3f} s, --metrics-only {d['metrics_only_seconds']:.3f} s; raw write of "
            f"{d['bytes_written'] / GB:.2f} GB {d['raw_write_seconds']:.3f} s",
            *format_checks(d["checks"]),
            f"  comparator peak RSS {d['comparator_peak_rss'] / MB:.0f} MB (after imports {d['comparator_baseline_rss'] / MB:.0f} MB, "
            f"one layer {d['one_layer_bytes'] / MB:.1f} MB)",
            "  compression of a sample of this trace's tensors: " + "; ".join(
                f"{c['compression']} {c['size_ratio']:.3f} x at {c['write_gb_s']:.2f} GB/s" for c in d["compression"]),
        ]
        if d.get("calibration"):
            from tracer.campaigns.calibration import format_calibration

            lines += ["  " + line for line in format_calibration(d["calibration"])]
    p = r.get("production")
    if p:
        lines.append("production batch and time to verdict:")
        if "error" in (p.get("batch") or {}):
            lines.append(f"  production batch failed: {p['batch']['error']}")
        lines += format_checks(p["checks"])
    return "\n".join(lines)


def format_markdown(r: dict) -> str:
    """The docs' speed table: one row per check, with the run's model, machine and date."""
    out = []
    for part, title in (("debug", "debug batch"), ("production", "production batch and time to verdict")):
        d = r.get(part)
        if not d:
            continue
        what = r.get("debug") or d
        out += [
            f"**{title}**: `{r.get('command', 'python -m tracer.bench')}` on {r['machine']['device']}, {r.get('date', '')} "
            f"({what.get('model', '')}, {what.get('dtype', '')}; medians of interleaved repeats, every side in a fresh thread)",
            "",
            "| measure | figures | ratio | target | |",
            "|---|---|---|---|---|",
        ]
        out += [f"| {c['label']} | {c['detail']} | {_value(Check.from_json(c))} | {c['target']} | {c['mark']} |" for c in d["checks"]]
        out.append("")
    return "\n".join(out)
