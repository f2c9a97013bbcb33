"""The verdict rule: which test a token must pass (noise-aware or plain), its factor and thresholds."""

from __future__ import annotations

from dataclasses import dataclass, field

PAIR = "packed-vs-unpacked"
"""The pair judged: the packed path against the unpacked one."""

VS_REF = {"packed": "packed-vs-reference", "unpacked": "unpacked-vs-reference"}
"""Each path against the high-precision reference: which one drifted."""

CONTROL = "control-vs-reference"
"""The control path (a healthy run-dtype forward) against the reference: sets the noise level."""

ROUNDED = "rounded-vs-reference"
"""The reference rounded to the run dtype, against itself: the representation floor."""




NOISE_FACTOR = 8.0
"""K of the noise rule (docs/control-path.md: a healthy path's worst token is at most 2.8 x the
control's noise level on 8M-150M; a shared cause such as fair-esm's bfloat16 RoPE is 16 x K)."""


PLAIN_MAX_REL_L2 = {"float32": 1e-3, "float64": 1e-6, "float16": 1e-2, "bfloat16": 5e-2}
"""Plain-rule default thresholds on relative L2 error, per run dtype (docs/verdict.md explains)."""


@dataclass(frozen=True)
class Rule:
    """How a token is judged.

    Attributes:
        kind: ``noise`` (needs a reference) or ``plain``.
        noise_factor: K of the noise rule.
        max_rel_l2: plain threshold on relative L2 error.
        site_max_rel_l2: per-site plain overrides, e.g. ``{"q_rope": 0.1}``.
        min_cos: optional plain threshold on cosine similarity.
    """

    kind: str = "noise"
    noise_factor: float = NOISE_FACTOR
    max_rel_l2: float = 5e-2
    site_max_rel_l2: dict = field(default_factory=dict)
    min_cos: float | None = None

    def describe(self) -> str:
        if self.kind == "noise":
            return f"noise-aware: rel L2 > {self.noise_factor:g} x the tap's noise level"
        extra = "".join(f", {k} {v:g}" for k, v in sorted(self.site_max_rel_l2.items()))
        cos = f" or cos < {self.min_cos:g}" if self.min_cos is not None else ""
        return f"plain: rel L2 > {self.max_rel_l2:g}{extra}{cos}"
