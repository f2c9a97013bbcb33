"""CUDA paths: the varlen kernels, the pinned-buffer writer, planted faults on the GPU.

Skipped on machines without a GPU (CI); run on a GPU machine with ``python -m pytest tests/integration/test_cuda.py``.
"""

import importlib.util

import pytest
import torch

from tests.conftest import SMALL, run
from tracer.esm.attention import has_torch_varlen, math_attention, resolve
from tracer.inputs.sequences import debug_batch
from tracer.store.trace_file import open_trace

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
KERNEL_PRESENT = {  # whether the package is there at all; a broken install must fail, not skip
    "flash-attn": lambda: importlib.util.find_spec("flash_attn") is not None,  # the optional '.[flash]' extra
    "torch-varlen": has_torch_varlen,  # PyTorch >= 2.10
}


@pytest.mark.parametrize("name", ["torch-varlen", "flash-attn"])
def test_varlen_kernel_error_is_at_most_twice_the_plain_bf16_error(name):
    """FlashAttention's own acceptance rule, against a float64 reference."""
    if not KERNEL_PRESENT[name]():
        pytest.skip(f"{name} is not installed here (an optional kernel)")
    backend = resolve(name, CUDA, torch.bfloat16)  # installed: any failure to resolve it is a failure
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 15, 177, 579], dtype=torch.int32, device=CUDA)
    q, k, v = (torch.randn(579, 40, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    ref = math_attention(q.double(), k.double(), v.double(), cu, 402, 0.125)
    kernel = backend.attend(q, k, v, cu, 402, 0.125).double()
    plain = math_attention(q, k, v, cu, 402, 0.125).double()
    assert (kernel - ref).abs().max() <= 2 * (plain - ref).abs().max()


def test_torch_varlen_backend_is_varlen_attn_to_the_bit():
    """The backend calls the kernel under ``varlen_attn`` directly (no custom-op layer): same bits."""
    from torch.nn.attention.varlen import varlen_attn

    backend = resolve("torch-varlen", CUDA, torch.bfloat16)
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 15, 177, 579], dtype=torch.int32, device=CUDA)
    q, k, v = (torch.randn(579, 40, 64, device=CUDA, dtype=torch.bfloat16) for _ in range(3))
    for scale in (None, 1.0, 0.125):
        assert torch.equal(backend.attend(q, k, v, cu, 402, scale), varlen_attn(q, k, v, cu, cu, 402, 402, scale=scale)), scale


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
def test_pinned_staging_copies_the_weights_bit_for_bit():
    from tracer.esm.models import architecture, build_random, to_device_pinned

    a = build_random(architecture(SMALL), 0)
    b = build_random(architecture(SMALL), 0)
    moved = to_device_pinned(a, CUDA, chunk=1 << 16)  # small chunks: both staging buffers cycle
    b.to(CUDA)
    assert moved > 0
    sa, sb = a.state_dict(), b.state_dict()
    for k in sb:
        assert sa[k].is_cuda and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.lm_head.weight is a.embed_tokens.weight  # tied weights stay tied


def test_lockstep_reference_on_cuda_is_the_in_place_fp32_reference(tmp_path):
    from tracer.esm.models import load_model, set_precision, strict_fp32_matmul
    from tracer.capture.paths import encode, run_unpacked

    seqs = debug_batch(300)
    result = run(tmp_path, seqs, device="cuda", dtype="bfloat16")
    model, arch, _ = load_model(SMALL, "random", 0)
    set_precision(model, CUDA, torch.bfloat16)
    set_precision(model, CUDA, torch.float32)  # the whole model up-cast in place (what the twin must equal)
    expected = {}
    with torch.inference_mode(), strict_fp32_matmul():
        run_unpacked(model, encode(seqs, model.alphabet), [t.name for t in result.summary.taps], expected.__setitem__)
    with open_trace(result.path) as t:
        for name in ("embed", "layers.2.q_rope", "layers.5.resid_out", "final_norm"):
            assert torch.equal(t.tap("reference", name), expected[name].cpu()), name


def test_sub_batches_on_cuda_give_the_same_verdict(tmp_path):
    from tracer.inputs.faults import Faults, Perturbation

    faults = Faults(perturbations=(Perturbation("unpacked", "layers.3.ffn_out", 3, 200, eps=0.5),))  # well above the bf16 bar
    # packed RoPE as fair-esm's: in bfloat16 the paths otherwise part at layer 0 q_rope first (the real bug)
    one = run(tmp_path, debug_batch(400), name="one.h5", device="cuda", faults=faults, max_batch_tokens=0, packed_rope="model")
    split = run(tmp_path, debug_batch(400), name="split.h5", device="cuda", faults=faults, max_batch_tokens=500, packed_rope="model")
    assert len(split.estimate.plan.groups) > 1
    a, b = one.summary.first_divergence, split.summary.first_divergence
    assert (a.layer, a.tap, a.sequence, a.token) == (b.layer, b.tap, b.sequence, b.token) == (3, "ffn_out", "large", 200)


def test_device_memory_bounded_by_one_layer_on_cuda(tmp_path):
    from tracer.benchmarks.production import production_batch

    r = run(tmp_path, production_batch(16), device="cuda", metrics_only=True)
    m, est = r.memory, r.estimate
    above = m["device_peak_allocated"] - m["device_allocated_before_paths"]
    assert above <= 4 * (m["layer_tap_bytes"] + est.workspace_bytes)
    assert m["peak_held_tap_bytes"] <= 1.25 * m["layer_tap_bytes"]
