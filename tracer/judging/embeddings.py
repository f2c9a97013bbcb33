"""Per-sequence embeddings as ESM-2 users pool them, and their cosines.

ESM-2 users take the final representation (fair-esm's ``representations[num_layers]``, our
``final_norm`` tap) and average it over the residues, leaving out ``<cls>`` (token 0) and
``<eos>`` (token L+1). A run stores that mean for every path in ``/embeddings/<path>``, shape
``(S, E)``, computed in float64 from the exact up-cast of the path's own final representation
(so the pooling adds no rounding of its own; the debug log pools in the model dtype, which
moves its cosines by about one bfloat16 ulp). The cosine of two pooled embeddings is the
number the debug log reports (0.9911 for the 400-residue sequence on trained 3B weights).

Example::

    pooled = mean_pool(final_norm_canonical, layout)          # (S, E) float64, CPU
    cosines(pooled_packed, pooled_unpacked)                   # (S,) float64
    pooled_cosines(open_trace("run.h5"))                      # {pair: {sequence id: cos}}
"""

from __future__ import annotations

import numpy as np
import torch

from tracer.inputs.packing import Layout

EMBEDDING_PAIRS = {
    "packed-vs-unpacked": ("packed", "unpacked"),
    "packed-vs-reference": ("packed", "reference"),
    "unpacked-vs-reference": ("unpacked", "reference"),
}
"""Pairs of pooled embeddings a summary reports, ``(a, b)``."""

POOLING = "mean over residues 1..L (<cls> and <eos> excluded) of final_norm, float64"


def mean_pool(final: torch.Tensor, layout: Layout) -> np.ndarray:
    """``final``: canonical ``(N, E)`` final representations -> ``(S, E)`` float64 residue means.

    A sequence of L residues has tokens ``0..L+1``; its residues are canonical rows
    ``offsets[s] + 1 .. offsets[s] + L``.
    """
    x = final.detach().to(torch.float64)  # exact up-cast
    rows = torch.split(x, list(layout.lengths), dim=0)  # per sequence (L + 2, E)
    return torch.stack([r[1:-1].mean(dim=0) for r in rows]).cpu().numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of ``(S, E)`` arrays, in float64 (NaN where a row is zero or non-finite)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.einsum("se,se->s", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def against_reference(pooled: dict[str, np.ndarray], ids: list[str]) -> dict[str, dict[str, float]]:
    """``{path: {sequence id: cosine}}`` of every path's pooled embedding (``{path: (S, E)}``)
    against the reference's (``{}`` without a reference)."""
    ref = pooled.get("reference")
    if ref is None:
        return {}
    return {p: {i: float(c) for i, c in zip(ids, cosines(v, ref))} for p, v in pooled.items() if p != "reference" and v is not None}


def stored_against_reference(trace) -> dict[str, dict[str, float]]:
    """:func:`against_reference` from a trace's stored pooled embeddings."""
    stored = {p: trace.embeddings(p) for p in trace.embedding_paths()}
    return against_reference(stored, [s.id for s in trace.sequences])


def pooled_cosines(trace) -> dict[str, dict[str, float]]:
    """``{pair: {sequence id: cosine}}`` from a trace's stored pooled embeddings (``{}`` if none)."""
    ids = [s.id for s in trace.sequences]
    stored = {p: trace.embeddings(p) for p in ("packed", "unpacked", "reference")}
    out = {}
    for pair, (a, b) in EMBEDDING_PAIRS.items():
        if stored[a] is not None and stored[b] is not None:
            out[pair] = {i: float(c) for i, c in zip(ids, cosines(stored[a], stored[b]))}
    return out
