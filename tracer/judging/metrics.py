"""Per-token comparison metrics: small pure functions ``(a, b) -> Tensor``.

``a`` and ``b`` are taps in canonical layout, ``(N, ...)``; each token's features are flattened
and one value per token is returned, ``(N,)`` (float64 tensors holding float32-accurate values;
traces store them as float32). ``b`` is the baseline (the unpacked path
for packed-vs-unpacked, the reference for path-vs-reference).

* ``cos_dist`` -- cosine distance ``1 - cos(a, b)``; 0 when both are zero vectors, 1 when one is.
* ``max_abs`` -- ``max |a - b|``.
* ``rel_l2`` -- relative L2 error ``|a - b| / |b|``; 0 when both are zero, ``inf`` when only ``b`` is.

Precision: inputs are up-cast (exactly) to float32, or float64 if either is float64, and the
difference ``d = a - b`` is taken in that dtype (its rounding is below 2^-24 relative to the
difference itself). Sums of squares use PyTorch's pairwise/tree reductions (relative error
~1e-6 in float32, far below the 3 significant digits reported). The cosine distance is
computed from the part of ``d`` orthogonal to ``b`` (see ``_metrics``), so it stays accurate
when ``a`` and ``b`` agree to the last float32 bit, where ``1 - a.b/(|a||b|)`` cancels to noise.

Non-finite values: a token with any NaN or Inf in ``a`` or ``b`` gets NaN in every metric, and
NaN never passes a threshold (it always counts as divergent), as in Polygraphy.

Example::

    >>> import torch
    >>> a = torch.tensor([[3.0, 4.0]]); b = torch.tensor([[3.0, 4.5]])
    >>> rel_l2(a, b).item() == 0.5 / (3.0**2 + 4.5**2) ** 0.5
    True
"""

from __future__ import annotations

import numpy as np
import torch

METRICS = ("cos_dist", "max_abs", "rel_l2")
_F64 = torch.float64


def cos_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return token_metrics(a, b)["cos_dist"]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return token_metrics(a, b)["max_abs"]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return token_metrics(a, b)["rel_l2"]


def token_metrics(a: torch.Tensor, b: torch.Tensor, na=None, nb=None, scratch=None) -> dict[str, torch.Tensor]:
    """All three metrics at once for ``(N, ...)`` taps: ``{name: (N,) float64}``.

    ``na``/``nb`` optionally pass each side's :func:`norms`, when one tap takes part in several
    pairs; ``scratch`` optionally passes an ``(N, F)`` tensor of the working dtype to hold the
    difference (a streaming loop then allocates nothing of that size).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    sums = token_sums(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), na, nb, scratch)
    return from_sums(sums.to(_F64))


def norms(x: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norms of a tap, ``(N,)``, in its working dtype (float32 or float64)."""
    x = x.reshape(x.shape[0], -1)
    return torch.linalg.vector_norm(x.to(work_dtype(x.dtype)), dim=-1)


def work_dtype(*dtypes) -> torch.dtype:
    """The dtype comparisons of taps in ``dtypes`` are computed in: float64 if any is, else float32."""
    return _F64 if _F64 in dtypes else torch.float32


def token_sums(a: torch.Tensor, b: torch.Tensor, na=None, nb=None, scratch=None) -> torch.Tensor:
    """Per-token sums ``|a-b|, |a|, |b|, (a-b).b, max|a-b|`` of ``(..., N, F)`` taps,
    ``(..., 5, N)`` in the working dtype.

    Few, fused kernels (this runs inside the traced forward on the GPU); :func:`from_sums`
    finishes the metrics, on the CPU, for a whole table at once. ``na``/``nb``: the sides'
    :func:`norms`, when the caller has them (a tap in several pairs needs them once).
    """
    work = work_dtype(a.dtype, b.dtype)
    a, b = a.to(work), b.to(work)  # exact up-casts (mixed-dtype kernels run ~7x slower on a CPU)
    if scratch is None or scratch.dtype != work:
        d = a - b  # rounding below 2^-24 relative to the difference itself
    else:
        d = torch.sub(a, b, out=scratch)
    db = torch.linalg.vecdot(d, b)  # (d * b).sum(-1) without the (N, F) product
    nd = torch.linalg.vector_norm(d, dim=-1)  # fused reductions, pairwise/tree sums
    na = torch.linalg.vector_norm(a, dim=-1) if na is None else na
    nb = torch.linalg.vector_norm(b, dim=-1) if nb is None else nb
    mx = torch.linalg.vector_norm(d, ord=torch.inf, dim=-1) if d.shape[-1] else torch.zeros_like(nd)  # max |d|, one kernel
    return torch.stack([nd, na, nb, db, mx], dim=-2)


def from_sums(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics from :func:`token_sums` (``(..., 5, N)``, float64): ``{name: (..., N)}``."""
    nd, na, nb, db, mx = sums.unbind(-2)
    dd, aa, bb = nd * nd, na * na, nb * nb
    # 1 - cos from the part of d orthogonal to b: sin^2 = (|d|^2 - (d.b)^2/|b|^2) / |a|^2 and
    # 1 - cos = sin^2 / (1 + cos). Every term is relative to |d|, so this stays accurate when a
    # and b agree to the last float32 bit (1 - a.b/(|a||b|) would cancel to noise there).
    cos = (bb + db) / (na * nb).clamp_min(1e-300)
    sin2 = (dd - db * db / bb.clamp_min(1e-300)).clamp_min(0.0) / aa.clamp_min(1e-300)
    cd = torch.where(cos > 0, sin2 / (1 + cos), 1 - cos)
    cd = torch.where((aa > 0) & (bb > 0), cd, (aa != bb).to(sums.dtype))  # both zero: 0; exactly one zero: 1
    rel = torch.where(bb > 0, nd / nb.clamp_min(1e-300), torch.where(nd > 0, torch.inf, 0.0))
    bad = ~(torch.isfinite(na) & torch.isfinite(nb) & torch.isfinite(nd))  # NaN/Inf anywhere in the token
    nan = torch.full_like(nd, torch.nan)
    return {"cos_dist": torch.where(bad, nan, cd), "max_abs": torch.where(bad, nan, mx), "rel_l2": torch.where(bad, nan, rel)}


def metrics_table(names: list[str], rows: dict[str, np.ndarray], n_tokens: int) -> dict[str, np.ndarray]:
    """Per-tap ``(3, N)`` metric rows (:data:`METRICS` order) -> ``{metric: (T, N) float32}``
    over ``names``; taps without a row are NaN."""
    grid = np.full((len(names), len(METRICS), n_tokens), np.nan, dtype=np.float32)
    for i, name in enumerate(names):
        if name in rows:
            grid[i] = rows[name]
    return {m: grid[:, j] for j, m in enumerate(METRICS)}


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back: the representation error of storing it in ``dtype``."""
    return x.to(dtype).to(x.dtype)
