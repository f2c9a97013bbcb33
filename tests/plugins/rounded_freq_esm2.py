"""Test fixture: examples/packed_esm2.py with ONE change, the rounded-frequency RoPE.

This is the packed forward of a team that "already uses fp32 RoPE" but reads the frequencies
from the model's ``rot_emb.inv_freq`` buffer, which ``model.to(torch.bfloat16)`` has rounded
(``apply_rotary_fp32`` takes ``layer.self_attn.rot_emb.inv_freq.float()`` instead of
recomputing them). Hugging Face transformers' ``EsmModel`` carries the same rounding. In a
bfloat16 run its ``q_rope`` error grows with position (0.0365 at token 400 of the 8M model,
11 x the control's median); a float32 run is exact. The rest is the example, unchanged.

    python -m tracer.run --packed tests/plugins/rounded_freq_esm2.py:make_forward --seq-len 400
"""


from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # the kernel our users call, imported by name
    from flash_attn import flash_attn_varlen_func
except ImportError:  # no flash-attn: PyTorch's own FlashAttention-2 varlen kernel, if this torch has it
    flash_attn_varlen_func = None
try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def create_position_ids_packed(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int64 position of every packed token within its own sequence."""
    starts = cu_seqlens[:-1].long()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1])
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_fp32(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE in float32 on ``x`` ``(N, H, d)`` with ``inv_freq`` ``(d/2,)`` float32; returns x's dtype."""
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (N, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (N, 1, d)
    xf = x.float()
    return (xf * emb.cos() + rotate_half(xf) * emb.sin()).to(x.dtype)


def block_diagonal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` bool: True where query and key are in the same sequence."""
    total = int(cu_seqlens[-1])
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=cu_seqlens.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    assert seq.numel() == total
    return seq[:, None] == seq[None, :]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """q, k, v: ``(N, H, d)``; attention within each sequence."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=softmax_scale, causal=False)
        if varlen_attn is not None:
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=softmax_scale)
    mask = block_diagonal_mask(cu_seqlens)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),  # (1, H, N, d)
        attn_mask=mask, scale=softmax_scale,
    )
    return out[0].transpose(0, 1)  # (N, H, d)


class PackedESM2Wrapper:
    """Holds a fair-esm ``ESM2`` and adds a packed forward."""

    def __init__(self, model):
        self.model = model

    def _embed(self, input_ids, cu_seqlens):
        m = self.model
        x = m.embed_scale * m.embed_tokens(input_ids)  # (N, E)
        if m.token_dropout:
            is_mask = input_ids == m.mask_idx
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            seq = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
            n_mask = torch.zeros_like(lengths).index_add_(0, seq, is_mask.long())
            mask_ratio_observed = n_mask.to(x.dtype) / lengths
            x = x * (1 - 0.15 * 0.8) / (1 - mask_ratio_observed)[seq, None]
        return x

    def _layer(self, layer, x, position_ids, cu_seqlens, max_seqlen):
        attn = layer.self_attn
        n, e = x.shape
        h, d = attn.num_heads, attn.head_dim
        residual = x
        y = layer.self_attn_layer_norm(x)
        q = attn.q_proj(y).view(n, h, d)
        k = attn.k_proj(y).view(n, h, d)
        v = attn.v_proj(y).view(n, h, d)
        inv_freq = attn.rot_emb.inv_freq.float()  # THE CHANGE: the buffer, rounded by model.to(bfloat16)
        q = apply_rotary_fp32(q, position_ids, inv_freq)
        k = apply_rotary_fp32(k, position_ids, inv_freq)
        ctx = varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=d**-0.5)
        x = residual + attn.out_proj(ctx.reshape(n, e))
        residual = x
        y = layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        return residual + y

    @torch.no_grad()
    def forward_packed(self, input_ids, cu_seqlens, max_seqlen, repr_layers=()):
        """``input_ids`` (N,) packed, ``cu_seqlens`` (B+1,) int32 -> {"representations": {layer: (N, E)}}."""
        m = self.model
        position_ids = create_position_ids_packed(cu_seqlens)
        x = self._embed(input_ids, cu_seqlens)
        reps = {}
        if 0 in repr_layers:
            reps[0] = x
        for i, layer in enumerate(m.layers):
            x = self._layer(layer, x, position_ids, cu_seqlens, max_seqlen)
            if i + 1 in repr_layers and i + 1 != m.num_layers:
                reps[i + 1] = x
        x = m.emb_layer_norm_after(x)
        if m.num_layers in repr_layers:
            reps[m.num_layers] = x
        return {"representations": reps}


def make_forward(model, alphabet):
    """The adapter of examples/packed_esm2_adapter.py, around this wrapper."""
    wrapper = PackedESM2Wrapper(model)

    def forward(tokens, cu_seqlens, max_seqlen):  # (N,), (B+1,) int32, int -> (N, E)
        return wrapper.forward_packed(tokens, cu_seqlens, max_seqlen, repr_layers=[model.num_layers])["representations"][model.num_layers]

    return forward
