"""One traced run: plan -> execute -> commit.

1. **Plan** (:mod:`tracer.runner.plan`), before anything is loaded: every option checked once,
   dtypes resolved once, the pre-flight estimate printed and checked against free disk and
   memory; a run that cannot fit stops with one line naming what would.
2. **Execute** (:func:`execute`):

   * load the model in its stored precision (float32 for fair-esm releases; random init is
     float32, cached after the first build) on the CPU, move it to the run device through pinned
     staging buffers and convert it in place to the run dtype;
   * build the paths (:mod:`tracer.capture.paths`): ``unpacked`` (fair-esm's ``ESM2.forward`` on
     the padded batch, or on length-sorted sub-batches, in the run dtype; or a plug-in),
     ``packed`` (the built-in packed forward or a plug-in, in the run dtype) and ``reference``
     (fair-esm's forward on an up-cast twin of the run-dtype weights, float32/float64, one layer
     at a time, TF32 off), plus the ``control`` (:mod:`tracer.capture.control`: tracer's healthy
     packed forward that sets the noise level) unless the packed path is its configuration;
   * run them in lockstep, layer by layer (:mod:`tracer.capture.lockstep`); after each layer its
     pairs' per-token sums are computed on the run device (on exact float32 up-casts) and the
     layer's taps are let go (full tensors stream to the file meanwhile);
   * ``--local``: re-run each layer on the other side's recorded input (:mod:`tracer.runner.local`);
   * finish the metrics in float64 on the CPU (stored as float32) and judge them
     (:mod:`tracer.judging.verdict`).
3. **Commit** (:func:`commit`): metrics, pooled embeddings, meta and summary are written and the
   file is linked into place (:mod:`tracer.store.trace_file`).

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

from tracer.capture import isolation
from tracer.capture.collector import Assembler, Collector, per_layer_on
from tracer.capture.control import Control
from tracer.capture.lockstep import Stream, run_lockstep, tap_group
from tracer.capture.observe import missing_advice
from tracer.capture import hf_paths
from tracer.capture.provenance import plugin_sources
from tracer.capture.paths import Batch, BuiltinPackedPath, FairEsmPath, TracedPath, encode, reference_path
from tracer.capture.plugin_state import plugin_view
from tracer.env import dtype_name, environment, return_freed_memory, tool_version
from tracer.errors import TracerError, first_line
from tracer.esm import models
from tracer.esm.packed_forward import PackedESM2
from tracer.inputs.sequences import Sequence
from tracer.judging.embeddings import POOLING, against_reference, mean_pool
from tracer.judging.pairs import batch_description, summary_context
from tracer.judging.verdict import CONTROL, VS_REF, MetricsTable, Summary, judge
from tracer.runner import preflight
from tracer.runner.config import RunConfig
from tracer.runner.local import local_table
from tracer.runner.plan import Plan, make_plan, validate_faults
from tracer.runner.progress import Progress
from tracer.store.tap_writer import AsyncTapWriter, Ledger
from tracer.store.trace_file import TraceWriter
from tracer.taps import FINAL

__all__ = ["Outcome", "Result", "commit", "execute", "trace"]


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


@dataclass
class Outcome:
    """What :func:`execute` hands to :func:`commit`."""

    names: list[str]
    table: MetricsTable
    local: dict
    pooled: dict
    meta: dict
    summary: Summary
    notes: list[str]
    write_stats: dict


@dataclass
class _Run:
    """The mutable state of one execution (the plan stays immutable)."""

    plan: Plan
    model: object
    weights: object
    batch: Batch
    say: Progress
    timings: dict
    ledger: Ledger = field(default_factory=Ledger)
    notes: list[str] = field(default_factory=list)
    base_allocated: int | None = None
    guard: isolation.Guard | None = None  # set when a plug-in is given the shared model

    def clock(self, name: str):
        return _clock(self.plan.device, self.timings, name)


def trace(config: RunConfig, sequences: list[Sequence], quiet: bool = False, loaded=None) -> Result:
    """Run, compare and write one trace (see module docstring).

    ``loaded`` may be ``(model, arch, weights)`` from :func:`tracer.esm.models.load_model`, to
    reuse a model across runs (its precision and device are set by the run).
    """
    say = Progress(quiet)
    timings: dict[str, float] = {}
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at first use)
    return_freed_memory()
    t0 = time.perf_counter()
    plan = make_plan(config, sequences, say, arch=loaded[1] if loaded is not None else None)
    t_load = time.perf_counter()
    model, arch, weights = loaded if loaded is not None else models.load_model(config.model, config.weights, config.seed, config.trust_checkpoint, progress=say)
    timings["load"] = time.perf_counter() - t_load
    isolation.refuse_changed(model)  # a plug-in of an earlier run changed this model object
    batch = encode(sequences, model.alphabet, config.pack_order)
    validate_faults(config.faults, batch, arch.num_layers)
    run = _Run(plan, model, weights, batch, say, timings)
    with TraceWriter(plan.out, force=config.force, compression=config.compression) as writer, _deterministic() as determinism, torch.inference_mode():
        writer.write_sequences(batch.ids, [s.residues for s in sequences], [s.length for s in sequences], batch.layout)
        outcome = execute(run, writer, determinism)
        result = commit(run, outcome, writer)
    timings["total"] = time.perf_counter() - t0 - timings["load"]
    return result


def execute(run: _Run, writer: TraceWriter, determinism: dict) -> Outcome:
    """Precision, paths, lockstep forwards, metrics and verdict (module docstring, step 2)."""
    plan, say = run.plan, run.say
    async_writer = None
    try:
        with run.clock("to_device"):
            models.set_precision(run.model, plan.device, plan.dtype, progress=say)
        run.guard = isolation.guard_for(run.model, plan.plugins)  # plug-ins cannot change the shared model
        paths, packed_builtin = build_paths(run)
        with run.clock("probe"):
            names, missing = _settle_taps(paths, list(plan.names), say)
        if run.guard is not None:
            run.guard.check("probe forward")
        for side, gone in missing.items():
            run.notes += [f"{side} path: {line}" for line in missing_advice(gone)]
        meta = run_meta(run, names, paths, determinism)
        meta["uncaptured"] = missing
        meta["plugin_sources"] = plugin_sources(run.plan.config)  # what code each plug-in side ran (resumes compare it)
        if packed_builtin is None:
            meta["packed_rope"] = "plug-in's own"
        say(
            f"{plan.arch.name} {plan.dtype_name} on {meta['environment']['device_name']} ({plan.device}); attention {plan.backend.name}; "
            f"reference {meta['reference_dtype'] or 'none'}; {len(names)} taps x {run.batch.layout.n_tokens} tokens"
        )
        if not plan.config.metrics_only:
            async_writer = AsyncTapWriter(writer, budget=plan.estimate.layer_tap_bytes, ledger=run.ledger)
        collector = _collector(run, names, async_writer)
        pooled, table, local = _forwards(run, paths, names, collector)
        with run.clock("judge"):  # while the writer may still be busy
            summary = _judge(run, meta, table, pooled)
        write_stats = {}
        with run.clock("write_wait"):
            if async_writer is not None:
                async_writer.close(progress=say, total=plan.estimate.trace_bytes)
                write_stats, async_writer = async_writer.stats, None
    except torch.cuda.OutOfMemoryError:
        raise TracerError(_oom_message(plan)) from None
    except (RuntimeError, NotImplementedError) as e:
        if "not implemented for" not in str(e) and not isinstance(e, NotImplementedError):
            raise
        raise TracerError(
            f"this PyTorch ({torch.__version__}) cannot run ESM-2 in {plan.dtype_name} on {plan.device.type} "
            f"with --attn {plan.backend.name} ({first_line(e)}); choose another --dtype, --device or --attn"
        ) from None
    finally:
        if async_writer is not None:  # failure path: stop the threads (no draining) before the file is removed
            async_writer.abort()
    meta["memory"] = _memory(run)
    return Outcome(names, table, local, pooled, meta, summary, run.notes, write_stats)


def commit(run: _Run, outcome: Outcome, writer: TraceWriter) -> Result:
    """Write metrics, embeddings, meta and summary, and link the file into place."""
    with run.clock("commit"):
        writer.write_metrics("metrics", outcome.names, outcome.table.pairs, outcome.table.present)
        if outcome.local:
            writer.write_metrics("local", outcome.names, outcome.local)
        if outcome.pooled:
            writer.write_embeddings(outcome.pooled, POOLING)
        writer.set_json("meta", outcome.meta)
        writer.set_json("summary", outcome.summary.to_json())
        bytes_written = writer.bytes_written
        path = writer.commit()
    stats = {**outcome.write_stats, "commit_seconds": writer.commit_seconds}
    return Result(path, outcome.summary, run.timings, bytes_written, stats, outcome.notes, outcome.meta["memory"], run.plan.estimate)


def build_paths(run: _Run) -> tuple[list[TracedPath], PackedESM2 | None]:
    """The two compared paths (built-in or plug-in), on the model in the run dtype, then the
    control when it runs as a separate stream. A plug-in's factory receives the model state of
    ``config.plugin_state`` (:mod:`tracer.capture.plugin_state`: a view, the model itself
    untouched); the model is checked after each plug-in's factory (:mod:`tracer.capture.isolation`)."""
    plan, model, config = run.plan, run.model, run.plan.config
    packed_builtin = None
    if plan.plugins["packed"] is None:
        packed_builtin = PackedESM2(model, plan.backend, rope=config.packed_rope, faults=config.faults)
        packed = BuiltinPackedPath(packed_builtin)
    else:
        packed = hf_paths.path_for(plan.plugins["packed"], plugin_view(model, config.plugin_state), config.pack_order)
        run.guard.check("factory", isolation.who({"packed": plan.plugins["packed"]}))
    if plan.plugins["unpacked"] is None:
        unpacked = FairEsmPath(model, config.faults)
    else:
        unpacked = hf_paths.path_for(plan.plugins["unpacked"], plugin_view(model, config.plugin_state), config.pack_order)
        run.guard.check("factory", isolation.who({"unpacked": plan.plugins["unpacked"]}))
    control = plan.control.path(model) if plan.separate_control else None
    return [unpacked, packed] + ([control] if control is not None else []), packed_builtin


def _settle_taps(paths: list[TracedPath], names: list[str], say) -> tuple[list[str], dict[str, list[str]]]:
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


def run_meta(run: _Run, names: list[str], paths: list[TracedPath], determinism: dict) -> dict:
    """The trace's ``meta`` record: everything needed to know what was run, and how."""
    plan, config, arch, backend = run.plan, run.plan.config, run.plan.arch, run.plan.backend
    return {
        "tool_version": tool_version(),
        "command": list(config.command),
        "model": arch.name,
        "architecture": {"num_layers": arch.num_layers, "embed_dim": arch.embed_dim, "heads": arch.heads},
        "weights": run.weights.to_dict(),
        "dtype": plan.dtype_name,
        "reference_dtype": dtype_name(plan.ref_dtype) if plan.ref_dtype is not None else None,
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
        "environment": environment(plan.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "paths": {p.name: {"label": p.label} for p in paths},
        **({"control": plan.control.to_meta()} if plan.control is not None else {}),
        "plugin_state": config.plugin_state,
        **determinism,  # what torch reports during the run
        "batching": {**plan.estimate.plan.to_meta(), "chosen_by": "user" if config.max_batch_tokens is not None else "pre-flight"},
        "preflight": plan.estimate.to_dict(),
    }


def _collector(run: _Run, names: list[str], async_writer) -> Collector:
    plan = run.plan
    sides = ["unpacked", "packed"] + (["control"] if plan.separate_control else []) + (["reference"] if plan.ref_dtype is not None else [])
    keep = {"unpacked", "reference"} if plan.config.local else set()
    return Collector(names, sides, plan.dtype, async_writer, keep=keep, ledger=run.ledger, per_layer=per_layer_on(plan.device.type))


def _forwards(run: _Run, paths: list[TracedPath], names: list[str], collector: Collector):
    """Every path in lockstep, then ``--local``; returns pooled embeddings, the table and local table."""
    plan, say, batch = run.plan, run.say, run.batch
    pooled: dict[str, np.ndarray] = {}  # path -> (S, E) mean-pooled final embeddings
    if plan.device.type == "cuda":  # the run's own peak, from the weights in the run dtype on
        torch.cuda.reset_peak_memory_stats(plan.device)
        run.base_allocated = torch.cuda.memory_allocated(plan.device)
    for path in paths:
        say(f"{path.name} path: {path.describe(batch)}, {plan.dtype_name}")
    if plan.ref_dtype is not None:
        say(f"reference path: fair-esm forward in {dtype_name(plan.ref_dtype)} on up-cast weights (one layer at a time)")
        say(f"control path (sets the noise level): {_describe_control(plan.control)}")
    say(f"running the paths in lockstep, layer by layer{_describe_split(plan)}")
    with run.clock("paths"):
        t = time.perf_counter()
        seconds, outputs = _lockstep(run, paths, names, collector, pooled)
        seconds["paths_host"] = time.perf_counter() - t  # launched; the rest of "paths" is the device finishing
    run.timings.update(seconds)
    if run.guard is not None:
        run.guard.check("forward")
        run.timings["isolation"] = run.guard.seconds
    for output in outputs:
        run.notes += output.notes
        for note in output.notes:
            say(f"note: {note}")
    local = {}
    if plan.config.local:
        say("local: re-running every layer on the other side's recorded input")
        with run.clock("local"):
            local = local_table(paths, batch, names, collector, plan.dtype)
    with run.clock("metrics"):
        pairs, present = _with_control(collector, plan.control)
        table = MetricsTable(names, pairs, local, present)
    return pooled, table, local


def _describe_control(control: Control) -> str:
    if control.reused:
        return f"the packed path under test is its configuration (fp32 RoPE, attention {control.backend.name}, no faults): reused"
    return f"built-in packed forward, fp32 RoPE on the loaded frequencies, attention {control.backend.name}, no faults, in lockstep"


def _with_control(collector: Collector, control: Control | None) -> tuple[dict, dict]:
    """The collector's pairs and their ``present`` flags, with :data:`CONTROL` taken from the
    packed path's error when the packed path is the control (same arrays, nothing recomputed)."""
    pairs, present = collector.table(), collector.present()
    if control is not None and control.reused and VS_REF["packed"] in pairs:
        pairs[CONTROL] = pairs[VS_REF["packed"]]
        if VS_REF["packed"] in present:
            present[CONTROL] = present[VS_REF["packed"]]
    return pairs, present


def _judge(run: _Run, meta: dict, table: MetricsTable, pooled: dict) -> Summary:
    plan = run.plan
    context = summary_context(meta, batch_description(list(plan.sequences), plan.config.pack_order))
    if run.notes:
        context["notes"] = run.notes
    return judge(table, run.batch.layout, run.batch.ids, plan.rule, context, trace=str(plan.out),
                 pooled_cos=against_reference(pooled, run.batch.ids))


def _lockstep(run: _Run, paths: list[TracedPath], names: list[str], collector: Collector, pooled: dict) -> tuple[dict, list]:
    """Every path over the batch, in lockstep layer by layer (:mod:`tracer.capture.lockstep`).

    A path that ``supports.sub_batches`` runs once per sub-batch of the plan (joined back by an
    :class:`Assembler`); the others get the whole batch. The reference is fair-esm's forward on
    an up-cast twin of the model (:func:`tracer.esm.models.upcast_twin`, one layer of
    ``ref_dtype`` weights at a time), with full-float32 matmuls. After each layer, the layer's
    pairs are computed and its taps let go. Returns turn seconds per path and the paths' outputs.
    """
    plan, batch, model = run.plan, run.batch, run.model
    split = plan.estimate.plan
    outputs: list = []
    streams: list[Stream] = []

    def recorder(side: str):
        return _pooling(collector.recorder(side), side, pooled, batch.layout, names)

    def add(path: TracedPath, part: Batch, record, label: str) -> None:
        streams.append(Stream(label, lambda rec: outputs.append(path.run(part, names, rec)), record, path.context))

    def add_path(path: TracedPath) -> None:
        if not path.supports.sub_batches or _whole(split, batch):
            add(path, batch, recorder(path.name), path.name)
            return
        join = Assembler(split.rows(batch.layout), batch.layout.n_tokens, recorder(path.name), collector.ledger)
        for k, group in enumerate(split.groups):
            part = encode([batch.sequences[i] for i in group], model.alphabet, "given")
            add(path.part(group), part, join.recorder(k), f"{path.name}[{k}]")

    groups = sorted({tap_group(n) for n in names})
    done = [0]
    pairs_seconds = [0.0]

    def on_group(group: int) -> None:
        t = time.perf_counter()
        collector.flush()
        pairs_seconds[0] += time.perf_counter() - t
        done[0] += 1
        run.say.tick("forwards", done[0], len(groups), "layers")

    with contextlib.ExitStack() as stack:
        for path in paths:
            add_path(path)
        if plan.ref_dtype is not None:
            twin = stack.enter_context(models.upcast_twin(model, plan.ref_dtype))
            add_path(reference_path(twin, models.strict_fp32_matmul, dtype_name(plan.ref_dtype)))
        try:
            run_lockstep(streams, groups, on_group, device=model.embed_tokens.weight.device)
        finally:
            run.say.tick_done()
    seconds: dict[str, float] = {"pairs": pairs_seconds[0]}  # host time launching the layers' pair metrics
    for s_ in streams:
        side = s_.name.split("[")[0]
        seconds[side] = seconds.get(side, 0.0) + s_.seconds
    return seconds, outputs


def _whole(split, batch: Batch) -> bool:
    return len(split.groups) == 1 and split.groups[0] == tuple(range(len(batch.sequences)))


def _describe_split(plan: Plan) -> str:
    split = plan.estimate.plan
    if len(split.groups) == 1:
        return ""
    return f"; fair-esm's padded batch in {len(split.groups)} length-sorted sub-batches of <= {split.max_tokens} padded tokens"


def _pooling(record, path: str, pooled: dict, layout, names: list[str]):
    """``record``, also keeping ``path``'s mean-pooled final embeddings in ``pooled`` (:mod:`tracer.judging.embeddings`)."""
    if FINAL not in names:
        return record

    def rec(name: str, tensor: torch.Tensor) -> None:
        if name == FINAL:
            pooled[path] = mean_pool(tensor, layout)
        record(name, tensor)

    return rec


def _memory(run: _Run) -> dict:
    device = run.plan.device
    return {
        "peak_held_tap_bytes": run.ledger.peak,
        "layer_tap_bytes": run.plan.estimate.layer_tap_bytes,
        "device_peak_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device_allocated_before_paths": run.base_allocated,
    }


def _oom_message(plan: Plan) -> str:
    device, estimate = plan.device, plan.estimate
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    have = f", {free / 2**30:.1f} GiB free now" if free is not None else ""
    ways = [f"--max-batch-tokens {max(1, estimate.plan.largest_padded_tokens // 2)}"]
    if not plan.config.metrics_only:
        ways.append("--metrics-only")
    ways += ["fewer --layers or --taps", "splitting the batch"]
    return (
        f"out of memory on {device} (pre-flight estimated a peak of {estimate.device_peak / 2**30:.2f} GiB{have}); "
        f"try {', '.join(ways)}"
    )


@contextlib.contextmanager
def _deterministic():
    """Deterministic algorithms where the backends allow (warn, don't fail, where they don't).

    PyTorch's deterministic mode also NaN-fills every uninitialised allocation by default; no
    op traced here reads uninitialised memory, and the fill doubled the cost of every op
    output (the 3B forward ran 8x slower on the H100), so it is turned off for the run.
    """
    import torch.utils.deterministic as det

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    _set_deterministic(True, warn_only=True)
    det.fill_uninitialized_memory = False
    try:
        yield {  # what torch reports now, recorded in the trace (not what was asked for)
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "fill_uninitialized_memory": bool(det.fill_uninitialized_memory),
        }
    finally:
        _set_deterministic(saved[0], warn_only=saved[1])
        det.fill_uninitialized_memory = saved[2]


def _set_deterministic(mode: bool, warn_only: bool) -> None:
    """``torch.use_deterministic_algorithms`` without its first line, which imports
    ``torch._inductor.config`` (and with it ``torch._dynamo``: about 1 s on a CPU) only to set
    inductor's own flag; tracer compiles nothing."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # pragma: no cover (a PyTorch without the private setter)
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@contextlib.contextmanager
def _clock(device: torch.device, timings: dict, name: str):
    """Records the phase's wall seconds (device synchronised) in ``timings[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings[name] = time.perf_counter() - t
