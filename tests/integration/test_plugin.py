"""A user's own packed forward (``--packed SPEC``): the worked example in ``examples/`` is traced
like the built-in path, copies of it with one classic user bug each are localized exactly, and
nothing the tool does changes what the plug-in computes.

Runs are on the CPU with the small random model; float32 runs use a float64 reference, where a
healthy path stays within ~1e-6 of fair-esm, so every planted bug stands far above the bar.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SMALL, mixed_batch, run
from tracer.esm import models
from tracer.errors import TracerError
from tracer.capture.paths import PluginPath, encode
from tracer.capture.plugin import Plugin, load
from tracer.run import main as run_main
from tracer.inputs.sequences import make_batch, motif_sequence
from tracer.store.trace_file import open_trace
from tracer.taps import tap_names

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ADAPTER = f"{EXAMPLES / 'packed_esm2_adapter.py'}:make_forward"
WRAPPER = (EXAMPLES / "packed_esm2.py").read_text()
ADAPTER_CODE = (EXAMPLES / "packed_esm2_adapter.py").read_text().replace("from packed_esm2 import PackedESM2Wrapper", "")


def plugin_file(tmp_path: Path, name: str, edits=(), extra: str = "", adapter: str = ADAPTER_CODE) -> str:
    """A self-contained copy of the example (wrapper + adapter) with ``edits`` applied; its SPEC."""
    text = WRAPPER
    for old, new in edits:
        assert text.count(old) == 1, f"edit target not found once: {old!r}"
        text = text.replace(old, new)
    path = tmp_path / f"{name}.py"
    path.write_text(text + "\n" + extra + "\n" + adapter)
    return f"{path}:make_forward"


def batch():
    return make_batch([("one", "MKT"), ("short", motif_sequence(12)), ("long", motif_sequence(40))])


BUGS = {
    # name: (edit of the user's code, (layer, tap, sequence, token) of the first divergence)
    "positions-not-restarted": (
        ("position_ids = create_position_ids_packed(cu_seqlens)", "position_ids = torch.arange(input_ids.shape[0], device=input_ids.device)"),
        (0, "q_rope", "short", 0),  # the first sequence's positions are right; the second starts at 5
    ),
    "token-dropout-rescale-forgotten": (
        ("x = x * (1 - 0.15 * 0.8) / (1 - mask_ratio_observed)[seq, None]", "pass"),
        (None, "embed", "one", 0),  # 1 / 0.88: every embedding 14% too large
    ),
    "attention-crosses-sequences": (
        ("attn_mask=mask, scale=softmax_scale", "attn_mask=None, scale=softmax_scale"),
        (0, "ctx", "one", 0),  # q/k/v are right; the context mixes in other sequences
    ),
    "softmax-scale-twice": (
        ("q = apply_rotary_fp32(q, position_ids)", "q = apply_rotary_fp32(q, position_ids) * d**-0.5"),
        (0, "q_rope", "one", 0),  # q_rope is q as the kernel consumes it: q * scale, here scaled twice
    ),
}


POSITIONS_BUG = BUGS["positions-not-restarted"][0]
"""The edit that makes a forward's positions run over the whole stream (reused by the layout tests)."""


@pytest.mark.parametrize("bug", list(BUGS))
def test_classic_user_bug_is_localized_and_blamed_on_packed(tmp_path, bug):
    edit, expected = BUGS[bug]
    spec = plugin_file(tmp_path, bug.replace("-", "_"), [edit])
    s = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=spec, metrics_only=True).summary
    fd = s.first_divergence
    assert fd is not None, f"{bug} was not found"
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == expected
    assert s.attribution.drifting == "packed" and s.attribution.explained_by == "packed"
    assert s.attribution.unpacked is None


def test_example_float32_agrees_with_builtin_at_every_tap(tmp_path):
    seqs = mixed_batch(300)
    plug = run(tmp_path, seqs, name="plug.h5", dtype="float32", reference="fp64", packed=ADAPTER)
    assert plug.summary.first_divergence is None and plug.summary.attribution.drifting == "neither"
    assert not plug.notes  # every tap captured, output consistent with its own final_norm
    built = run(tmp_path, seqs, name="builtin.h5", dtype="float32", reference="none", attn="math")
    with open_trace(plug.path) as a, open_trace(built.path) as b:
        assert a.taps("packed") == b.taps("packed") == tap_names(6)
        for name in a.taps("packed"):
            x, y = a.tap("packed", name).double(), b.tap("packed", name).double()
            rel = ((x - y).norm() / y.norm()).item()
            # float32 noise: different GELU (F.gelu vs fair-esm's erf formula) and SDPA vs bmm
            assert rel < 1e-5, (name, rel)


def test_example_bfloat16_verdict_matches_builtin(tmp_path):
    seqs = mixed_batch(300)
    plug = run(tmp_path, seqs, name="plug.h5", dtype="bfloat16", packed=ADAPTER, metrics_only=True).summary
    built = run(tmp_path, seqs, name="builtin.h5", dtype="bfloat16", packed_rope="fp32", attn="math", metrics_only=True).summary
    a, b = plug.first_divergence, built.first_divergence
    assert a is not None and b is not None
    assert (a.layer, a.tap, a.sequence, a.token) == (b.layer, b.tap, b.sequence, b.token)
    assert plug.attribution.drifting == built.attribution.drifting == "unpacked"
    assert plug.attribution.explained_by == built.attribution.explained_by


HIDDEN_KERNEL = '''
_KERNELS = {"sdpa": F.scaled_dot_product_attention}  # a reference the tool cannot see


def hidden_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    mask = block_diagonal_mask(cu_seqlens)
    out = _KERNELS["sdpa"](q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), attn_mask=mask, scale=softmax_scale)
    return out[0].transpose(0, 1)
'''
CALL = "ctx = varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=d**-0.5)"
HIDDEN = (CALL, "ctx = hidden_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=d**-0.5)")
TAPPED = (
    CALL,
    "i = list(self.model.layers).index(layer)\n"
    "        import tracer\n"
    "        q = tracer.tap('q_rope', i, q, scale=d**-0.5)\n"
    "        tracer.tap('k_rope', i, k)\n"
    "        tracer.tap('v', i, v)\n"
    "        ctx = hidden_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale=d**-0.5)",
)


def test_hook_and_helper_captures_are_identical(tmp_path):
    # the same computation: attention seen by the tool (hooks), or hidden from it and tapped by hand
    helper = run(tmp_path, batch(), name="helper.h5", dtype="float32", reference="none", packed=plugin_file(tmp_path, "helper", [TAPPED], HIDDEN_KERNEL))
    seen = run(tmp_path, batch(), name="seen.h5", dtype="float32", reference="none", packed=ADAPTER)
    assert not helper.notes and not seen.notes
    with open_trace(helper.path) as a, open_trace(seen.path) as b:
        assert a.taps("packed") == b.taps("packed")
        for name in a.taps("packed"):
            assert torch.equal(a.tap("packed", name), b.tap("packed", name)), name


def test_uncaptured_taps_are_named_with_the_line_that_captures_them(tmp_path, capsys):
    spec = plugin_file(tmp_path, "hidden", [HIDDEN], HIDDEN_KERNEL)
    out = tmp_path / "t.h5"
    code = run_main(["--model", SMALL, "--weights", "random", "--device", "cpu", "--dtype", "float32", "--seq-len", "20",
                     "--packed", spec, "--out", str(out)])
    assert code == 0
    err = capsys.readouterr()
    text = err.err + err.out
    assert "packed path (plug-in " in text and "12 of 50 taps could not be captured" in text
    assert 'not captured: layers.{0-5}.q_rope; add tracer.tap("q_rope", i, q, scale=softmax_scale)' in text
    assert "not captured: layers.{0-5}.k_rope" in text and "layers.{0-5}.v;" not in text  # v from v_proj
    assert "verdict   no divergence" in err.out  # the rest is traced
    with open_trace(out) as t:
        assert len(t.taps("packed")) == 38 and "layers.0.q_rope" not in t.taps("unpacked")
        assert t.meta["uncaptured"]["packed"][0] == "layers.0.q_rope"


def test_bad_layout_names_tap_layer_and_shapes(tmp_path):
    wrong = ("tracer.tap('v', i, v)", "tracer.tap('v', i, v[:, :3])")
    spec = plugin_file(tmp_path, "badlayout", [TAPPED, wrong], HIDDEN_KERNEL)
    with pytest.raises(TracerError) as e:
        run(tmp_path, batch(), dtype="float32", packed=spec)
    msg = str(e.value)
    assert "tap layers.0.v (layer 0): expected shape (" in msg and ", 20, 16), received (" in msg and ", 3, 16)" in msg
    assert "\n" not in msg


def test_output_that_disagrees_with_its_own_final_tap_is_reported(tmp_path):
    adapter = ADAPTER_CODE.replace("repr_layers=[model.num_layers])", "repr_layers=[model.num_layers - 1])").replace(
        'out["representations"][model.num_layers]', 'out["representations"][model.num_layers - 1]'
    )
    spec = plugin_file(tmp_path, "wrongrepr", adapter=adapter)
    result = run(tmp_path, batch(), dtype="float32", packed=spec, metrics_only=True)
    assert any("returned output differs from its own final_norm tap" in n for n in result.notes)
    assert any("returned output differs" in n for n in result.summary.context["notes"])


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nowhere.py:make", "nowhere.py does not exist"),
        ("{ex}:nothing", "has no 'nothing'; it defines: make_forward"),
        ("{ex}", "expected builtin, package.module:factory or path/to/file.py:factory"),
        ("no_such_pkg_xyz.mod:f", "no module named 'no_such_pkg_xyz'"),
    ],
)
def test_bad_spec_is_one_line_before_the_model_loads(spec, fragment):
    spec = spec.format(ex=EXAMPLES / "packed_esm2_adapter.py")
    with pytest.raises(TracerError) as e:
        load(spec, "packed")
    assert fragment in str(e.value)


def test_plugin_that_raises_is_one_line_naming_it(tmp_path, capsys):
    boom = ("x = self._embed(input_ids, cu_seqlens)", "x = self._embed(input_ids, cu_seqlens); raise ValueError('boom in user code')")
    spec = plugin_file(tmp_path, "raises", [boom])
    code = run_main(["--model", SMALL, "--weights", "random", "--device", "cpu", "--seq-len", "10", "--packed", spec, "--out", str(tmp_path / "t.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("tracer: error: packed plug-in ") and "raised ValueError in its forward: boom in user code (at " in err[-1]
    assert "raises.py:" in err[-1] and not any("Traceback" in line for line in err)
    assert not (tmp_path / "t.h5").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_tracing_does_not_change_the_plugins_output(dtype):
    model, _, _ = models.load_model(SMALL, "random", seed=0)
    models.set_precision(model, torch.device("cpu"), dtype)
    b = encode(mixed_batch(40), model.alphabet, "reversed")
    forward = load(ADAPTER, "packed").make(model, model.alphabet)
    outputs = []

    def recording(*args):
        outputs.append(forward(*args))
        return outputs[-1]

    path = PluginPath(Plugin("packed", "recording", lambda m, a: recording), model, "reversed")
    got = {}
    with torch.inference_mode():
        out = path.run(b, tap_names(6), got.__setitem__)
        traced = outputs[-1]
        bare = forward(b.packed, b.layout.cu_seqlens, b.layout.max_seqlen)
    assert len(got) == 50 and not out.notes
    assert torch.equal(traced, bare)


def test_unpacked_plugin_wrapping_fair_esm_traces_like_the_default(tmp_path):
    code = (
        "def make_unpacked(model, alphabet):\n"
        "    def forward(tokens):\n"
        "        return model(tokens, repr_layers=[model.num_layers])['representations'][model.num_layers]\n"
        "    return forward\n"
    )
    f = tmp_path / "unpacked_plugin.py"
    f.write_text(code)
    plug = run(tmp_path, batch(), name="plug.h5", dtype="float32", reference="none", unpacked=f"{f}:make_unpacked")
    default = run(tmp_path, batch(), name="default.h5", dtype="float32", reference="none")
    assert not plug.notes
    with open_trace(plug.path) as a, open_trace(default.path) as b:
        assert a.taps("unpacked") == b.taps("unpacked") == tap_names(6)
        for name in a.taps("unpacked"):
            assert torch.equal(a.tap("unpacked", name), b.tap("unpacked", name)), name


def test_builtin_only_options_are_refused_for_a_plugin(tmp_path):
    from tracer.inputs.faults import Faults

    with pytest.raises(TracerError, match="switch of the built-in packed path"):
        run(tmp_path, batch(), packed=ADAPTER, faults=Faults(double_scale=True))
    with pytest.raises(TracerError, match="does not apply to a plug-in"):
        run(tmp_path, batch(), packed=ADAPTER, local=True)


def test_read_only_tools_do_not_import_the_run_orchestration():
    code = (
        "import sys; import tracer.compare, tracer.plot, tracer.bundle; "
        "bad = [m for m in ('esm', 'tracer.runner.execute', 'tracer.esm.models', 'tracer.capture.paths') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_plugin_trace_bundles_and_compares(tmp_path):
    from tracer import bundle as bundle_cli

    r = run(tmp_path, batch(), packed=ADAPTER)  # bfloat16, float32 reference, full tensors
    assert bundle_cli.main([str(r.path), "-o", str(tmp_path / "b")]) == 0
    report = (tmp_path / "b" / "report.md").read_text()
    assert f"| packed path | plug-in {ADAPTER} |" in report and "| unpacked path | fair-esm ESM2.forward |" in report
    # a reader that stops early (`| head`) is not an error
    p = subprocess.Popen([sys.executable, "-m", "tracer.compare", str(r.path), "--table"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before it prints
    assert p.wait(timeout=300) == 0 and b"Traceback" not in p.stderr.read()


LOOP_KERNEL = '''
def loop_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale):
    """A loop over sequences, SDPA on (H, L, d) per sequence."""
    bounds = cu_seqlens.tolist()
    outs = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), scale=softmax_scale)
            for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat([o.transpose(0, 1) for o in outs])
'''


def test_loop_over_sequences_is_joined_in_call_order(tmp_path):
    spec = plugin_file(tmp_path, "loop", [(CALL, CALL.replace("varlen_attention", "loop_attention"))], LOOP_KERNEL)
    loop = run(tmp_path, batch(), name="loop.h5", dtype="float32", reference="none", packed=spec, pack_order="reversed")
    seen = run(tmp_path, batch(), name="seen.h5", dtype="float32", reference="none", packed=ADAPTER, pack_order="reversed")
    assert not loop.notes and loop.summary.first_divergence is None
    with open_trace(loop.path) as a, open_trace(seen.path) as b:
        for name in a.taps("packed"):
            if name.endswith(("q_rope", "k_rope", "v")) and name.startswith("layers.0."):
                assert torch.equal(a.tap("packed", name), b.tap("packed", name)), name


BATCH_AXIS = Path(__file__).resolve().parents[1] / "plugins" / "batch_axis_esm2.py"


def test_a_batch_axis_of_one_is_traced_like_none(tmp_path):
    """A forward that carries ``(1, N, E)`` or ``(N, 1, E)`` through fair-esm's modules, and hands
    ``q_rope`` to ``tracer.tap`` as ``(1, N, E)``, is traced tap for tap like the ``(N, E)`` one."""
    runs = {lay: run(tmp_path, batch(), name=f"{lay}.h5", dtype="float32", reference="fp64", packed=f"{BATCH_AXIS}:make_forward_{lay}")
            for lay in ("ne", "1ne", "n1e")}
    for lay, r in runs.items():
        assert r.summary.first_divergence is None and not r.notes, lay
    with open_trace(runs["ne"].path) as a, open_trace(runs["1ne"].path) as b, open_trace(runs["n1e"].path) as c:
        assert a.taps("packed") == b.taps("packed") == c.taps("packed") == tap_names(6)
        for name in a.taps("packed"):
            x = a.tap("packed", name)
            for other in (b, c):  # the same rows in the same order (float32 GEMMs of other shapes: rounding only)
                assert torch.allclose(other.tap("packed", name), x, rtol=1e-5, atol=1e-6), name


def test_a_bug_in_a_batch_axis_layout_is_found_at_its_token(tmp_path):
    text = BATCH_AXIS.read_text().replace("pos = positions(cu_seqlens, n)", "pos = torch.arange(n)")
    path = tmp_path / "batch_axis_bug.py"
    path.write_text(text)
    s = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=f"{path}:make_forward_n1e", metrics_only=True).summary
    fd = s.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (0, "q_rope", "short", 0)
    assert s.attribution.drifting == "packed"


def test_packing_through_fair_esms_own_layers_is_traced_and_its_positions_named(tmp_path):
    """A packed stream run through fair-esm's unmodified layers (``(N, 1, E)``, block-diagonal
    mask): q_rope and k_rope are read from fair-esm's own rotary module, the stream-wide positions
    are found at the second sequence's first token, and attention absorbs them."""
    spec = f"{Path(__file__).resolve().parents[1] / 'plugins' / 'masked_stream_esm2.py'}:make_forward"
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=spec, metrics_only=True)
    s = r.summary
    assert not r.notes  # every tap captured, q_rope/k_rope included
    fd = s.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (0, "q_rope", "short", 0)
    assert s.attribution.drifting == "packed" and s.attribution.unpacked is None
    d = s.diagnosis.packed
    assert d.pattern == "sequence-offset" and d.propagates is False and d.absorbed_at == "layers.0.ctx"


FAKES = Path(__file__).resolve().parents[1] / "fakes"


def _fake(monkeypatch):
    """``import flash_attn`` / ``xformers`` give their CPU test doubles in ``tests/fakes``;
    afterwards every module imported from there is removed (the example imports flash-attn
    whenever it can)."""
    monkeypatch.syspath_prepend(str(FAKES))
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(FAKES)):
            del sys.modules[name]


@pytest.fixture
def fake_flash_attn(monkeypatch):
    yield from _fake(monkeypatch)


FLASH_CALLS = {
    "varlen": "ctx = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=d**-0.5)",
    "qkvpacked": "ctx = flash_attn_varlen_qkvpacked_func(torch.stack([q, k, v], dim=1), cu_seqlens, max_seqlen, 0.0, d**-0.5)",
    "kvpacked": "ctx = flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], dim=1), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=d**-0.5)",
}
FLASH_IMPORT = "from flash_attn import flash_attn_varlen_qkvpacked_func, flash_attn_varlen_kvpacked_func"


@pytest.mark.parametrize("call", list(FLASH_CALLS))
def test_flash_attn_calls_are_intercepted_whatever_the_packing_of_qkv(tmp_path, fake_flash_attn, call):
    """flash-attn's varlen functions, q/k/v separate, stacked (``qkv``) or ``q`` + ``kv``, give
    q_rope (scaled as the kernel scales it), k_rope and v exactly as SDPA with a mask does; a
    planted position bug is found at its token."""
    spec = plugin_file(tmp_path, f"flash_{call}", [(CALL, FLASH_CALLS[call])], FLASH_IMPORT)
    flash = run(tmp_path, batch(), name=f"{call}.h5", dtype="float32", reference="fp64", packed=spec)
    assert not flash.notes and flash.summary.first_divergence is None
    seen = run(tmp_path, batch(), name="sdpa.h5", dtype="float32", reference="none", packed=ADAPTER)
    with open_trace(flash.path) as a, open_trace(seen.path) as b:
        for name in a.taps("packed"):
            if name.startswith("layers.0.") and name.endswith(("q_rope", "k_rope", "v")):
                assert torch.equal(a.tap("packed", name), b.tap("packed", name)), name
    bug = POSITIONS_BUG
    spec = plugin_file(tmp_path, f"flash_{call}_bug", [(CALL, FLASH_CALLS[call]), bug], FLASH_IMPORT)
    fd = run(tmp_path, batch(), name=f"{call}-bug.h5", dtype="float32", reference="fp64", packed=spec, metrics_only=True).summary.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (0, "q_rope", "short", 0)


HF_TEAM = Path(__file__).resolve().parents[1] / "plugins" / "hf_team_esm2.py"


def test_a_users_own_hf_forward_is_read_with_hfs_module_table(tmp_path):
    """A team's padding-free forward on HF's EsmModel (its own attention function registered in
    HF): tracer finds the EsmModel the forward holds and captures every tap from HF's modules; a
    planted position bug is found at its token."""
    r = run(tmp_path, batch(), name="hf.h5", dtype="float32", reference="fp64", packed=f"{HF_TEAM}:make_forward", metrics_only=True)
    assert not r.notes and r.summary.first_divergence is None
    path = tmp_path / "hf_bug.py"
    path.write_text(HF_TEAM.read_text().replace(
        "pos = torch.arange(tokens.shape[0], device=tokens.device) - torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)",
        "pos = torch.arange(tokens.shape[0], device=tokens.device)"))
    s = run(tmp_path, batch(), name="hf-bug.h5", dtype="float32", reference="fp64", packed=f"{path}:make_forward", metrics_only=True).summary
    fd = s.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (0, "q_rope", "short", 0)
    assert s.attribution.drifting == "packed"


SORTING_ADAPTER = '''
def make_forward(model, alphabet):
    wrapper = PackedESM2Wrapper(model)

    def forward(tokens, cu_seqlens, max_seqlen):
        """Runs the sequences longest first (as teams batch for their kernels), returns rows in the given order."""
        lengths, starts = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), cu_seqlens[:-1].tolist()
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        idx = torch.cat([torch.arange(starts[i], starts[i] + lengths[i]) for i in order]).to(tokens.device)
        cu = torch.tensor([0] + [sum(lengths[i] for i in order[:k + 1]) for k in range(len(order))], dtype=torch.int32, device=tokens.device)
        out = wrapper.forward_packed(tokens[idx], cu, max_seqlen, repr_layers=[model.num_layers])["representations"][model.num_layers]
        back = torch.empty_like(out)
        back[idx] = out
        return back

    return forward
'''


@pytest.mark.parametrize("pack_order, key, first_shifted", [
    ("given", "-lengths[i]", "one"),  # runs long, short, one: "long" unshifted, "one" first in the batch's order
    ("reversed", "lengths[i]", "short"),  # packed long, short, one; runs one, short, long
])
def test_a_forward_that_reorders_the_sequences_is_read_in_its_own_order(tmp_path, pack_order, key, first_shifted):
    """A forward that sorts the sequences by length inside: its taps are put back in the batch's
    order (read from its call of embed_tokens), so a healthy one agrees everywhere and a planted
    position bug is found at the batch's first shifted sequence."""
    adapter = SORTING_ADAPTER.replace("-lengths[i]", key)
    spec = plugin_file(tmp_path, "sorting", adapter=adapter)
    r = run(tmp_path, batch(), name="sorting.h5", dtype="float32", reference="fp64", packed=spec, pack_order=pack_order)
    assert r.summary.first_divergence is None
    assert r.notes == ["the packed plug-in runs the sequences in its own order (read from its call of embed_tokens); its taps were read at the batch's rows, in the batch's order"]
    seen = run(tmp_path, batch(), name="seen.h5", dtype="float32", reference="none", packed=ADAPTER, pack_order=pack_order)
    with open_trace(r.path) as a, open_trace(seen.path) as b:
        for name in ("embed", "layers.0.q_rope", "layers.5.resid_out"):  # the same rows: float32 rounding of another order only
            x, y = a.tap("packed", name).double(), b.tap("packed", name).double()
            assert ((x - y).norm(dim=-1) / y.norm(dim=-1)).max() < 1e-5, name
    bug = POSITIONS_BUG
    spec = plugin_file(tmp_path, "sorting_bug", [bug], adapter=adapter)
    fd = run(tmp_path, batch(), name="sorting-bug.h5", dtype="float32", reference="fp64", packed=spec, pack_order=pack_order,
             metrics_only=True).summary.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (0, "q_rope", first_shifted, 0)


def test_stream_rows_match_sequences_by_content():
    from tracer.capture.observe import stream_rows

    given, bounds = [0, 5, 2, 0, 7, 0, 5, 2], (0, 3, 5, 8)  # three sequences, the first and last equal
    assert stream_rows(given, bounds, given, 0) == list(range(8))
    stream = [0, 7, 0, 5, 2, 0, 5, 2]  # the short one first
    assert stream_rows(given, bounds, stream, 0) == [2, 3, 4, 0, 1, 5, 6, 7]
    assert stream_rows(given, bounds, [0, 7, 0, 5, 2, 0, 5, 3], 0) is None  # not the batch's sequences
    assert stream_rows(given, bounds, [5, 0, 7, 0, 2, 0, 5, 2], 0) is None  # does not start a sequence


PADDING_ADAPTER = '''
def make_forward(model, alphabet):
    wrapper = PackedESM2Wrapper(model)

    def forward(tokens, cu_seqlens, max_seqlen):
        """Pads the stream to a multiple of 16 tokens (one extra padding sequence), as kernels like it."""
        n = tokens.shape[0]
        extra = -n % 16 or 16
        tokens = torch.cat([tokens, tokens.new_full((extra,), model.padding_idx)])
        cu = torch.cat([cu_seqlens, cu_seqlens.new_tensor([n + extra])])
        out = wrapper.forward_packed(tokens, cu, max(max_seqlen, extra), repr_layers=[model.num_layers])
        return out["representations"][model.num_layers][:n]

    return forward
'''


def test_a_forward_that_pads_its_stream_is_read_at_the_batchs_rows(tmp_path):
    spec = plugin_file(tmp_path, "padding", adapter=PADDING_ADAPTER)
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=spec, metrics_only=True)
    assert r.summary.first_divergence is None
    assert r.notes == ["the packed plug-in pads the stream with 3 token(s) beyond the batch's 61 (read from its call of embed_tokens); "
                       "its taps were read at the batch's rows, in the batch's order"]
    bug = POSITIONS_BUG
    spec = plugin_file(tmp_path, "padding_bug", [bug], adapter=PADDING_ADAPTER)
    fd = run(tmp_path, batch(), name="bug.h5", dtype="float32", reference="fp64", packed=spec, metrics_only=True).summary.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (0, "q_rope", "short", 0)


def test_stream_rows_skip_padding_tokens():
    from tracer.capture.observe import stream_rows

    given, bounds = [0, 5, 2, 0, 7, 2], (0, 3, 6)
    assert stream_rows(given, bounds, [0, 5, 2, 1, 1, 0, 7, 2, 1], 0, 1) == [0, 1, 2, 5, 6, 7]
    assert stream_rows(given, bounds, [1, 0, 7, 2, 0, 5, 2], 0, 1) == [4, 5, 6, 1, 2, 3]
    assert stream_rows(given, bounds, [0, 5, 2, 3, 0, 7, 2], 0, 1) is None  # 3 is not padding


FUSED_QKV = (
    "        q = attn.q_proj(y).view(n, h, d)\n        k = attn.k_proj(y).view(n, h, d)\n        v = attn.v_proj(y).view(n, h, d)\n",
    "        w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # fused q/k/v, one GEMM\n"
    "        b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])\n"
    "        q, k, v = F.linear(y, w, b).view(n, 3, h, d).unbind(1)\n",
)


def test_fused_qkv_weights_are_traced(tmp_path):
    """q/k/v from one fused matrix (the projections never called): attention calls still belong
    to the layer whose self_attn_layer_norm ran last; a planted position bug is found at its token."""
    spec = plugin_file(tmp_path, "fused", [FUSED_QKV])
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=spec, metrics_only=True)
    assert not r.notes and r.summary.first_divergence is None
    bug = POSITIONS_BUG
    spec = plugin_file(tmp_path, "fused_bug", [FUSED_QKV, bug])
    fd = run(tmp_path, batch(), name="bug.h5", dtype="float32", reference="fp64", packed=spec, metrics_only=True).summary.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == (0, "q_rope", "short", 0)


def test_shorter_factory_and_forward_signatures_are_taken(tmp_path):
    """``make_forward(model)`` and ``forward(tokens, cu_seqlens)``: the arguments they do not
    take are left out; the trace is the example's."""
    adapter = (
        "def make_forward(model):\n"
        "    wrapper = PackedESM2Wrapper(model)\n"
        "    def forward(tokens, cu_seqlens):\n"
        "        lengths = cu_seqlens[1:] - cu_seqlens[:-1]\n"
        "        out = wrapper.forward_packed(tokens, cu_seqlens, int(lengths.max()), repr_layers=[model.num_layers])\n"
        "        return out['representations'][model.num_layers]\n"
        "    return forward\n"
    )
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=plugin_file(tmp_path, "short", adapter=adapter), metrics_only=True)
    assert not r.notes and r.summary.first_divergence is None


def test_fitted_arguments():
    from tracer.capture.plugin import fitted

    args = (1, 2, 3)
    assert fitted(lambda a, b, c: 0, args, 2) == args
    assert fitted(lambda a, b: 0, args, 2) == (1, 2)
    assert fitted(lambda a: 0, args, 2) == args  # fewer than allowed: passed whole, the call fails by itself
    assert fitted(lambda *a: 0, args, 2) == args
    assert fitted(lambda a, b, c=0, *, d=1: 0, args, 2) == args
    assert fitted(max, args, 2) == args  # no signature


PAD_EMBED_ADAPTER = '''
class PadEmbed(PackedESM2Wrapper):
    def _embed(self, input_ids, cu_seqlens):
        """Embeds PADDED (rows of a (B, T) batch, or the stream padded to a multiple of 16), then drops the padding."""
        m = self.model
        if PADDED_BATCH:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            ids = torch.nn.utils.rnn.pad_sequence(torch.split(input_ids, lens), batch_first=True, padding_value=m.padding_idx)
        else:
            ids = torch.cat([input_ids, input_ids.new_full((-input_ids.shape[0] % 16 or 16,), m.padding_idx)])
        x = m.embed_scale * m.embed_tokens(ids)[ids != m.padding_idx]
        return x * (1 - 0.15 * 0.8)  # no <mask> tokens in these batches


def make_forward(model, alphabet):
    wrapper = PadEmbed(model)

    def forward(tokens, cu_seqlens, max_seqlen):
        return wrapper.forward_packed(tokens, cu_seqlens, max_seqlen, repr_layers=[model.num_layers])["representations"][model.num_layers]

    return forward
'''


@pytest.mark.parametrize("padded_batch", [True, False], ids=["padded-batch", "padded-stream"])
def test_padding_dropped_right_after_the_embedding_is_traced(tmp_path, padded_batch):
    """A forward that embeds a padded (B, T) batch, or a padded stream, and drops the padding
    before its layers: its taps are the batch's rows, traced as the example's."""
    spec = plugin_file(tmp_path, "pad_embed", adapter=PAD_EMBED_ADAPTER.replace("PADDED_BATCH", str(padded_batch)))
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=spec, metrics_only=True)
    assert r.summary.first_divergence is None
    assert not any("could not be captured" in n or "not captured" in n for n in r.notes), r.notes


def test_a_users_packed_and_padded_hf_forwards_share_one_model(tmp_path):
    """Both sides a team's own forwards on ONE HF model: each lockstep path observes its own
    attention calls; every tap is captured and the two agree."""
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=f"{HF_TEAM}:make_forward",
            unpacked=f"{HF_TEAM}:make_unpacked", metrics_only=True)
    assert not r.notes and r.summary.first_divergence is None


def test_a_users_hf_forward_that_fits_no_layout_is_observed_through_fair_esm(tmp_path):
    """A packed forward that runs HF on a padded batch inside: HF's taps have the padded layout,
    so it is observed through fair-esm's modules (what it captures is traced; the run goes on)."""
    adapter = (
        "def make_forward(model, alphabet):\n"
        "    hf = team_model(model)\n"
        "    def forward(tokens, cu_seqlens, max_seqlen):\n"
        "        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()\n"
        "        ids = torch.nn.utils.rnn.pad_sequence(torch.split(tokens, lens), batch_first=True, padding_value=alphabet.padding_idx)\n"
        "        out = hf(input_ids=ids, attention_mask=(ids != alphabet.padding_idx).long()).last_hidden_state\n"
        "        return torch.cat([out[i, :n] for i, n in enumerate(lens)])\n"
        "    return forward\n"
    )
    path = tmp_path / "hf_padded_inside.py"
    path.write_text(HF_TEAM.read_text().split("def make_unpacked")[0] + adapter)
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=f"{path}:make_forward", metrics_only=True)
    assert r.summary.first_divergence is None
    assert any("not captured" in n for n in r.notes)


def test_a_forward_on_its_own_copy_of_the_model_is_traced(tmp_path):
    """The factory gives its wrapper ``copy.deepcopy(model)`` (what tracer advises a plug-in that
    would change the shared model): the copy's modules are observed; a planted bug is found."""
    adapter = "import copy\n" + ADAPTER_CODE.replace("wrapper = PackedESM2Wrapper(model)", "wrapper = PackedESM2Wrapper(copy.deepcopy(model))")
    r = run(tmp_path, batch(), dtype="float32", reference="fp64", packed=plugin_file(tmp_path, "copy", adapter=adapter), metrics_only=True)
    assert not r.notes and r.summary.first_divergence is None
    edit, expected = BUGS["positions-not-restarted"]
    spec = plugin_file(tmp_path, "copy_bug", [edit], adapter=adapter)
    fd = run(tmp_path, batch(), name="bug.h5", dtype="float32", reference="fp64", packed=spec, metrics_only=True).summary.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == expected


@pytest.fixture
def fake_xformers(monkeypatch):
    yield from _fake(monkeypatch)


XFORMERS_CALL = ("ctx = xops.memory_efficient_attention(q[None], k[None], v[None], scale=d**-0.5, "
                 "attn_bias=fmha.BlockDiagonalMask.from_seqlens((cu_seqlens[1:] - cu_seqlens[:-1]).tolist()))[0]")


def test_xformers_memory_efficient_attention_is_intercepted(tmp_path, fake_xformers):
    """xformers' attention over a packed row ``(1, N, H, d)`` with a block-diagonal bias gives
    q_rope, k_rope and v exactly as SDPA does; a planted position bug is found at its token."""
    imports = "import xformers.ops as xops\nfrom xformers.ops import fmha"
    spec = plugin_file(tmp_path, "xf", [(CALL, XFORMERS_CALL)], imports)
    r = run(tmp_path, batch(), name="xf.h5", dtype="float32", reference="fp64", packed=spec)
    assert not r.notes and r.summary.first_divergence is None
    seen = run(tmp_path, batch(), name="sdpa.h5", dtype="float32", reference="none", packed=ADAPTER)
    with open_trace(r.path) as a, open_trace(seen.path) as b:
        for name in ("layers.0.q_rope", "layers.0.k_rope", "layers.0.v"):
            assert torch.equal(a.tap("packed", name), b.tap("packed", name)), name
    edit, expected = BUGS["positions-not-restarted"]
    spec = plugin_file(tmp_path, "xf_bug", [(CALL, XFORMERS_CALL), edit], imports)
    fd = run(tmp_path, batch(), name="xf-bug.h5", dtype="float32", reference="fp64", packed=spec, metrics_only=True).summary.first_divergence
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == expected


FLEX_CALL = (
    "seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())\n"
    "        mask = create_block_mask(lambda b, hh, i, j: seq[i] == seq[j], None, None, n, n, device=str(q.device))\n"
    "        ctx = flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask, scale=d**-0.5)[0].transpose(0, 1)"
)


def test_flex_attention_with_a_document_mask_is_intercepted(tmp_path):
    """PyTorch's flex_attention (eager) over the packed row with a block mask per sequence:
    q/k/v are read as SDPA's; a planted position bug is found at its token. In a fresh
    interpreter: its first call installs torch._dynamo's hooks, which would stay in this one."""
    code = (
        "import sys, pathlib\n"
        "from tests.conftest import run\n"
        "from tests.integration.test_plugin import BUGS, CALL, FLEX_CALL, batch, plugin_file\n"
        "tmp = pathlib.Path(sys.argv[1])\n"
        "imports = 'from torch.nn.attention.flex_attention import create_block_mask, flex_attention'\n"
        "r = run(tmp, batch(), name='flex.h5', dtype='float32', reference='fp64', packed=plugin_file(tmp, 'flex', [(CALL, FLEX_CALL)], imports), metrics_only=True)\n"
        "assert not r.notes and r.summary.first_divergence is None, (r.notes, r.summary.first_divergence)\n"
        "edit, expected = BUGS['positions-not-restarted']\n"
        "spec = plugin_file(tmp, 'flex_bug', [(CALL, FLEX_CALL), edit], imports)\n"
        "fd = run(tmp, batch(), name='flex-bug.h5', dtype='float32', reference='fp64', packed=spec, metrics_only=True).summary.first_divergence\n"
        "assert (fd.layer, fd.tap, fd.sequence, fd.token) == expected, fd\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]