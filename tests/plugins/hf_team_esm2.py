"""Test fixture: a team's own padding-free forward on Hugging Face's ``EsmModel``.

The team registers its own varlen attention in HF's ``AttentionInterface`` (SDPA with a
block-diagonal mask built from the ``cu_seq_lens_q`` HF passes through), builds an
``EsmModel`` with it, and runs the packed tokens as one row with restarting ``position_ids``.
Its weights come from the run's fair-esm model through tracer's converter, standing in for the
team's own conversion or ``from_pretrained``; its padded forward (``make_unpacked``) shares the
same model. It knows nothing of tracer's observation: tracer finds the ``EsmModel`` each forward
holds and reads its taps with HF's module table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from tracer.esm.hf_model import build_hf

NAME = "team_varlen"


def team_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``(B, H, T, d)`` query/key/value -> ``(B, T, H, d)``: one padding-free row (``cu_seq_lens_q``
    given), or a padded batch (its 2D padding mask, as HF's flash-attention masks pass it)."""
    if "cu_seq_lens_q" in kwargs:
        cu = kwargs["cu_seq_lens_q"].long()
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1, device=query.device), cu[1:] - cu[:-1])
        mask = seq[:, None] == seq[None, :]
    else:
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


_MODELS: dict = {}


def team_model(model):
    """One HF model per fair-esm model, shared by the team's packed and padded forwards."""
    if id(model) not in _MODELS:
        AttentionInterface.register(NAME, team_varlen)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
        _MODELS[id(model)] = build_hf(model, NAME, "to", model.embed_tokens.weight.dtype)
    return _MODELS[id(model)]


def make_unpacked(model, alphabet):
    hf = team_model(model)

    def forward(tokens):
        return hf(input_ids=tokens, attention_mask=(tokens != alphabet.padding_idx).long()).last_hidden_state  # (B, T, E)

    return forward


def make_forward(model, alphabet):
    hf = team_model(model)

    def forward(tokens, cu_seqlens, max_seqlen):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        pos = torch.arange(tokens.shape[0], device=tokens.device) - torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
        out = hf(input_ids=tokens[None], position_ids=pos[None], cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens,
                 max_length_q=max_seqlen, max_length_k=max_seqlen)
        return out.last_hidden_state  # (1, N, E)

    return forward
