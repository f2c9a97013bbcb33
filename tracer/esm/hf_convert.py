"""Exact conversion between fair-esm's ESM-2 and Hugging Face transformers' ``EsmModel``.

Both directions move tensors without arithmetic (renamed keys, the same tensors), so a
round trip is bitwise. The mapping (``{i}`` = layer)::

    fair-esm ESM2                              Hugging Face EsmModel (EsmForMaskedLM: "esm." prefix)
    embed_tokens.weight                        embeddings.word_embeddings.weight
    layers.{i}.self_attn_layer_norm            encoder.layer.{i}.attention.LayerNorm
    layers.{i}.self_attn.q_proj / k_proj / v_proj
                                               encoder.layer.{i}.attention.self.query / key / value
    layers.{i}.self_attn.out_proj              encoder.layer.{i}.attention.output.dense
    layers.{i}.final_layer_norm                encoder.layer.{i}.LayerNorm
    layers.{i}.fc1 / fc2                       encoder.layer.{i}.intermediate.dense / output.dense
    emb_layer_norm_after                       encoder.emb_layer_norm_after
    layers.{i}.self_attn.rot_emb.inv_freq      rotary_embeddings.inv_freq (one buffer for all layers)
    contact_head.regression                    contact_head.regression
    lm_head.dense / layer_norm / bias          lm_head.dense / layer_norm / bias   (EsmForMaskedLM)
    lm_head.weight (tied to embed_tokens)      lm_head.decoder.weight (tied to word_embeddings)

transformers is imported only by the functions that build HF objects; a missing package is one
line (:func:`require_transformers`). transformers 4.x is refused: its ESM RoPE takes no
``position_ids`` (positions come from the padded length, built with ``type_as(inv_freq)``), so
it cannot run padding-free, and its numerics are not the 5.x ones this module maps.

Example::

    hf_state = fair_to_hf(model.state_dict(), model.num_layers)
    back = hf_to_fair(hf_state, model.num_layers)          # bitwise equal to model.state_dict()
    model, arch, weights = load_hf_folder("my-esm2-folder")  # config.json + *.safetensors
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tracer.errors import TracerError, first_line

SUPPORTED = "transformers>=5.17 (tested 5.17 and 5.24)"
INSTALL = "pip install 'tracer[hf]'"

_LAYER = {  # fair-esm name inside layers.{i}.  ->  HF name inside encoder.layer.{i}.
    "self_attn_layer_norm": "attention.LayerNorm",
    "self_attn.q_proj": "attention.self.query",
    "self_attn.k_proj": "attention.self.key",
    "self_attn.v_proj": "attention.self.value",
    "self_attn.out_proj": "attention.output.dense",
    "final_layer_norm": "LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
}
_TOP = {  # fair-esm module -> HF module inside the base model
    "embed_tokens": "embeddings.word_embeddings",
    "emb_layer_norm_after": "encoder.emb_layer_norm_after",
    "contact_head.regression": "contact_head.regression",
}
_HEAD = ("lm_head.dense", "lm_head.layer_norm")
_INV_FREQ = "rotary_embeddings.inv_freq"
_legacy = re.compile(r"LayerNorm\.(gamma|beta)$")
_LEGACY = {"gamma": "weight", "beta": "bias"}


def require_transformers(what: str = "the Hugging Face paths"):
    """The ``transformers`` module, or one line saying how to get a supported one."""
    try:
        import transformers
        from transformers.models.esm import modeling_esm
    except ImportError as e:
        missing = getattr(e, "name", None) or "transformers"
        raise TracerError(f"{what} need the Hugging Face extra ({missing} is not installed): {INSTALL} ({SUPPORTED})") from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5 or not hasattr(modeling_esm, "EsmRotaryEmbedding") or not hasattr(modeling_esm, "ALL_ATTENTION_FUNCTIONS"):
        raise TracerError(
            f"{what} need {SUPPORTED}; this is transformers {transformers.__version__}, whose ESM RoPE takes no "
            "position_ids (positions from the padded length, type_as(inv_freq)): upgrade with " + INSTALL
        )
    return transformers


# ---------------------------------------------------------------------------------------------
# State dicts.


def fair_to_hf(state: dict, num_layers: int, masked_lm: bool = False) -> dict:
    """fair-esm ``ESM2.state_dict()`` -> HF ``EsmModel`` (``masked_lm``: ``EsmForMaskedLM``) keys.

    The same tensors, renamed. The per-layer rotary buffers become HF's single one; they must
    be equal (they are in every ESM-2 checkpoint).
    """
    base = "esm." if masked_lm else ""
    out = {}
    for i in range(num_layers):
        for fair, hf in _LAYER.items():
            for p in ("weight", "bias"):
                out[f"{base}encoder.layer.{i}.{hf}.{p}"] = state[f"layers.{i}.{fair}.{p}"]
    for fair, hf in _TOP.items():
        for p in ("weight", "bias"):
            if f"{fair}.{p}" in state:
                out[f"{base}{hf}.{p}"] = state[f"{fair}.{p}"]
    inv = [state[f"layers.{i}.self_attn.rot_emb.inv_freq"] for i in range(num_layers)]
    if any(not torch.equal(inv[0], x) or x.dtype != inv[0].dtype for x in inv[1:]):
        raise TracerError("the layers' rotary inv_freq buffers differ; Hugging Face's EsmModel holds one for all layers")
    out[f"{base}{_INV_FREQ}"] = inv[0]
    if masked_lm:
        for m in _HEAD:
            for p in ("weight", "bias"):
                out[f"{m}.{p}"] = state[f"{m}.{p}"]
        out["lm_head.decoder.weight"] = state["lm_head.weight"]
        out["lm_head.bias"] = state["lm_head.bias"]
    return out


def hf_to_fair(state: dict, num_layers: int) -> dict:
    """HF ``EsmModel``/``EsmForMaskedLM`` state dict -> fair-esm ``ESM2`` keys (the same tensors).

    The rotary buffer may sit at the model level (transformers 5.x), per layer (older files) or
    under 5.x's pattern key; a file without one gets none (the loader fills in the constructor's).
    An ``EsmModel`` without a language-model head gets fair-esm's tied ``lm_head.weight`` (the
    embedding) and zeros for the rest of the head, which tracing never runs. The pooler (HF
    only, unused by ESM-2) is dropped.
    """
    state = {_legacy.sub(lambda m: "LayerNorm." + _LEGACY[m.group(1)], k): v for k, v in state.items()}
    base = "esm." if any(k.startswith("esm.") for k in state) else ""
    get = lambda k: state[f"{base}{k}"]  # noqa: E731
    out = {}
    for i in range(num_layers):
        for fair, hf in _LAYER.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{fair}.{p}"] = get(f"encoder.layer.{i}.{hf}.{p}")
    for fair, hf in _TOP.items():
        for p in ("weight", "bias"):
            if f"{base}{hf}.{p}" in state:
                out[f"{fair}.{p}"] = get(f"{hf}.{p}")
    inv = [v for k, v in sorted(state.items()) if k.endswith(_INV_FREQ)]
    if inv:
        for i in range(num_layers):
            out[f"layers.{i}.self_attn.rot_emb.inv_freq"] = inv[0]
    if "lm_head.dense.weight" in state:
        for m in _HEAD:
            for p in ("weight", "bias"):
                out[f"{m}.{p}"] = state[f"{m}.{p}"]
        # tied to the embedding: save_pretrained writes it once, under the embedding's name
        out["lm_head.weight"] = state.get("lm_head.decoder.weight", out["embed_tokens.weight"])
        out["lm_head.bias"] = state["lm_head.bias"]
    else:
        e = out["embed_tokens.weight"]
        width, dtype = e.shape[1], e.dtype
        out["lm_head.weight"] = e
        out["lm_head.bias"] = torch.zeros(e.shape[0], dtype=dtype)
        out["lm_head.dense.weight"] = torch.zeros(width, width, dtype=dtype)
        out["lm_head.dense.bias"] = torch.zeros(width, dtype=dtype)
        out["lm_head.layer_norm.weight"] = torch.ones(width, dtype=dtype)
        out["lm_head.layer_norm.bias"] = torch.zeros(width, dtype=dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Configs.

_FIXED = {  # EsmConfig fields an ESM-2 has, with the one value tracer (and fair-esm) supports
    "vocab_size": 33,
    "position_embedding_type": "rotary",
    "emb_layer_norm_before": False,
    "pad_token_id": 1,
    "mask_token_id": 32,
    "layer_norm_eps": 1e-5,
    "is_folding_model": False,
    "is_decoder": False,
    "add_cross_attention": False,
}


def hf_config(arch, attn_implementation: str | None = None):
    """The ``EsmConfig`` of a fair-esm ESM-2 of shape ``arch`` (:class:`tracer.models.Architecture`)."""
    require_transformers()
    from transformers import EsmConfig

    from esm.data import Alphabet

    cfg = EsmConfig(
        hidden_size=arch.embed_dim,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.heads,
        intermediate_size=4 * arch.embed_dim,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=1026,
        token_dropout=arch.token_dropout,
        vocab_list=tuple(Alphabet.from_architecture("ESM-1b").all_toks),
        **{k: v for k, v in _FIXED.items() if k not in ("is_decoder", "add_cross_attention")},
    )
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    return cfg


def architecture_of(cfg: dict, where: str):
    """The :class:`tracer.models.Architecture` of an HF ``config.json`` dict; one line if it is no ESM-2."""
    from tracer.esm import models

    for key, want in _FIXED.items():
        got = cfg.get(key, want)
        if got != want and not (isinstance(want, float) and isinstance(got, float) and abs(got - want) < 1e-12):
            raise TracerError(f"{where}: {key} is {got!r}; tracer traces ESM-2, which has {key} = {want!r}")
    try:
        width, layers, heads = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as e:
        raise TracerError(f"{where}: no usable {e} (hidden_size, num_hidden_layers, num_attention_heads)") from None
    if cfg.get("intermediate_size", 4 * width) != 4 * width or cfg.get("hidden_act", "gelu") != "gelu":
        raise TracerError(f"{where}: ESM-2 has intermediate_size = 4 x hidden_size and hidden_act gelu")
    if float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))) != 10000.0:
        raise TracerError(f"{where}: rope_theta must be 10000 (ESM-2's RoPE)")
    return models.Architecture("custom", layers, width, heads, bool(cfg.get("token_dropout", True))).known()


# ---------------------------------------------------------------------------------------------
# Folders.


def is_hf_folder(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def folder_architecture(path):
    """The architecture in a local HF folder's ``config.json`` (no tensor is read)."""
    p = Path(path) / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TracerError(f"{p}: cannot read it ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(cfg, dict):
        raise TracerError(f"{p}: not a config (a JSON object)")
    return architecture_of(cfg, str(p))


def read_hf_state(path) -> dict:
    """The tensors of a local HF folder's ``*.safetensors`` files (shards merged)."""
    p = Path(path)
    shards = sorted(p.glob("*.safetensors"))
    if not shards:
        have = ", ".join(sorted(x.name for x in p.iterdir())[:6])
        raise TracerError(f"{p}: no *.safetensors file (tracer reads safetensors only); the folder has {have}")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise TracerError(f"--weights {p} needs the Hugging Face extra (safetensors is not installed): {INSTALL}") from None
    state: dict = {}
    for shard in shards:
        try:
            state.update(load_file(str(shard)))
        except Exception as e:  # a damaged or truncated file: one line
            raise TracerError(f"{shard}: not a readable safetensors file ({type(e).__name__}: {first_line(e)})") from None
    return state


def load_hf_folder(path, name: str | None = None):
    """A local HF ESM-2 folder as fair-esm ``(ESM2, Architecture, Weights)`` (the reference's model).

    The tensors keep the file's dtype (a float32 folder gives a float32 model, as a fair-esm
    checkpoint does); the rotary buffer is kept exactly as stored.
    """
    from tracer.esm import models

    arch = folder_architecture(path)
    if name is not None and not models.architecture(name).same_shape(arch):
        want = models.architecture(name)
        raise TracerError(f"{path} has {arch.describe()}, but {want.name} has {want.describe()}; drop --model or pass the matching one")
    hf_state = read_hf_state(path)
    try:
        state = hf_to_fair(hf_state, arch.num_layers)
    except KeyError as e:
        raise TracerError(f"{path} does not match ESM-2 ({arch.describe()}): no tensor {e}") from None
    model = models.build_from_checkpoint({"model": state}, arch, path)
    return model, arch, models.Weights("hf-folder", str(path), None, models.fingerprint(model))
