"""CUDA paths: the varlen kernels, the pinned-buffer writer, planted faults on the GPU.

Skipped on machines without a GPU (CI); run on a GPU machine with ``python -m pytest tests/integration/test_cuda.py``.
"""

import pytest
import torch

from tests.conftest import SMALL, run
from tracer.attention import math_attention, resolve
from tracer.sequences import debug_batch
from tracer.store import open_trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("name", ["torch-varlen", "flash-attn"])
def test_varlen_kernel_error_is_at_most_twice_the_plain_bf16_error(name):
    """FlashAttention's own acceptance rule, against a float64 reference."""
    try:
        backend = resolve(name, CUDA, torch.bfloat16)
    except Exception as e:  # flash-attn not installed
        pytest.skip(str(e))
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 15, 177, 579], dtype=torch.int32, device=CUDA)
    q, k, v = (torch.randn(579, 40, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    ref = math_attention(q.double(), k.double(), v.double(), cu, 402, 0.125)
    kernel = backend.attend(q, k, v, cu, 402, 0.125).double()
    plain = math_attention(q, k, v, cu, 402, 0.125).double()
    assert (kernel - ref).abs().max() <= 2 * (plain - ref).abs().max()


def test_planted_faults_found_exactly_on_cuda():
    from tracer.selfcheck import run_checks

    rows = run_checks(SMALL, "random", 0, "cuda", "bfloat16", "auto", 400, say=lambda m: None)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_pinned_writer_round_trip_and_determinism(tmp_path):
    a = run(tmp_path, debug_batch(300), name="a.h5", device="cuda", dtype="bfloat16")
    b = run(tmp_path, debug_batch(300), name="b.h5", device="cuda", dtype="bfloat16")
    with open_trace(a.path) as ta, open_trace(b.path) as tb:
        assert ta.meta["attention"]["backend"] in ("torch-varlen", "flash-attn")
        for path in ta.paths:
            for name in ta.taps(path):
                assert torch.equal(ta.tap(path, name).view(torch.uint8), tb.tap(path, name).view(torch.uint8)), (path, name)
    assert a.summary.to_json()["first_divergence"] == {**b.summary.to_json()["first_divergence"]}


def test_plugin_example_on_cuda_matches_builtin_and_captures_the_kernel(tmp_path):
    """The worked example calls PyTorch's varlen kernel (or flash-attn) on CUDA: every tap is
    captured, and its bf16 verdict matches the built-in path with the same kernel and RoPE."""
    from tests.integration.test_plugin import ADAPTER

    seqs = debug_batch(400)
    plug = run(tmp_path, seqs, name="plug.h5", device="cuda", dtype="bfloat16", packed=ADAPTER, metrics_only=True)
    built = run(tmp_path, seqs, name="builtin.h5", device="cuda", dtype="bfloat16", attn="torch-varlen", metrics_only=True)
    assert not plug.notes, plug.notes
    a, b = plug.summary.first_divergence, built.summary.first_divergence
    assert (a.layer, a.tap, a.sequence, a.token) == (b.layer, b.tap, b.sequence, b.token)
    assert plug.summary.attribution.drifting == built.summary.attribution.drifting == "unpacked"


def test_plugin_bug_found_on_cuda(tmp_path):
    from tests.integration.test_plugin import BUGS, batch, plugin_file

    edit, expected = BUGS["positions-not-restarted"]
    spec = plugin_file(tmp_path, "positions", [edit])
    s = run(tmp_path, batch(), device="cuda", dtype="bfloat16", packed=spec, metrics_only=True).summary
    fd = s.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == expected
    assert s.attribution.drifting == "packed"
