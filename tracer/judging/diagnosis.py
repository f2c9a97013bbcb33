"""Why two forwards part: the shape of the error at a divergence, and whether it matters.

The verdict (:mod:`tracer.judging.verdict`) says *where*: the first packed-vs-unpacked
divergence and each path's first drift from the reference. This module says *what shape* the
error has there, from the per-token errors of that pair at that tap, and *whether it matters*:
whether it is still above the noise level at the same layer's attention output and at the final
representation, and what it does to the pooled embeddings users compare.

Input: a :class:`MetricsTable`, the token layout (``lengths``, pack ``order``; anything with
those two attributes, such as :class:`tracer.inputs.packing.Layout`), the bars and noise levels
of :func:`verdict.thresholds`, the points of the verdict, and the per-sequence pooled-embedding
cosines of each path against the reference. Output: one :class:`Diagnosis` per point, in a
:class:`Diagnoses` record. Pure numpy; every number is float64.

The vocabulary (``docs/diagnosis.md`` states the rules, thresholds and margins):

* ``non-finite`` -- the tap holds a NaN or Inf.
* ``step-at-position`` -- a jump at the first integer a 16-bit dtype cannot hold (bfloat16 257,
  float16 2049), in sequences long enough to reach it.
* ``isolated`` -- a few tokens.
* ``sequence-offset`` -- each sequence at its own level, the first sequence of the pack clean:
  something carried from one sequence to the next in the packed stream.
* ``sequence-boundary`` -- confined to the first/last tokens of sequences (``edges``), or each
  sequence at its own level, highest in the sequences with the largest share of foreign
  neighbours in the pack, the shortest (``neighbours``).
* ``grows-with-position`` -- rises with the position inside each sequence.
* ``uniform`` -- the same relative error at (almost) every token.
* ``widespread`` -- most tokens, at varying levels, with none of the structures above.
* ``unclassified`` -- none of the above fits; the evidence is still reported.

Example::

    bars, noise, _ = thresholds(table, rule)
    d = diagnose(Judged(table, layout, ids, bars, noise), VS_REF["unpacked"], summary.attribution.unpacked, "unpacked")
    d.pattern, d.evidence["step_position"], d.cause    # 'step-at-position', 257, 'positions or ...'
    summary.diagnosis                                   # the same, for the divergence and each drift (judge)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from tracer.judging.rule import PAIR, VS_REF
from tracer.taps import EMBED, FINAL, parse_tap, tap_name, walk_key

PATTERNS = ("non-finite", "step-at-position", "isolated", "sequence-offset", "sequence-boundary",
            "grows-with-position", "uniform", "widespread", "unclassified")

INTEGER_LIMITS = {257: "bfloat16", 2049: "float16"}
"""The first integer each 16-bit dtype cannot represent (8 and 11 significant bits): a position
computed or stored in that dtype is rounded from there on (257 becomes 256)."""

ISOLATED_MAX_TOKENS = 3
"""``isolated``: at most this many tokens over the bar (and at most 1 % of the tokens)."""
STEP_WINDOW = 32
"""``step-at-position``: positions compared on each side of the limit (fewer when the sequence ends)."""
STEP_MIN_RATIO = 2.5
"""``step-at-position``: 75th percentile of the error just after the limit / just before, at least."""
SEQUENCE_ETA2 = 0.8
"""Per-sequence patterns: share of the variance of log10(error) explained by the sequence, at least."""
NEIGHBOUR_SPREAD = 4.0
"""``sequence-boundary`` (neighbours): highest / lowest sequence level, at least."""
NEIGHBOUR_RHO = -0.8
"""``sequence-boundary`` (neighbours): rank correlation of sequence level with length, at most."""
EDGE_RATIO = 4.0
"""``sequence-boundary`` (edges): mean error of first/last tokens / median of interior tokens, at least."""
GROWTH_RHO = 0.6
"""``grows-with-position``: rank correlation of the error with the position in the sequence, at least."""
GROWTH_RATIO = 2.0
"""``grows-with-position``: median error in the last quarter of positions / the first quarter, at
least; and the tokens over the bar sit later in their sequences (median position) than those within."""
UNIFORM_SPREAD = 3.0
"""``uniform``: 90th / 10th percentile of the error, at most (with ``UNIFORM_OVER`` of the tokens over the bar)."""
UNIFORM_OVER = 0.9
WIDESPREAD_OVER = 0.5
"""``widespread``: share of the tokens over the bar, at least."""
ROPE_SITES = frozenset({"q_rope", "k_rope"})
ATTENTION_SITES = frozenset({"ctx", "attn_out"})
_TINY = 1e-30

JSON_FIELDS = ("subject", "pair", "tap", "sequence", "token", "pattern", "evidence", "cause", "propagates",
               "absorbed_at", "attention", "final", "pooled_cos")
"""Keys of a diagnosis object in JSON (``docs/diagnosis.md`` documents each)."""


@dataclass(frozen=True)
class Check:
    """The diagnosed tokens' error at one later tap: the largest error / noise level, and whether
    every one of them is within the bar (``K`` x noise)."""

    tap: str
    max_ratio: float | None
    within: bool

    def to_json(self) -> dict:
        return {"tap": self.tap, "max_ratio": _num(self.max_ratio), "within": self.within}

    @classmethod
    def from_json(cls, d: dict | None) -> "Check | None":
        return None if d is None else cls(d["tap"], d["max_ratio"], d["within"])


@dataclass(frozen=True)
class Diagnosis:
    """The shape of one divergence or drift, its likely cause and its consequence.

    Attributes:
        subject: ``divergence`` (packed vs unpacked) or the drifting path (``packed``, ``unpacked``).
        pair: the metrics pair diagnosed, e.g. ``unpacked-vs-reference``.
        tap, sequence, token: the point the verdict named.
        pattern: one of :data:`PATTERNS`.
        evidence: the numbers behind the pattern (errors in units of the tap's noise level).
        cause: plain words chosen from the pattern and the tap only.
        propagates: whether the diagnosed tokens are still over the bar at the final
            representation (``final_norm``, else the last traced ``resid_out``); ``None`` when no
            later tap was traced.
        absorbed_at: the first later tap where every diagnosed token is back within the bar.
        attention: the same layer's attention output (``attn_out``, else ``ctx``), for taps before it.
        final: the final representation.
        pooled_cos: ``{path: {sequence id: cosine}}`` of each involved path's mean-pooled final
            embedding against the reference (and the control's, when traced).
    """

    subject: str
    pair: str
    tap: str
    sequence: str
    token: int
    pattern: str
    evidence: dict
    cause: str
    propagates: bool | None
    absorbed_at: str | None
    attention: Check | None = None
    final: Check | None = None
    pooled_cos: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["attention"] = self.attention.to_json() if self.attention else None
        d["final"] = self.final.to_json() if self.final else None
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Diagnosis":
        return cls(**{**d, "attention": Check.from_json(d.get("attention")), "final": Check.from_json(d.get("final"))})

    def lines(self) -> list[str]:
        """Two lines of text: the pattern and its cause; whether it propagates and the pooled cosines."""
        at = f" {self.evidence['step_position']}" if self.pattern == "step-at-position" else ""
        if self.propagates is None:
            fate = "no later tap traced"
        elif self.propagates:
            size = "a NaN or Inf" if self.final.max_ratio is None else f"{self.final.max_ratio:.3g} x noise"
            fate = f"propagates to {self.final.tap} ({size})"
        else:
            fate = f"absorbed at {self.absorbed_at}" if self.absorbed_at else "absorbed"
        if self.attention is not None:
            fate += f"; {self.attention.tap} {'within' if self.attention.within else 'beyond'} noise"
        cos = ", ".join(f"{p} {_worst_cos(v)}" for p, v in self.pooled_cos.items() if v)
        cos = f"; pooled cos vs reference (worst sequence): {cos}" if cos else ""
        return [f"{self.subject} at {self.tap}: {self.pattern}{at}: {self.cause}", f"{fate}{cos}"]


@dataclass(frozen=True)
class Diagnoses:
    """Every diagnosis of a summary: the first divergence's and each drifting path's."""

    divergence: Diagnosis | None = None
    packed: Diagnosis | None = None
    unpacked: Diagnosis | None = None

    def __iter__(self):
        return iter([d for d in (self.divergence, self.packed, self.unpacked) if d is not None])

    def __bool__(self) -> bool:
        return any(True for _ in self)

    def to_json(self) -> dict:
        return {k: (getattr(self, k).to_json() if getattr(self, k) else None) for k in ("divergence", "packed", "unpacked")}

    @classmethod
    def from_json(cls, d: dict | None) -> "Diagnoses":
        d = d or {}
        return cls(**{k: Diagnosis.from_json(d[k]) if d.get(k) else None for k in ("divergence", "packed", "unpacked")})


# --- token geometry -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Tokens:
    """Per canonical token: its sequence, its position inside it, and its row in the packed stream."""

    seq: np.ndarray
    pos: np.ndarray
    stream: np.ndarray
    lengths: np.ndarray
    first_packed: int

    @classmethod
    def of(cls, layout) -> "_Tokens":
        lengths = np.asarray(layout.lengths, dtype=np.int64)
        order = list(layout.order)
        seq = np.repeat(np.arange(len(lengths)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        pos = np.arange(len(seq)) - starts[seq]
        packed_start = np.zeros(len(lengths), dtype=np.int64)
        packed_start[order] = np.concatenate([[0], np.cumsum(lengths[order])[:-1]])
        return cls(seq, pos, packed_start[seq] + pos, lengths, order[0])

    def per_sequence(self, x: np.ndarray) -> list[np.ndarray]:
        """``x`` (one value per canonical token) split into each sequence's tokens (views: canonical
        tokens are contiguous per sequence, so this is one pass, not one mask per sequence)."""
        return np.split(x, np.cumsum(self.lengths)[:-1])


def _rank(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x), dtype=np.float64)
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (ties broken by order; 0 when either side is constant)."""
    if len(x) < 3:
        return 0.0
    rx, ry = _rank(x), _rank(y)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _p(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else float("nan")


# --- the patterns -------------------------------------------------------------------------


def _step(r: np.ndarray, over: np.ndarray, tok: _Tokens) -> dict | None:
    """Evidence of a step at an integer limit, or ``None``."""
    for limit, dtype in INTEGER_LIMITS.items():
        before = r[(tok.pos >= limit - STEP_WINDOW) & (tok.pos < limit) & (tok.pos >= 1)]
        after_mask = (tok.pos >= limit) & (tok.pos < limit + STEP_WINDOW) & (tok.pos < tok.lengths[tok.seq] - 1)
        after = r[after_mask]
        if after.size < 3 or not over[tok.pos >= limit].any():
            continue
        ratio = _p(after, 75) / max(_p(before, 75), _TINY)
        if ratio >= STEP_MIN_RATIO:
            return {"step_position": limit, "step_dtype": dtype, "step_ratio": ratio,
                    "before_p75": _p(before, 75), "after_p75": _p(after, 75)}
    return None


def _levels(r: np.ndarray, tok: _Tokens) -> tuple[np.ndarray, float]:
    """Per-sequence median error, and the share of the variance of log10 error the sequence explains."""
    logr = np.log10(np.maximum(r, 1e-3))
    n = len(tok.lengths)
    levels = np.array([np.median(part) for part in tok.per_sequence(r)])
    total = float(np.var(logr))
    if n < 2 or total <= 0:
        return levels, 0.0
    means = np.array([part.mean() for part in tok.per_sequence(logr)])
    between = float(np.sum(tok.lengths * (means - logr.mean()) ** 2) / len(logr))
    return levels, between / total


def _per_sequence(r, over, tok, ids) -> tuple[str, dict] | None:
    levels, eta2 = _levels(r, tok)
    if eta2 < SEQUENCE_ETA2:
        return None
    share = np.array([part.mean() for part in tok.per_sequence(over)])
    ev = {"eta2": eta2, "sequence_levels": {ids[s]: float(levels[s]) for s in range(len(levels))},
          "first_packed": ids[tok.first_packed]}
    others = [s for s in range(len(levels)) if s != tok.first_packed]
    if share[tok.first_packed] == 0 and others and all(share[s] >= 0.5 for s in others):
        return "sequence-offset", ev
    rho = _spearman(tok.lengths.astype(float), levels) if len(levels) >= 3 else 0.0
    spread = float(levels.max() / max(levels.min(), _TINY))
    ev.update(level_vs_length_rho=rho, level_spread=spread)
    if (share >= 0.5).all() and spread >= NEIGHBOUR_SPREAD and rho <= NEIGHBOUR_RHO:
        return "sequence-boundary", {**ev, "kind": "neighbours"}
    return None


def _edges(r, over, tok) -> dict | None:
    long_enough = tok.lengths[tok.seq] >= 4
    edge = long_enough & ((tok.pos == 0) | (tok.pos == tok.lengths[tok.seq] - 1))
    interior = long_enough & ~edge
    if not edge.any() or not interior.any():
        return None
    ratio = float(r[edge].mean() / max(np.median(r[interior]), _TINY))
    at_edges = float(over[edge].sum() / max(over[long_enough].sum(), 1))
    if ratio >= EDGE_RATIO and at_edges >= 0.8:
        return {"kind": "edges", "edge_ratio": ratio, "over_at_edges": at_edges}
    return None


def _growth(r, e, tok) -> dict:
    body = tok.pos >= 1
    pos, rb = tok.pos[body].astype(np.float64), r[body]
    top = float(pos.max()) if pos.size else 0.0
    first, last = rb[pos <= max(1.0, top / 4)], rb[pos >= 3 * top / 4]
    slope, icpt = np.polyfit(pos, e[body], 1) if pos.size >= 3 and np.ptp(pos) > 0 else (0.0, 0.0)
    fit = icpt + slope * pos
    ss = float(np.sum((e[body] - e[body].mean()) ** 2))
    return {"position_rho": _spearman(pos, rb), "stream_rho": _spearman(tok.stream[body].astype(float), rb),
            "growth_ratio": float(np.median(last) / max(np.median(first), _TINY)) if first.size and last.size else 1.0,
            "slope_per_100": float(slope * 100), "fit_r2": 1 - float(np.sum((e[body] - fit) ** 2)) / ss if ss > 0 else 0.0}


def _late(over: np.ndarray, tok: _Tokens) -> tuple[float, float] | None:
    """Median position of the tokens over the bar and of those within it (``None`` if either set is empty)."""
    if over.all() or not over.any():
        return None
    return float(np.median(tok.pos[over])), float(np.median(tok.pos[~over]))


def classify(e: np.ndarray, bar: float, unit: float, layout, ids: list[str]) -> tuple[str, dict]:
    """The pattern of one tap's per-token errors ``e`` ``(N,)`` (relative L2, canonical order)
    judged against ``bar``; ``unit`` (the noise level) scales the evidence. Rules in order, first match wins."""
    tok = _Tokens.of(layout)
    e = np.asarray(e, dtype=np.float64)
    bad = ~np.isfinite(e)
    if np.isnan(e).any():
        where = [(ids[tok.seq[i]], int(tok.pos[i])) for i in np.flatnonzero(np.isnan(e))[:10]]
        return "non-finite", {"n_tokens_non_finite": int(np.isnan(e).sum()), "tokens": where}
    r = np.where(bad, np.inf, e) / max(unit, _TINY)
    r = np.where(np.isfinite(r), r, np.finfo(np.float64).max)
    over = ~(e <= bar)
    n_over = int(over.sum())
    ev = {"n_tokens_over": n_over, "fraction_over": n_over / len(e), "median_ratio": float(np.median(r)),
          "max_ratio": float(r.max()), **_growth(r, e, tok)}
    step = _step(r, over, tok)
    if step:
        return "step-at-position", {**ev, **step}
    if 0 < n_over <= ISOLATED_MAX_TOKENS and n_over <= 0.01 * len(e):
        return "isolated", {**ev, "tokens": [(ids[tok.seq[i]], int(tok.pos[i])) for i in np.flatnonzero(over)]}
    per_seq = _per_sequence(r, over, tok, ids)
    if per_seq:
        return per_seq[0], {**ev, **per_seq[1]}
    edges = _edges(r, over, tok)
    if edges:
        return "sequence-boundary", {**ev, **edges}
    late = _late(over, tok)
    if late is not None:
        ev["over_position_median"], ev["within_position_median"] = late
    if ev["position_rho"] >= GROWTH_RHO and ev["growth_ratio"] >= GROWTH_RATIO and (late is None or late[0] > late[1]):
        return "grows-with-position", ev
    spread = _p(r, 90) / max(_p(r, 10), _TINY)
    ev["spread_p90_p10"] = spread
    if ev["fraction_over"] >= UNIFORM_OVER and spread <= UNIFORM_SPREAD:
        return "uniform", ev
    if ev["fraction_over"] >= WIDESPREAD_OVER:
        return "widespread", ev
    return "unclassified", ev


def cause(pattern: str, site: str, evidence: dict) -> str:
    """Plain words for a pattern at a tap site; never more than the pattern and the site say."""
    rope, attention = site in ROPE_SITES, site in ATTENTION_SITES
    if pattern == "non-finite":
        return "a NaN or Inf value (an overflow in the run dtype, or a row with nothing to attend to)"
    if pattern == "step-at-position":
        dt = evidence["step_dtype"]
        if rope:
            return f"positions or frequencies of RoPE computed in {dt}"
        return f"a position-dependent value held in {dt}, which cannot represent {evidence['step_position']}"
    if pattern == "grows-with-position":
        if rope:
            return "RoPE angles off by an amount that grows with position: frequencies (inv_freq) or positions held in low precision"
        return "an error that grows with the position inside each sequence"
    if pattern == "sequence-offset":
        if rope:
            return "RoPE positions not restarted at each sequence start (each sequence shifted by its offset in the pack)"
        return "something carried from one sequence to the next in the packed stream (the first sequence is clean)"
    if pattern == "sequence-boundary":
        if evidence.get("kind") == "edges":
            return "the first or last tokens of sequences (<cls>/<eos>, or a boundary off by one) handled differently"
        if attention or rope:
            return "attention reaches tokens of other sequences in the pack (cu_seqlens or the mask)"
        return "each sequence affected according to its neighbours in the pack"
    if pattern == "uniform":
        if evidence.get("scale_only"):
            return f"every token scaled by the same factor ({1 + evidence['median_rel_l2']:.3g} or {1 - evidence['median_rel_l2']:.3g})" + (
                ": the embedding scale or the token-dropout rescale" if site == EMBED else "")
        if attention:
            return "attention computed differently at every token (softmax scale or the attention kernel)"
        return "the same relative error at every token: a systematic difference in this tap's computation"
    if pattern == "widespread":
        if attention:
            return "attention computed differently at most tokens (softmax scale, masking inside a sequence, or the kernel)"
        if rope:
            return "the RoPE rotation differs at most tokens (rotation convention, frequencies or positions)"
        return f"a systematic difference in {site} at most tokens"
    if pattern == "isolated":
        return "a few tokens only: a local perturbation at these tokens"
    return "no pattern of the vocabulary fits; see the evidence"


# --- propagation --------------------------------------------------------------------------


STREAM_SITES = frozenset({"attn_out", "resid_mid", "resid_out", FINAL})
"""Taps that carry an error forward to the final representation (branch taps such as q_rope,
v, ctx of later layers and ffn_out are left out: they can be within noise while the stream is not)."""


def _downstream(taps: list[str], row: int) -> list[int]:
    """Rows of the stream taps after the diagnosed one, in walk order; for a q_rope, k_rope or v
    tap, the same layer's ctx first (where attention consumes them)."""
    layer, site = parse_tap(taps[row])
    key = walk_key(taps[row])
    out = []
    for i, name in enumerate(taps):
        lay, s = parse_tap(name)
        if walk_key(name) > key and (s in STREAM_SITES or (s == "ctx" and lay == layer)):
            out.append(i)
    return sorted(out, key=lambda i: walk_key(taps[i]))


def _check(judged: "Judged", rel: np.ndarray, row: int, cols: np.ndarray) -> Check:
    v = rel[row, cols].astype(np.float64)
    finite = v[np.isfinite(v)]
    ratio = _num(finite.max() / max(judged.unit[row], _TINY)) if finite.size else None
    return Check(judged.table.taps[row], ratio, bool((v <= judged.bars[row]).all()))  # NaN never passes


def propagation(judged: "Judged", pair: str, row: int, cols: np.ndarray) -> dict:
    """Whether the tokens ``cols`` diagnosed at ``row`` stay over the bar downstream.

    ``absorbed_at``: the first stream tap from which every later stream tap has them all within
    the bar (``None`` when the final representation is over). ``propagates``: the final
    representation (``final_norm``, else the last traced ``resid_out``) is over the bar.
    """
    table = judged.table
    rel = table.pairs[pair]["rel_l2"]
    compared = table.compared(pair)
    rows = [i for i in _downstream(table.taps, row) if compared[i]]
    checks = [_check(judged, rel, i, cols) for i in rows]
    absorbed = None
    for c in reversed(checks):
        if not c.within:
            break
        absorbed = c.tap
    layer, site = parse_tap(table.taps[row])
    layer = 0 if site == EMBED else layer  # the embedding's error meets attention in layer 0
    by_name = {c.tap: c for c in checks}
    attn = next((by_name[tap_name(layer, s)] for s in ("attn_out", "ctx") if layer is not None and tap_name(layer, s) in by_name), None)
    final = by_name.get(FINAL) or next((c for c in reversed(checks) if parse_tap(c.tap)[1] == "resid_out"), None)
    return {"propagates": None if final is None else not final.within, "absorbed_at": absorbed, "attention": attn, "final": final}


# --- entry points -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Judged:
    """What the verdict judged: the metrics table, the token layout (``lengths``, ``order``), the
    sequence ids, and the per-tap bars and noise levels of :func:`verdict.thresholds` (``noise``
    ``None`` under the plain rule)."""

    table: object
    layout: object
    ids: list
    bars: np.ndarray
    noise: np.ndarray | None

    @property
    def unit(self) -> np.ndarray:
        """What errors are measured in: the noise level, else the bar."""
        return np.asarray(self.noise if self.noise is not None else self.bars, dtype=np.float64)


def diagnose(judged: Judged, pair: str, point, subject: str, pooled_cos: dict | None = None) -> Diagnosis:
    """The diagnosis of one verdict point (``point``: a :class:`~verdict.Point`) in ``pair``."""
    table, bars = judged.table, judged.bars
    row = table.taps.index(point.name)
    e = table.pairs[pair]["rel_l2"][row].astype(np.float64)
    pattern, ev = classify(e, float(bars[row]), float(judged.unit[row]), judged.layout, judged.ids)
    ev["unit"] = "noise" if judged.noise is not None else "bar"
    cols = np.flatnonzero(~(e <= bars[row]))
    finite = e[cols][np.isfinite(e[cols])]
    ev["median_rel_l2"] = float(np.median(finite)) if finite.size else None
    cd = table.pairs[pair]["cos_dist"][row, cols].astype(np.float64)
    # over the tokens over the bar: a pure scale a = c * b has cos distance 0, an error of the same
    # size in a random direction has about rel^2 / 2
    ev["scale_only"] = bool(finite.size == cols.size > 0 and np.isfinite(cd).all() and np.median(cd) <= 0.01 * ev["median_rel_l2"] ** 2)
    prop = propagation(judged, pair, row, cols)
    return Diagnosis(subject, pair, point.name, point.sequence, point.token, pattern, _clean(ev),
                     cause(pattern, parse_tap(point.name)[1], ev), **prop, pooled_cos=pooled_cos or {})


def diagnose_all(judged: Judged, first, drifts: dict, pooled_cos: dict | None = None) -> Diagnoses:
    """The first divergence's diagnosis and each drifting path's (``drifts``: ``{path: Point | None}``).

    ``pooled_cos``: ``{path: {sequence id: cosine against the reference}}`` (paths ``packed``,
    ``unpacked`` and optionally ``control``); each diagnosis keeps the paths it involves and the control.
    """
    pooled_cos = pooled_cos or {}

    def cos_of(*paths):  # full float64 precision (1 - cos matters); NaN (a NaN/Inf embedding) as None
        return {p: {i: (float(c) if np.isfinite(c) else None) for i, c in pooled_cos[p].items()}
                for p in (*paths, "control") if p in pooled_cos}

    div = None
    if first is not None:
        div = diagnose(judged, PAIR, first, "divergence", cos_of("packed", "unpacked"))
    out = {}
    for path in ("packed", "unpacked"):
        p = drifts.get(path)
        pair = VS_REF[path]
        if p is not None and judged.table.has(pair):
            out[path] = diagnose(judged, pair, p, path, cos_of(path))
    return Diagnoses(div, out.get("packed"), out.get("unpacked"))


def _worst_cos(by_sequence: dict) -> str:
    """The lowest cosine, ``nan`` if any sequence's embedding held a NaN/Inf."""
    values = list(by_sequence.values())
    return "nan" if any(v is None for v in values) else f"{min(values):.6f}"


def _clean(ev: dict) -> dict:
    """JSON-ready evidence: floats to 6 significant digits (NaN/Inf to None), tuples to lists."""
    out = {}
    for k, v in ev.items():
        if isinstance(v, dict):
            v = _clean(v)
        elif isinstance(v, (list, tuple)):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        elif isinstance(v, (bool, np.bool_)):
            v = bool(v)
        elif isinstance(v, (int, np.integer)):
            v = int(v)
        elif isinstance(v, (float, np.floating)):
            v = _num(v)
        out[k] = v
    return out


def _num(x):
    """A number for JSON: 6 significant digits; NaN and Inf (and ``None``) are ``None``."""
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.6g}") if np.isfinite(x) else None
