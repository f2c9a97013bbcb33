"""Resumes verify what they reuse (issue 17, items 13-14): a finished row is reused only if its
trace verifies and its configuration fingerprint (plug-in source included) matches; rows are
reported from the verified traces, never from the manifest's copies."""

import json
import shutil
from pathlib import Path

import h5py
import pytest

from tests.conftest import campaign_config as base

from tracer import experiments, sweep
from tracer.campaigns.campaign import TraceFacts
from tracer.errors import TracerError
from tracer.inputs.sequences import make_batch, motif_sequence
from tracer.store.binding import seed
from tracer.store.trace_file import checksum

ADAPTER = Path(__file__).resolve().parents[2] / "examples" / "packed_esm2_adapter.py"


def seqs():
    return make_batch([("short", motif_sequence(12)), ("long", motif_sequence(40))])


def lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_item13_an_edited_manifest_does_not_change_the_report(tmp_path, tiny, capsys):
    out = tmp_path / "exp"
    first = experiments.run_matrix(base(), seqs(), out, quiet=True, loaded=tiny)
    truth = {r["name"]: r["verdict"] for r in first["rows"]}
    manifest = json.loads((out / "manifest.json").read_text())
    flipped = {"agree": "diverged", "diverged": "agree"}[truth["baseline"]]
    manifest["done"]["baseline"]["verdict"] = flipped
    manifest["done"]["baseline"]["first_divergence"] = None
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = experiments.run_matrix(base(), seqs(), out, quiet=True, loaded=tiny)
    rows = {r["name"]: r for r in again["rows"]}
    assert rows["baseline"]["verdict"] == truth["baseline"]  # from the verified trace, not the manifest
    assert rows["baseline"]["first_divergence"] == {r["name"]: r for r in first["rows"]}["baseline"]["first_divergence"]
    assert again["conclusion"] == first["conclusion"]


def test_item13_a_deleted_row_trace_is_rerun_and_said(tmp_path, tiny, capsys):
    out = tmp_path / "exp"
    experiments.run_matrix(base(), seqs(), out, quiet=True, loaded=tiny)
    (out / "traces" / "packing-alone.h5").unlink()
    record = experiments.run_matrix(base(), seqs(), out, quiet=False, loaded=tiny)
    said = lines(capsys)
    assert any(s.startswith("tracer: packing-alone: trace fails verification (") and s.endswith("; rerunning") for s in said), said
    assert (out / "traces" / "packing-alone.h5").exists()
    assert {r["name"]: r for r in record["rows"]}["packing-alone"]["verdict"] in ("agree", "diverged")


def test_item13_a_truncated_sweep_trace_is_rerun_never_a_made_up_cliff(tmp_path, tiny, capsys):
    config = base(dtype="float32", reference="none")
    out = tmp_path / "sw"
    first = sweep.run_sweep(config, [20, 30, 40], out, quiet=True, loaded=tiny, plot=False)
    assert first["cliffs"] == []
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["done"]["L00030"]["verdict"] = "diverged"  # an edited row
    manifest["done"]["L00030"]["max_rel_l2_by_site"]["q_rope"] = 1e6
    (out / "manifest.json").write_text(json.dumps(manifest))
    with open(out / "traces" / "L00020.h5", "r+b") as f:
        f.truncate(100)
    record = sweep.run_sweep(config, [20, 30, 40], out, quiet=False, loaded=tiny, plot=False)
    said = lines(capsys)
    assert any(s.startswith("tracer: L00020: trace fails verification (") for s in said), said
    assert not any("L00030" in s and "rerunning" in s for s in said)  # its trace is fine: reused, from the trace
    assert record["cliffs"] == [] and [r["verdict"] for r in record["rows"]] == [r["verdict"] for r in first["rows"]]
    assert record["rows"] == first["rows"]


def test_item13_a_trace_of_another_row_is_not_reused(tmp_path, tiny, capsys):
    config = base(dtype="float32", reference="none")
    out = tmp_path / "sw"
    sweep.run_sweep(config, [20, 30], out, quiet=True, loaded=tiny, plot=False)
    shutil.copy(out / "traces" / "L00020.h5", out / "traces" / "L00030.h5")
    record = sweep.run_sweep(config, [20, 30], out, quiet=False, loaded=tiny, plot=False)
    said = lines(capsys)
    assert any(s.startswith("tracer: L00030: its trace is not the one this row recorded") for s in said), said
    with h5py.File(out / "traces" / "L00030.h5") as f:
        assert f["sequences/lengths"][0] == 30
    assert record["rows"][1]["length"] == 30


def test_item14_an_edited_plugin_source_reruns_the_rows_it_made(tmp_path, tiny, capsys, monkeypatch):
    plugin = tmp_path / "adapter.py"
    shutil.copy(ADAPTER, plugin)
    shutil.copy(ADAPTER.with_name("packed_esm2.py"), tmp_path / "packed_esm2.py")  # the adapter imports it
    config = base(dtype="float32", reference="fp64", packed=f"{plugin}:make_forward")
    out = tmp_path / "exp"
    real, calls = experiments.trace, []

    def interrupted(cfg, s, **kw):
        calls.append(cfg.out)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg, s, **kw)

    monkeypatch.setattr(experiments, "trace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        experiments.run_matrix(config, seqs(), out, quiet=True, loaded=tiny)
    done = json.loads((out / "manifest.json").read_text())["done"]
    assert len(done) == 2
    plugin.write_text(plugin.read_text() + "\n# edited after the interruption\n")
    calls.clear()
    monkeypatch.setattr(experiments, "trace", real)
    experiments.run_matrix(config, seqs(), out, quiet=False, loaded=tiny)
    said = lines(capsys)
    for name in done:
        assert f"tracer: {name}: the packed plug-in source {plugin} changed since it ran; rerunning" in said, said
    assert not any(s.startswith("tracer: resuming:") for s in said), said
    with h5py.File(out / "traces" / "baseline.h5") as f:
        sources = json.loads(f.attrs["meta"])["plugin_sources"]
    assert sources["packed"]["file"] == str(plugin) and sources["packed"]["spec"] == f"{plugin}:make_forward"


def test_a_summary_without_a_verdict_is_refused_not_read_as_agree(tmp_path, tiny):
    config = base(dtype="float32", reference="none")
    sweep.run_sweep(config, [20], tmp_path / "sw", quiet=True, loaded=tiny, plot=False)
    path = tmp_path / "sw" / "traces" / "L00020.h5"
    with h5py.File(path, "r+") as f:
        summary = json.loads(f.attrs["summary"])
        del summary["verdict"]
        text = json.dumps(summary, sort_keys=True)
        f.attrs["summary"] = text
        f.attrs["summary_crc32"] = checksum(text, seed(f.attrs["run_id"], "summary"))
    with pytest.raises(TracerError, match="its stored summary says verdict None"):
        TraceFacts.read(path)
