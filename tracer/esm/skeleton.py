"""fair-esm's ESM2 built on the meta device with no initialisers run: a skeleton whose tensors
are assigned afterwards (from a checkpoint, or layer by layer as up-casts).

Constructing under ``torch.device("meta")`` runs the modules' initialisers and fair-esm's rotary
frequencies on meta tensors, and some of those ops (``normal_``, a scalar divided by a tensor)
go through PyTorch's Python reference implementations, which import ``torch._dynamo`` (about
1 s on a CPU, once per process). So the module is constructed on the CPU with its initialisers
skipped (as Hugging Face transformers does in ``no_init_weights``): its large tensors are
allocated but never touched, so no memory is written. Then every tensor moves to the meta
device (``to_empty``).

Example::

    model = esm2_skeleton(num_layers=6, embed_dim=320, attention_heads=20)
    model.load_state_dict(state, assign=True)
"""

from __future__ import annotations

import contextlib

import torch
from esm.model.esm2 import ESM2

_INITIALISERS = ("normal_", "uniform_", "trunc_normal_", "constant_", "zeros_", "ones_", "xavier_uniform_",
                 "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_init():
    """``torch.nn.init``'s initialisers return their tensor untouched (restored on exit)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def esm2_skeleton(**kwargs) -> ESM2:
    """``ESM2(**kwargs)`` on the meta device: shapes only, no data, no initialisers run."""
    with _no_init():
        model = ESM2(**kwargs)  # weights allocated on the CPU, never written
    return model.to_empty(device="meta")
