"""A plug-in cannot change the model the other paths run on (:mod:`tracer.capture.isolation`).

Every plug-in here is the worked example adapter (which changes nothing and passes) plus one
change to the shared model, made in its factory or in its forward. Each run must stop with one
line naming what changed, and leave no trace file. CPU, small random model, short sequences.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import SMALL, run
from tracer import experiments
from tracer.capture import isolation
from tracer.capture.plugin import load
from tracer.errors import TracerError
from tracer.esm.models import build_random, architecture, load_model, set_precision
from tracer.inputs.sequences import make_batch, motif_sequence
from tracer.runner.execute import RunConfig, trace

ADAPTER = f"{Path(__file__).resolve().parents[2] / 'examples' / 'packed_esm2_adapter.py'}:make_forward"
F32 = {"dtype": "float32", "reference": "fp64"}


def seqs():
    return make_batch([("short", motif_sequence(12)), ("long", motif_sequence(48))])


def example(model, alphabet):
    return load(ADAPTER, "packed").factory(model, alphabet)


def in_factory(change):
    """The example adapter whose factory first applies ``change(model)``."""

    def factory(model, alphabet):
        change(model)
        return example(model, alphabet)

    return factory


def in_forward(change, on_call=1):
    """The example adapter whose forward applies ``change(model)`` on its ``on_call``-th call
    (call 1 is the probe run on two short sequences, call 2 the traced forward)."""

    def factory(model, alphabet):
        forward, calls = example(model, alphabet), [0]

        def wrapped(*args):
            calls[0] += 1
            if calls[0] == on_call:
                change(model)
            return forward(*args)

        return wrapped

    return factory


def scale(attr, factor):
    def change(model):
        with torch.no_grad():
            model.get_parameter(attr).mul_(factor)

    return change


def shift_embedding(model):
    with torch.no_grad():
        model.embed_tokens.weight.add_(0.1)


def copy_layer(model):
    model.layers[3] = copy.deepcopy(model.layers[2])


def copy_layer_values(model):
    model.layers[3].load_state_dict(model.layers[2].state_dict())


def scale_inv_freq(model):
    model.layers[0].self_attn.rot_emb.inv_freq.mul_(1.01)


def leave_hook(model):
    model.layers[1].fc2.register_forward_hook(lambda module, args, out: out * 1.1)


def refused(tmp_path, plugin, fragment, side="packed", **kw):
    out = tmp_path / "t.h5"
    with pytest.raises(TracerError) as e:
        run(tmp_path, seqs(), name=out.name, **{side: plugin}, **kw)
    message = str(e.value)
    assert "\n" not in message and fragment in message, message
    assert "changed the shared model" in message and "copy.deepcopy(model)" in message, message
    assert not out.exists() and not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*partial*"))
    return message


def test_the_example_adapter_changes_nothing_and_the_check_is_timed(tmp_path):
    result = run(tmp_path, seqs(), packed=ADAPTER, **F32)
    assert result.summary.verdict == "agree"
    assert result.timings["isolation"] > 0


# 1. A factory that casts the shared model.
@pytest.mark.parametrize("cast, kw, fragment", [
    (lambda m: m.float(), {}, "embed_tokens.weight (dtype bfloat16 -> float32)"),
    (lambda m: m.half(), F32, "embed_tokens.weight (dtype float32 -> float16)"),
], ids=["float-in-bf16-run", "half-in-f32-run"])
def test_a_factory_that_casts_the_model_is_refused(tmp_path, cast, kw, fragment):
    message = refused(tmp_path, in_factory(cast), fragment, **kw)
    assert "in its factory" in message and "the --packed plug-in" in message


# 2. Weights and flags changed by the factory.
@pytest.mark.parametrize("change, fragment", [
    (scale("layers.2.fc1.weight", 1.5), "layers.2.fc1.weight (values)"),
    (shift_embedding, "embed_tokens.weight (values)"),
    (lambda m: setattr(m, "token_dropout", False), "model.token_dropout (True -> False)"),
    (copy_layer, "layers.3 (module replaced)"),
    (copy_layer_values, "layers.3.self_attn.k_proj.weight (values)"),
], ids=["fc1-x1.5", "embedding+0.1", "token-dropout-off", "layer-copied", "layer-values-copied"])
def test_a_factory_that_changes_weights_or_flags_is_refused(tmp_path, change, fragment):
    refused(tmp_path, in_factory(change), fragment)


# 3. A buffer the reference shares.
def test_a_changed_rotary_buffer_is_refused(tmp_path):
    refused(tmp_path, in_factory(scale_inv_freq), "layers.0.self_attn.rot_emb.inv_freq (values)", **F32)


# 4. A torch function patched for every path.
def test_a_globally_patched_softmax_is_refused(tmp_path):
    original = F.softmax
    try:
        def patch(model):
            F.softmax = lambda x, *a, **k: original(x * 1.001, *a, **k)

        refused(tmp_path, in_factory(patch), "torch.nn.functional.softmax (function replaced)", **F32)
    finally:
        F.softmax = original


# 5. A hook left on the shared model, by the forward this time.
def test_a_hook_left_by_the_forward_is_refused(tmp_path):
    message = refused(tmp_path, in_forward(leave_hook), "layers.1.fc2 forward hooks", **F32)
    assert "in its probe forward" in message


def test_a_change_in_the_traced_forward_is_refused(tmp_path):
    message = refused(tmp_path, in_forward(scale("layers.4.fc2.weight", 2.0), on_call=2), "layers.4.fc2.weight (values)")
    assert "in its forward" in message


def test_an_unpacked_plugin_is_checked_too(tmp_path):
    def factory(model, alphabet):
        model.emb_layer_norm_after.eps = 1e-3

        def forward(tokens):
            return model(tokens, repr_layers=[model.num_layers])["representations"][model.num_layers]

        return forward

    message = refused(tmp_path, factory, "emb_layer_norm_after.eps (1e-05 -> 0.001)", side="unpacked")
    assert "the --unpacked plug-in" in message


# 6. experiments runs the factory once per row: the change must not compound.
def test_experiments_stop_at_the_first_row_instead_of_compounding(tmp_path):
    calls = []

    def factory(model, alphabet):
        calls.append(1)
        return in_factory(scale("layers.2.fc1.weight", 1.5))(model, alphabet)

    loaded = load_model(SMALL, "random", 0)
    config = RunConfig(model=SMALL, weights="random", device="cpu", packed=factory)
    with pytest.raises(TracerError, match=r"layers\.2\.fc1\.weight \(values\)"):
        experiments.run_matrix(config, seqs(), tmp_path / "exp", quiet=True, loaded=loaded)
    assert len(calls) == 1
    # the changed model object is refused by any later run, even with the built-in paths
    with pytest.raises(TracerError, match="changed by a plug-in in an earlier run"):
        trace(RunConfig(model=SMALL, weights="random", device="cpu", out=str(tmp_path / "b.h5")), seqs(), quiet=True, loaded=loaded)


# The fingerprint itself.
def test_the_fingerprint_sees_every_kind_of_change():
    model = build_random(architecture(SMALL), 0)
    set_precision(model, torch.device("cpu"), torch.bfloat16)
    before = isolation.Fingerprint.take(model)
    assert before.changes(isolation.Fingerprint.take(model)) == []
    with torch.no_grad():
        w = model.layers[0].fc1.weight
        w[[0, 1]] = w[[1, 0]].clone()  # two rows swapped: same sum
    model.layers[5].self_attn.scaling *= 2
    torch.backends.cudnn.allow_tf32, saved = not torch.backends.cudnn.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        changes = before.changes(isolation.Fingerprint.take(model))
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    assert "layers.0.fc1.weight (values)" in changes
    assert any(c.startswith("layers.5.self_attn.scaling") for c in changes)
    assert any(c.startswith("torch setting cuDNN TF32") for c in changes)


def test_torch_rewrapping_its_own_function_on_a_lazy_import_is_not_a_change(monkeypatch):
    """The first import of torch._dynamo (which a varlen kernel may trigger inside a forward)
    rebinds torch.manual_seed to a disable-wrapper of itself: torch's own wrapper of the very same
    function is no change. A wrapper written elsewhere, even one that keeps __wrapped__, is."""
    import functools

    model = build_random(architecture(SMALL), 0)
    original = torch.manual_seed
    before = isolation.Fingerprint.take(model)
    monkeypatch.setattr(torch, "manual_seed", torch._disable_dynamo(original))
    assert before.changes(isolation.Fingerprint.take(model)) == []

    @functools.wraps(original)
    def user_wrapper(*a, **k):
        return original(*a, **k)

    monkeypatch.setattr(torch, "manual_seed", user_wrapper)
    assert "torch.manual_seed (function replaced)" in before.changes(isolation.Fingerprint.take(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_device_digest_is_exact_and_sees_swaps_scales_and_nan(dtype):
    x = torch.randn(64, 48, dtype=dtype)
    d = isolation.device_digest(x)
    assert torch.equal(d, isolation.device_digest(x.clone()))
    for changed in (x * 1.5, x.flip(0), x.flip(1), torch.where(torch.arange(48) == 7, float("nan"), x)):
        assert not torch.equal(d, isolation.device_digest(changed.to(dtype)))
    y = x.clone()
    y.view(-1)[5] = torch.nextafter(y.view(-1)[5], torch.tensor(float("inf"), dtype=dtype))  # one ulp
    assert not torch.equal(d, isolation.device_digest(y))


# 8. A checkpoint truncated during a float32 run (the run dtype is the stored one): SIGBUS (rc 135)
# and a .partial file when the run computed from the file's mapping. Overwriting it in place is
# in tests/unit/test_checkpoint_reads.py.
PLUGIN_THAT_CHANGES_THE_FILE = '''
import os, sys
sys.path.insert(0, {examples!r})
from packed_esm2_adapter import make_forward as example

def make(model, alphabet):
    open(os.environ["CK"], "r+b").truncate(0)
    return example(model, alphabet)
'''


def test_a_checkpoint_truncated_during_a_float32_run_does_not_stop_it(tmp_path):
    import os
    import subprocess
    import sys

    from tracer.esm.models import save_random_cache

    arch = architecture(SMALL)
    save_random_cache(build_random(arch, 0), arch, tmp_path / "ck.pt")
    plugin = tmp_path / "changes_the_file.py"
    plugin.write_text(PLUGIN_THAT_CHANGES_THE_FILE.format(examples=str(Path(ADAPTER.rsplit(":", 1)[0]).parent)))
    env = {**os.environ, "CK": str(tmp_path / "ck.pt"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = tmp_path / "t.h5"
    cmd = [sys.executable, "-m", "tracer.run", "--model", SMALL, "--weights", str(tmp_path / "ck.pt"), "--device", "cpu",
           "--dtype", "float32", "--reference", "fp64", "--seq-len", "48", "--packed", f"{plugin}:make", "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    from tracer.store.trace_file import open_trace

    with open_trace(out) as t:
        assert t.summary["verdict"] == "agree"  # the plug-in is the example: the paths agree on the weights as loaded
    assert (tmp_path / "ck.pt").stat().st_size == 0
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*partial*"))


def test_torch_dynamo_tagging_module_init_is_not_a_change(monkeypatch):
    """torch._dynamo's mutation guard (installed when a forward first calls flex_attention, say)
    rebinds torch.nn.Module.__init__ to a closure over the old one: no change. The same closure
    written by a plug-in is one."""
    from torch._dynamo import mutation_guard

    model = build_random(architecture(SMALL), 0)
    init = torch.nn.Module.__init__
    monkeypatch.setattr(torch.nn.Module, "__init__", init)  # whatever happens here is undone after the test
    monkeypatch.setattr(torch.nn.Module, "__setstate__", torch.nn.Module.__setstate__)
    monkeypatch.setattr(torch.nn.Module, "___needs_generation_tag_patch", True, raising=False)
    before = isolation.Fingerprint.take(model)
    mutation_guard.install_generation_tagging_init()
    assert torch.nn.Module.__init__ is not init
    assert before.changes(isolation.Fingerprint.take(model)) == []

    def plugin_init(self, *a, **k):
        init(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "__init__", plugin_init)
    assert "torch.nn.Module.__init__ (function replaced)" in before.changes(isolation.Fingerprint.take(model))
