"""Varlen attention backends for the packed path.

Every backend has the same contract::

    attend(q, k, v, cu_seqlens, max_seqlen, scale) -> out
    # q, k, v, out: (N, H, d) packed tokens; cu_seqlens: (S + 1,) int32 on q's device;
    # attention never crosses a cu_seqlens boundary; scale multiplies q.k (None = 1/sqrt(d))

Backends:

* ``flash-attn`` -- ``flash_attn.flash_attn_varlen_func`` from the flash-attn package
  (CUDA, float16/bfloat16).
* ``torch-varlen`` -- PyTorch's built-in FlashAttention-2 varlen kernel (CUDA, float16/bfloat16),
  ``torch.ops.aten._flash_attention_forward``: the kernel ``torch.nn.attention.varlen.varlen_attn``
  runs, with the same output to the bit (``tests/integration/test_cuda.py``), called directly:
  ``varlen_attn`` is a custom op, whose module imports ``torch._dynamo`` (about 1 s) and whose
  every call adds a Python layer and a kernel.
* ``math`` -- an exact implementation that runs anywhere, in any dtype: for each sequence,
  ``softmax(q k^T) v`` with the same numerics as fair-esm's own attention (scores and the
  output product in the model dtype, softmax in float32).

``auto`` picks the first of these that can run on the device and dtype.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tracer.env import version
from tracer.errors import TracerError

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, "float | None"], torch.Tensor]
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """A resolved attention backend.

    Attributes:
        name: ``flash-attn``, ``torch-varlen`` or ``math``.
        attend: the function (contract in the module docstring).
        deterministic: whether its forward gives bit-identical results run to run.
        version: package version, where there is one.
    """

    name: str
    attend: Attend
    deterministic: bool
    version: str | None = None


_BOUNDS = threading.local()
"""Per thread, the last ``cu_seqlens`` tensor seen and its values on the host (every layer of a
forward passes the same one; each lockstep stream, e.g. packed and control, has its own thread)."""


def _host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens.tolist()``, read from the device once per tensor, not once per layer (each
    read waits for the device to drain). Offsets tensors are never written in place."""
    if getattr(_BOUNDS, "tensor", None) is not cu_seqlens:
        _BOUNDS.tensor, _BOUNDS.values = cu_seqlens, cu_seqlens.tolist()
    return _BOUNDS.values


def math_attention(q, k, v, cu_seqlens, max_seqlen, scale):
    """Exact per-sequence attention with fair-esm's numerics (see module docstring)."""
    out = torch.empty_like(q)
    bounds = _host_bounds(cu_seqlens)
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs = q[start:end].transpose(0, 1)  # (H, L, d)
        ks = k[start:end].transpose(0, 1)
        vs = v[start:end].transpose(0, 1)
        s = qs.shape[-1] ** -0.5 if scale is None else scale
        if s != 1.0:  # the packed path pre-scales q like fair-esm and passes 1.0
            qs = qs * s
        w = torch.bmm(qs, ks.transpose(1, 2))  # (H, L, L) in the model dtype, like fair-esm
        p = F.softmax(w.float(), dim=-1).type_as(w)  # softmax in float32, like fair-esm
        out[start:end] = torch.bmm(p, vs).transpose(0, 1)  # (L, H, d)
    return out


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale):
    # dropout 0, not causal, no debug mask: what varlen_attn passes (module docstring)
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, False, False, scale=scale)[0]


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, scale):
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p=0.0, softmax_scale=scale, causal=False,
    )


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or installed without a working CUDA build
        return False
    return True


def has_torch_varlen() -> bool:
    """PyTorch has the varlen FlashAttention-2 kernel (>= 2.10: ``varlen_attn`` exists), checked
    without importing ``torch.nn.attention.varlen`` (module docstring)."""
    import importlib.util

    return hasattr(torch.ops.aten, "_flash_attention_forward") and importlib.util.find_spec("torch.nn.attention.varlen") is not None


BACKENDS = ("auto", "flash-attn", "torch-varlen", "math")

PLUGIN = Backend("plug-in", attend=None, deterministic=False)
"""Recorded when the packed side is a user's forward: its attention kernel is its own."""


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend ``name`` for ``device``/``dtype``, or a :class:`TracerError` saying why not."""
    cuda = device.type == "cuda"
    half = dtype in HALF_DTYPES
    if name == "auto":
        if cuda and half and has_flash_attn():
            return resolve("flash-attn", device, dtype)
        if cuda and half and has_torch_varlen():
            return resolve("torch-varlen", device, dtype)
        return resolve("math", device, dtype)
    if name == "math":
        return Backend("math", math_attention, deterministic=True)
    if name in ("flash-attn", "torch-varlen"):
        if name == "flash-attn" and not has_flash_attn():
            where = "" if cuda else f"; this run is on {device.type}, where --attn math is the backend"
            raise TracerError(
                "--attn flash-attn: the flash-attn package is not installed (it builds only on CUDA "
                f"machines: pip install 'tracer[flash]'), or use --attn torch-varlen{where}"
            )
        if not cuda:
            raise TracerError(f"--attn {name} needs a CUDA device; use --attn math on {device.type}")
        if not half:
            raise TracerError(
                f"--attn {name} runs in float16/bfloat16 only, not {str(dtype).removeprefix('torch.')}; "
                "use --dtype bfloat16 or --attn math"
            )
        if name == "flash-attn":
            return Backend("flash-attn", _flash_attn, deterministic=True, version=version("flash-attn"))
        if not has_torch_varlen():
            raise TracerError(
                f"--attn torch-varlen needs torch.nn.attention.varlen (PyTorch >= 2.10), "
                f"this is torch {torch.__version__}"
            )
        return Backend("torch-varlen", _torch_varlen, deterministic=True, version=torch.__version__)
    raise TracerError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
