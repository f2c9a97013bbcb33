import pytest
import torch

from tracer.esm import attention
from tracer.esm.attention import math_attention, resolve
from tracer.errors import TracerError


def _naive(q, k, v, cu, scale):
    out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1).double() for x in (q, k, v))  # (H, L, d)
        w = torch.softmax(qs @ ks.transpose(1, 2) * scale, dim=-1)
        out.append((w @ vs).transpose(0, 1))
    return torch.cat(out)


@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
def test_math_backend_is_exact_attention(scale):
    torch.manual_seed(0)
    cu = torch.tensor([0, 1, 4, 37], dtype=torch.int32)
    q, k, v = (torch.randn(37, 3, 8) for _ in range(3))
    got = math_attention(q, k, v, cu, 33, scale)
    want = _naive(q, k, v, cu, 8**-0.5 if scale is None else scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # float32 vs float64 reference


def test_math_backend_never_crosses_sequences():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, 2, 4) for _ in range(3))
    a = math_attention(q, k, v, cu, 7, None)
    k2, v2 = k.clone(), v.clone()
    k2[5:] += 1.0
    v2[5:] -= 3.0
    b = math_attention(q, k2, v2, cu, 7, None)
    assert torch.equal(a[:5], b[:5])
    assert not torch.equal(a[5:], b[5:])


def test_auto_on_cpu_is_math():
    assert resolve("auto", torch.device("cpu"), torch.bfloat16).name == "math"


@pytest.mark.parametrize(
    "name, device, dtype, fragment",
    [
        ("flash-attn", "cpu", torch.bfloat16, "flash-attn package is not installed .*this run is on cpu"),
        ("torch-varlen", "cpu", torch.bfloat16, "needs a CUDA device"),
        ("torch-varlen", "cuda", torch.float32, "float16/bfloat16 only, not float32"),
        ("nope", "cpu", torch.bfloat16, "unknown attention backend 'nope'"),
    ],
)
def test_backend_refusals(name, device, dtype, fragment):
    with pytest.raises(TracerError, match=fragment):
        resolve(name, torch.device(device), dtype)


def test_missing_flash_attn_package(monkeypatch):
    monkeypatch.setattr(attention, "has_flash_attn", lambda: False)
    with pytest.raises(TracerError, match="flash-attn package is not installed"):
        resolve("flash-attn", torch.device("cuda"), torch.bfloat16)
