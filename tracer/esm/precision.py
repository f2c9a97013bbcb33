"""Switching a loaded ESM-2 between precisions and devices without stale state, and the
reference's up-cast twin.

fair-esm keeps two pieces of rotary-embedding state that do not follow a precision change the
way weights do, and tracer manages both explicitly:

* ``rot_emb.inv_freq`` is a *buffer*, so ``model.to(bfloat16)`` rounds it to bfloat16, and a
  later ``model.to(float32)`` does not bring the lost bits back. The buffer *as loaded* is
  remembered per rotary module (:func:`loaded_inv_freq`; released ESM-2 checkpoints carry an
  fp16-rounded one, which fair-esm's own loader keeps), and :func:`set_precision` restores
  ``loaded.to(dtype)`` after every change: in bfloat16 exactly what ``model.to(bfloat16)`` gives
  the freshly loaded model, in float32/float64 the loaded values up-cast exactly. It is never
  rewritten from its definition: tracer traces the model as loaded.
* ``rot_emb._cos_cached``/``_sin_cached`` are plain attributes keyed on sequence length and device
  only, *not dtype*: a table built in float32 would be reused by a bfloat16 run of the same length
  and silently promote q/k to float32. :func:`reset_rotary_caches` clears them before every run.

Example::

    model, arch, weights = models.load_model("esm2_t6_8M_UR50D", weights="random", seed=0)
    set_precision(model, torch.device("cpu"), torch.bfloat16)
"""

from __future__ import annotations

import contextlib

import torch
from esm.model.esm2 import ESM2




_LOADED = "_tracer_loaded_inv_freq"


def remember_loaded(model: ESM2) -> None:
    """Keep each rotary module's ``inv_freq`` as it is now (call right after loading)."""
    for layer in model.layers:
        rot = layer.self_attn.rot_emb
        object.__setattr__(rot, _LOADED, rot.inv_freq.detach().to("cpu", copy=True))


def loaded_inv_freq(rot) -> torch.Tensor:
    """The rotary module's ``inv_freq`` as loaded, in its loaded dtype, on the CPU.

    Remembered by :func:`load_model`; a model that did not come through it is remembered the
    first time it is seen here (so call this before changing its precision).
    """
    if not hasattr(rot, _LOADED):
        object.__setattr__(rot, _LOADED, rot.inv_freq.detach().to("cpu", copy=True))
    return getattr(rot, _LOADED)


def canonical_inv_freq(dim: int) -> torch.Tensor:
    """RoPE inverse frequencies for head dimension ``dim``, float32 on the CPU, computed exactly as
    ``esm.rotary_embedding.RotaryEmbedding.__init__`` does (what a checkpoint without the buffer
    gets from fair-esm's constructor)."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


ROTARY_CACHES = ("_seq_len_cached", "_cos_cached", "_sin_cached")
"""fair-esm's rotary cos/sin tables and the length they were built for (keyed on length and
device, not dtype): derived state, rebuilt on the next forward once cleared."""


def clear_rotary_cache(rot) -> None:
    """Drop one ``RotaryEmbedding``'s cached tables (:data:`ROTARY_CACHES`)."""
    for name in ROTARY_CACHES:
        setattr(rot, name, None)


def reset_rotary_caches(model: ESM2) -> None:
    """Drop every layer's fair-esm cos/sin tables."""
    for layer in model.layers:
        clear_rotary_cache(layer.self_attn.rot_emb)


def set_precision(model: ESM2, device: torch.device, dtype: torch.dtype, progress=None) -> None:
    """Move ``model`` to ``device``/``dtype`` in place, with no state carried over.

    Weights are converted in place, so only one copy is ever held (an up-cast after a down-cast
    is exact: the reference then computes on the very weights the low-precision paths used).
    Rotary inverse frequencies are the loaded buffer cast to ``dtype`` (exactly what
    ``model.to(dtype)`` does to the loaded model), never the definition, and the rotary caches
    are cleared (see the module docstring). Tensors still on the host go to a CUDA device through
    pinned staging buffers (:func:`to_device_pinned`) in their stored dtype, then are converted
    on the device.
    """
    loaded = [loaded_inv_freq(layer.self_attn.rot_emb) for layer in model.layers]  # before any cast
    if device.type == "cuda":
        to_device_pinned(model, device, progress=progress)
    model.to(device=device, dtype=dtype)
    for layer, inv in zip(model.layers, rotary_on(loaded, device, dtype)):
        layer.self_attn.rot_emb.inv_freq = inv
    reset_rotary_caches(model)


def rotary_on(loaded: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every layer's loaded ``inv_freq`` cast to ``dtype`` on ``device``, in one host-to-device
    copy (a copy per layer waits for the device each time); the values are exactly
    ``inv.to(device, dtype)`` of each."""
    if len({(t.shape, t.dtype) for t in loaded}) != 1:  # pragma: no cover (ESM-2 layers share one shape)
        return [inv.to(device=device, dtype=dtype) for inv in loaded]
    return list(torch.stack(loaded).to(device=device, dtype=dtype).unbind(0))


def to_device_pinned(model: ESM2, device: torch.device, chunk: int = 64 << 20, progress=None) -> int:
    """Copy every host tensor of ``model`` to CUDA ``device`` through two pinned staging buffers.

    A pageable ``.to("cuda")`` runs at ~1 GB/s on the H100 machine, a pinned copy at ~50 GB/s.
    Each tensor (memory-mapped checkpoint pages or host memory, in its stored dtype) is copied
    chunk by chunk into a pinned buffer (reading the file at disk speed when it is not cached)
    while the previous chunk crosses to the device asynchronously on a side stream. Values are
    not changed (same dtype, bytes copied). Returns the bytes copied.

    Args:
        progress: optional :class:`tracer.runner.progress.Progress` (a bytes ticker).
    """
    host = [(m, name, t, kind) for m in model.modules() for kind, table in (("p", m._parameters), ("b", m._buffers))
            for name, t in table.items() if t is not None and t.device.type == "cpu"]
    total = sum(t.numel() * t.element_size() for _, _, t, _ in host)
    if not host:
        return 0
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done_events: list = [None, None]
    stream = torch.cuda.Stream(device=device)
    moved = 0
    k = 0
    done: dict[int, torch.Tensor] = {}  # id(host tensor) -> its device copy (keeps tied weights tied)
    with torch.no_grad():
        for module, name, t, kind in host:
            if id(t) in done:
                (module._parameters if kind == "p" else module._buffers)[name] = done[id(t)]
                continue
            src = t.detach().contiguous()
            dst = torch.empty(src.shape, dtype=src.dtype, device=device)
            n = src.numel() * src.element_size()
            src_bytes = src.reshape(-1).view(torch.uint8) if n else None
            dst_bytes = dst.reshape(-1).view(torch.uint8) if n else None
            for off in range(0, n, chunk):
                m = min(chunk, n - off)
                if done_events[k] is not None:
                    done_events[k].synchronize()  # this buffer's previous copy has left
                staging[k][:m].copy_(src_bytes[off : off + m])  # host -> pinned (reads the file pages)
                with torch.cuda.stream(stream):
                    dst_bytes[off : off + m].copy_(staging[k][:m], non_blocking=True)
                    done_events[k] = torch.cuda.Event()
                    done_events[k].record(stream)
                k = 1 - k
                moved += m
                if progress is not None:
                    progress.tick("to device", moved, total, bytes_unit=True)
            new = torch.nn.Parameter(dst, requires_grad=False) if kind == "p" else dst
            (module._parameters if kind == "p" else module._buffers)[name] = new
            done[id(t)] = new
    stream.synchronize()
    torch.cuda.current_stream(device).wait_stream(stream)
    if progress is not None:
        progress.tick_done()
    return moved


def _set_rotary(layer, inv_freq: torch.Tensor) -> None:
    """One layer's rotary ``inv_freq``, and its cos/sin caches cleared."""
    rot = layer.self_attn.rot_emb
    rot.inv_freq = inv_freq
    clear_rotary_cache(rot)


def to_meta(module: torch.nn.Module) -> None:
    """Every tensor of ``module`` that holds data replaced by a meta tensor of its shape and dtype.

    Not ``module.to_empty(device="meta")``: ``empty_like`` of a tensor already on the meta
    device runs PyTorch's Python reference implementation, whose first call imports sympy (about
    2 s on the H200 machine, once per process) and which costs ~1 ms per tensor after that."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is None or t.is_meta:
                    continue
                blank = torch.empty(t.shape, dtype=t.dtype, device="meta")
                table[name] = torch.nn.Parameter(blank, requires_grad=False) if isinstance(t, torch.nn.Parameter) else blank


def _tensor_slots(twin_layer: torch.nn.Module, layer: torch.nn.Module) -> list[tuple[dict, str, torch.Tensor, torch.Tensor]]:
    """``(table, name, meta tensor, source tensor)`` for every parameter and persistent buffer of
    the twin's layer (its meta skeleton), matched by name with ``layer``'s (its state dict)."""
    sources = layer.state_dict()
    slots = []
    for prefix, m in twin_layer.named_modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                key = f"{prefix}.{name}" if prefix else name
                if t is not None and key in sources:
                    slots.append((table, name, t, sources[key]))
    return slots


_TWINS: dict[tuple, ESM2] = {}
"""Reusable meta-device skeletons of :func:`upcast_twin`, by shape (one per shape, taken while in use)."""


@contextlib.contextmanager
def upcast_twin(model: ESM2, dtype: torch.dtype):
    """fair-esm's ESM2 of ``model``'s shape whose weights are exact up-casts of ``model``'s, one layer at a time.

    The reference path runs this twin's own ``ESM2.forward`` while ``model`` stays in the run
    dtype (so the paths can run in lockstep). The twin is built on the meta device (no memory);
    its embedding, final norm and heads are up-cast once (``E x E`` at most); each layer's
    weights are up-cast to ``dtype`` on the weights' device by a pre-hook when the layer is
    entered and dropped by a post-hook when the last forward inside it returns, so one layer of
    up-cast weights exists at a time (two while sub-batches in lockstep straddle a boundary).
    The up-cast of a low-precision tensor is exact, and the rotary ``inv_freq`` is the loaded
    buffer cast to ``dtype``, as :func:`set_precision` sets it, so the twin computes what
    ``model`` converted in place to ``dtype`` would compute.

    Example::

        with upcast_twin(model, torch.float32) as ref:
            ref(tokens, repr_layers=[ref.num_layers])
    """
    from tracer.esm.skeleton import esm2_skeleton

    key = (model.num_layers, model.embed_dim, model.attention_heads, id(model.alphabet), model.token_dropout)
    twin = _TWINS.pop(key, None)  # a skeleton of this shape left by an earlier run (building one costs ~0.1 s)
    if twin is None:
        twin = esm2_skeleton(
            num_layers=model.num_layers,
            embed_dim=model.embed_dim,
            attention_heads=model.attention_heads,
            alphabet=model.alphabet,
            token_dropout=model.token_dropout,
        )
    device = model.embed_tokens.weight.device
    outer = {k: v.to(dtype) for k, v in model.state_dict().items() if not k.startswith("layers.")}
    twin.load_state_dict(outer, strict=False, assign=True)
    twin.eval().requires_grad_(False)

    inside = [0] * model.num_layers  # forwards inside each layer (sub-batches park mid-layer)
    rotary = rotary_on([loaded_inv_freq(layer.self_attn.rot_emb) for layer in model.layers], device, dtype)  # copied once

    slots = [_tensor_slots(twin_layer, layer) for twin_layer, layer in zip(twin.layers, model.layers)]

    def materialise(i):
        def hook(module, args):
            if inside[i] == 0:
                for table, name, blank, source in slots[i]:  # what load_state_dict(assign=True) did, without its bookkeeping
                    value = source.to(dtype)
                    table[name] = torch.nn.Parameter(value, requires_grad=False) if isinstance(blank, torch.nn.Parameter) else value
                # the loaded buffer cast to dtype, as set_precision does
                _set_rotary(module, rotary[i])
            inside[i] += 1

        return hook

    def drop(i):
        def hook(module, args, output):
            inside[i] -= 1
            if inside[i] == 0:
                for table, name, blank, _ in slots[i]:  # back to the skeleton's own meta tensors
                    table[name] = blank
                _set_rotary(module, module.self_attn.rot_emb.inv_freq)

        return hook

    handles = []
    try:
        for i, layer in enumerate(twin.layers):
            handles.append(layer.register_forward_pre_hook(materialise(i)))
            handles.append(layer.register_forward_hook(drop(i)))
        yield twin
    finally:
        for h in handles:
            h.remove()
        to_meta(twin)  # no data outlives the call
        reset_rotary_caches(twin)
        _TWINS[key] = twin  # the twin holds model.alphabet, so its id in the key stays valid


@contextlib.contextmanager
def strict_fp32_matmul():
    """Run float32 matmuls in full float32 (no TF32) and restore the caller's settings after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])
