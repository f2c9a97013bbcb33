"""The verdict's records: points, per-tap statistics, attribution, the local split and the
:class:`Summary`, each printable and round-tripping through JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np

from tracer.judging.diagnosis import Diagnoses, _num
from tracer.judging.rule import Rule
from tracer.taps import EMBED, FINAL, parse_tap, walk_key


@dataclass(frozen=True)
class Point:
    """One (tap, sequence, token) with its metric values.

    Attributes:
        name: full tap name; ``layer``/``tap``: its layer (``None`` for embed/final_norm) and site.
        sequence/sequence_index/token: which token (0 = ``<cls>``, residues 1..L).
        cos, rel_l2, max_abs: metric values of the pair being judged at that token.
        threshold: the relative-L2 bar it was judged against; ``noise``: noise level (noise rule).
        path: for drift points, the path that drifted.
        non_finite: the token holds a NaN or Inf (metrics are then ``None``).
    """

    name: str
    layer: int | None
    tap: str
    sequence: str
    sequence_index: int
    token: int
    cos: float | None
    rel_l2: float | None
    max_abs: float | None
    threshold: float
    noise: float | None = None
    path: str | None = None
    non_finite: bool = False

    def where(self) -> str:
        at = f"layer {self.layer}, {self.tap}" if self.layer is not None else self.tap
        return f"{at}, sequence {self.sequence}, token {self.token}"

    def excess(self) -> str:
        """Why the point failed: ``rel L2 0.03 > 0.026``, or that it holds a NaN/Inf."""
        if self.non_finite:
            return "a NaN or Inf value"
        return f"rel L2 {_fmt(self.rel_l2)} > {self.threshold:.3g}"

    def to_json(self) -> dict:
        return {k: _num(v) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict | None) -> "Point | None":
        if d is None:
            return None
        d = dict(d)
        if d.get("threshold") is None:
            d["threshold"] = float("nan")
        return cls(**{k: d.get(k) for k in _fields(cls)})


@dataclass(frozen=True)
class TapStats:
    """Per-tap summary over all tokens: the pair's worst values, and each path's error vs the reference."""

    name: str
    layer: int | None
    tap: str
    min_cos: float
    max_rel_l2: float
    median_rel_l2: float
    max_abs: float
    diverged_tokens: int
    threshold: float
    noise: float | None
    floor: float | None
    vs_reference: dict | None
    compared: bool = True
    """Whether both paths recorded this tap (``False``: missing, its values are NaN)."""

    def to_json(self) -> dict:
        # field by field, not asdict(): a summary has a record per tap (290 on the 3B), and
        # asdict deep-copies each one (tens of ms a run); vs_reference holds plain numbers
        d = {k: getattr(self, k) for k in _TAPSTATS_JSON}
        d = {k: _num(v) if isinstance(v, float) else v for k, v in d.items()}
        if d["vs_reference"] is not None:
            d["vs_reference"] = {p: dict(v) for p, v in d["vs_reference"].items()}
        return d

    @classmethod
    def from_json(cls, name: str, d: dict) -> "TapStats":
        layer, tap = parse_tap(name)
        nan = float("nan")
        values = {k: (nan if d.get(k) is None and k not in ("noise", "floor", "vs_reference") else d.get(k)) for k in _fields(cls) if k not in ("name", "layer", "tap")}
        values["compared"] = d.get("compared", True)
        return cls(name=name, layer=layer, tap=tap, **values)


@dataclass(frozen=True)
class Attribution:
    """Which path moved away from the reference.

    Attributes:
        drifting: ``packed``, ``unpacked``, ``both`` or ``neither``.
        first: the earliest drift point of either path (``None`` if neither drifts).
        packed/unpacked: each path's first drift point.
        explained_by: which path(s) had drifted by the first packed-vs-unpacked divergence:
            ``packed``, ``unpacked``, ``both``, or ``neither`` (both within noise, but their
            errors add up); ``None`` when the paths agree.
        reference: reference dtype.
        at_divergence: at the first divergence's own tap and token, each path's relative L2
            error against the reference, the bar, and which path(s) are beyond it (``off``);
            ``None`` when the paths agree.
    """

    drifting: str
    first: Point | None
    packed: Point | None
    unpacked: Point | None
    explained_by: str | None
    reference: str
    at_divergence: dict | None = None

    def sentence(self) -> str:
        ref = f"the {self.reference} reference"
        if self.drifting == "neither":
            return f"both paths stay within noise of {ref}"
        if self.drifting == "both":
            a, b = sorted([self.packed, self.unpacked], key=_order)  # data-flow order, as `first`
            if _order(a) == _order(b):
                return f"both paths drift from {ref} first at the same point, {a.where()} ({a.excess()})"
            return f"both paths drift from {ref}: {a.path} first at {a.where()} ({a.excess()}), {b.path} at {b.where()}"
        p = self.first
        other = "packed" if p.path == "unpacked" else "unpacked"
        return f"{p.path} drifts from {ref} first at {p.where()} ({p.excess()}); {other} stays within noise"

    def to_json(self) -> dict:
        return {
            "drifting": self.drifting,
            "first": self.first.to_json() if self.first else None,
            "packed": self.packed.to_json() if self.packed else None,
            "unpacked": self.unpacked.to_json() if self.unpacked else None,
            "explained_by": self.explained_by,
            "reference": self.reference,
            "at_divergence": self.at_divergence,
            "sentence": self.sentence(),
        }

    @classmethod
    def from_json(cls, d: dict | None) -> "Attribution | None":
        if d is None:
            return None
        return cls(d["drifting"], Point.from_json(d["first"]), Point.from_json(d["packed"]), Point.from_json(d["unpacked"]),
                   d["explained_by"], d["reference"], d.get("at_divergence"))


@dataclass(frozen=True)
class LocalLayer:
    """Error born in one layer vs error it inherited, for one pair (``tracer.run --local``).

    ``local_*``: the layer re-run on the other side's input; ``accumulated_*``: the normal run.
    Values are the largest relative L2 error over the layer's taps and tokens.
    """

    layer: int
    local_max_rel_l2: float
    accumulated_max_rel_l2: float
    born_here: bool


@dataclass
class Summary:
    """The comparator's result for one trace (printable, JSON-able, stored in the trace)."""

    trace: str
    context: dict
    rule: Rule
    verdict: str
    first_divergence: Point | None
    attribution: Attribution | None
    taps: list[TapStats]
    local: dict[str, list[LocalLayer]]
    diagnosis: Diagnoses = field(default_factory=Diagnoses)
    """Why: the shape, cause and consequence of the divergence and of each drift (:mod:`tracer.judging.diagnosis`)."""

    @property
    def diverged(self) -> bool:
        return self.first_divergence is not None

    def worst_layers(self, n: int = 3) -> list[tuple[int, float]]:
        """The ``n`` layers with the largest packed-vs-unpacked relative L2 error; a layer with a
        NaN/Inf token counts as worst of all (its value is NaN). Missing taps are left out."""
        per_layer: dict[int, float] = {}
        for s in self.taps:
            if s.layer is not None and s.compared:
                v = per_layer.get(s.layer, 0.0)
                per_layer[s.layer] = np.nan if np.isnan(v) or np.isnan(s.max_rel_l2) else max(v, s.max_rel_l2)
        return sorted(per_layer.items(), key=lambda kv: (not np.isnan(kv[1]), -kv[1] if not np.isnan(kv[1]) else 0.0))[:n]

    def to_json(self) -> dict:
        layers: dict[int, dict] = {}
        extra = {}
        for s in self.taps:
            if s.layer is None:
                extra[s.tap] = s.to_json()
            else:
                layers.setdefault(s.layer, {})[s.tap] = s.to_json()
        return {
            "trace": self.trace,
            **self.context,
            "rule": {**asdict(self.rule), "description": self.rule.describe()},
            "verdict": self.verdict,
            "first_divergence": self.first_divergence.to_json() if self.first_divergence else None,
            "attribution": self.attribution.to_json() if self.attribution else None,
            "diagnosis": self.diagnosis.to_json(),
            "worst_layers": [{"layer": i, "max_rel_l2": _num(v)} for i, v in self.worst_layers()],
            "layers": [{"layer": i, "taps": layers[i]} for i in sorted(layers)],
            EMBED: extra.get(EMBED),
            FINAL: extra.get(FINAL),
            "local": {
                pair: [{k: _num(v) if isinstance(v, float) else v for k, v in asdict(x).items()} for x in rows]
                for pair, rows in self.local.items()
            }
            or None,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Summary":
        """The inverse of :meth:`to_json` (floats as stored: 6 significant digits). A record without
        a verdict, or with one other than ``agree``/``diverged``, is refused (never read as agreement)."""
        if d.get("verdict") not in ("agree", "diverged"):
            raise ValueError(f"summary has no valid verdict ({d.get('verdict')!r})")
        rule = {k: v for k, v in d["rule"].items() if k != "description"}
        taps = []
        for name in (EMBED,):
            if d.get(name) is not None:
                taps.append(TapStats.from_json(name, d[name]))
        for layer in d.get("layers") or []:
            taps += [TapStats.from_json(f"layers.{layer['layer']}.{tap}", v) for tap, v in layer["taps"].items()]
        if d.get(FINAL) is not None:
            taps.append(TapStats.from_json(FINAL, d[FINAL]))
        local = {pair: [LocalLayer(**{k: (float("nan") if v is None else v) for k, v in row.items()}) for row in rows]
                 for pair, rows in (d.get("local") or {}).items()}
        return cls(
            trace=d.get("trace", ""),
            context={k: v for k, v in d.items() if k not in _SUMMARY_KEYS},
            rule=Rule(**rule),
            verdict=d["verdict"],
            first_divergence=Point.from_json(d.get("first_divergence")),
            attribution=Attribution.from_json(d.get("attribution")),
            taps=taps,
            local=local,
            diagnosis=Diagnoses.from_json(d.get("diagnosis")),
        )

    def format_text(self, table: bool = False) -> str:
        c = self.context
        lines = [
            f"model     {c.get('model')} ({c.get('weights')}), {c.get('dtype')} on {c.get('device')}, "
            f"attention {c.get('backend')}, packed RoPE {c.get('packed_rope')}",
            f"batch     {c.get('batch')}",
            *([f"paths     packed: {c.get('packed_path', 'builtin')}; unpacked: {c.get('unpacked_path', 'fair-esm ESM2.forward')}"]
              if c.get("packed_path") or c.get("unpacked_path") else []),
            f"rule      {self.rule.describe()}" + (f"; reference {c['reference']}" if c.get("reference") else "; no reference"),
        ]
        if c.get("control") and self.rule.kind == "noise":
            lines.append(f"control   {c['control']}")
        if c.get("faults") and c["faults"] != "none":
            lines.append(f"faults    PLANTED: {c['faults']}")
        fd = self.first_divergence
        if fd is None:
            lines.append("verdict   no divergence: packed and unpacked agree at every traced tap and token")
        else:
            noise = f" = {self.rule.noise_factor:g} x noise {fd.noise:.3g}" if fd.noise is not None else ""
            lines.append(f"verdict   FIRST DIVERGENCE at {fd.where()}")
            if fd.non_finite:
                lines.append(f"          packed vs unpacked: a NaN or Inf value at this token (never passes); threshold {fd.threshold:.3g}{noise}")
            else:
                lines.append(
                    f"          packed vs unpacked: cos {_fmt_cos(fd.cos)}, rel L2 {_fmt(fd.rel_l2)}, "
                    f"max |diff| {_fmt(fd.max_abs)}; threshold {fd.threshold:.3g}{noise}"
                )
        if self.attribution is not None:
            lines.append(f"attribution {self.attribution.sentence()}")
            at = self.attribution.at_divergence
            if at and fd is not None:
                lines.append(
                    f"          at the divergence: packed is {_fmt(at['packed_rel_l2'])} and unpacked {_fmt(at['unpacked_rel_l2'])} "
                    f"from the reference (bar {_fmt(at['threshold'])}): off = {at['off']}; "
                    f"drifted by then: {self.attribution.explained_by}"
                )
        else:
            lines.append("attribution none (no reference traced; run with --reference fp32)")
        for d in self.diagnosis:
            what, fate = d.lines()
            lines += [f"diagnosis {what}", f"          {fate}"]
        worst = ", ".join(f"layer {i} {_fmt(v)}" for i, v in self.worst_layers())
        if worst:
            lines.append(f"worst     layers by packed-vs-unpacked max rel L2: {worst}")
        for pair, rows in self.local.items():
            born = [r.layer for r in rows if r.born_here]
            lines.append(f"local     {pair}: error born in layer(s) {born or 'none'} (re-run on the other side's input)")
        for note in c.get("notes") or []:
            lines.append(f"note      {note}")
        if table:
            lines.append(self.format_table())
        return "\n".join(lines)

    def format_table(self) -> str:
        head = f"{'tap':<22} {'min cos':>10} {'max relL2':>10} {'med relL2':>10} {'thresh':>9} {'diverged':>8}"
        if any(s.vs_reference for s in self.taps):
            head += f" {'U-ref max':>10} {'P-ref max':>10}"
        rows = [head]
        for s in self.taps:
            if not s.compared:
                rows.append(f"{s.name:<22} {'missing (not recorded by both paths)':>50}")
                continue
            row = (
                f"{s.name:<22} {_fmt_cos(s.min_cos):>10} {_fmt(s.max_rel_l2):>10} {_fmt(s.median_rel_l2):>10} "
                f"{s.threshold:>9.3g} {s.diverged_tokens:>8}"
            )
            if s.vs_reference:
                row += f" {_fmt(s.vs_reference['unpacked']['max_rel_l2']):>10} {_fmt(s.vs_reference['packed']['max_rel_l2']):>10}"
            rows.append(row)
        return "\n".join(rows)


_SUMMARY_KEYS = frozenset({"trace", "rule", "verdict", "first_divergence", "attribution", "diagnosis", "worst_layers", "layers", EMBED, FINAL, "local"})
"""Keys of :meth:`Summary.to_json` that are not the run context."""


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


_TAPSTATS_JSON = tuple(f for f in _fields(TapStats) if f not in ("name", "layer", "tap"))
"""The fields of :meth:`TapStats.to_json` (the name is the key it is stored under)."""



def _fmt(x) -> str:
    if x is None or np.isnan(x):
        return "nan"
    return f"{x:.3g}"  # inf prints as inf


def _fmt_cos(x) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.6f}"


def _order(p: Point):
    """Walk order of a point: tap in data-flow order, then sequence, then token."""
    return (walk_key(p.name), p.sequence_index, p.token)
