"""The command line end to end, as a user runs it (subprocesses, CPU, small random model)."""

import json

import pytest
import subprocess
import sys


from tracer.store.trace_file import open_trace

BASE = ["--model", "esm2_t6_8M_UR50D", "--weights", "random", "--device", "cpu", "--quiet"]


def cli(module, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_run_json_contract_and_compare_agrees(tmp_path):
    out = tmp_path / "t.h5"
    r = cli("tracer.run", "--seq-len", "300", *BASE, "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # stdout is exactly one JSON object
    assert doc["trace"] == str(out) and out.exists()
    fd = doc["first_divergence"]
    assert fd is not None and {"layer", "tap", "sequence", "token", "cos", "rel_l2", "max_abs", "threshold"} <= set(fd)
    assert (fd["layer"], fd["tap"]) == (0, "q_rope")
    assert [entry["layer"] for entry in doc["layers"]] == list(range(6))
    assert set(doc["layers"][0]["taps"]) == {"q_rope", "k_rope", "v", "ctx", "attn_out", "resid_mid", "ffn_out", "resid_out"}
    assert doc["attribution"]["drifting"] == "unpacked"
    with open_trace(out) as t:
        assert t.summary == doc  # the same summary is stored in the trace
        assert t.meta["weights"]["source"] == "random" and t.meta["attention"]["backend"] == "math"
        assert t.meta["command"][:3] == ["python", "-m", "tracer.run"]
    c = cli("tracer.compare", str(out), "--json")
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout) == doc  # recomputed from the tensors: same verdict, same numbers


def test_run_text_summary_and_none_found(tmp_path):
    r = cli("tracer.run", "--seq-len", "30", *BASE, "--dtype", "float32", "--out", str(tmp_path / "t.h5"))
    assert r.returncode == 0, r.stderr
    assert "verdict   no divergence" in r.stdout
    assert f"trace     {tmp_path / 't.h5'}" in r.stdout


def test_run_alone_and_fasta(tmp_path):
    r = cli("tracer.run", "--seq-len", "20", "--alone", *BASE, "--json", "--out", str(tmp_path / "a.h5"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["batch"].startswith("large (20) residues")
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">p1\nMKTAYIAKQR\n>p2\nGGSW\n")
    r = cli("tracer.run", "--fasta", str(fasta), *BASE, "--json", "--out", str(tmp_path / "f.h5"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["batch"].startswith("p1 (10), p2 (4)")


def test_planted_fault_from_the_command_line(tmp_path):
    r = cli("tracer.run", "--seq-len", "300", *BASE, "--dtype", "float32", "--fault", "positions-bf16", "--json", "--out", str(tmp_path / "t.h5"))
    assert r.returncode == 0, r.stderr
    fd = json.loads(r.stdout)["first_divergence"]
    assert (fd["layer"], fd["tap"], fd["sequence"], fd["token"]) == (0, "q_rope", "large", 257)


def test_help():
    r = cli("tracer.run", "--help")
    assert r.returncode == 0 and "--seq-len" in r.stdout and "--weights" in r.stdout


def test_determinism_metadata_is_what_torch_reports(tmp_path, monkeypatch):
    import torch

    from tests.conftest import run
    from tracer.inputs.sequences import debug_batch

    r = run(tmp_path, debug_batch(10), name="a.h5", metrics_only=True)
    with open_trace(r.path) as t:
        assert (t.meta["deterministic_algorithms"], t.meta["deterministic_warn_only"], t.meta["fill_uninitialized_memory"]) == (True, True, False)
    monkeypatch.setattr(torch._C, "_set_deterministic_algorithms", lambda *a, **k: None)  # a torch that ignores the request (what tracer calls)
    r = run(tmp_path, debug_batch(10), name="b.h5", metrics_only=True)
    with open_trace(r.path) as t:
        assert t.meta["deterministic_algorithms"] is False  # recorded as measured, not as intended


def test_bench_write_is_timed_to_durable_data(tmp_path, monkeypatch):
    """The benchmark's writer figure: tracer's writer stores every tap of a real trace (same
    names, shapes, dtypes) and the clock stops only after fsync; nothing is left behind."""
    import os

    import h5py

    from tests.conftest import run
    from tracer.benchmarks import disk
    from tracer.inputs.sequences import debug_batch

    trace = run(tmp_path, debug_batch(10), name="t.h5").path
    with h5py.File(trace) as f:
        want = sum(ds.nbytes for p in f["taps"] for ds in f["taps"][p].values())
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    folder = tmp_path / "bench"
    folder.mkdir()
    seconds, nbytes = disk.tracer_write(folder, trace)
    assert nbytes == want and seconds > 0 and synced
    assert not list(folder.iterdir())
def test_negative_max_batch_tokens_is_one_line_error(capsys):
    from tracer.run import main

    with pytest.raises(SystemExit) as stop:  # refused by the option's range, before anything loads
        main(["--model", "esm2_t6_8M_UR50D", "--weights", "random", "--max-batch-tokens", "-5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-batch-tokens" in err[0] and "-5 is out of range" in err[0], err
