"""Test fixture: a packed ESM-2 forward that keeps a batch axis of one, as many teams' do.

``make_forward_1ne`` carries the residual stream as ``(1, N, E)`` (Hugging Face's padding-free
rows), ``make_forward_n1e`` as ``(N, 1, E)`` (fair-esm's ``(T, B, E)`` with ``B = 1``), and
``make_forward_ne`` as ``(N, E)``. Every module hook therefore sees that layout; ``q_rope`` is
also handed to ``tracer.tap`` with its heads merged, ``(1, N, E)``, and the final
representation is returned in the forward's own layout. Attention is SDPA over the
packed stream with a block-diagonal mask; RoPE in float32 with the frequencies recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tracer


def positions(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.arange(n, device=cu_seqlens.device) - torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """RoPE in float32 on ``x`` ``(N, H, d)``."""
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    f = pos.float()[:, None] * inv[None, :]
    emb = torch.cat((f, f), -1)[:, None, :]
    xf = x.float()
    x1, x2 = xf.chunk(2, -1)
    return (xf * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()).to(x.dtype)


def embed(model, tokens, cu_seqlens):
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths)
    x = model.embed_scale * model.embed_tokens(tokens)
    is_mask = tokens == model.mask_idx
    x = x.masked_fill(is_mask[:, None], 0.0)
    ratio = torch.zeros_like(lengths).index_add_(0, seq, is_mask.long()).to(x.dtype) / lengths
    return x * (1 - 0.15 * 0.8) / (1 - ratio)[seq, None], seq


def make(model, layout: str):
    def forward(tokens, cu_seqlens, max_seqlen):
        n = tokens.shape[0]
        x, seq = embed(model, tokens, cu_seqlens)
        pos = positions(cu_seqlens, n)
        mask = seq[:, None] == seq[None, :]
        x = {"1NE": x[None], "N1E": x[:, None], "NE": x}[layout]
        for i, layer in enumerate(model.layers):
            a = layer.self_attn
            h, d = a.num_heads, a.head_dim
            y = layer.self_attn_layer_norm(x)
            q, k, v = (p(y).reshape(n, h, d) for p in (a.q_proj, a.k_proj, a.v_proj))
            q, k = rope(q, pos), rope(k, pos)
            tracer.tap("q_rope", i, q.reshape(1, n, h * d), scale=d**-0.5)
            ctx = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=d**-0.5)
            x = x + a.out_proj(ctx[0].transpose(0, 1).reshape(x.shape))
            x = x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
        return model.emb_layer_norm_after(x)  # in its own layout, batch axis included

    return forward


def make_forward_1ne(model, alphabet):
    return make(model, "1NE")


def make_forward_n1e(model, alphabet):
    return make(model, "N1E")


def make_forward_ne(model, alphabet):
    return make(model, "NE")
