"""Pre-flight: what a run will cost, estimated before the model is loaded, against what is free.

Everything is computed from the architecture, the token counts and the options (no model is
built: parameter counts come from fair-esm's ESM2 constructed on the meta device). Every tap is
``N x E`` numbers (per-head taps are ``N x H x d`` with ``H x d = E``), in the run dtype for the
low-precision paths and in the reference dtype for the reference.

* **trace bytes**: the tensors (unless ``--metrics-only``) plus the metric tables
  (``(T, N)`` float32 per metric and pair).
* **held taps**: the paths run in lockstep (:mod:`tracer.capture.lockstep`), so the taps held at once
  are about one layer of every path (on a GPU exactly that: a layer's pairs are computed once
  the layer is done; on a CPU the low-precision paths' taps wait for the reference's, which are
  let go as their pairs are computed), plus, for full traces, up to one more layer in flight to
  the disk (``--local`` keeps every layer of unpacked and reference).
* **workspace**: the largest single forward step: fair-esm's padded attention holds
  ``B x H x T x T`` scores (float32 softmax, 16-bit copies and the head-mean of the returned
  weights: 12 bytes per score in 16-bit runs, 8 in float32; measured on CPU),
  the feed-forward ``~12 x B x T x E`` values; the parked paths' residual streams; the packed
  path's ``~12 x N x E``; on a GPU, a layer's pairs (a float32 stack of each operand, at most
  64 MB or one tap, and two temporaries).
* **metric sums**: every pair keeps five per-token sums per tap for the whole run (float32),
  and the table is finished from them in float64 at the end (:func:`metric_sums_bytes`); this
  grows with taps x tokens like a trace of its own, and dominates for thousands of sequences.
* **device peak** = weights in the run dtype + the up-cast reference copy of the embedding/heads
  and of one layer + held taps + workspace + metric sums. On a CUDA run the **host peak** is the float32 model
  while it loads (random init or a checkpoint's pages) and the pinned staging buffers; on a CPU
  run both are the same memory, and the load's float32 model counts too.

:func:`check` compares with free disk (at the trace's folder), free device memory and available
host memory and, if something does not fit, names what would: ``--max-batch-tokens K`` (the
unpacked and reference sub-batches), ``--metrics-only``, a ``--layers`` range, fewer ``--taps``,
or splitting the batch.

Example::

    est = estimate(arch, [s.n_tokens for s in seqs], names, torch.bfloat16, torch.float32, metrics_only=True)
    print(est.describe())
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tracer.inputs.batching import SubBatches, plan_sub_batches
from tracer.errors import TracerError
from tracer.judging.metrics import METRICS

HEADROOM = 0.9
"""Fraction of free memory/disk a run may plan to use."""


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass(frozen=True)
class Estimate:
    """Bytes a run will need (module docstring says how each is estimated).

    Attributes:
        trace_bytes: bytes written to the trace.
        layer_tap_bytes: one layer of taps of all paths (the unit of the memory bound).
        held_tap_bytes: taps held at once.
        weights_bytes: the model on the run device, in the run dtype.
        reference_weights_bytes: up-cast copies held by the reference (heads + one layer).
        workspace_bytes: activations of the largest forward step, plus parked paths.
        device_peak: peak on the run device (CUDA), or 0 for CPU runs.
        host_peak: peak host memory above what the process holds before loading.
        load_bytes: float32 bytes of the model while it loads.
        plan: the sub-batches this estimate assumes.
        device: ``cpu`` or ``cuda``.
    """

    trace_bytes: int
    layer_tap_bytes: int
    held_tap_bytes: int
    weights_bytes: int
    reference_weights_bytes: int
    workspace_bytes: int
    device_peak: int
    host_peak: int
    load_bytes: int
    plan: SubBatches
    device: str = "cpu"

    def describe(self) -> str:
        where = f"device peak {_gb(self.device_peak)}, host peak {_gb(self.host_peak)}" if self.device == "cuda" else f"memory peak {_gb(self.host_peak)}"
        split = "" if len(self.plan.groups) == 1 else f" in {len(self.plan.groups)} sub-batches of <= {self.plan.max_tokens} padded tokens"
        return (
            f"estimate: trace {_gb(self.trace_bytes)}; {where} (weights {_gb(self.weights_bytes)}, "
            f"held taps {_gb(self.held_tap_bytes)}, workspace {_gb(self.workspace_bytes)}){split}"
        )

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "plan"}
        d["plan"] = self.plan.to_meta()
        return d


@dataclass(frozen=True)
class Resources:
    """Free bytes where the run will write and compute (``None`` = unknown, not checked)."""

    disk: int | None
    host: int | None
    device: int | None = None


_PARAMS: dict[tuple, tuple[int, int, int]] = {}


def parameter_counts(num_layers: int, embed_dim: int, heads: int) -> tuple[int, int, int]:
    """``(total, one layer, outside the layers)`` parameter+buffer elements of fair-esm's ESM2."""
    key = (num_layers, embed_dim, heads)
    if key not in _PARAMS:
        from tracer.esm.skeleton import esm2_skeleton

        m = esm2_skeleton(num_layers=1, embed_dim=embed_dim, attention_heads=heads)
        layer = sum(t.numel() for t in m.layers[0].state_dict().values())
        outer = sum(t.numel() for k, t in m.state_dict().items() if not k.startswith("layers.") and not k.startswith("contact_head."))
        outer += num_layers * heads + 1  # contact head regression
        _PARAMS[key] = (outer + num_layers * layer, layer, outer)
    return _PARAMS[key]


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def estimate(
    arch,
    n_tokens: list[int],
    names: list[str],
    dtype: torch.dtype,
    ref_dtype: torch.dtype | None,
    metrics_only: bool = False,
    local: bool = False,
    max_batch_tokens: int = 0,
    device: str = "cpu",
    control: bool = False,
) -> Estimate:
    """The :class:`Estimate` of one run (see the module docstring)."""
    from tracer.capture.collector import Collector, per_layer_on
    from tracer.capture.lockstep import tap_group

    n, e, h = sum(n_tokens), arch.embed_dim, arch.heads
    b, rb = _bytes(dtype), (_bytes(ref_dtype) if ref_dtype is not None else 0)
    path_bytes = [b, b] + ([b] if control else []) + ([rb] if ref_dtype is not None else [])  # unpacked, packed[, control][, reference]
    tap = n * e  # elements per tap
    per_group: dict[int, int] = {}
    for name in names:
        g = tap_group(name)
        per_group[g] = per_group.get(g, 0) + 1
    layer_taps = max(per_group.values()) if per_group else 0
    layer_tap_bytes = layer_taps * tap * sum(path_bytes)

    pairs = 1 + (4 if ref_dtype is not None else 0)  # packed-vs-unpacked [, three vs reference, rounded floor]
    if local:
        pairs += 3 if ref_dtype is not None else 1
    metrics = pairs * len(METRICS) * len(names) * n * 4
    tensors = 0 if metrics_only else len(names) * tap * sum(path_bytes)
    datasets = (0 if metrics_only else len(names) * len(path_bytes)) + pairs * len(METRICS)
    trace_bytes = tensors + metrics + 64 * len(n_tokens) + 2048 * datasets + (64 << 10)  # HDF5 headers, meta, summary

    # on a GPU the collector computes a layer's pairs once the layer is done: every path's taps
    # of the layer are held (tracer.capture.collector). On a CPU a layer's low-precision taps
    # wait for the reference, and reference taps are let go as their pairs are computed (every
    # 8 pending pairs, 3 per reference tap).
    if per_layer_on(device):
        held = layer_tap_bytes
    elif ref_dtype is not None:
        held = layer_taps * tap * (3 if control else 2) * b + -(-layer_taps // 2) * tap * rb
    else:
        held = layer_taps * tap * b + min(layer_taps, 8) * tap * b
    if not metrics_only:
        held += layer_tap_bytes  # the writer's back-pressure budget: one layer in flight to the disk
    if local:
        held += len(names) * tap * (b + rb)

    total, layer_params, outer_params = parameter_counts(arch.num_layers, e, h)
    weights = total * b
    ref_weights = (outer_params + layer_params) * rb

    plan = plan_sub_batches(n_tokens, max_batch_tokens)
    attn_per_score = {2: 12, 4: 8, 8: 36}  # scores, float32 softmax, 16-bit copies, head-mean copy (measured on CPU)
    steps = []
    for k, group in enumerate(plan.groups):
        t = max(n_tokens[i] for i in group)
        p = plan.padded_tokens(k)
        for bb in [b] + ([rb] if ref_dtype is not None else []):  # the padded paths: unpacked, reference
            steps.append(len(group) * h * t * t * attn_per_score[bb] + 8 * p * e * bb)
            steps.append(12 * p * e * bb)
    steps.append(12 * n * e * b)  # packed forward (and the control's)
    parked = 2 * e * (plan.total_padded_tokens * (b + rb) + n * b * (2 if control else 1))  # residual streams of the waiting paths
    if per_layer_on(device):  # a layer's pairs: per operand a float32 stack of <= 64 MB (one tap at least) and its difference
        work = 8 if 8 in (b, rb) else 4
        operands = (3 if control else 2) + 2  # the low-precision paths, the reference, the rounded reference
        steps.append((operands + 2) * max(Collector.chunk_bytes, tap * work))  # + the difference and a product
    workspace = max(steps) + parked

    load = total * 4  # float32 as stored / as initialised
    sums = metric_sums_bytes(len(names), n, pairs, ref_dtype)
    run = weights + ref_weights + held + workspace + sums
    if device == "cuda":
        pinned = 0 if metrics_only else 4 * 2 * tap * max(path_bytes)  # writer's pinned pools
        return Estimate(trace_bytes, layer_tap_bytes, held, weights, ref_weights, workspace, int(run * 1.1), load + pinned, load, plan, device)
    return Estimate(trace_bytes, layer_tap_bytes, held, weights, ref_weights, workspace, 0, max(load + weights, run), load, plan, device)


def check_writable(folder: Path, out: Path) -> None:
    """Refuse, in one line, a ``--out`` whose folder (or nearest existing parent) cannot hold a
    trace: not a folder, not writable, or on a pseudo file system (``/proc``, ``/sys``: no
    blocks at all), where "0 GB free" would otherwise read as "use a larger machine"."""
    if not folder.is_dir():
        raise TracerError(f"cannot write {out}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TracerError(f"cannot write {out}: the folder {folder} is not writable; choose another --out")
    try:
        blocks = os.statvfs(folder).f_blocks
    except (OSError, AttributeError):  # no statvfs here: nothing to tell
        return
    if blocks == 0:
        raise TracerError(
            f"cannot write {out}: {folder} is on a pseudo file system (like /proc or /sys) that holds no files; choose another --out"
        )


SUMS = 5
"""Per-token sums a pair keeps per tap until the end (:func:`tracer.judging.metrics.token_sums`)."""


def metric_sums_bytes(n_taps: int, n: int, pairs: int, ref_dtype: torch.dtype | None) -> int:
    """Memory the per-token metrics take, on top of the taps: every pair keeps ``5`` sums per tap
    and token for the whole run (float32; float64 with a float64 reference), and the table is
    finished at the end one pair at a time in float64 (the ``(T, 5, N)`` sums, three metrics)
    while every finished pair's three float32 metrics are held. Negligible for a debug batch,
    this is gigabytes for ten thousand sequences: 192 bytes per tap and token with a reference
    (9.6 kB per token for the 50 taps of a 6-layer model)."""
    work = 8 if ref_dtype == torch.float64 else 4
    held = pairs * n_taps * n * SUMS * work
    finishing = n_taps * n * (SUMS * 8 + len(METRICS) * 8) + pairs * n_taps * n * len(METRICS) * 4
    return held + finishing


def free_resources(out: Path, device: torch.device) -> Resources:
    """Free disk at ``out``'s folder, available host memory, free device memory."""
    folder = Path(out).resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    check_writable(folder, Path(out))
    disk = shutil.disk_usage(folder).free
    host = None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        host = info.get("MemAvailable")
    except OSError:
        pass
    dev = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return Resources(disk, host, dev)


def _fits(est: Estimate, free: Resources) -> list[str]:
    """What does not fit (empty if everything does)."""
    short = []
    if free.disk is not None and est.trace_bytes > HEADROOM * free.disk:
        short.append(f"the trace needs {_gb(est.trace_bytes)} but {_gb(free.disk)} of disk is free")
    if free.device is not None and est.device_peak > HEADROOM * free.device:
        short.append(f"the run needs about {_gb(est.device_peak)} of device memory but {_gb(free.device)} is free")
    if free.host is not None and est.host_peak > HEADROOM * free.host:
        short.append(f"the run needs about {_gb(est.host_peak)} of host memory but {_gb(free.host)} is available")
    return short


def check(est_for, free: Resources, auto_split: bool, options: dict) -> Estimate:
    """The estimate to run with, or :class:`TracerError` naming what would fit.

    Args:
        est_for: ``est_for(**changes)`` -> :class:`Estimate` with some options changed
            (``max_batch_tokens``, ``metrics_only``, ``layers``, ``sites``, ``n_sequences``).
        free: what is free.
        auto_split: the user left ``--max-batch-tokens`` to us: split the padded batch if that
            makes it fit.
        options: the run's ``metrics_only``, ``layers`` (list), ``sites`` (list), ``n_sequences``.
    """
    est = est_for()
    short = _fits(est, free)
    if not short:
        return est
    # the padded paths' workspace shrinks with the sub-batch budget
    whole = est.plan.largest_padded_tokens
    budgets = [whole >> k for k in range(1, 12) if whole >> k >= 1024]
    for k in budgets:
        cand = est_for(max_batch_tokens=k)
        if not _fits(cand, free):
            if auto_split:
                return cand
            return _refuse(short, f"--max-batch-tokens {k}")
    ways = []
    if not options["metrics_only"] and not _fits(est_for(metrics_only=True), free):
        ways.append("--metrics-only")
    layers = options["layers"]
    for count in range(len(layers) - 1, 0, -1):
        if not _fits(est_for(layers=layers[:count]), free):
            ways.append(f"--layers {layers[0]}-{layers[count - 1]}")
            break
    sites = options["sites"]
    for count in range(len(sites) - 1, 0, -1):
        if not _fits(est_for(sites=sites[:count]), free):
            ways.append(f"--taps {','.join(sites[:count])}")
            break
    s = options["n_sequences"]
    for parts in range(2, s + 1):
        if not _fits(est_for(n_sequences=-(-s // parts)), free):
            ways.append(f"splitting the batch into {parts} runs of <= {-(-s // parts)} sequences")
            break
    return _refuse(short, " or ".join(ways) if ways else None)


def _refuse(short: list[str], way: str | None) -> Estimate:
    hint = f"; this would fit: {way}" if way else "; nothing smaller fits: use a larger machine"
    raise TracerError(f"{'; '.join(short)} (pre-flight estimate, nothing loaded yet){hint}")
