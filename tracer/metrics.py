"""Per-token comparison metrics: small pure functions ``(a, b) -> Tensor``.

``a`` and ``b`` are taps in canonical layout, ``(N, ...)``; every function flattens each token's
features, computes in float64 (so that float32 paths that agree to 1e-7 are still resolved) and
returns one value per token, ``(N,)`` float64. ``b`` is the baseline (the unpacked path for
packed-vs-unpacked, the reference for path-vs-reference).

* ``cos_dist`` -- cosine distance ``1 - cos(a, b)``; 0 when both are zero vectors, 1 when one is.
* ``max_abs`` -- ``max |a - b|``.
* ``rel_l2`` -- relative L2 error ``|a - b| / |b|``; 0 when both are zero, ``inf`` when only ``b`` is.

Non-finite values: a token with any NaN or Inf in ``a`` or ``b`` gets NaN in every metric, and
NaN never passes a threshold (it always counts as divergent), as in Polygraphy.

Example::

    >>> import torch
    >>> a = torch.tensor([[3.0, 4.0]]); b = torch.tensor([[3.0, 4.5]])
    >>> rel_l2(a, b).item() == 0.5 / (3.0**2 + 4.5**2) ** 0.5
    True
"""

from __future__ import annotations

import torch

METRICS = ("cos_dist", "max_abs", "rel_l2")


def _flat64(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)  # (N, F)


def _nonfinite(a64: torch.Tensor, b64: torch.Tensor) -> torch.Tensor:
    return ~(torch.isfinite(a64).all(1) & torch.isfinite(b64).all(1))  # (N,)


def cos_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return token_metrics(a, b)["cos_dist"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return token_metrics(a, b)["max_abs"]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return token_metrics(a, b)["rel_l2"]


def token_metrics(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    """All three metrics at once, sharing the float64 up-cast: ``{name: (N,) float64}``."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = _flat64(a), _flat64(b)
    diff = a64 - b64  # (N, F)
    na, nb = a64.norm(dim=1), b64.norm(dim=1)
    nd = diff.norm(dim=1)
    dot = (a64 * b64).sum(1)
    denom = na * nb
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(torch.float64).tiny), (na == nb).to(torch.float64))
    # 1 - cos loses digits when a ~ b; for close vectors use |a/|a| - b/|b||^2 / 2 instead.
    unit_gap = (a64 / na.clamp_min(1e-300)[:, None] - b64 / nb.clamp_min(1e-300)[:, None]).norm(dim=1)
    cdist = torch.where(denom > 0, 0.5 * unit_gap**2, 1.0 - cos)
    rel = torch.where(nb > 0, nd / nb.clamp_min(1e-300), torch.where(nd > 0, torch.inf, 0.0))
    mx = diff.abs().amax(dim=1) if diff.shape[1] else torch.zeros_like(nd)
    bad = _nonfinite(a64, b64)
    nan = torch.full_like(nd, torch.nan)
    return {
        "cos_dist": torch.where(bad, nan, cdist),
        "max_abs": torch.where(bad, nan, mx),
        "rel_l2": torch.where(bad, nan, rel),
    }


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back: the representation error of storing it in ``dtype``."""
    return x.to(dtype).to(x.dtype)
