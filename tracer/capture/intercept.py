"""The attention kernels a plug-in's forward may call, replaced for a run by wrappers that read q, k and v.

A wrapper records what the kernel consumes and calls the original with the very same arguments
(:class:`tracer.capture.observe.Observer` installs them). flash-attn's functions
(:data:`FLASH_ATTN_FUNCTIONS`: q/k/v separate, stacked as ``qkv``, or ``q`` + ``kv``),
xformers' ``memory_efficient_attention`` (``(B, M, H, K)``; a block-diagonal bias for packed
sequences), PyTorch's ``flex_attention`` (uncompiled), ``varlen_attn`` and
``scaled_dot_product_attention`` are replaced in every loaded
module that holds them (:class:`Patch`), so ``from flash_attn import flash_attn_varlen_func``
is covered.
"""

from __future__ import annotations

import inspect
import sys

import torch


FLASH_ATTN_FUNCTIONS = (
    ("flash_attn_varlen_func", "varlen"),
    ("flash_attn_varlen_qkvpacked_func", "qkvpacked"),
    ("flash_attn_varlen_kvpacked_func", "kvpacked"),
    ("flash_attn_func", "varlen"),
    ("flash_attn_qkvpacked_func", "qkvpacked"),
    ("flash_attn_kvpacked_func", "kvpacked"),
)
"""flash-attn's functions that are intercepted, and how q, k and v are passed: separately,
``qkv`` stacked on axis -3 (``(..., 3, H, d)``), or ``q`` and ``kv`` (``(..., 2, H, d)``)."""


def attention_targets() -> list[tuple[str, object, str, str]]:
    """``(label, original, q/k/v arg names joined, scale arg)`` for every importable kernel."""
    targets = []
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        try:
            import flash_attn
        except Exception:  # installed without a working CUDA build: nothing to intercept
            flash_attn = None
        for name, kind in FLASH_ATTN_FUNCTIONS:
            fn = getattr(flash_attn, name, None)
            if fn is not None:
                targets.append((name, fn, kind, "softmax_scale"))
    xops = sys.modules.get("xformers.ops")  # only if the user's code imported it (a heavy import otherwise)
    if getattr(xops, "memory_efficient_attention", None) is not None:
        targets.append(("memory_efficient_attention", xops.memory_efficient_attention, "varlen", "scale"))  # (B, M, H, K)
    flex = sys.modules.get("torch.nn.attention.flex_attention")  # likewise: it imports the compiler stack
    if getattr(flex, "flex_attention", None) is not None:
        targets.append(("flex_attention", flex.flex_attention, "sdpa", "scale"))  # (B, H, S, D), a block mask
    try:
        from torch.nn.attention import varlen

        targets.append(("varlen_attn", varlen.varlen_attn, "varlen", "scale"))
    except ImportError:
        pass
    targets.append(("scaled_dot_product_attention", torch.nn.functional.scaled_dot_product_attention, "sdpa", "scale"))
    return targets


def bind(fn, args, kwargs) -> dict:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: SDPA's documented one
        sig = inspect.signature(lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None)
    bound = sig.bind(*args, **kwargs)
    names = list(sig.parameters)
    out = dict(bound.arguments)
    # first three positional parameters are q, k, v whatever they are called
    for role, pname in zip(("q", "k", "v"), names[:3]):
        out[role] = bound.arguments.get(pname)
    return out


def qkv_of(kind: str, bound: dict) -> tuple:
    """q, k, v of an attention call's bound arguments (``kind``: :data:`FLASH_ATTN_FUNCTIONS`);
    ``None`` s where the call does not hold them in the expected form."""
    first, second = bound.get("q"), bound.get("k")
    if kind == "qkvpacked":
        if isinstance(first, torch.Tensor) and first.dim() >= 3 and first.shape[-3] == 3:
            return tuple(first.unbind(-3))
        return None, None, None
    if kind == "kvpacked":
        if isinstance(second, torch.Tensor) and second.dim() >= 3 and second.shape[-3] == 2:
            return (first, *second.unbind(-3))
        return None, None, None
    return first, second, bound.get("v")


class Patch:
    """Replace ``original`` by ``wrapper`` in every loaded module's namespace; undo in :meth:`undo`."""

    def __init__(self):
        self.done: list[tuple[dict, str, object]] = []

    def apply(self, replacements: dict[int, object], extra_namespaces=()) -> None:
        spaces = []
        for module in list(sys.modules.values()):
            d = getattr(module, "__dict__", None)
            if isinstance(d, dict):
                spaces.append(d)
        spaces += [d for d in extra_namespaces if isinstance(d, dict)]
        seen = set()
        for d in spaces:
            if id(d) in seen:
                continue
            seen.add(id(d))
            for key, value in list(d.items()):
                wrapper = replacements.get(id(value))
                if wrapper is not None:
                    self.done.append((d, key, value))
                    d[key] = wrapper

    def undo(self) -> None:
        while self.done:
            d, key, value = self.done.pop()
            d[key] = value
