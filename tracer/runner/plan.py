"""A run's plan: every option checked and resolved once, before the model loads.

:func:`make_plan` validates the :class:`~tracer.runner.config.RunConfig` against the
architecture (read from the checkpoint's header or the catalogue, not loaded), resolves the
device, the run dtype and the reference dtype once, loads plug-in factories (so a bad SPEC fails
in a second), picks the taps and the verdict rule, and runs the pre-flight estimate
(:mod:`tracer.runner.preflight`). The result is one immutable :class:`Plan` that the execution
(:mod:`tracer.runner.execute`) follows.

Example::

    plan = make_plan(RunConfig(model="esm2_t6_8M_UR50D", weights="random", device="cpu"), debug_batch(50), print)
    print(plan.estimate.describe())
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import torch

from tracer.env import dtype_name, resolve_device, resolve_dtype
from tracer.errors import TracerError
from tracer.esm import attention, models
from tracer.esm.packed_forward import ROPE_MODES
from tracer.capture import hf_paths
from tracer.capture.control import Control, plan_control
from tracer.inputs.faults import Faults
from tracer.judging.pairs import default_rule
from tracer.judging.verdict import Rule
from tracer.runner import preflight
from tracer.runner.config import REFERENCES, RunConfig, default_out, resolved_reference
from tracer.store import files
from tracer.taps import EMBED, FINAL, SITES, parse_tap, select_taps, tap_name

_REF_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def reference_dtype(reference: str, dtype: torch.dtype) -> torch.dtype | None:
    """The reference path's dtype for ``--reference`` at run dtype ``dtype`` (``None``: no reference)."""
    reference = resolved_reference(reference, dtype_name(dtype))
    if reference == "none":
        return None
    ref = _REF_DTYPES[reference]
    if torch.finfo(ref).bits <= torch.finfo(dtype).bits:
        raise TracerError(
            f"--reference {reference} is not more precise than the run dtype {dtype_name(dtype)}; "
            "use --reference fp64 (or none)"
        )
    return ref


@dataclass(frozen=True)
class Plan:
    """What a run will do, settled before anything heavy happens.

    Attributes:
        config: the options as given.
        sequences: the input sequences, canonical order.
        device, dtype, ref_dtype: resolved once (``ref_dtype`` ``None``: no reference path).
        backend: attention backend of the built-in packed path (``attention.PLUGIN`` for a plug-in).
        arch: the architecture (read without loading the weights).
        names: the taps to trace, walk order.
        rule: the verdict rule.
        out: the trace path.
        plugins: ``{"packed"|"unpacked": Plugin or None}`` (``None``: the built-in path).
        estimate: the pre-flight estimate (memory, disk, sub-batches).
        control: the control path that sets the noise level (:mod:`tracer.capture.control`;
            ``None`` without a reference).
    """

    config: RunConfig
    sequences: tuple
    device: torch.device
    dtype: torch.dtype
    ref_dtype: torch.dtype | None
    backend: attention.Backend
    arch: models.Architecture
    names: tuple[str, ...]
    rule: Rule
    out: Path
    plugins: MappingProxyType
    estimate: preflight.Estimate | None = None
    control: Control | None = None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def separate_control(self) -> bool:
        """Whether the control runs as its own lockstep stream (not reused from the packed path)."""
        return self.control is not None and not self.control.reused

    @property
    def can_split(self) -> bool:
        """Whether fair-esm's padded forward runs the unpacked side (only it takes sub-batches)."""
        return self.plugins["unpacked"] is None


def make_plan(config: RunConfig, sequences: list, say, arch: models.Architecture | None = None) -> Plan:
    """Check every option, resolve dtypes and device once, estimate the run (see module docstring)."""
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    if dtype == torch.float64:
        raise TracerError("--dtype float64 is a reference precision, not a run dtype; choose bfloat16, float16 or float32")
    if config.packed_rope not in ROPE_MODES:
        raise TracerError(f"unknown --packed-rope {config.packed_rope!r}; choose one of {', '.join(ROPE_MODES)}")
    ref_dtype = reference_dtype(config.reference, dtype)
    plugins = {side: hf_paths.load_side(getattr(config, side), side, config, device, dtype) for side in ("packed", "unpacked")}  # fail fast
    check_plugin_options(config, plugins)
    backend = attention.resolve(config.attn, device, dtype) if plugins["packed"] is None else getattr(plugins["packed"], "backend", None) or attention.PLUGIN
    control_backend = attention.resolve("auto", device, dtype) if backend is attention.PLUGIN else backend
    control = plan_control(plugins["packed"] is None, config.packed_rope, config.faults, control_backend, ref_dtype is not None)
    if config.local and ref_dtype is None:
        say("--local without a reference splits packed-vs-unpacked error only")
    _check_output_options(config)
    arch = arch or models.peek_architecture(config.model, config.weights, config.trust_checkpoint)
    names = select_taps(arch.num_layers, list(config.taps) if config.taps else None, list(config.layers) if config.layers is not None else None)
    if config.local and not (EMBED in names and all(tap_name(i, "resid_out") in names for i in range(arch.num_layers - 1))):
        raise TracerError("--local re-runs each layer on its recorded input: it needs all layers and the embed and resid_out taps")
    rule = config.rule or default_rule(dtype_name(dtype), ref_dtype is not None)
    if rule.kind == "noise" and ref_dtype is None:
        raise TracerError("the noise-aware rule needs a reference; use --reference fp32/fp64 or --rule plain")
    out = Path(config.out) if config.out else default_out(arch.name, dtype_name(dtype), sequences)
    plan = Plan(config, tuple(sequences), device, dtype, ref_dtype, backend, arch, tuple(names), rule, out, MappingProxyType(plugins),
                control=control)
    plan = replace(plan, estimate=_preflight(plan))
    say(plan.estimate.describe())
    return plan


def _check_output_options(config: RunConfig) -> None:
    if config.out is not None:  # before a long model load
        if not config.out.strip():
            raise TracerError("--out is empty; give a file path (or leave --out out for a default name under traces/)")
        files.check_target(Path(config.out), config.force, inputs=[config.weights if config.weights not in ("auto", "random") else None])
    if config.max_batch_tokens is not None and config.max_batch_tokens < 0:
        raise TracerError(f"--max-batch-tokens must be 0 (one batch) or a positive number of padded tokens, got {config.max_batch_tokens}")


def _preflight(plan: Plan) -> preflight.Estimate:
    """Estimate the run before loading and check it against what is free (:mod:`tracer.runner.preflight`)."""
    config, arch = plan.config, plan.arch
    n_tokens = [s.n_tokens for s in plan.sequences]
    all_layers = sorted({parse_tap(n)[0] for n in plan.names if parse_tap(n)[0] is not None})
    taps = list(config.taps) if config.taps else [EMBED, *SITES, FINAL]
    sites = [t for t in SITES if t in taps]

    def est_for(max_batch_tokens=None, metrics_only=None, layers=None, sites=None, n_sequences=None):
        chosen = list(plan.names)
        if layers is not None or sites is not None:
            keep = [t for t in taps if t not in SITES] + list(sites if sites is not None else [t for t in taps if t in SITES])
            chosen = select_taps(arch.num_layers, keep, layers if layers is not None else all_layers)
        tokens = sorted(n_tokens, reverse=True)[:n_sequences] if n_sequences else n_tokens
        mbt = config.max_batch_tokens if max_batch_tokens is None else max_batch_tokens
        return preflight.estimate(
            arch, tokens, chosen, plan.dtype, plan.ref_dtype,
            metrics_only=config.metrics_only if metrics_only is None else metrics_only,
            local=config.local, max_batch_tokens=(mbt or 0) if plan.can_split else 0, device=plan.device.type,
            control=plan.separate_control,
        )

    free = preflight.free_resources(plan.out, plan.device)
    options = {"metrics_only": config.metrics_only, "layers": all_layers, "sites": sites, "n_sequences": len(plan.sequences)}
    return preflight.check(est_for, free, config.max_batch_tokens is None and plan.can_split, options)


def check_plugin_options(config: RunConfig, plugins: dict) -> None:
    """Options that act on the built-in paths only."""
    f = config.faults
    if plugins["packed"] is not None:
        foreign = [k for k in f.switches if k not in getattr(plugins["packed"], "switches", ())]  # --packed hf honours two
        if foreign:
            raise TracerError(f"--fault {foreign[0].replace('_', '-')} is a switch of the built-in packed path; it does not apply to --packed {plugins['packed'].label}")
        if f.perturbations_of("packed"):
            raise TracerError("perturbations of the packed side need the built-in packed path (perturb the unpacked side, or edit your plug-in)")
    if plugins["unpacked"] is not None and f.perturbations_of("unpacked"):
        raise TracerError("perturbations of the unpacked side need fair-esm's own forward (--unpacked fair-esm)")
    if plugins["unpacked"] is not None and config.max_batch_tokens:
        raise TracerError("--max-batch-tokens splits fair-esm's padded forward; an unpacked plug-in gets the batch as it is (use --max-batch-tokens 0)")
    if config.plugin_state != "as-loaded" and plugins["packed"] is None and plugins["unpacked"] is None:
        raise TracerError(f"plug-in state {config.plugin_state!r} changes what a plug-in's factory receives; this run has no plug-in")
    if config.local and (plugins["packed"] is not None or plugins["unpacked"] is not None):
        raise TracerError("--local re-runs single layers of the built-in paths; it does not apply to a plug-in")


def validate_faults(faults: Faults, batch, num_layers: int) -> None:
    """Planted faults name layers, sequences and tokens that exist."""
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


__all__ = ["Plan", "REFERENCES", "make_plan", "reference_dtype", "validate_faults"]
