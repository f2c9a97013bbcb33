"""``--local``: each layer re-run on the other side's recorded input, to split error born in a
layer from error inherited from the layers before it.

The packed path re-runs layer ``i`` on the unpacked path's recorded input (and, with a
reference, both paths on the reference's input cast to the run dtype); the per-token metrics of
those re-runs against the recorded outputs form the ``local`` table. Needs the built-in paths
(their ``run_layer``; the plan refuses ``--local`` with a plug-in).
"""

from __future__ import annotations

import numpy as np
import torch

from tracer.judging.metrics import METRICS, metrics_table, token_metrics
from tracer.taps import EMBED, parse_tap, tap_name


def local_table(paths, batch, names: list[str], collector, dtype: torch.dtype) -> dict:
    """``{pair: {metric: (T, N)}}`` of the single-layer re-runs (see module docstring)."""
    by_name = {p.name: p for p in paths}
    held_u = collector.held["unpacked"]
    held_r = collector.held.get("reference", {})
    rows: dict[str, dict[str, np.ndarray]] = {}
    num_layers = 1 + max(parse_tap(n)[0] for n in names if parse_tap(n)[0] is not None)
    for layer in range(num_layers):
        layer_names = [n for n in names if parse_tap(n)[0] == layer]
        inp = EMBED if layer == 0 else tap_name(layer - 1, "resid_out")
        runs = [("packed-vs-unpacked", "packed", held_u[inp], held_u)]
        if held_r:
            x_ref = held_r[inp].to(dtype)  # the reference's input, in the run dtype
            runs += [("packed-vs-reference", "packed", x_ref, held_r), ("unpacked-vs-reference", "unpacked", x_ref, held_r)]
        for pair, side, x, against in runs:
            rec: dict[str, torch.Tensor] = {}
            by_name[side].run_layer(layer, x, batch, layer_names, rec.__setitem__)
            for n in layer_names:
                m = token_metrics(rec[n], against[n])
                rows.setdefault(pair, {})[n] = torch.stack([m[k] for k in METRICS]).float().cpu().numpy()
    return {pair: metrics_table(names, by_tap, batch.layout.n_tokens) for pair, by_tap in rows.items()}
