"""Pictures of a trace: ``python -m tracer.plot TRACE.h5 [-o DIR]``.

Writes PNG and SVG files:

* ``curves`` -- per-layer curves, one line per tap site: the worst token's relative L2 error
  (log scale) of packed vs unpacked and, with a reference, of each path vs the reference; the
  first divergence is starred. A grey band is the control path's worst token per layer
  ("healthy run-dtype error": tracer's own fault-free forward in the run dtype against the
  reference, :mod:`tracer.capture.control`), the error a healthy implementation reaches.
* ``heatmap-<pair>`` -- layer x token heatmaps of the relative L2 error, one panel per site,
  sequences separated and labelled, the first divergence circled.
* ``sequences`` -- per-sequence curves of the layer output (``resid_out``) error.
* ``positions`` -- at the tap the diagnosis names (:mod:`tracer.judging.diagnosis`), each path's
  error against the reference (and the control's, when traced) against the position inside each
  sequence, with the bar and the first integer the run dtype cannot hold (bfloat16 257, float16
  2049) marked; written when the trace has a diagnosis.

The figures work from the per-token metrics stored in every trace (full, ``--metrics-only`` or a
bundle's slim file). The functions return matplotlib figures, for notebooks::

    from tracer.plot import load, curves_figure
    data = load("traces/run.h5"); curves_figure(data).show()
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: a signal while importing is one line, not a traceback
    from tracer.runner.interrupts import quiet_during_imports

    quiet_during_imports("no plots were written")

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm

from tracer.store import files
from tracer.cli import Parser, main_guard
from tracer.judging.tables import Verified, verify
from tracer.errors import TracerError
from tracer.store.trace_file import open_trace, reading
from tracer.taps import EMBED, FINAL, SITES, parse_tap
from tracer.judging.diagnosis import INTEGER_LIMITS
from tracer.judging.verdict import CONTROL, MetricsTable

PAIR_LABELS = {
    "packed-vs-unpacked": "packed vs unpacked",
    "unpacked-vs-reference": "unpacked vs reference",
    "packed-vs-reference": "packed vs reference",
}

COLORS = dict(zip(SITES, plt.get_cmap("tab10").colors))
FLOOR = 1e-9  # log-scale floor for exact agreement (relative L2 of 0)


@dataclass
class PlotData:
    """What the figures need from a trace (read once, then the file is closed)."""

    path: Path
    table: MetricsTable
    summary: dict
    ids: list[str]
    offsets: list[int]
    num_layers: int
    identity: str = ""
    """A digest of the trace's meta record (which run it is), for :data:`MARKER`."""

    @property
    def title(self) -> str:
        s = self.summary
        ref = f", reference {s['reference']}" if s.get("reference") else ""
        return f"{s['model']} · {s['dtype']} · attention {s['backend']} · RoPE {s['packed_rope']}{ref}\n{s['batch']}"

    def pairs(self) -> list[str]:
        return [p for p in PAIR_LABELS if self.table.has(p)]


def load(path: str | Path, verified: Verified | None = None) -> PlotData:
    """What the figures need, after verifying the trace as ``tracer.compare`` does (every
    checksum, the manifest, the stored metrics against the tensors and the stored summary
    against the stored metrics, :func:`tracer.judging.tables.verify`); ``verified``: what the
    caller's own verification of this trace gave (its stored table is used, not read again)."""
    with open_trace(path) as t, reading(path):
        table = (verified or verify(t)).stored
        summary = t.summary
        if summary is None:
            raise TracerError(f"{path} has no stored summary to plot")
        num_layers = t.meta["architecture"]["num_layers"]
        identity = hashlib.sha256(json.dumps(t.meta, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return PlotData(Path(path), table, summary, [s.id for s in t.sequences], t.layout.offsets.tolist(), num_layers, identity)


def _layer_x(name: str, num_layers: int) -> float:
    layer, site = parse_tap(name)
    return -1 if site == EMBED else num_layers if site == FINAL else layer


def _worst(rel: np.ndarray) -> np.ndarray:
    """Worst token per row; a row with a non-finite token is ``inf`` (drawn at the top)."""
    with np.errstate(all="ignore"):
        return np.where(np.isfinite(rel).all(axis=1), np.nanmax(np.where(np.isfinite(rel), rel, -1), axis=1), np.inf)


def _bottom(values: np.ndarray) -> float:
    """Where exact agreement (0) is drawn on a log axis: a decade below the smallest error."""
    positive = values[np.isfinite(values) & (values > 0)]
    return float(positive.min()) / 10 if positive.size else FLOOR


def _first(summary: dict, pair: str) -> dict | None:
    if pair == "packed-vs-unpacked":
        return summary.get("first_divergence")
    att = summary.get("attribution") or {}
    return att.get(pair.split("-")[0])


def control_envelope(table: MetricsTable, num_layers: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(x, worst)``: per layer position (embed at -1, final norm at L), the control's worst
    token over every tap there; ``None`` without the control's metrics."""
    if not table.has(CONTROL):
        return None
    worst = _worst(table.pairs[CONTROL]["rel_l2"])
    by_x: dict[float, float] = {}
    for i, name in enumerate(table.taps):
        x = _layer_x(name, num_layers)
        if np.isfinite(worst[i]):
            by_x[x] = max(by_x.get(x, 0.0), float(worst[i]))
    xs = np.array(sorted(by_x))
    return (xs, np.array([by_x[x] for x in xs])) if xs.size else None


def curves_figure(data: PlotData):
    """Per-layer worst-token relative L2 error, one line per site, one panel per pair."""
    pairs = data.pairs()
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.2 * len(pairs), 4.6), sharey=True, squeeze=False)
    taps = data.table.taps
    layers = np.arange(data.num_layers)
    bottom = min(_bottom(_worst(data.table.pairs[p]["rel_l2"])) for p in pairs)
    envelope = control_envelope(data.table, data.num_layers)
    for ax, pair in zip(axes[0], pairs):
        worst = np.maximum(_worst(data.table.pairs[pair]["rel_l2"]), bottom)
        if envelope is not None:
            ax.fill_between(envelope[0], bottom, np.maximum(envelope[1], bottom), step="mid", color="0.82", alpha=0.7,
                            lw=0, zorder=0, label="healthy run-dtype error (control, worst token)")
        for site in SITES:
            idx = [i for i, n in enumerate(taps) if parse_tap(n)[1] == site]
            if idx:
                xs = [parse_tap(taps[i])[0] for i in idx]
                ax.plot(xs, worst[idx], marker=".", ms=3, lw=1.3, color=COLORS[site], label=site)
        for name, marker in ((EMBED, "s"), (FINAL, "D")):
            if name in taps:
                i = taps.index(name)
                ax.plot([_layer_x(name, data.num_layers)], [worst[i]], marker=marker, color="k", ls="", label=name)
        first = _first(data.summary, pair)
        if first:
            x = first["layer"] if first["layer"] is not None else (-1 if first["tap"] == EMBED else data.num_layers)
            y = max(first["rel_l2"] or bottom, bottom)
            ax.plot([x], [y], marker="*", ms=16, color="red", mec="k", ls="", zorder=5)
            ax.annotate(f"first: {first['tap']}\n{first['sequence']} tok {first['token']}", (x, y),
                        xytext=(8, -26), textcoords="offset points", fontsize=8, color="red")
        ax.set_yscale("log")
        ax.axhline(bottom, color="0.6", lw=0.8, ls=":")
        ax.text(data.num_layers + 0.4, bottom, "identical", fontsize=7, color="0.4", ha="right", va="bottom")
        ax.set_title(PAIR_LABELS[pair])
        ax.set_xlabel("layer (embed at -1, final norm at L)")
        ax.set_xlim(-1.5, data.num_layers + 0.5)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xticks(_ticks(layers))
    axes[0][0].set_ylabel("worst token's relative L2 error |a−b|/|b|")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(data.title, fontsize=9)
    fig.tight_layout()
    return fig


def _ticks(layers: np.ndarray) -> list[int]:
    step = max(1, int(np.ceil(len(layers) / 12)))
    return list(range(0, len(layers), step))


def heatmap_figure(data: PlotData, pair: str = "packed-vs-unpacked"):
    """Layer x token heatmaps of relative L2 error, one panel per site."""
    if not data.table.has(pair):
        raise TracerError(f"{data.path} has no {pair} metrics")
    taps = data.table.taps
    rel = data.table.pairs[pair]["rel_l2"]
    sites = [s for s in SITES if any(parse_tap(n)[1] == s for n in taps)]
    finite = rel[np.isfinite(rel) & (rel > 0)]
    vmin = max(float(np.percentile(finite, 1)) if finite.size else FLOOR, FLOOR)
    vmax = max(float(finite.max()) if finite.size else 1.0, vmin * 10)
    ncol = 2
    nrow = int(np.ceil(len(sites) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(13, 2.3 * nrow + 1.2), squeeze=False, sharex=True)
    first = _first(data.summary, pair)
    im = None
    for k, site in enumerate(sites):
        ax = axes[k // ncol][k % ncol]
        idx = [i for i, n in enumerate(taps) if parse_tap(n)[1] == site]
        grid = np.clip(np.nan_to_num(rel[idx], nan=vmax, posinf=vmax), vmin, vmax)
        layers = [parse_tap(taps[i])[0] for i in idx]
        im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                       norm=LogNorm(vmin=vmin, vmax=vmax), cmap="magma",
                       extent=(-0.5, grid.shape[1] - 0.5, -0.5, len(idx) - 0.5))
        for off in data.offsets[1:-1]:
            ax.axvline(off - 0.5, color="w", lw=0.8, alpha=0.8)
        ax.set_title(site, fontsize=9, loc="left")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers))[:: max(1, len(layers) // 6)])
        ax.set_yticklabels(layers[:: max(1, len(layers) // 6)])
        if first and first["tap"] == site and first["layer"] in layers:
            col = data.offsets[first["sequence_index"]] + first["token"]
            ax.plot([col], [layers.index(first["layer"])], marker="o", ms=14, mfc="none", mec="cyan", mew=2)
    for k in range(len(sites), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    spans = " | ".join(f"{name} {data.offsets[i]}-{data.offsets[i + 1] - 1}" for i, name in enumerate(data.ids))
    for ax in axes[-1]:
        ax.set_xlabel("token row (canonical order; white lines separate sequences)", fontsize=8)
    fig.text(0.5, 0.005, f"rows: {spans}  (token 0 of each sequence is <cls>)", ha="center", fontsize=7, color="0.3")
    fig.suptitle(f"{PAIR_LABELS[pair]}: relative L2 error per layer and token\n{data.title}", fontsize=9)
    fig.tight_layout(rect=(0, 0.02, 0.93, 1))
    cax = fig.add_axes((0.94, 0.15, 0.012, 0.7))
    fig.colorbar(im, cax=cax, label="relative L2 error (log)")
    return fig


def sequences_figure(data: PlotData, site: str = "resid_out"):
    """Per-sequence curves: each sequence's worst-token error at ``site``, per layer, per pair."""
    taps = data.table.taps
    idx = [i for i, n in enumerate(taps) if parse_tap(n)[1] == site]
    if not idx:
        raise TracerError(f"{data.path} has no {site} taps")
    layers = [parse_tap(taps[i])[0] for i in idx]
    pairs = data.pairs()
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, pair in zip(axes[0], pairs):
        rel = data.table.pairs[pair]["rel_l2"][idx]
        bottom = _bottom(rel)
        for s, name in enumerate(data.ids):
            rows = slice(data.offsets[s], data.offsets[s + 1])
            ax.plot(layers, np.maximum(_worst(rel[:, rows]), bottom), marker=".", ms=3, lw=1.5,
                    color=cmap(s / max(1, len(data.ids) - 1)), label=f"{name} ({data.offsets[s + 1] - data.offsets[s] - 2} res)")
        ax.set_yscale("log")
        ax.set_title(PAIR_LABELS[pair])
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"worst token's relative L2 error at {site}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"per sequence: {site}\n{data.title}", fontsize=9)
    fig.tight_layout()
    return fig


def diagnosed_tap(summary: dict) -> tuple[str, dict] | None:
    """The tap of the first diagnosis (the divergence's, else the earliest drift's) and that diagnosis."""
    diags = [d for d in (summary.get("diagnosis") or {}).values() if d]
    return (diags[0]["tap"], diags[0]) if diags else None


def _tap_stats(summary: dict, tap: str) -> dict:
    layer, site = parse_tap(tap)
    if layer is None:
        return summary.get(site) or {}
    rows = [e["taps"] for e in summary.get("layers", []) if e["layer"] == layer]
    return rows[0].get(site, {}) if rows else {}


def positions_figure(data: PlotData):
    """Error against the position inside each sequence at the diagnosed tap, one panel per path
    (against the reference; packed vs unpacked without one), the bar and the dtype's integer limit marked."""
    found = diagnosed_tap(data.summary)
    if found is None:
        raise TracerError(f"{data.path} has no diagnosis to draw")
    tap, diag = found
    pairs = [p for p in ("packed-vs-reference", "unpacked-vs-reference", CONTROL) if data.table.has(p)] or ["packed-vs-unpacked"]
    row = data.table.taps.index(tap)
    stats = _tap_stats(data.summary, tap)
    limits = [p for p, dt in INTEGER_LIMITS.items() if dt == data.summary.get("dtype")]
    limits = limits or ([diag["evidence"]["step_position"]] if diag["pattern"] == "step-at-position" else [])
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.4 * len(pairs), 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    rel_all = np.concatenate([data.table.pairs[p]["rel_l2"][row] for p in pairs])
    bottom = _bottom(rel_all)
    for ax, pair in zip(axes[0], pairs):
        rel = data.table.pairs[pair]["rel_l2"][row]
        for s, name in enumerate(data.ids):
            seg = rel[data.offsets[s]:data.offsets[s + 1]]
            ax.plot(np.arange(len(seg)), np.maximum(np.nan_to_num(seg, nan=np.inf), bottom), lw=0.9, marker="." if len(seg) < 40 else None,
                    ms=3, color=cmap(s / max(1, len(data.ids) - 1)), label=f"{name} ({len(seg) - 2} res)",
                    zorder=3 - len(seg) / max(np.diff(data.offsets)))  # shorter sequences drawn on top
        if stats.get("threshold"):
            ax.axhline(stats["threshold"], color="red", lw=0.9, ls="--", label=f"bar {stats['threshold']:.3g}")
        if stats.get("noise"):
            ax.axhline(stats["noise"], color="0.4", lw=0.8, ls=":", label=f"noise {stats['noise']:.3g}")
        for limit in limits:
            if limit < max(np.diff(data.offsets)):
                ax.axvline(limit, color="k", lw=0.8, ls="-.", label=f"{limit}: first integer {INTEGER_LIMITS[limit]} cannot hold")
        ax.set_yscale("log")
        ax.set_title(PAIR_LABELS.get(pair, pair.replace("-vs-", " vs ")))
        ax.set_xlabel("position inside the sequence (token 0 = <cls>)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"relative L2 error at {tap}")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fate = "propagates" if diag["propagates"] else f"absorbed at {diag['absorbed_at']}" if diag["propagates"] is False else ""
    fig.suptitle(f"{tap}: {diag['pattern']} ({diag['subject']}), {fate}\n{data.title}", fontsize=9)
    fig.tight_layout()
    return fig


MARKER = "plots.json"
"""Written with the figures: which trace they are of, and which files are the set."""


def plot_names(data: PlotData) -> list[str]:
    """The figures a trace gets (without extension), as :func:`plot_trace` writes them."""
    sites = [site for site in SITES if any(parse_tap(n)[1] == site for n in data.table.taps)]
    return (["curves"] + (["sequences"] + [f"heatmap-{pair}" for pair in data.pairs()] if sites else [])
            + (["positions"] if diagnosed_tap(data.summary) is not None else []))


def _check_folder(out: Path, data: PlotData, names: list[str], force: bool) -> None:
    """Refuse (without ``force``) to replace figures in ``out`` that are not this trace's."""
    present = [f"{n}.{ext}" for n in names for ext in ("png", "svg") if files.exists(out / f"{n}.{ext}")]
    if not present or force:
        return
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and marker.get("identity") == data.identity:
        return  # this trace's own figures: drawn again
    of = f" of another trace ({marker.get('trace')})" if isinstance(marker, dict) and marker.get("trace") else " not known to be this trace's"
    more = f" and {len(present) - 1} more" if len(present) > 1 else ""
    raise TracerError(f"{out} holds {present[0]}{more}{of}; pass --force to replace them, or -o to choose another folder")


def plot_trace(path: str | Path, out_dir: str | Path | None = None, quiet: bool = True, verified: Verified | None = None,
               force: bool = False) -> Path:
    """Write every figure as PNG and SVG into ``out_dir`` (default: ``<trace>-plots/``), after
    verifying the trace (:func:`load`; ``verified``: the caller just did, and this is what it gave).

    A trace of a subset of taps gets the figures its taps allow (no heatmap without per-layer
    taps; the per-sequence curves use ``resid_out``, else the latest site traced). Figures of
    another trace in ``out_dir`` are replaced only with ``force`` (:data:`MARKER` says whose they
    are); all files are written to partial files first and renamed together, so an interrupted
    plot leaves the old set or the new one (:func:`tracer.store.files.write_group`).
    """
    if out_dir is not None and str(out_dir) == "":
        raise TracerError("-o is empty; give the folder to write the plots into")
    out = Path(out_dir) if out_dir else Path(path).with_name(Path(path).stem + "-plots")
    if files.exists(out) and not out.is_dir():
        raise TracerError(f"{out} exists and is not a folder; -o names the folder to write the plots into")
    data = load(path, verified)
    names = plot_names(data)
    _check_folder(out, data, names, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TracerError(f"cannot create the plot folder {out}: {e.strerror or e}") from None
    sites = [site for site in SITES if any(parse_tap(n)[1] == site for n in data.table.taps)]
    figures = {"curves": curves_figure(data)}
    try:
        if "sequences" in names:
            figures["sequences"] = sequences_figure(data, "resid_out" if "resid_out" in sites else sites[-1])
            for pair in data.pairs():
                figures[f"heatmap-{pair}"] = heatmap_figure(data, pair)
        if "positions" in names:
            figures["positions"] = positions_figure(data)
        items = [(out / f"{name}.{ext}", _savefig(fig, ext)) for name, fig in figures.items() for ext in ("png", "svg")]
        marker = {"trace": str(Path(path).resolve()), "identity": data.identity, "files": [p.name for p, _ in items]}
        items.append((out / MARKER, json.dumps(marker, indent=2) + "\n"))
        files.write_group(items, inputs=[path], what="-o")
    except OSError as e:
        raise TracerError(f"cannot write the plots into {out}: {e.strerror or e}") from None
    finally:
        for fig in figures.values():
            plt.close(fig)
    if not quiet:
        for name in figures:
            print(f"tracer: wrote {out / name}.png/.svg", file=sys.stderr)
    return out


def _savefig(fig, ext: str):
    return lambda f: fig.savefig(f, dpi=130, format=ext)


def build_parser() -> Parser:
    p = Parser(prog="python -m tracer.plot", description="Draw per-layer curves, layer x token heatmaps and per-sequence curves of a trace (PNG and SVG).")
    p.add_argument("trace", metavar="TRACE.h5")
    p.add_argument("-o", "--out", default=None, metavar="DIR", help="output folder (default <trace>-plots/)")
    p.add_argument("--force", action="store_true", help="replace figures of another trace in DIR")
    return p


def use_file_backend() -> None:
    """Command-line use writes files only: no display needed (notebooks keep their backend)."""
    matplotlib.use("Agg")


@main_guard(unwritten="no plots were written")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    use_file_backend()
    with reading(args.trace):
        out = plot_trace(args.trace, args.out, quiet=False, force=args.force)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
