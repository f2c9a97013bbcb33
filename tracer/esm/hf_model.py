"""Hugging Face ``EsmModel`` on the run's weights, and its two forwards (padded, padding-free).

* :func:`build_hf` converts the fair-esm model the run loaded (:mod:`tracer.esm.hf_convert`,
  same tensors) into an HF ``EsmModel`` and sets its dtype the way users do, as they choose:

  - ``to``: built as stored (the rotary ``inv_freq`` as loaded, float32), then
    ``model.to(dtype)``, which casts every floating tensor, **the ``inv_freq`` buffer included**
    (unless the fair-esm model handed over keeps its rotary buffers in float32, the
    experiments' ``state-rotary-fp32`` state: then the buffer is put back to the loaded float32
    values after the cast, the fix users apply);
  - ``from_pretrained``: ``EsmModel.from_pretrained(..., dtype=dtype)`` on the same state dict,
    which casts the parameters and **keeps the buffer as stored** (float32).

  The parameters are bitwise the run-dtype weights of the fair-esm paths either way.
* :class:`PaddedForward`: ``model(input_ids (B, T), attention_mask)``, attention as the user picks
  (``eager``, ``sdpa``).
* :class:`PackedForward`: padding-free, one row ``(1, N)`` with ``position_ids`` restarting at 0
  in every sequence and ``cu_seq_lens_*``/``max_length_*`` derived from them by HF's own
  ``prepare_fa_kwargs_from_position_ids`` (what ``DataCollatorWithFlattening`` hands a model).
  Attention is ``flash_attention_2`` where the flash-attn package runs, else
  :data:`VARLEN`, tracer's varlen kernel (:mod:`tracer.attention`: ``torch-varlen`` or ``math``)
  registered in HF's ``AttentionInterface``; it reads ``cu_seq_lens_q`` or derives it from
  ``position_ids``, as HF's flash-attention path does.

dtypes: whatever HF does in the model's dtype (RoPE: cos/sin from float32 ``position_ids *
inv_freq``, cast to the model dtype, applied in float32); the registered kernel as the chosen
tracer backend does it (``math``: scores in the model dtype, softmax in float32).

Example::

    hf = build_hf(model, "sdpa", "to", torch.bfloat16)
    out = PaddedForward(hf, padding_idx=1)(tokens)            # (B, T, E)
"""

from __future__ import annotations

import contextlib

import torch

from tracer.esm.attention import Backend
from tracer.errors import TracerError
from tracer.esm.hf_convert import fair_to_hf, hf_config, require_transformers

DTYPE_BY = ("to", "from_pretrained")
PADDED_ATTN = ("sdpa", "eager")
VARLEN = "tracer_varlen"
"""The name tracer's varlen kernel is registered under in HF's ``AttentionInterface``."""

_BACKEND: dict[str, Backend] = {}  # VARLEN's kernel: set by build_hf (one tracer backend per process)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention-interface function over a padding-free row: ``(1, H, N, d)`` -> ``(1, N, H, d)``."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    if query.shape[0] != 1:
        raise TracerError(f"{VARLEN} runs padding-free batches of one row; got a batch of {query.shape[0]}")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if kwargs.get("position_ids") is None:
            raise TracerError(f"{VARLEN} needs cu_seq_lens_q or position_ids (a padding-free row)")
        (cu, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(kwargs["position_ids"])
    else:
        max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # (1, H, N, d) -> (N, H, d), as varlen kernels take it
    out = _BACKEND["kernel"].attend(q, k, v, cu.to(torch.int32), int(max_len), scaling)  # (N, H, d)
    return out.unsqueeze(0), None  # (1, N, H, d), no weights


def register_varlen(backend: Backend) -> None:
    """Register :data:`VARLEN` in HF's attention and mask interfaces, running ``backend``."""
    require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    _BACKEND["kernel"] = backend
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])  # 2D mask or none


def flash_attention_2_available() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available
    except ImportError:
        return False
    return bool(is_flash_attn_2_available())


def build_hf(model, attn: str, dtype_by: str, dtype: torch.dtype):
    """HF ``EsmModel`` (no pooler, eval) holding ``model``'s weights, in ``dtype`` set per ``dtype_by``.

    Args:
        model: fair-esm ``ESM2`` in the run dtype on the run device (its rotary ``inv_freq`` as
            loaded is kept by :func:`tracer.models.loaded_inv_freq`).
        attn: HF ``attn_implementation`` (``eager``, ``sdpa``, ``flash_attention_2`` or :data:`VARLEN`).
        dtype_by: ``to`` or ``from_pretrained`` (module docstring).
        dtype: the run dtype.
    """
    from tracer.esm import models

    require_transformers()
    from transformers import EsmModel

    if dtype_by not in DTYPE_BY:
        raise TracerError(f"--hf-dtype-by {dtype_by!r}: choose one of {', '.join(DTYPE_BY)}")
    arch = models.Architecture("custom", model.num_layers, model.embed_dim, model.attention_heads, model.token_dropout)
    device = model.embed_tokens.weight.device
    state = fair_to_hf(model.state_dict(), model.num_layers)
    state["rotary_embeddings.inv_freq"] = models.loaded_inv_freq(model.layers[0].self_attn.rot_emb).to(device)  # as stored
    cfg = hf_config(arch)
    if dtype_by == "from_pretrained":
        with _quiet_transformers():  # its per-tensor "Loading weights" bar would bury tracer's lines
            hf = EsmModel.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype, add_pooling_layer=False, attn_implementation=attn)
        hf.to(device)  # a move: from_pretrained already set the dtypes
    else:
        with torch.device("meta"):
            hf = EsmModel(cfg, add_pooling_layer=False)
        hf.load_state_dict(state, strict=True, assign=True)
        hf.embeddings.position_ids = torch.arange(cfg.max_position_embeddings, device=device).expand((1, -1))
        hf.set_attn_implementation(attn)
        hf.to(device=device, dtype=dtype)  # what users write: every floating tensor, buffers too
        if model.layers[0].self_attn.rot_emb.inv_freq.dtype == torch.float32 != dtype:
            # the state handed over keeps the rotary buffer in float32 (tracer.experiments' state-rotary-fp32):
            # the fix users apply after .to(dtype), the loaded values put back in float32
            hf.rotary_embeddings.inv_freq = state["rotary_embeddings.inv_freq"].float()
    return hf.eval().requires_grad_(False)


class PaddedForward:
    """``forward(tokens (B, T)) -> (B, T, E)``: HF's padded forward with its attention mask."""

    def __init__(self, hf, padding_idx: int):
        self.hf, self.padding_idx = hf, padding_idx

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens.ne(self.padding_idx).long()  # (B, T): 1 = real token, as HF tokenizers give it
        return self.hf(input_ids=tokens, attention_mask=mask).last_hidden_state  # (B, T, E)


def restarting_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int64: each packed token's position within its own sequence."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    return torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device) - starts


class PackedForward:
    """``forward(tokens (N,), cu_seqlens, max_seqlen) -> (N, E)``: HF padding-free, one row.

    ``faults`` (tests and ``--fault``): ``positions_not_restarted`` gives positions ``0..N-1``
    (so the ``cu_seq_lens`` derived from them span the whole row: RoPE wrong *and* attention
    across sequences, the padding-free bug); ``leak_across_sequences`` keeps the positions and
    passes ``cu_seq_lens = [0, N]``.
    """

    def __init__(self, hf, faults=None):
        self.hf, self.faults = hf, faults

    def __call__(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        f = self.faults
        pos = restarting_positions(cu_seqlens)  # (N,)
        if f is not None and f.positions_not_restarted:
            pos = torch.arange(tokens.shape[0], device=tokens.device)
        position_ids = pos.unsqueeze(0)  # (1, N)
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
        if f is not None and f.leak_across_sequences:
            cu_q = cu_k = cu_q.new_tensor([0, tokens.shape[0]])
            max_q = max_k = tokens.shape[0]
        out = self.hf(
            input_ids=tokens.unsqueeze(0), position_ids=position_ids,
            cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=max_q, max_length_k=max_k,
        ).last_hidden_state  # (1, N, E)
        return out[0]


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' progress bars off for the duration (as the user had them, after)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
