"""The noise rule's K against measured margins: ``python -m tracer.bench --calibrate-only``.

K (:data:`tracer.judging.rule.NOISE_FACTOR`) must sit above every healthy token and below every
real cause. :func:`calibrate` measures, on one model and batch (``--metrics-only`` traces, then
removed), each ratio worst token / noise level (the control's median error per tap,
:mod:`tracer.capture.control`):

* ``healthy``: the control path itself (the built-in packed path in the control's
  configuration, reused as the control); margin K / worst;
* ``same_rope_pair``: ``--packed-rope model``, packed vs unpacked (the same RoPE on both
  sides, so only kernel rounding parts them), which must stay below K;
* ``shared_cause``: ``--packed-rope model``, the worst token of either path against the
  reference (both carry fair-esm's bfloat16 RoPE), in units of K;
* one row per ``--calibrate-packed SPEC`` plug-in: its packed worst token, in units of K.

docs/control-path.md has measured margins. Example::

    cal = calibrate(dict(model="esm2_t6_8M_UR50D", weights="random", device="cpu", dtype="bfloat16", attn="auto", force=True),
                    debug_batch(400), load_model("esm2_t6_8M_UR50D", "random", 0), Path("/tmp"))
    print("\n".join(format_calibration(cal)))
"""

from __future__ import annotations

import time
from pathlib import Path

from tracer.env import environment, resolve_device, resolve_dtype
from tracer.errors import TracerError
from tracer.esm import attention, models
from tracer.inputs.sequences import debug_batch
from tracer.judging.rule import NOISE_FACTOR
from tracer.judging.tables import stored_table
from tracer.judging.verdict import noise_ratios
from tracer.runner.config import RunConfig
from tracer.runner.execute import trace
from tracer.runner.plan import reference_dtype
from tracer.store.trace_file import open_trace


def _ratios(trace_path: Path) -> dict:
    with open_trace(trace_path) as t:
        return noise_ratios(stored_table(t))


def calibrate(base: dict, seqs, loaded, folder: Path, packed_specs=(), say=print) -> dict:
    """K's margins on fault-free and shared-cause runs (``--metrics-only`` traces, then removed).

    * ``healthy``: the control path's worst token / its own noise level (the built-in packed
      path in the control's configuration, reused as the control); the margin is K / worst.
    * ``same_rope_pair``: ``--packed-rope model``, packed vs unpacked (the same RoPE on both
      sides, so only kernel rounding parts them): worst token / noise, which must stay below K.
    * ``shared_cause``: ``--packed-rope model``, the worst token of either path against the
      reference / noise, in units of K (both paths carry fair-esm's bfloat16 RoPE).
    * one row per ``packed_specs`` plug-in: its packed worst token / noise, in units of K.

    ``base``: :class:`RunConfig` fields of the run (model, weights, device, dtype, attn).
    """
    k = NOISE_FACTOR
    runs = [("healthy", {}), ("packed_rope_model", {"packed_rope": "model"})] + [(f"plug-in {spec}", {"packed": spec}) for spec in packed_specs]
    out: dict = {"K": k, "seq_len": max(s.length for s in seqs)}
    for label, kw in runs:
        say(f"bench: calibration run: {label}")
        t0 = time.perf_counter()
        r = trace(RunConfig(**base, metrics_only=True, out=str(folder / "bench-cal.h5"), **kw), seqs, quiet=True, loaded=loaded)
        ratios = _ratios(r.path)
        att = r.summary.attribution
        r.path.unlink(missing_ok=True)
        row = {"seconds": round(time.perf_counter() - t0, 1), "drifting": att.drifting if att else None, "verdict": r.summary.verdict,
               "ratios": ratios}
        if label == "healthy":
            worst = ratios["control-vs-reference"]["max_ratio"]
            out["healthy"] = {**row, "worst": worst, "k_over_worst": k / worst if worst else None}
        elif label == "packed_rope_model":
            pair = ratios["packed-vs-unpacked"]["max_ratio"]
            shared = max(ratios["packed-vs-reference"]["max_ratio"], ratios["unpacked-vs-reference"]["max_ratio"])
            out["same_rope_pair"] = {"worst": pair, "k_over_worst": k / pair if pair else None}
            out["shared_cause"] = {**row, "worst": shared, "over_k": shared / k}
        else:
            worst = ratios["packed-vs-reference"]["max_ratio"]
            out.setdefault("plugins", {})[label.removeprefix("plug-in ")] = {**row, "worst": worst, "over_k": worst / k}
    return out


def format_calibration(c: dict) -> list[str]:
    """The margins of K, one line each, with their targets."""
    k = c["K"]
    h, pair, shared = c["healthy"], c["same_rope_pair"], c["shared_cause"]

    def below(x):
        return "K / inf" if not x["k_over_worst"] else f"K / {x['k_over_worst']:.2f}"

    lines = [
        f"noise calibration, K = {k:g}, large sequence {c['seq_len']} residues (worst token / noise level):",
        f"  {'healthy: the control path':<58}{h['worst']:>8.3g} = {below(h)}   [<= K / 2]",
        f"  {'packed vs unpacked, same RoPE (--packed-rope model)':<58}{pair['worst']:>8.3g} = {below(pair)}   [< K]",
        f"  {'shared cause (--packed-rope model), worst path':<58}{shared['worst']:>8.3g} = {shared['over_k']:.2f} K   [>= 3 K]; drifting: {shared['drifting']}",
    ]
    for spec, p in (c.get("plugins") or {}).items():
        lines.append(f"  {'plug-in ' + Path(spec.split(':')[0]).name + ', packed':<58}{p['worst']:>8.3g} = {p['over_k']:.2f} K   drifting: {p['drifting']}")
    return lines


def run_calibration(model_name, seq_len, device_name, dtype_name_, attn, folder: Path, packed_specs=(), say=print) -> dict:
    """``--calibrate-only``: :func:`calibrate` alone, on random weights."""
    device, dtype = resolve_device(device_name), resolve_dtype(dtype_name_)
    if reference_dtype("auto", dtype) is None:
        raise TracerError(f"--calibrate-only calibrates the noise rule, which needs a reference: use --dtype bfloat16 or float16, not {dtype_name_}")
    t0 = time.perf_counter()
    say(f"bench: loading {model_name} (random weights)")
    loaded = models.load_model(model_name, "random", 0)
    base = dict(model=model_name, weights="random", device=device_name, dtype=dtype_name_, attn=attn, force=True)
    cal = calibrate(base, debug_batch(seq_len), loaded, folder, packed_specs, say)
    return {"model": model_name, "dtype": dtype_name_, "device": environment(device)["device_name"],
            "backend": attention.resolve(attn, device, dtype).name, "calibration": cal, "seconds": time.perf_counter() - t0}
