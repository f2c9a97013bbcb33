"""One traced run, end to end: load, run the paths, compare, write the trace atomically.

Order of work, and the dtype of every step:

0. Pre-flight (:mod:`tracer.runner.preflight`), before anything is loaded: trace bytes and peak memory
   are estimated from the architecture and token counts, printed, and checked against free disk
   and memory; a run that cannot fit stops with one line naming what would.
1. Load the model in its stored precision (float32 for fair-esm releases; random init is
   float32, cached after the first build) on the CPU, then move it to the run device through
   pinned staging buffers and convert it in place to the run dtype.
2. The paths run in lockstep, layer by layer (:mod:`tracer.capture.lockstep`), each forward in its own
   thread, one thread at a time:

   * ``unpacked``: fair-esm's ``ESM2.forward`` on the padded batch (or on length-sorted
     sub-batches, :mod:`tracer.inputs.batching`), in the run dtype, or the user's plug-in;
   * ``packed``: the built-in packed forward (RoPE per ``rope``) or the user's plug-in, in the
     run dtype;
   * ``reference`` (if any): fair-esm's ``ESM2.forward`` again, on an up-cast twin of the model
     (:func:`tracer.esm.models.upcast_twin`: exact float32/float64 up-casts of the run-dtype weights,
     one layer at a time; rotary state rebuilt), TF32 off.

   After each layer, its pairs' per-token sums are computed on the run device (on exact float32
   up-casts) and the layer's taps are let go (full tensors stream to the file meanwhile), so
   the taps held are about one layer of every path, whatever the depth.
3. ``--local``: each layer re-run on the other side's recorded input (these runs keep every
   layer of unpacked and reference).
4. The metrics are finished in float64 on the CPU and stored as float32; the verdict is
   decided; meta (with the pre-flight estimate and the memory measured), metrics and summary are
   written, and the file is renamed into place.

One copy of the weights in the run dtype exists, plus one layer up-cast for the reference. Example::

    result = trace(RunConfig(model="esm2_t6_8M_UR50D", weights="random", device="cpu"), debug_batch(400))
    print(result.summary.format_text())
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tracer.esm import attention

from tracer.store import files

from tracer.esm import models

from tracer.runner import preflight
from tracer.inputs.batching import SubBatches, sub_faults
from tracer.capture.collector import Assembler, Collector
from tracer.store.tap_writer import AsyncTapWriter, Ledger
from tracer.judging.embeddings import POOLING, mean_pool
from tracer.env import dtype_name, environment, resolve_device, resolve_dtype, return_freed_memory, tool_version
from tracer.errors import TracerError
from tracer.inputs.faults import Faults
from tracer.capture.lockstep import Stream, run_lockstep, tap_group
from tracer.judging.metrics import METRICS, metrics_table, token_metrics
from tracer.esm.packed_forward import ROPE_MODES, PackedESM2
from tracer.capture.observe import missing_advice
from tracer.capture.paths import (
    Batch, BuiltinPackedPath, FairEsmPath, PluginPath, TracedPath, encode, run_packed_layer, run_unpacked_layer,
)
from tracer.capture.plugin import BUILTIN
from tracer.runner.progress import Progress
from tracer.capture.plugin import load as load_plugin
from tracer.judging.pairs import batch_description, default_rule, summary_context
from tracer.inputs.sequences import Sequence
from tracer.store.trace_file import TraceWriter
from tracer.taps import EMBED, FINAL, SITES, parse_tap, select_taps, tap_name
from tracer.judging.verdict import MetricsTable, Rule, Summary, judge

REFERENCES = ("auto", "fp32", "fp64", "none")
_REF_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides its sequences (defaults are the CLI's).

    Attributes:
        model: fair-esm name; ``None`` = ``esm2_t36_3B_UR50D`` (or the checkpoint's own).
        weights: ``auto``, ``random`` or a checkpoint path.
        seed: seed of random weights.
        trust_checkpoint: allow arbitrary pickled objects in the checkpoint.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        dtype: run dtype of both paths.
        attn: attention backend of the packed path (``auto``, ``flash-attn``, ``torch-varlen``, ``math``).
        packed_rope: ``fp32`` or ``model``.
        reference: ``auto`` (fp32 for 16-bit runs, none otherwise), ``fp32``, ``fp64``, ``none``.
        pack_order: order of sequences in the packed stream.
        taps, layers: subsets to trace (``None`` = all).
        metrics_only: compute metrics on the fly, store no tensors.
        local: also re-run each layer on the other side's input (local vs inherited error).
        compression: HDF5 compression of tensors.
        out: trace path (``None`` = ``traces/<model>-<dtype>-<lengths>-<time>.h5``).
        force: overwrite ``out`` if it exists.
        faults: planted bugs (validation of the tool).
        rule: verdict rule; ``None`` = noise rule with a reference, plain rule without.
        command: the command line, recorded in the trace.
        packed: the packed side: ``builtin``, ``package.module:factory``, ``file.py:factory`` or
            a factory callable (:mod:`tracer.capture.plugin`).
        unpacked: the unpacked side: ``fair-esm`` (its own ``ESM2.forward``) or a plug-in SPEC.
        max_batch_tokens: padded-token budget of fair-esm's unpacked and reference sub-batches
            (:mod:`tracer.inputs.batching`); ``0`` = the batch as given; ``None`` = one batch if the
            pre-flight estimate fits in free memory, else the largest budget that does.
    """

    model: str | None = None
    weights: str = "auto"
    seed: int = 0
    trust_checkpoint: bool = False
    device: str = "auto"
    dtype: str = "bfloat16"
    attn: str = "auto"
    packed_rope: str = "fp32"
    reference: str = "auto"
    pack_order: str = "given"
    taps: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    metrics_only: bool = False
    local: bool = False
    compression: str = "none"
    out: str | None = None
    force: bool = False
    faults: Faults = field(default_factory=Faults)
    rule: Rule | None = None
    command: tuple[str, ...] = ()
    packed: object = BUILTIN["packed"]
    unpacked: object = BUILTIN["unpacked"]
    max_batch_tokens: int | None = None


@dataclass
class Result:
    """What a run produced: the trace path, the verdict, the timings (seconds), notes for the
    user (taps a plug-in did not expose, with the line that would capture them), the memory
    measured (``peak_held_tap_bytes``: most tap bytes held at once, counted exactly; the CUDA
    peak allocation) and the pre-flight estimate."""

    path: Path
    summary: Summary
    timings: dict
    bytes_written: int
    write_stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    estimate: "preflight.Estimate | None" = None


def reference_dtype(reference: str, dtype: torch.dtype) -> torch.dtype | None:
    if reference not in REFERENCES:
        raise TracerError(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    if reference == "none":
        return None
    if reference == "auto":
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
    ref = _REF_DTYPES[reference]
    if torch.finfo(ref).bits <= torch.finfo(dtype).bits:
        raise TracerError(
            f"--reference {reference} is not more precise than the run dtype {dtype_name(dtype)}; "
            "use --reference fp64 (or none)"
        )
    return ref


def default_out(arch_name: str, dtype: str, batch: list[Sequence]) -> Path:
    lengths = "-".join(str(s.length) for s in batch[:4]) + ("-etc" if len(batch) > 4 else "")
    now = time.time()  # unique per run and still sortable: microseconds and the process id
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}-{os.getpid()}"
    return Path("traces") / f"{arch_name}-{dtype}-L{lengths}-{stamp}.h5"


@contextlib.contextmanager
def _deterministic():
    """Deterministic algorithms where the backends allow (warn, don't fail, where they don't).

    PyTorch's deterministic mode also NaN-fills every uninitialised allocation by default; no
    op traced here reads uninitialised memory, and the fill doubled the cost of every op
    output (the 3B forward ran 8x slower on the H100), so it is turned off for the run.
    """
    import torch.utils.deterministic as det

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False
    try:
        yield {  # what torch reports now, recorded in the trace (not what was asked for)
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill_uninitialized_memory": bool(det.fill_uninitialized_memory),
        }
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        det.fill_uninitialized_memory = saved[2]


def _validate_faults(faults: Faults, batch: Batch, num_layers: int) -> None:
    for p in faults.perturbations:
        layer, _ = parse_tap(p.tap)
        if layer is not None and layer >= num_layers:
            raise TracerError(f"fault tap {p.tap}: the model has layers 0..{num_layers - 1}")
        if not 0 <= p.sequence < len(batch.sequences):
            raise TracerError(f"fault sequence index {p.sequence} out of range")
        n = batch.layout.lengths[p.sequence]
        if not 0 <= p.token < n:
            raise TracerError(f"fault token {p.token}: sequence {batch.ids[p.sequence]!r} has tokens 0..{n - 1}")
    if faults.layers is not None and any(not 0 <= i < num_layers for i in faults.layers):
        raise TracerError(f"fault layers {list(faults.layers)}: the model has layers 0..{num_layers - 1}")


def _oom_message(config: RunConfig, estimate, device: torch.device) -> str:
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    have = f", {free / 2**30:.1f} GiB free now" if free is not None else ""
    ways = [f"--max-batch-tokens {max(1, estimate.plan.largest_padded_tokens // 2)}"]
    if not config.metrics_only:
        ways.append("--metrics-only")
    ways += ["fewer --layers or --taps", "splitting the batch"]
    return (
        f"out of memory on {device} (pre-flight estimated a peak of {estimate.device_peak / 2**30:.2f} GiB{have}); "
        f"try {', '.join(ways)}"
    )


def run_meta(config: RunConfig, arch, weights, dtype, ref_dtype, backend, names: list[str], device) -> dict:
    """The trace's ``meta`` record: everything needed to know what was run, and how."""
    return {
        "tool_version": tool_version(),
        "command": list(config.command),
        "model": arch.name,
        "architecture": {"num_layers": arch.num_layers, "embed_dim": arch.embed_dim, "heads": arch.heads},
        "weights": weights.to_dict(),
        "dtype": dtype_name(dtype),
        "reference_dtype": dtype_name(ref_dtype) if ref_dtype is not None else None,
        "attention": {"backend": backend.name, "version": backend.version, "deterministic": backend.deterministic},
        "packed_rope": config.packed_rope,
        "pack_order": config.pack_order,
        "taps": names,
        "metrics_only": config.metrics_only,
        "tensors": "none" if config.metrics_only else "full",
        "local": config.local,
        "compression": config.compression,
        "faults": config.faults.to_dict(),
        "faults_description": config.faults.describe(),
        "environment": environment(device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class _Plan:
    """What :func:`_prepare` settled before any forward runs."""

    model: object
    arch: object
    weights: object
    device: torch.device
    dtype: torch.dtype
    ref_dtype: torch.dtype | None
    backend: attention.Backend
    batch: Batch
    names: list[str]
    rule: Rule
    out: Path
    plugins: dict
    estimate: preflight.Estimate


def _prepare(config: RunConfig, sequences: list[Sequence], say, loaded, timings: dict) -> _Plan:
    """Check every option (before the model load where possible), load, encode, choose taps."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    if dtype == torch.float64:
        raise TracerError("--dtype float64 is a reference precision, not a run dtype; choose bfloat16, float16 or float32")
    if config.packed_rope not in ROPE_MODES:
        raise TracerError(f"unknown --packed-rope {config.packed_rope!r}; choose one of {', '.join(ROPE_MODES)}")
    ref_dtype = reference_dtype(config.reference, dtype)
    plugins = {side: load_plugin(getattr(config, side), side) for side in ("packed", "unpacked")}  # fail fast
    _check_plugin_options(config, plugins)
    backend = attention.resolve(config.attn, device, dtype) if plugins["packed"] is None else attention.PLUGIN
    if config.local and ref_dtype is None:
        say("--local without a reference splits packed-vs-unpacked error only")
    if config.out is not None:  # before a long model load
        if not config.out.strip():
            raise TracerError("--out is empty; give a file path (or leave --out out for a default name under traces/)")
        files.refuse_existing(Path(config.out), config.force)

    if config.max_batch_tokens is not None and config.max_batch_tokens < 0:
        raise TracerError(f"--max-batch-tokens must be 0 (one batch) or a positive number of padded tokens, got {config.max_batch_tokens}")
    arch = loaded[1] if loaded is not None else models.peek_architecture(config.model, config.weights, config.trust_checkpoint)
    names = select_taps(arch.num_layers, list(config.taps) if config.taps else None, list(config.layers) if config.layers is not None else None)
    if config.local and not (EMBED in names and all(tap_name(i, "resid_out") in names for i in range(arch.num_layers - 1))):
        raise TracerError("--local re-runs each layer on its recorded input: it needs all layers and the embed and resid_out taps")
    rule = config.rule or default_rule(dtype_name(dtype), ref_dtype is not None)
    if rule.kind == "noise" and ref_dtype is None:
        raise TracerError("the noise-aware rule needs a reference; use --reference fp32/fp64 or --rule plain")
    out = Path(config.out) if config.out else default_out(arch.name, dtype_name(dtype), sequences)
    estimate = _preflight(config, arch, names, sequences, dtype, ref_dtype, device, out, plugins["unpacked"] is None)
    say(estimate.describe())

    t0 = time.perf_counter()
    if loaded is None:
        loaded = models.load_model(config.model, config.weights, config.seed, config.trust_checkpoint, progress=say)
    model, arch, weights = loaded
    timings["load"] = time.perf_counter() - t0
    batch = encode(sequences, model.alphabet, config.pack_order)
    _validate_faults(config.faults, batch, arch.num_layers)
    return _Plan(model, arch, weights, device, dtype, ref_dtype, backend, batch, names, rule, out, plugins, estimate)


def _preflight(config: RunConfig, arch, names, sequences, dtype, ref_dtype, device, out: Path, can_split: bool):
    """Estimate the run before loading and check it against what is free (:mod:`tracer.runner.preflight`)."""
    n_tokens = [s.n_tokens for s in sequences]
    all_layers = sorted({parse_tap(n)[0] for n in names if parse_tap(n)[0] is not None})
    taps = list(config.taps) if config.taps else [EMBED, *SITES, FINAL]
    sites = [t for t in SITES if t in taps]

    def est_for(max_batch_tokens=None, metrics_only=None, layers=None, sites=None, n_sequences=None):
        chosen = names
        if layers is not None or sites is not None:
            keep = [t for t in taps if t not in SITES] + list(sites if sites is not None else [t for t in taps if t in SITES])
            chosen = select_taps(arch.num_layers, keep, layers if layers is not None else all_layers)
        tokens = sorted(n_tokens, reverse=True)[:n_sequences] if n_sequences else n_tokens
        mbt = config.max_batch_tokens if max_batch_tokens is None else max_batch_tokens
        return preflight.estimate(
            arch, tokens, chosen, dtype, ref_dtype,
            metrics_only=config.metrics_only if metrics_only is None else metrics_only,
            local=config.local, max_batch_tokens=(mbt or 0) if can_split else 0, device=device.type,
        )

    free = preflight.free_resources(out, device)
    options = {"metrics_only": config.metrics_only, "layers": all_layers, "sites": sites, "n_sequences": len(sequences)}
    return preflight.check(est_for, free, config.max_batch_tokens is None and can_split, options)


def _check_plugin_options(config: RunConfig, plugins: dict) -> None:
    """Options that act on the built-in paths only."""
    f = config.faults
    switches = [k for k, v in f.to_dict().items() if v is True]
    if plugins["packed"] is not None:
        if switches:
            raise TracerError(f"--fault {switches[0].replace('_', '-')} is a switch of the built-in packed path; it does not apply to --packed {plugins['packed'].label}")
        if f.perturbations_of("packed"):
            raise TracerError("perturbations of the packed side need the built-in packed path (perturb the unpacked side, or edit your plug-in)")
    if plugins["unpacked"] is not None and f.perturbations_of("unpacked"):
        raise TracerError("perturbations of the unpacked side need fair-esm's own forward (--unpacked fair-esm)")
    if plugins["unpacked"] is not None and config.max_batch_tokens:
        raise TracerError("--max-batch-tokens splits fair-esm's padded forward; an unpacked plug-in gets the batch as it is (use --max-batch-tokens 0)")
    if config.local and (plugins["packed"] is not None or plugins["unpacked"] is not None):
        raise TracerError("--local re-runs single layers of the built-in paths; it does not apply to a plug-in")


def _build_paths(config: RunConfig, plan: _Plan) -> tuple[TracedPath, TracedPath, PackedESM2 | None]:
    """The two compared paths (built-in or plug-in), on the model in the run dtype."""
    model = plan.model
    packed_builtin = None
    if plan.plugins["packed"] is None:
        packed_builtin = PackedESM2(model, plan.backend, rope=config.packed_rope, faults=config.faults)
        packed = BuiltinPackedPath(packed_builtin)
    else:
        packed = PluginPath(plan.plugins["packed"], model, config.pack_order)
    if plan.plugins["unpacked"] is None:
        unpacked = FairEsmPath(model, config.faults)
    else:
        unpacked = PluginPath(plan.plugins["unpacked"], model, config.pack_order)
    return unpacked, packed, packed_builtin


def _settle_taps(paths, names: list[str], say) -> tuple[list[str], dict[str, list[str]]]:
    """The taps every path delivers; what each path could not capture (reported, never silent)."""
    missing: dict[str, list[str]] = {}
    keep = list(names)
    for path in paths:
        have = set(path.capturable(names))
        gone = [n for n in names if n not in have]
        if gone:
            missing[path.name] = gone
            say(f"{path.name} path ({path.label}): {len(gone)} of {len(names)} taps could not be captured; the rest is traced")
            for line in missing_advice(gone):
                say(f"  {line}")
        keep = [n for n in keep if n in have]
    if not keep:
        raise TracerError(f"none of the requested taps could be captured from {' and '.join(p.label for p in paths)}")
    return keep, missing


def trace(config: RunConfig, sequences: list[Sequence], quiet: bool = False, loaded=None) -> Result:
    """Run, compare and write one trace (see module docstring).

    ``loaded`` may be ``(model, arch, weights)`` from :func:`tracer.esm.models.load_model`, to reuse a
    model across runs (its precision and device are set by the run).
    """
    say = Progress(quiet)
    timings: dict[str, float] = {}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at first use)
    return_freed_memory()
    t0 = time.perf_counter()
    plan = _prepare(config, sequences, say, loaded, timings)
    model, arch, batch, device, dtype, ref_dtype = plan.model, plan.arch, plan.batch, plan.device, plan.dtype, plan.ref_dtype
    run_paths = ["unpacked", "packed"] + (["reference"] if ref_dtype is not None else [])
    names = plan.names

    with TraceWriter(plan.out, force=config.force, compression=config.compression) as writer, _deterministic() as determinism, torch.inference_mode():
        writer.write_sequences(batch.ids, [s.residues for s in sequences], [s.length for s in sequences], batch.layout)
        async_writer = None
        clock = _Clock(device, timings)
        write_stats: dict = {}
        notes: list[str] = []
        ledger = Ledger()
        base_allocated = None
        try:
            with clock("to_device"):
                models.set_precision(model, device, dtype, progress=say)
            unpacked, packed, packed_builtin = _build_paths(config, plan)
            with clock("probe"):
                names, missing = _settle_taps([unpacked, packed], names, say)
            for side, gone in missing.items():
                notes += [f"{side} path: {line}" for line in missing_advice(gone)]
            meta = run_meta(config, arch, plan.weights, dtype, ref_dtype, plan.backend, names, device)
            meta["paths"] = {p.name: {"label": p.label} for p in (unpacked, packed)}
            if packed_builtin is None:
                meta["packed_rope"] = "plug-in's own"
            meta["uncaptured"] = missing
            meta.update(determinism)  # what torch reports during the run
            meta["batching"] = {**plan.estimate.plan.to_meta(), "chosen_by": "user" if config.max_batch_tokens is not None else "pre-flight"}
            meta["preflight"] = plan.estimate.to_dict()
            say(
                f"{arch.name} {dtype_name(dtype)} on {meta['environment']['device_name']} ({device}); attention {plan.backend.name}; "
                f"reference {meta['reference_dtype'] or 'none'}; {len(names)} taps x {batch.layout.n_tokens} tokens"
            )
            async_writer = None if config.metrics_only else AsyncTapWriter(writer, budget=plan.estimate.layer_tap_bytes, ledger=ledger)
            keep = {"unpacked", "reference"} if config.local else set()
            collector = Collector(names, run_paths, dtype, async_writer, keep=keep, ledger=ledger)
            pooled: dict[str, np.ndarray] = {}  # path -> (S, E) mean-pooled final embeddings

            def recorder(path: str):
                return _pooling(collector.recorder(path), path, pooled, batch.layout, names)

            if device.type == "cuda":  # the run's own peak, from the weights in the run dtype on
                torch.cuda.reset_peak_memory_stats(device)
                base_allocated = torch.cuda.memory_allocated(device)
            for path in (unpacked, packed):
                say(f"{path.name} path: {path.describe(batch)}, {dtype_name(dtype)}")
            if ref_dtype is not None:
                say(f"reference path: fair-esm forward in {dtype_name(ref_dtype)} on up-cast weights (one layer at a time)")
            say(f"running the paths in lockstep, layer by layer{_describe_split(plan.estimate.plan, batch)}")
            with clock("paths"):
                seconds, outputs = _run_paths(model, sequences, batch, names, collector, recorder, ref_dtype, config.faults,
                                              plan.estimate.plan, unpacked, packed, say)
            timings.update(seconds)
            for output in outputs:
                notes += output.notes
                for note in output.notes:
                    say(f"note: {note}")
            local_table = {}
            if config.local:
                say("local: re-running every layer on the other side's recorded input")
                with clock("local"):
                    local_table = _local(model, packed_builtin, batch, names, collector, dtype, arch.num_layers)
            with clock("metrics"):
                table = MetricsTable(names, collector.table(), local_table, collector.present())
            with clock("judge"):  # while the writer may still be busy
                context = summary_context(meta, batch_description(sequences, config.pack_order))
                if notes:
                    context["notes"] = notes
                summary = judge(table, batch.layout, batch.ids, plan.rule, context, trace=str(plan.out))
            with clock("write_wait"):
                if async_writer is not None:
                    async_writer.close(progress=say, total=plan.estimate.trace_bytes)
                    write_stats = async_writer.stats
                    async_writer = None
        except torch.cuda.OutOfMemoryError:
            raise TracerError(_oom_message(config, plan.estimate, device)) from None
        except (RuntimeError, NotImplementedError) as e:
            if "not implemented for" not in str(e) and not isinstance(e, NotImplementedError):
                raise
            raise TracerError(
                f"this PyTorch ({torch.__version__}) cannot run ESM-2 in {dtype_name(dtype)} on {device.type} "
                f"with --attn {plan.backend.name} ({str(e).splitlines()[0]}); choose another --dtype, --device or --attn"
            ) from None
        finally:
            if async_writer is not None:  # failure path: stop the threads (no draining) before the file is removed
                async_writer.abort()
        meta["memory"] = {
            "peak_held_tap_bytes": ledger.peak,
            "layer_tap_bytes": plan.estimate.layer_tap_bytes,
            "device_peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "device_allocated_before_paths": base_allocated,
        }
        with clock("commit"):
            writer.write_metrics("metrics", names, table.pairs, table.present)
            if local_table:
                writer.write_metrics("local", names, local_table)
            if pooled:
                writer.write_embeddings(pooled, POOLING)
            writer.set_json("meta", meta)
            writer.set_json("summary", summary.to_json())
            bytes_written = writer.bytes_written
            path = writer.commit()
        write_stats["commit_seconds"] = writer.commit_seconds
    timings["total"] = time.perf_counter() - t0 - timings["load"]
    return Result(path, summary, timings, bytes_written, write_stats, notes, meta["memory"], plan.estimate)


def _describe_split(plan: SubBatches, batch: Batch) -> str:
    if len(plan.groups) == 1:
        return ""
    return f"; fair-esm's padded batch in {len(plan.groups)} length-sorted sub-batches of <= {plan.max_tokens} padded tokens"


def _run_paths(model, sequences, batch: Batch, names, collector: Collector, recorder, ref_dtype, faults: Faults, plan: SubBatches,
               unpacked: TracedPath, packed: TracedPath, say) -> tuple[dict, list]:
    """Every path over the batch, in lockstep layer by layer (:mod:`tracer.capture.lockstep`).

    ``unpacked`` and ``packed`` run as built (fair-esm's forward, the built-in packed forward or
    a plug-in); fair-esm's forward runs once per sub-batch of ``plan``. ``reference``: fair-esm's
    ``ESM2.forward`` on each sub-batch, on an up-cast twin of the model
    (:func:`tracer.esm.models.upcast_twin`, one layer of ``ref_dtype`` weights at a time), with
    full-float32 matmuls. After each layer, the layer's pairs are computed and its taps let go.
    ``recorder(path)`` is the record callback of a whole path. Returns turn seconds per path and
    the paths' outputs (notes).
    """
    whole = len(plan.groups) == 1 and plan.groups[0] == tuple(range(len(sequences)))
    parts = [batch] if whole else [encode([sequences[i] for i in g], model.alphabet, "given") for g in plan.groups]
    rows = plan.rows(batch.layout)
    streams: list[Stream] = []
    outputs: list = []

    def stream(name: str, path: TracedPath, part: Batch, record, context=None):
        def run(rec):
            outputs.append(path.run(part, names, rec))

        streams.append(Stream(name, run, record, context))

    def fair_esm(side: str, net, side_faults, context=None):
        join = Assembler(rows, batch.layout.n_tokens, recorder(side), collector.ledger)
        for k, (group, part) in enumerate(zip(plan.groups, parts)):
            f = sub_faults(side_faults, group) if side_faults is not None else None
            stream(f"{side}[{k}]", FairEsmPath(net, f, name=side), part, join.recorder(k), context)

    groups = sorted({tap_group(n) for n in names})
    batch_device = model.embed_tokens.weight.device
    done = [0]

    def on_group(group: int) -> None:
        collector.flush()
        done[0] += 1
        say.tick("forwards", done[0], len(groups), "layers")

    with contextlib.ExitStack() as stack:
        if isinstance(unpacked, FairEsmPath):
            fair_esm("unpacked", model, faults)
        else:  # a plug-in gets the user's batch as it is
            stream("unpacked", unpacked, batch, recorder("unpacked"))
        stream("packed", packed, batch, recorder("packed"))
        if ref_dtype is not None:
            twin = stack.enter_context(models.upcast_twin(model, ref_dtype))
            fair_esm("reference", twin, None, models.strict_fp32_matmul)
        try:
            run_lockstep(streams, groups, on_group, device=batch_device)
        finally:
            say.tick_done()
    seconds: dict[str, float] = {}
    for s_ in streams:
        side = s_.name.split("[")[0]
        seconds[side] = seconds.get(side, 0.0) + s_.seconds
    return seconds, outputs


def _pooling(record, path: str, pooled: dict, layout, names: list[str]):
    """``record``, also keeping ``path``'s mean-pooled final embeddings in ``pooled`` (:mod:`tracer.judging.embeddings`)."""
    if FINAL not in names:
        return record

    def rec(name: str, tensor: torch.Tensor) -> None:
        if name == FINAL:
            pooled[path] = mean_pool(tensor, layout)
        record(name, tensor)

    return rec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """``with clock("phase"):`` records the phase's wall seconds (device synchronised) in ``timings``."""

    def __init__(self, device: torch.device, timings: dict):
        self.device, self.timings = device, timings

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.timings[name] = time.perf_counter() - t


def _to_padded(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Canonical ``(N, E)`` -> fair-esm's ``(T, B, E)``, padding rows zero."""
    b, t = batch.padded.shape
    flat = x.new_zeros(b * t, x.shape[-1])
    flat.index_copy_(0, batch.layout.canonical_from_padded(t).to(x.device), x)
    return flat.view(b, t, -1).transpose(0, 1)  # (T, B, E)


def _to_packed(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    if batch.layout.is_identity:
        return x
    return x.index_select(0, batch.layout.canonical_row_of_packed.to(x.device))


def _local(model, packed, batch, names, collector, dtype, num_layers) -> dict:
    """Re-run each layer on the other side's recorded input: error born here vs inherited."""
    held_u = collector.held["unpacked"]
    held_r = collector.held.get("reference", {})
    rows: dict[str, dict[str, np.ndarray]] = {}
    for layer in range(num_layers):
        layer_names = [n for n in names if parse_tap(n)[0] == layer]
        inp = EMBED if layer == 0 else tap_name(layer - 1, "resid_out")
        runs = [("packed-vs-unpacked", "packed", held_u[inp], held_u)]
        if held_r:
            x_ref = held_r[inp].to(dtype)  # the reference's input, in the run dtype
            runs += [("packed-vs-reference", "packed", x_ref, held_r), ("unpacked-vs-reference", "unpacked", x_ref, held_r)]
        for pair, path, x, against in runs:
            rec: dict[str, torch.Tensor] = {}
            if path == "packed":
                run_packed_layer(packed, layer, _to_packed(x, batch), batch, layer_names, rec.__setitem__)
            else:
                run_unpacked_layer(model, layer, _to_padded(x, batch), batch, layer_names, rec.__setitem__, packed.faults)
            for n in layer_names:
                m = token_metrics(rec[n], against[n])
                rows.setdefault(pair, {})[n] = torch.stack([m[k] for k in METRICS]).float().cpu().numpy()
    return {pair: metrics_table(names, by_tap, batch.layout.n_tokens) for pair, by_tap in rows.items()}
