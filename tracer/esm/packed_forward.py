"""The packed path: ESM-2's own modules and weights run over one concatenated token stream.

Sequences are concatenated (no padding) and attention is confined to each sequence by
``cu_seqlens`` (see :mod:`tracer.esm.attention`). Everything else matches fair-esm's ``ESM2.forward``
op for op, in the model's dtype: embedding scale, token-dropout rescale (in the model dtype,
per sequence), the pre-LN layer (``self_attn_layer_norm``, q/k/v projections, q pre-scaled by
``head_dim ** -0.5`` like fair-esm, RoPE with positions restarting at 0 for every sequence,
attention, ``out_proj``, residual add, ``final_layer_norm``, fair-esm's erf GELU, fc2, residual
add), and the final layer norm.

RoPE (``rope=``):

* ``fp32`` (default): the model's inverse frequencies *as loaded* (:func:`tracer.esm.models.loaded_inv_freq`,
  up-cast exactly to float32, whatever the run dtype), positions in float32, cos/sin and the
  rotation in float32, result cast to the model dtype.
* ``model``: exactly what fair-esm's ``RotaryEmbedding`` does, in the model dtype: positions
  ``arange(T).type_as(inv_freq)`` (so in bfloat16 positions above 256 are rounded), the module's
  own ``inv_freq`` buffer (the loaded one cast to the model dtype), cos/sin and rotation in the
  model dtype.

Each layer uses its own rotary module's frequencies (layers with equal ones share one table).

Example::

    packed = PackedESM2(model, attention.resolve("math", device, dtype), rope="fp32")
    final = packed(tokens, layout)   # tokens: (N,) packed; final: (N, E)
"""

from __future__ import annotations

import torch
from esm.modules import gelu
from esm.rotary_embedding import rotate_half
from torch import nn

from tracer.esm.attention import Backend
from tracer.inputs.faults import Faults
from tracer.esm.models import loaded_inv_freq
from tracer.inputs.packing import Layout
from tracer.taps import SITES
from tracer.capture.hooks import HookPoint

ROPE_MODES = ("fp32", "model")


class Rope:
    """Per-token cos/sin tables for one forward, and the rotation.

    Args:
        mode: ``fp32`` or ``model`` (module docstring).
        positions: ``(N,)`` int64 position of every packed token.
        inv_freq: ``(d/2,)`` inverse frequencies: for ``fp32`` the loaded values (up-cast here to
            float32), for ``model`` the rotary module's own buffer in the model dtype.
    """

    def __init__(self, mode: str, positions: torch.Tensor, inv_freq: torch.Tensor):
        self.mode = mode
        if mode == "fp32":
            inv = inv_freq.to(device=positions.device, dtype=torch.float32)  # exact up-cast of the loaded values
            freqs = positions.float()[:, None] * inv[None, :]  # (N, d/2), one rounding per product
        else:  # fair-esm's _update_cos_sin_tables, in the model dtype, then gathered per token
            t = torch.arange(int(positions.max()) + 1, device=positions.device).type_as(inv_freq)
            freqs = torch.einsum("i,j->ij", t, inv_freq)[positions]  # (N, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (N, d)
        self.cos = emb.cos()[:, None, :]  # (N, 1, d): broadcast over heads
        self.sin = emb.sin()[:, None, :]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``x``: ``(N, H, d)`` in the model dtype -> same shape and dtype."""
        if self.mode == "fp32":
            xf = x.float()
            return (xf * self.cos + rotate_half(xf) * self.sin).to(x.dtype)
        return x * self.cos + rotate_half(x) * self.sin  # fair-esm's apply_rotary_pos_emb


class PackedLayer(nn.Module):
    """One fair-esm ``TransformerLayer`` run on packed tokens, with a :class:`HookPoint` per site."""

    def __init__(self, esm_layer: nn.Module, index: int):
        super().__init__()
        object.__setattr__(self, "esm", esm_layer)  # not a submodule: the weights are the model's
        self.index = index
        for site in SITES:
            setattr(self, site, HookPoint())

    def forward(self, x, rope: Rope, cu_seqlens, max_seqlen: int, backend: Backend, faults: Faults):
        """``x``: ``(N, E)`` packed residual stream in the model dtype -> ``(N, E)``."""
        layer, attn = self.esm, self.esm.self_attn
        n, e = x.shape  # tokens, embedding dim
        h, d = attn.num_heads, attn.head_dim
        residual = x
        y = layer.self_attn_layer_norm(x)  # (N, E)
        q = attn.q_proj(y)
        q *= attn.scaling  # fair-esm scales q before the rotation, in the model dtype
        k = attn.k_proj(y)
        v = attn.v_proj(y)
        q = self.q_rope(rope(q.view(n, h, d)))  # (N, H, d)
        k = self.k_rope(rope(k.view(n, h, d)))
        v = self.v(v.view(n, h, d))
        scale = 1.0  # q is already scaled
        if faults.at(self.index):
            if faults.double_scale:
                scale = None  # the kernel's default 1/sqrt(d) on top of the pre-scaling
            if faults.leak_across_sequences:
                cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=x.device)
                max_seqlen = n
        ctx = self.ctx(backend.attend(q, k, v, cu_seqlens, max_seqlen, scale))  # (N, H, d)
        a = self.attn_out(attn.out_proj(ctx.reshape(n, e)))  # (N, E)
        x = self.resid_mid(residual + a)
        residual = x
        y = gelu(layer.fc1(layer.final_layer_norm(x)))  # (N, 4E)
        y = self.ffn_out(layer.fc2(y))  # (N, E)
        return self.resid_out(residual + y)


class PackedESM2(nn.Module):
    """ESM-2's forward over a packed stream, sharing the fair-esm model's modules and weights.

    Module paths of the hook points equal the tap names (``embed``, ``layers.3.q_rope``, ...,
    ``final_norm``), so ``packed.get_submodule(tap)`` is where that tap is recorded.

    Args:
        model: fair-esm ``ESM2`` (its precision and device are used as they are).
        backend: attention backend (:func:`tracer.esm.attention.resolve`).
        rope: ``fp32`` or ``model``.
        faults: planted bugs (:class:`tracer.inputs.faults.Faults`), off by default.
    """

    def __init__(self, model, backend: Backend, rope: str = "fp32", faults: Faults | None = None):
        super().__init__()
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        object.__setattr__(self, "esm", model)
        self.backend = backend
        self.rope_mode = rope
        self.faults = faults or Faults()
        self.embed = HookPoint()
        self.layers = nn.ModuleList(PackedLayer(layer, i) for i, layer in enumerate(model.layers))
        self.final_norm = HookPoint()

    def embed_tokens(self, tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
        """``tokens``: ``(N,)`` packed ids -> ``(N, E)`` layer-0 input, as fair-esm computes it."""
        m = self.esm
        x = m.embed_scale * m.embed_tokens(tokens)  # (N, E)
        if m.token_dropout:
            is_mask = tokens == m.mask_idx
            x.masked_fill_(is_mask.unsqueeze(-1), 0.0)
            if not self.faults.skip_token_dropout_rescale:
                mask_ratio_train = 0.15 * 0.8
                seq = layout.packed_seq_index.to(tokens.device)  # (N,) canonical sequence of each token
                src_lengths = torch.tensor(layout.lengths, device=tokens.device)  # (S,)
                n_mask = torch.zeros_like(src_lengths).index_add_(0, seq, is_mask.long())
                mask_ratio_observed = n_mask.to(x.dtype) / src_lengths  # (S,), model dtype like fair-esm
                x = x * (1 - mask_ratio_train) / (1 - mask_ratio_observed)[seq, None]
        return self.embed(x)

    def rope_tables(self, layout: Layout, device) -> list[tuple[Rope, Rope]]:
        """Per layer, ``(correct, faulty)`` RoPE tables; ``faulty`` differs only under a positions
        fault. Layers whose frequencies are equal share their tables."""
        positions = layout.positions.to(device)
        bad_pos = positions
        if self.faults.positions_not_restarted:
            bad_pos = torch.arange(layout.n_tokens, device=device)
        if self.faults.positions_low_precision:
            bad_pos = bad_pos.to(torch.bfloat16).long()
        shared: dict[tuple, tuple[Rope, Rope]] = {}
        tables = []
        invs = [loaded_inv_freq(layer.self_attn.rot_emb) if self.rope_mode == "fp32" else layer.self_attn.rot_emb.inv_freq
                for layer in self.esm.layers]
        values = torch.stack(invs).tolist() if len({(t.shape, t.dtype, t.device) for t in invs}) == 1 else [t.tolist() for t in invs]  # one read
        for inv, value in zip(invs, values):
            key = (inv.dtype, tuple(value))
            if key not in shared:
                good = Rope(self.rope_mode, positions, inv)
                shared[key] = (good, good if bad_pos is positions else Rope(self.rope_mode, bad_pos, inv))
            tables.append(shared[key])
        return tables

    def run_layer(self, i: int, x: torch.Tensor, layout: Layout, tables=None, cu=None) -> torch.Tensor:
        """Layer ``i`` alone on a packed ``(N, E)`` input (used to split local from inherited error).

        ``cu``: ``layout.cu_seqlens`` on ``x``'s device, when the caller has it (a host-to-device
        copy per layer would wait for the device each time)."""
        good, bad = (tables or self.rope_tables(layout, x.device))[i]
        cu = layout.cu_seqlens.to(x.device) if cu is None else cu
        rope = bad if self.faults.at(i) else good
        return self.layers[i](x, rope, cu, layout.max_seqlen, self.backend, self.faults)

    def forward(self, tokens: torch.Tensor, layout: Layout) -> torch.Tensor:
        """``tokens``: ``(N,)`` packed token ids -> ``(N, E)`` final representations."""
        x = self.embed_tokens(tokens, layout)
        tables = self.rope_tables(layout, tokens.device)
        cu = layout.cu_seqlens.to(tokens.device)  # (S+1,) int32, copied once
        for i in range(len(self.layers)):
            x = self.run_layer(i, x, layout, tables, cu)
        return self.final_norm(self.esm.emb_layer_norm_after(x))
