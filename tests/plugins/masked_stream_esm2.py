"""Test fixture: packing with fair-esm's own layers, the simplest packed forward a team writes.

The packed tokens run as one ``(N, 1, E)`` sequence through ``ESM2``'s unmodified
``TransformerLayer`` s, with an additive block-diagonal ``self_attn_mask`` keeping attention
inside each sequence. fair-esm's attention applies RoPE with positions ``0..N-1`` over the whole
stream, so every sequence after the first is rotated by its offset in the pack: its ``q_rope``
and ``k_rope`` differ from the unpacked path's, while attention, which sees only position
differences, is unchanged up to rounding. Nothing here knows of tracer.
"""

from __future__ import annotations

import torch


def make_forward(model, alphabet):
    def forward(tokens, cu_seqlens, max_seqlen):
        n = tokens.shape[0]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=tokens.device), lengths)
        x = model.embed_scale * model.embed_tokens(tokens)
        is_mask = tokens == model.mask_idx
        x = x.masked_fill(is_mask[:, None], 0.0)
        ratio = torch.zeros_like(lengths).index_add_(0, seq, is_mask.long()).to(x.dtype) / lengths
        x = (x * (1 - 0.15 * 0.8) / (1 - ratio)[seq, None])[:, None]  # (N, 1, E): fair-esm's (T, B, E)
        mask = torch.zeros(n, n, dtype=x.dtype, device=x.device).masked_fill(seq[:, None] != seq[None, :], float("-inf"))
        for layer in model.layers:
            x, _ = layer(x, self_attn_mask=mask)
        return model.emb_layer_norm_after(x)[:, 0]

    return forward
