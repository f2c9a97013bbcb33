"""Direct module-level comparisons on identical inputs, and fair-esm's RoPE in float32 for one run.

Three tools for ``tracer.experiments``:

* :func:`fair_esm_rope_fp32` -- a context manager under which fair-esm's rotary modules compute
  RoPE in float32 (the fix a user would try on the padded path). It shadows each
  ``rot_emb.forward`` with an instance attribute and removes it in ``finally``; no buffer,
  weight or cache of the model is touched, and hooks on the modules still fire.
* :func:`rope_probe` -- the packed path's rotation (:class:`tracer.esm.packed_forward.Rope`, as the packed
  path builds it) vs fair-esm's own ``RotaryEmbedding`` on the very Q/K fair-esm's forward
  produced in one layer, each against a float64 rotation of the same Q/K.
* :func:`attention_probe` -- the packed attention kernel vs fair-esm's own attention on the very
  Q/K/V fair-esm's forward produced (its recorded context is the unpacked side), each against
  float64 attention on the same Q/K/V.

The probes judge their per-token metrics with the run's own rule (:func:`tracer.judging.verdict.judge`),
so a probe's "first divergence" and "drifting" mean exactly what a trace's do. Their noise level
comes from a control, as in a trace (:mod:`tracer.capture.control`): the fault-free float32 RoPE on
the loaded frequencies (``rope_probe``), the packed kernel with no fault (``attention_probe``).

Example::

    with fair_esm_rope_fp32(model):
        trace(config, sequences, loaded=(model, arch, weights))
    summary = rope_probe(model, batch, backend, "fp32", Faults(), layer=0)
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from esm.rotary_embedding import rotate_half

from tracer.esm.attention import Backend
from tracer.inputs.faults import Faults
from tracer.judging.metrics import METRICS, metrics_table, round_to, token_metrics
from tracer.esm.models import loaded_inv_freq
from tracer.esm.packed_forward import PackedESM2
from tracer.capture.paths import Batch
from tracer.capture.hooks import padded_rows, tap_unpacked, unpacked_to_canonical
from tracer.taps import tap_name
from tracer.judging.verdict import CONTROL, PAIR, ROUNDED, VS_REF, MetricsTable, Rule, Summary, judge

ROPE_FP32_CHANGE = (
    "fair-esm's rot_emb.forward shadowed for this run only: positions, inverse frequencies (the "
    "module's as loaded, up-cast), cos/sin and the rotation in float32 (float64 for a float64 input), result "
    "cast back to the input dtype; buffers, weights and caches untouched"
)


def _rope_forward_fp32(rot, q: torch.Tensor, k: torch.Tensor):
    """fair-esm's ``RotaryEmbedding.forward`` contract (``(B*H, T, d)`` each), computed in float32
    on ``rot``'s inverse frequencies as loaded (the values the packed path's fp32 RoPE uses)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    t = torch.arange(k.shape[-2], device=k.device, dtype=compute)  # positions 0..T-1, exact up to 2^24
    inv = loaded_inv_freq(rot).to(device=k.device, dtype=compute)  # (d/2,), exact up-cast
    freqs = torch.outer(t, inv)  # (T, d/2), one rounding per product, like fair-esm's einsum
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
    cos, sin = emb.cos()[None], emb.sin()[None]  # (1, T, d)

    def rotate(x):
        xf = x.to(compute)
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

    return rotate(q), rotate(k)


@contextlib.contextmanager
def fair_esm_rope_fp32(model):
    """fair-esm's rotary modules compute RoPE in float32 inside the block (see module docstring)."""
    shadowed = []
    try:
        for layer in model.layers:
            rot = layer.self_attn.rot_emb
            object.__setattr__(rot, "forward", functools.partial(_rope_forward_fp32, rot))  # instance attribute; Module.__call__ uses it
            shadowed.append(rot)
        yield
    finally:
        for rot in shadowed:
            rot.__dict__.pop("forward", None)


def _capture(model, batch: Batch, layer: int, names: list[str]):
    """One fair-esm forward on the batch: the rotary module's inputs ``(q, k)`` in ``layer`` and
    the taps ``names`` (canonical), all in the model's current precision."""
    device = model.embed_tokens.weight.device
    got: dict = {}

    def pre(module, args):
        got["rope_in"] = (args[0].detach().clone(), args[1].detach().clone())  # (B*H, T, d) each

    handle = model.layers[layer].self_attn.rot_emb.register_forward_pre_hook(pre)
    try:
        with tap_unpacked(model, batch.layout, batch.padded.shape[1], names, got.__setitem__):
            model(batch.padded.to(device), repr_layers=[])
    finally:
        handle.remove()
    return got


def _judge(table_rows: dict[str, dict[str, np.ndarray]], names: list[str], batch: Batch, reference: str) -> Summary:
    pairs = {pair: metrics_table(names, rows, batch.layout.n_tokens) for pair, rows in table_rows.items()}
    return judge(MetricsTable(names, pairs), batch.layout, batch.ids, Rule(kind="noise"), {"reference": reference})


def _rows(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    m = token_metrics(a, b)
    return torch.stack([m[k] for k in METRICS]).float().cpu().numpy()


def rope_probe(model, batch: Batch, backend: Backend, rope_mode: str, faults: Faults, layer: int = 0) -> Summary:
    """Packed RoPE vs fair-esm's ``RotaryEmbedding`` on the same Q/K of ``layer``, float64 reference.

    The model must already be in the run precision. Q/K are what fair-esm's forward feeds its
    rotary module (q pre-scaled); the packed side rotates them as the packed path does (its mode,
    positions restarting per sequence, planted position faults included); the reference rotates
    them in float64 (positions and frequencies exact).
    """
    dtype = model.embed_tokens.weight.dtype
    heads, lay = model.attention_heads, batch.layout
    b = len(lay.lengths)
    with torch.inference_mode():
        got = _capture(model, batch, layer, [])
        q, k = got["rope_in"]  # (B*H, T, d), model dtype
        rot = model.layers[layer].self_attn.rot_emb
        uq, uk = rot(q, k)  # fair-esm's own module, as its forward calls it
        device = q.device
        flat = lay.canonical_from_padded(batch.padded.shape[1]).to(device)
        rows = padded_rows(flat, batch.padded.shape[1], b, heads)

        def canon(x):  # (B*H, T, d) -> canonical (N, H, d)
            return unpacked_to_canonical(x, "BHTd", b, heads, rows, True)

        good, bad = PackedESM2(model, backend, rope=rope_mode, faults=faults).rope_tables(lay, device)[layer]
        rope = bad if faults.at(layer) else good
        to_packed, to_canon = lay.canonical_row_of_packed.to(device), lay.packed_row_of_canonical.to(device)

        control = PackedESM2(model, backend, rope="fp32", faults=Faults()).rope_tables(lay, device)[layer][0]

        def packed_rotate(x, rope=rope):  # canonical -> packed order -> rotate -> canonical
            return rope(x.index_select(0, to_packed)).index_select(0, to_canon)

        rq, rk = _rope_forward_fp32(model.layers[layer].self_attn.rot_emb, q.double(), k.double())  # float64 reference
        names = [tap_name(layer, "q_rope"), tap_name(layer, "k_rope")]
        sides = {
            "unpacked": dict(zip(names, (canon(uq), canon(uk)))),
            "packed": dict(zip(names, (packed_rotate(canon(q)), packed_rotate(canon(k))))),
            "control": dict(zip(names, (packed_rotate(canon(q), control), packed_rotate(canon(k), control)))),
            "reference": dict(zip(names, (canon(rq), canon(rk)))),
        }
    return _judge(_pairs(sides, names, dtype), names, batch, "float64")


def _pairs(sides: dict, names: list[str], dtype: torch.dtype) -> dict:
    ref = sides["reference"]
    return {
        PAIR: {n: _rows(sides["packed"][n], sides["unpacked"][n]) for n in names},
        VS_REF["packed"]: {n: _rows(sides["packed"][n], ref[n]) for n in names},
        VS_REF["unpacked"]: {n: _rows(sides["unpacked"][n], ref[n]) for n in names},
        CONTROL: {n: _rows(sides["control"][n], ref[n]) for n in names},
        ROUNDED: {n: _rows(round_to(ref[n], dtype), ref[n]) for n in names},
    }


def _attention_fp64(q, k, v, cu_seqlens) -> torch.Tensor:
    """Exact per-sequence attention in float64; q is pre-scaled (scale 1). ``(N, H, d)`` each."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        w = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e])  # (H, L, L)
        out[s:e] = torch.einsum("hqk,khd->qhd", w.softmax(-1), v[s:e])
    return out


def attention_probe(model, batch: Batch, backend: Backend, faults: Faults, layers: list[int]) -> Summary:
    """The packed kernel vs fair-esm's attention on the same Q/K/V (``layers``), float64 reference.

    Q/K/V and fair-esm's context are recorded from one fair-esm forward in the run precision;
    the packed kernel (and the planted attention faults of the packed path: double scale,
    leak across sequences) runs on the same Q/K/V in pack order; the reference is float64
    attention over each sequence.
    """
    dtype = model.embed_tokens.weight.dtype
    lay = batch.layout
    names = [tap_name(i, s) for i in layers for s in ("q_rope", "k_rope", "v", "ctx")]
    ctx_names = [tap_name(i, "ctx") for i in layers]
    sides: dict[str, dict] = {"unpacked": {}, "packed": {}, "control": {}, "reference": {}}
    with torch.inference_mode():
        got = _capture(model, batch, layers[0], names)
        device = got[names[0]].device
        to_packed, to_canon = lay.canonical_row_of_packed.to(device), lay.packed_row_of_canonical.to(device)
        cu = lay.cu_seqlens.to(device)
        for i in layers:
            q, k, v = (got[tap_name(i, s)] for s in ("q_rope", "k_rope", "v"))  # canonical (N, H, d)
            scale, cu_k, max_k = 1.0, cu, lay.max_seqlen  # q is pre-scaled, like the packed path
            if faults.at(i) and faults.double_scale:
                scale = None
            if faults.at(i) and faults.leak_across_sequences:
                cu_k, max_k = torch.tensor([0, lay.n_tokens], dtype=torch.int32, device=device), lay.n_tokens
            qp, kp, vp = (x.index_select(0, to_packed) for x in (q, k, v))
            ctx_p = backend.attend(qp, kp, vp, cu_k, max_k, scale)  # (N, H, d) pack order
            sides["packed"][tap_name(i, "ctx")] = ctx_p.index_select(0, to_canon)
            sides["unpacked"][tap_name(i, "ctx")] = got[tap_name(i, "ctx")]
            control = backend.attend(qp, kp, vp, cu, lay.max_seqlen, 1.0)  # the same kernel, no fault
            sides["control"][tap_name(i, "ctx")] = control.index_select(0, to_canon)
            sides["reference"][tap_name(i, "ctx")] = _attention_fp64(qp, kp, vp, cu).index_select(0, to_canon)
    return _judge(_pairs(sides, ctx_names, dtype), ctx_names, batch, "float64")

