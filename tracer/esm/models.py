"""Loading ESM-2 by fair-esm name, checkpoint file, hub cache or seeded random init.

The pieces live in their own modules (:mod:`tracer.esm.catalogue`, :mod:`tracer.esm.checkpoints`,
:mod:`tracer.esm.weights_cache`, :mod:`tracer.esm.precision`); this module loads a model and
re-exports them, so that ``models.X`` names one place for callers.

Example::

    model, arch, weights = load_model("esm2_t6_8M_UR50D", weights="random", seed=0)
    set_precision(model, torch.device("cpu"), torch.bfloat16)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from esm.model.esm2 import ESM2

from tracer.errors import TracerError, first_line
from tracer.esm import hf_convert
from tracer.esm.weights_cache import join_cache_write
from tracer.esm.catalogue import ARCHITECTURES, Architecture, DEFAULT_MODEL, Weights, architecture  # noqa: F401 (re-exported)
from tracer.esm.checkpoints import hub_checkpoint_path, read_checkpoint, checkpoint_architecture, build_from_checkpoint, download_checkpoint  # noqa: F401 (re-exported)
from tracer.esm.weights_cache import build_random, random_cache_key, random_cache_path, read_random_cache, save_random_cache, wait_for_cache_writes  # noqa: F401 (re-exported)
from tracer.esm.precision import loaded_inv_freq, canonical_inv_freq, set_precision, to_device_pinned, upcast_twin, strict_fp32_matmul  # noqa: F401 (re-exported)



def load_model(
    name: str | None = None,
    weights: str = "auto",
    seed: int = 0,
    trust_checkpoint: bool = False,
    progress=None,
) -> tuple[ESM2, Architecture, Weights]:
    """Load an ESM-2 model in its stored precision on the CPU.

    Args:
        name: fair-esm model name; ``None`` means the default (``esm2_t36_3B_UR50D``), or the
            checkpoint's own architecture when ``weights`` is a path.
        weights: ``auto`` (torch-hub cache, else fair-esm's download), ``random`` (seeded init of
            the named architecture), a path to a fair-esm ``.pt`` checkpoint, or a local Hugging
            Face folder (``config.json`` + ``*.safetensors``, :mod:`tracer.esm.hf_convert`).
        seed: RNG seed for ``random``.
        trust_checkpoint: allow arbitrary pickled objects in the checkpoint.
        progress: optional ``callable(str)`` for status lines.

    Returns:
        ``(model, architecture, weights record)``; the model is in eval mode with no gradients.
    """
    say = progress or (lambda msg: None)
    if weights not in ("random", "auto") and hf_convert.is_hf_folder(weights):
        say(f"reading Hugging Face folder {weights} (converted to fair-esm's ESM2 for the fair-esm paths and the reference)")
        return hf_convert.load_hf_folder(weights, name)
    if weights == "random":
        arch = architecture(name or DEFAULT_MODEL)
        cached = random_cache_path(arch, seed)
        join_cache_write(cached)  # this process may still be writing it
        if cached is not None and cached.exists():
            say(f"loading {arch.name} seeded random weights (seed {seed}) from the cache {cached}")
            data, why = read_random_cache(cached, arch, seed)
            if data is not None:
                model = build_from_checkpoint(data, arch, cached)
                return model, arch, Weights("random", None, seed, fingerprint(model))
            say(f"cache entry {cached} is not used ({why}); building the weights again")  # rebuilt, never trusted
        say(f"building {arch.name} ({arch.describe()}) with seeded random weights (seed {seed})")
        model = build_random(arch, seed)
        if cached is not None:
            save_random_cache(model, arch, cached, background=True, seed=seed)  # the run does not wait for the disk
        return model, arch, Weights("random", None, seed, fingerprint(model))

    if weights == "auto":
        arch = architecture(name or DEFAULT_MODEL)
        path = hub_checkpoint_path(arch.name)
        source = "hub-cache"
        if not path.exists():
            say(f"{arch.name} is not in the torch-hub cache ({path.parent}); downloading it")
            try:
                download_checkpoint(arch.name, path)
            except Exception as e:  # any network/HTTP/disk failure: one line, and the ways out
                raise TracerError(
                    f"could not get the {arch.name} checkpoint ({first_line(e)}); "
                    "use --weights PATH for a local .pt file, or --weights random to trace the "
                    "architecture with seeded random weights"
                ) from None
            source = "download"
    else:
        path = Path(weights)
        source = "checkpoint"
        arch = None

    say(f"reading checkpoint {path}")
    data = read_checkpoint(path, trust=trust_checkpoint)
    found = checkpoint_architecture(data, path)
    if arch is None and name is not None:
        arch = architecture(name)
    if arch is not None and not arch.same_shape(found):
        raise TracerError(
            f"checkpoint {path} is {found.name} ({found.describe()}), but the model asked for is "
            f"{arch.name} ({arch.describe()}); pass --model {found.name}"
            if found.name != "custom"
            else f"checkpoint {path} has {found.describe()}, but {arch.name} has {arch.describe()}"
        )
    arch = arch or found
    model = build_from_checkpoint(data, arch, path)
    del data
    return model, arch, Weights(source, str(path), None, fingerprint(model))


def peek_architecture(name: str | None, weights: str, trust_checkpoint: bool = False) -> Architecture:
    """The architecture :func:`load_model` will load, without building it.

    A checkpoint path without a model name has its config read (memory-mapped: the tensors'
    bytes are not read).
    """
    if weights not in ("random", "auto") and hf_convert.is_hf_folder(weights):
        return hf_convert.folder_architecture(weights)
    if weights in ("random", "auto") or name is not None:
        return architecture(name or DEFAULT_MODEL)
    return checkpoint_architecture(read_checkpoint(weights, trust=trust_checkpoint, tensors=False), weights)


def fingerprint(model: ESM2) -> str:
    """SHA-256 over the embedding, final layer norm and last layer's fc2 bias, as stored."""
    h = hashlib.sha256()
    for t in (model.embed_tokens.weight, model.emb_layer_norm_after.weight, model.layers[-1].fc2.bias):
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
