"""Test double of the flash-attn package, for CPU tests of how tracer intercepts its functions.

flash-attn needs a CUDA build; this module has the same six public functions with flash-attn
2.x's signatures, computed exactly by ``scaled_dot_product_attention`` (a block-diagonal mask from
``cu_seqlens`` for the varlen ones), so a forward that imports them runs on the CPU. Put on
``sys.path`` only by the ``fake_flash_attn`` fixture of the tests that use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__version__ = "0+tracer-test-double"

_KERNEL = (F.scaled_dot_product_attention,)
"""Held in a tuple: tracer replaces SDPA in module namespaces during a run, and flash-attn's own
kernel is not SDPA, so the double's inner call must not be seen as a second attention call."""


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    assert not causal and torch.equal(cu_seqlens_q, cu_seqlens_k), "the test double does self-attention only"
    lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
    mask = seq[:, None] == seq[None, :]
    out = _KERNEL[0](*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, scale=softmax_scale)
    return out[0].transpose(0, 1)  # (N, H, d)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    q, k, v = qkv.unbind(-3)
    return _varlen(q, k, v, cu_seqlens, cu_seqlens, softmax_scale, causal)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    k, v = kv.unbind(-3)
    return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    out = _KERNEL[0](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2)  # (B, T, H, d)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    return flash_attn_func(*qkv.unbind(-3), softmax_scale=softmax_scale, causal=causal)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    return flash_attn_func(q, *kv.unbind(-3), softmax_scale=softmax_scale, causal=causal)
