"""Hugging Face ESM-2 as traced paths: --unpacked hf (padded) and --packed hf (padding-free).

float32 runs on the CPU with a float64 reference: every HF tap agrees with fair-esm's to float32
rounding (measured ~6e-7 at 8M/35M/150M; the bar 1e-5 leaves 15x). bfloat16 runs show HF's
rounded-frequency drift (``model.to(dtype)`` rounds the rotary ``inv_freq`` buffer).
"""

import sys

import numpy as np
import pytest
import torch

from tests.conftest import BASE, one_line_error, run
from tracer.capture import hf_paths
from tracer.capture.paths import encode
from tracer.judging.tables import stored_table
from tracer.esm import attention, hf_convert
from tracer.esm.models import load_model, set_precision
from tracer.inputs.faults import Faults
from tracer.inputs.sequences import debug_batch
from tracer.run import main as run_main
from tracer.store.trace_file import open_trace
from tracer.taps import select_taps

CPU = torch.device("cpu")


def _table(result):
    t = open_trace(result.path)
    return t, stored_table(t)


@pytest.mark.parametrize("sides", [("hf", "hf"), ("hf", "builtin"), ("fair-esm", "hf")], ids=["hf-hf", "hf-builtin", "fairesm-hf"])
def test_hf_paths_agree_with_fair_esm_at_every_tap_float32(tmp_path, sides):
    unpacked, packed = sides
    result = run(tmp_path, debug_batch(60), dtype="float32", reference="fp64", unpacked=unpacked, packed=packed, pack_order="reversed")
    s = result.summary
    assert s.verdict == "agree" and s.attribution.drifting == "neither"
    t, table = _table(result)
    assert t.meta["taps"] == select_taps(6, None, None)  # every tap captured, none missing
    for pair in ("packed-vs-reference", "unpacked-vs-reference"):
        worst = np.nanmax(table.pairs[pair]["rel_l2"])
        assert worst < 1e-5, (pair, worst)  # float32 rounding only (measured 6e-7)


@pytest.mark.parametrize("side", ["unpacked", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_tracing_leaves_hf_output_bitwise_unchanged(small_model, side, dtype):
    model, arch = small_model
    set_precision(model, CPU, dtype)
    plugin = hf_paths.hf_plugin(side, "to", "sdpa", attention.resolve("math", CPU, dtype))
    path = hf_paths.HfPath(plugin, model, "reversed")
    batch = encode(debug_batch(40), model.alphabet, "reversed")
    names = select_taps(arch.num_layers, None, None)
    with torch.inference_mode():
        plain = path._call(batch)
        obs = path._observe(batch, names, lambda n, x: None, {n: "module" for n in names})
        with obs:
            traced = path._call(batch)
        again = path._call(batch)
    assert torch.equal(plain, traced) and torch.equal(plain, again)
    assert obs.attention_calls == arch.num_layers  # the attention interface was seen, once per layer
    from transformers.models.esm import modeling_esm

    assert not isinstance(modeling_esm.ALL_ATTENTION_FUNCTIONS, hf_paths._View)  # HF's dispatch restored


@pytest.mark.parametrize(
    "faults, expected",
    [
        # positions run on, so the cu_seq_lens derived from them span the row: RoPE is wrong first
        (Faults(positions_not_restarted=True), (0, "q_rope", "small", 0)),
        (Faults(leak_across_sequences=True), (0, "ctx", "tiny", 0)),
    ],
    ids=["positions-not-restarted", "leak"],
)
def test_planted_fault_in_hf_padding_free_is_found_exactly(tmp_path, faults, expected):
    result = run(tmp_path, debug_batch(60), dtype="float32", reference="fp64", unpacked="hf", packed="hf", faults=faults)
    fd = result.summary.first_divergence
    assert fd is not None, "the planted fault was not found"
    assert (fd.layer, fd.tap, fd.sequence, fd.token) == expected
    assert result.summary.attribution.drifting == "packed"


def test_bfloat16_to_dtype_drifts_with_position_from_pretrained_does_not(tmp_path):
    """``model.to(bfloat16)`` rounds HF's inv_freq: both HF paths' layer-0 q_rope error against
    the float32 reference grows with position, and against the control's noise level both are
    blamed ("both", first at layer 0 q_rope late in the long sequence); ``from_pretrained(dtype=)``
    keeps the buffer float32, the error stays flat and neither path is blamed (measured at 8M:
    0.0035 at token 1, 0.033 at token 400 vs 0.0036 flat)."""
    growth = {}
    for by in ("to", "from_pretrained"):
        result = run(tmp_path, debug_batch(400), name=f"{by}.h5", dtype="bfloat16", unpacked="hf", packed="hf",
                     hf_dtype_by=by, metrics_only=True)
        att = result.summary.attribution
        if by == "to":
            assert att.drifting == "both"
            for point in (att.packed, att.unpacked):
                assert (point.layer, point.tap, point.sequence) == (0, "q_rope", "large") and point.token > 200
        else:
            assert att.drifting == "neither"
        t, table = _table(result)
        row, large = t.meta["taps"].index("layers.0.q_rope"), t.token_slice("large")
        for pair in ("packed-vs-reference", "unpacked-vs-reference"):
            err = table.pairs[pair]["rel_l2"][row, large]
            growth[by, pair] = np.median(err[350:400]) / np.median(err[1:50])
        assert np.array_equal(table.pairs["packed-vs-reference"]["rel_l2"][row], table.pairs["unpacked-vs-reference"]["rel_l2"][row])
    for pair in ("packed-vs-reference", "unpacked-vs-reference"):
        assert growth["to", pair] > 4  # measured 6x
        assert growth["from_pretrained", pair] < 1.5  # measured 1.1x


def test_hf_folder_as_weights(tmp_path):
    from transformers import EsmForMaskedLM

    model, arch, _ = load_model("esm2_t6_8M_UR50D", "random", seed=3)
    with torch.device("meta"):
        hf = EsmForMaskedLM(hf_convert.hf_config(arch))
    hf.load_state_dict(hf_convert.fair_to_hf(model.state_dict(), arch.num_layers, masked_lm=True), assign=True)
    folder = tmp_path / "esm2-hf"
    hf.save_pretrained(folder)
    result = run(tmp_path, debug_batch(30), model=None, weights=str(folder), dtype="float32", reference="fp64", unpacked="hf", packed="hf")
    t, table = _table(result)
    assert t.meta["weights"]["source"] == "hf-folder" and t.meta["model"] == "esm2_t6_8M_UR50D"
    assert np.nanmax(table.pairs["packed-vs-reference"]["rel_l2"]) < 1e-5


def test_cli_hf_both_sides(tmp_path, capsys):
    out = tmp_path / "t.h5"
    argv = [*BASE, "--dtype", "float32", "--seq-len", "30", "--unpacked", "hf", "--packed", "hf", "--hf-attn", "eager",
            "--hf-dtype-by", "from_pretrained", "--metrics-only", "--out", str(out)]
    assert run_main(argv) == 0
    text = capsys.readouterr().out
    assert "hf padded (transformers" in text and "attn eager, dtype by from_pretrained" in text
    assert "hf padding-free (transformers" in text and "attn tracer_varlen math" in text


def test_cli_without_transformers_is_one_line(tmp_path, capsys, monkeypatch):
    for mod in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "transformers", None)
    one_line_error(capsys, run_main, [*BASE, "--packed", "hf", "--out", str(tmp_path / "t.h5")], "--packed hf need the Hugging Face extra")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--packed", "hf", "--fault", "double-scale"], "--fault double-scale is a switch of the built-in packed path"),
        (["--packed", "hf", "--fault", "leak@2"], "faults in --packed hf act on every layer"),
    ],
)
def test_hf_option_errors_are_one_line(tmp_path, capsys, argv, fragment):
    one_line_error(capsys, run_main, [*BASE, *argv, "--out", str(tmp_path / "t.h5")], fragment)


def test_float32_rotary_state_keeps_hf_inv_freq_float32(small_model):
    """The model state with float32 rotary buffers (experiments' state-rotary-fp32) is the fix
    applied after ``.to(dtype)``: HF's buffer holds the loaded values in float32; as loaded, the
    cast rounds it."""
    from tracer.esm import hf_model
    from tracer.esm.models import loaded_inv_freq

    model, _ = small_model
    set_precision(model, CPU, torch.bfloat16)
    loaded = loaded_inv_freq(model.layers[0].self_attn.rot_emb)
    assert hf_model.build_hf(model, "sdpa", "to", torch.bfloat16).rotary_embeddings.inv_freq.dtype == torch.bfloat16
    for layer in model.layers:
        layer.self_attn.rot_emb.inv_freq = loaded_inv_freq(layer.self_attn.rot_emb).float()
    kept = hf_model.build_hf(model, "sdpa", "to", torch.bfloat16).rotary_embeddings.inv_freq
    assert kept.dtype == torch.float32 and torch.equal(kept, loaded.float())


def test_an_hf_model_a_forward_holds_is_found(small_model):
    """:func:`tracer.capture.hf_paths.held_hf_model`: through the forward's closure, a bound
    object's attributes, or a model around it (EsmForMaskedLM); two different ones are ambiguous."""
    from transformers import EsmForMaskedLM

    from tracer.esm import hf_model

    model, _ = small_model
    hf = hf_model.build_hf(model, "sdpa", "to", torch.float32)
    other = hf_model.build_hf(model, "sdpa", "to", torch.float32)

    def closure(tokens):
        return hf(tokens)

    class Wrapper:
        def __init__(self, inner):
            self.inner = inner

        def forward(self, tokens):
            return self.inner(tokens)

    mlm = EsmForMaskedLM(hf.config)
    assert hf_paths.held_hf_model(closure) is hf
    assert hf_paths.held_hf_model(Wrapper(hf).forward) is hf
    assert hf_paths.held_hf_model(Wrapper(mlm).forward) is mlm.esm
    assert hf_paths.held_hf_model(lambda tokens: (hf(tokens), other(tokens))) is None
    assert hf_paths.held_hf_model(lambda tokens: model(tokens)) is None  # fair-esm: its own table
