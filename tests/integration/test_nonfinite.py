"""NaN and Inf are data to report, never a crash: a planted NaN/Inf, a checkpoint with one NaN
weight, and two traces compared with each other. The trace is kept and names the exact tap and
token where the first non-finite value appears."""

import json

import pytest
import torch

from tests.conftest import SMALL
from tests.unit.test_models import write_checkpoint
from tracer import compare
from tracer import run as run_cli
from tracer.esm.models import ARCHITECTURES, build_random
from tracer.store.trace_file import open_trace

BASE = ["--model", SMALL, "--device", "cpu", "--seq-len", "30", "--alone", "--quiet", "--json"]  # one sequence, 'large'



def run_json(capsys, argv):
    assert run_cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_planted_non_finite_value_is_the_first_divergence(tmp_path, capsys, value):
    out = tmp_path / "t.h5"
    doc = run_json(capsys, [*BASE, "--weights", "random", "--dtype", "float32", "--reference", "fp64", "--out", str(out),
                            "--fault", f"perturb:packed:layers.2.ffn_out:large:5:{value}"])
    fd, att = doc["first_divergence"], doc["attribution"]
    assert (fd["layer"], fd["tap"], fd["sequence"], fd["token"], fd["non_finite"]) == (2, "ffn_out", "large", 5, True)
    assert (att["first"]["path"], att["first"]["layer"], att["first"]["tap"], att["first"]["token"]) == ("packed", 2, "ffn_out", 5)
    assert att["drifting"] == "packed" and att["at_divergence"]["off"] == "packed"
    assert doc["worst_layers"][0] == {"layer": 2, "max_rel_l2": None}  # NaN, shown first, not skipped
    with open_trace(out) as t:  # the trace is kept, and holds the non-finite values
        assert not torch.isfinite(t.tap("packed", "layers.2.ffn_out")[t.token_slice("large")][5]).all()
    assert compare.main([str(out), "--table"]) == 0
    text = capsys.readouterr().out
    assert "FIRST DIVERGENCE at layer 2, ffn_out, sequence large, token 5" in text and "a NaN or Inf value" in text
    assert any(line.startswith("layers.2.ffn_out ") and " nan " in line for line in text.splitlines())
    if value == "nan":  # the bug-report bundle shows it too, rather than a dash or a 0
        from tracer import bundle

        assert bundle.main([str(out), "-o", str(tmp_path / "report")]) == 0
        report = (tmp_path / "report" / "report.md").read_text()
        assert "token 5 (packed vs unpacked: a NaN or Inf value;" in report
        assert "| 2 | ffn_out | nan | nan | 2 |" in report and report.count(" | nan |") >= 4


def test_checkpoint_with_one_nan_weight(tmp_path, capsys):
    arch = ARCHITECTURES[SMALL]
    model = build_random(arch, 0)
    model.layers[3].fc2.weight.data[7, 11] = float("nan")
    ckpt = tmp_path / "nan.pt"
    write_checkpoint(ckpt, model, arch)
    out = tmp_path / "t.h5"
    doc = run_json(capsys, [*BASE, "--weights", str(ckpt), "--dtype", "float32", "--reference", "fp64", "--out", str(out)])
    fd, att = doc["first_divergence"], doc["attribution"]
    # fc2's output feature 7 is NaN for every token: the first in walk order is token 0 (<cls>)
    assert (fd["layer"], fd["tap"], fd["sequence"], fd["token"], fd["non_finite"]) == (3, "ffn_out", "large", 0, True)
    assert att["drifting"] == "both"
    assert att["sentence"] == ("both paths drift from the float64 reference first at the same point, "
                               "layer 3, ffn_out, sequence large, token 0 (a NaN or Inf value)")
    assert out.exists()


def test_compare_two_traces_with_a_nan(tmp_path, capsys):
    common = [*BASE, "--weights", "random", "--dtype", "float32", "--reference", "none"]
    clean, bad = tmp_path / "clean.h5", tmp_path / "nan.h5"
    run_json(capsys, [*common, "--out", str(clean)])
    run_json(capsys, [*common, "--out", str(bad), "--fault", "perturb:unpacked:layers.1.v:large:4:nan"])
    assert compare.main([str(clean), str(bad), "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)["paths"]
    assert paths["packed"]["identical"]
    for key in ("first_difference", "first_divergence"):
        d = paths["unpacked"][key]
        assert (d["layer"], d["tap"], d["sequence"], d["token"], d["non_finite"]) == (1, "v", "large", 4, True)
    assert compare.main([str(clean), str(bad)]) == 0
    assert "first divergence at layer 1, v, sequence large, token 4 (a NaN or Inf value)" in capsys.readouterr().out
    assert compare.main([str(bad), str(bad), "--json"]) == 0  # the same NaNs: bit-identical, not a difference
    assert all(r["identical"] for r in json.loads(capsys.readouterr().out)["paths"].values())
