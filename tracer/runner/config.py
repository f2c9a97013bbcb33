"""What a run is asked to do: :class:`RunConfig`, built once from the command line by
:func:`config_from_args` (``tracer.run``, ``tracer.experiments`` and ``tracer.sweep`` share it).

Example::

    config = RunConfig(model="esm2_t6_8M_UR50D", weights="random", device="cpu", dtype="bfloat16")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracer.errors import TracerError
from tracer.capture.plugin import BUILTIN
from tracer.inputs.faults import Faults, parse_faults

REFERENCES = ("auto", "fp32", "fp64", "none")
"""``--reference`` choices: ``auto`` is fp32 for 16-bit runs and none for float32."""
AUTO_REFERENCE = {"bfloat16": "fp32", "float16": "fp32", "float32": "none"}
"""What ``--reference auto`` means for each run dtype (the one place this rule is written)."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides its sequences (defaults are the CLI's).

    Attributes:
        model: fair-esm name; ``None`` = ``esm2_t36_3B_UR50D`` (or the checkpoint's own).
        weights: ``auto``, ``random`` or a checkpoint path.
        seed: seed of random weights.
        trust_checkpoint: allow arbitrary pickled objects in the checkpoint.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        dtype: run dtype of the compared paths (``bfloat16``, ``float16``, ``float32``).
        attn: attention backend of the packed path (``auto``, ``flash-attn``, ``torch-varlen``, ``math``).
        packed_rope: ``fp32`` or ``model``.
        reference: ``auto`` (fp32 for 16-bit runs, none otherwise), ``fp32``, ``fp64``, ``none``.
        pack_order: order of sequences in the packed stream.
        taps, layers: subsets to trace (``None`` = all).
        metrics_only: compute metrics on the fly, store no tensors.
        local: also re-run each layer on the other side's input (local vs inherited error).
        compression: HDF5 compression of tensors.
        out: trace path (``None`` = ``traces/<model>-<dtype>-L<lengths>-<time>.h5``).
        force: overwrite ``out`` if it exists.
        faults: planted bugs (validation of the tool).
        rule: verdict rule; ``None`` = noise rule with a reference, plain rule without.
        command: the command line, recorded in the trace.
        packed: the packed side: ``builtin``, ``hf`` (Hugging Face ``EsmModel`` padding-free,
            :mod:`tracer.capture.hf_paths`), ``package.module:factory``, ``file.py:factory`` or
            a factory callable (:mod:`tracer.capture.plugin`).
        unpacked: the unpacked side: ``fair-esm`` (its own ``ESM2.forward``), ``hf`` (``EsmModel``
            padded) or a plug-in SPEC.
        max_batch_tokens: padded-token budget of fair-esm's unpacked and reference sub-batches
            (:mod:`tracer.inputs.batching`); ``0`` = the batch as given; ``None`` = one batch if the
            pre-flight estimate fits in free memory, else the largest budget that does.
        hf_dtype_by: how the ``hf`` paths get the run dtype: ``to`` (``model.to(dtype)``, casts the
            rotary ``inv_freq`` buffer) or ``from_pretrained`` (``dtype=``, keeps it float32).
        hf_attn: ``attn_implementation`` of the padded ``hf`` path: ``sdpa`` or ``eager``.
        plugin_state: the model state a plug-in's factory receives
            (:data:`tracer.capture.plugin_state.STATES`); the other paths always run on the model as loaded.
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
    rule: object | None = None
    command: tuple[str, ...] = ()
    packed: object = BUILTIN["packed"]
    unpacked: object = BUILTIN["unpacked"]
    max_batch_tokens: int | None = None
    hf_dtype_by: str = "to"
    hf_attn: str = "sdpa"
    plugin_state: str = "as-loaded"


def config_from_args(args, ids: list[str], command: tuple[str, ...], **extra) -> RunConfig:
    """The one :class:`RunConfig` builder for every CLI: options the tool does not declare keep
    their defaults; ``ids`` name the sequences (for ``--fault perturb:...``); ``extra`` sets the
    tool's own options (``out``, ``metrics_only``, ...)."""
    from tracer.cli import rule_from_args

    def get(name, default=None):
        return getattr(args, name, default)

    has_reference = resolved_reference(args.reference, args.dtype) != "none"
    rule = rule_from_args(args, args.dtype, has_reference) if hasattr(args, "rule") else None
    return RunConfig(
        model=args.model, weights=args.weights, seed=args.seed, trust_checkpoint=args.trust_checkpoint,
        device=args.device, dtype=args.dtype, attn=args.attn, packed_rope=args.packed_rope, reference=args.reference,
        pack_order=get("pack_order", "given"), packed=args.packed, unpacked=args.unpacked,
        hf_dtype_by=get("hf_dtype_by", "to"), hf_attn=get("hf_attn", "sdpa"),
        faults=parse_faults(get("fault", []), ids),
        rule=rule, command=command, **extra,
    )


def output_stem(model: str, dtype: str, lengths: list[int]) -> str:
    """``<model>-<dtype>-L<lengths>``: the stem of every default output name (traces, campaign folders)."""
    return f"{model}-{dtype}-L" + "-".join(str(n) for n in lengths[:4]) + ("-etc" if len(lengths) > 4 else "")


def default_out(model: str, dtype: str, batch) -> Path:
    """``traces/<stem>-<time>.h5``, unique per run and still sortable (microseconds, process id)."""
    now = time.time()
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now % 1 * 1e6):06d}-{os.getpid()}"
    return Path("traces") / f"{output_stem(model, dtype, [s.length for s in batch])}-{stamp}.h5"


def resolved_reference(reference: str, dtype: str) -> str:
    """``fp32``, ``fp64`` or ``none``: ``--reference`` with ``auto`` resolved for run dtype ``dtype``."""
    if reference not in REFERENCES:
        raise TracerError(f"unknown reference {reference!r}; choose one of {', '.join(REFERENCES)}")
    return AUTO_REFERENCE.get(dtype, "none") if reference == "auto" else reference
