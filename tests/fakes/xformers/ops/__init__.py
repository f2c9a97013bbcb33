"""Test double of ``xformers.ops``, for CPU tests of how tracer intercepts its attention.

``memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None)`` in xformers'
``(B, M, H, K)`` layout, with ``fmha.BlockDiagonalMask.from_seqlens`` for packed sequences,
computed exactly by ``scaled_dot_product_attention`` (held out of tracer's sight, as xformers'
own kernels are). Put on ``sys.path`` only by the tests that use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xformers.ops import fmha

_KERNEL = (F.scaled_dot_product_attention,)


def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, **kwargs):
    mask = None
    if isinstance(attn_bias, fmha.BlockDiagonalMask):
        seq = torch.repeat_interleave(torch.arange(len(attn_bias.seqlens)), torch.tensor(attn_bias.seqlens)).to(query.device)
        mask = seq[:, None] == seq[None, :]
    out = _KERNEL[0](query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.transpose(1, 2)  # (B, M, H, K)
