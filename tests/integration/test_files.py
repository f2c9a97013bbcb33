"""Nothing lost: what tracer writes never deletes or replaces what it did not create in this run:
bundles and benchmarks, parallel runs with one --out, signals, a
full disk, and plots into places that cannot be written."""

import dataclasses
import errno
import os
import signal
import stat
import subprocess
import sys
import time

import h5py
import pytest

from tests.conftest import BASE, default_signals, one_line_error, run, signal_while_torch_imports
from tracer import bench as bench_cli
from tracer import bundle as bundle_cli
from tracer import plot as plot_cli
from tracer import run as run_cli
from tracer.capture import paths
from tracer.runner import config as tracing
from tracer.store.tap_writer import AsyncTapWriter
from tracer.errors import TracerError
from tracer.store.files import partials_of
from tracer.inputs.packing import Layout
from tracer.inputs.sequences import debug_batch
from tracer.store.trace_file import TraceWriter, open_trace




def leftovers(folder):
    """Anything a run may leave behind by mistake: partial files and private build folders."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".partial") or p.name.startswith("."))


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    return run(tmp_path_factory.mktemp("t"), debug_batch(30), dtype="bfloat16").path


# ---------------------------------------------------------------------------------------------
# 5. bundle and bench delete nothing they did not create


def test_bundle_never_deletes_an_existing_folder(tmp_path, capsys, trace_file):
    d = tmp_path / "d"
    d.mkdir()
    (d / "report.md").write_text("my own report")
    (d / "notes.txt").write_text("mine")
    one_line_error(capsys, bundle_cli.main, [str(trace_file), "-o", str(d)], "exists and is not empty; pass --force")
    assert (d / "report.md").read_text() == "my own report" and (d / "notes.txt").read_text() == "mine"
    # --force writes into it: same-named files replaced, nothing else touched
    assert bundle_cli.main([str(trace_file), "-o", str(d), "--force"]) == 0
    assert (d / "notes.txt").read_text() == "mine" and (d / "report.md").read_text().startswith("# tracer report")
    assert not leftovers(tmp_path)


def test_bundle_never_deletes_its_own_input(tmp_path, capsys, trace_file):
    d = tmp_path / "d"
    assert bundle_cli.main([str(trace_file), "-o", str(d)]) == 0
    capsys.readouterr()
    slim = d / "trace-slim.h5"
    before = slim.read_bytes()
    for extra in ([], ["--force"]):
        one_line_error(capsys, bundle_cli.main, [str(slim), "-o", str(d), *extra], "is inside the bundle's destination")
    assert slim.read_bytes() == before


def test_bundle_archive_name_keeps_dots_and_never_replaces(tmp_path, capsys, trace_file):
    unrelated = tmp_path / "proj.zip"
    unrelated.write_bytes(b"someone else's archive")
    assert bundle_cli.main([str(trace_file), "-o", str(tmp_path / "proj.v2")]) == 0
    capsys.readouterr()
    assert unrelated.read_bytes() == b"someone else's archive"
    assert (tmp_path / "proj.v2.zip").is_file() and (tmp_path / "proj.v2" / "report.md").is_file()
    # an archive that exists is not replaced without --force
    one_line_error(capsys, bundle_cli.main, [str(trace_file), "-o", str(tmp_path / "proj")], "proj.zip exists")
    assert unrelated.read_bytes() == b"someone else's archive" and not (tmp_path / "proj").exists()
    assert not leftovers(tmp_path)


def test_bundle_out_named_zip_leaves_no_partial(tmp_path, trace_file):
    assert bundle_cli.main([str(trace_file), "-o", str(tmp_path / "out.zip")]) == 0
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out.zip").is_file()
    assert not leftovers(tmp_path)


def test_bench_removes_only_what_it_created(tmp_path, monkeypatch, capsys):
    d = tmp_path / "d"
    d.mkdir()
    owned = {"raw-write.bin": b"user data", "compression-none.h5": b"user h5", "bench-full.h5": b"user trace"}
    for name, data in owned.items():
        (d / name).write_bytes(data)
    seen = []

    def fake_run_bench(model, seq_len, device, dtype, repeats, folder, attn, say, packed_specs=()):
        seen.append(folder)
        bench_cli.raw_write(folder, 1 << 16)  # the real scratch write (and its removal)
        (folder / "bench-full.h5").write_bytes(b"a trace of this run")
        return {}

    monkeypatch.setattr(bench_cli, "run_bench", fake_run_bench)
    assert bench_cli.main(["--dir", str(d), "--json"]) == 0
    assert {p.name: p.read_bytes() for p in d.iterdir()} == owned
    assert seen and seen[0].parent == d and not seen[0].exists()


def test_dangling_symlink_at_out_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "t.h5"
    out.symlink_to(tmp_path / "nowhere.h5")
    one_line_error(capsys, run_cli.main, [*BASE, "--seq-len", "10", "--out", str(out)], "exists (a dangling symlink); pass --force")
    assert out.is_symlink() and os.readlink(out) == str(tmp_path / "nowhere.h5")
    assert not (tmp_path / "nowhere.h5").exists()
    assert run_cli.main([*BASE, "--seq-len", "10", "--out", str(out), "--force"]) == 0
    assert not out.is_symlink() and h5py.is_hdf5(out)


# ---------------------------------------------------------------------------------------------
# 6. unique partial files, commits that never replace


def _layout():
    return Layout.from_lengths([3], None)


def test_two_writers_of_one_path_never_share_or_clobber(tmp_path):
    path = tmp_path / "t.h5"
    a, b = TraceWriter(path), TraceWriter(path)
    assert a.partial != b.partial and set(partials_of(path)) == {a.partial, b.partial}
    for w, mark in ((a, "A"), (b, "B")):
        w.write_sequences(["s"], ["M"], [1], _layout())
        w.set_json("meta", {"writer": mark})
    a.commit()
    with pytest.raises(TracerError, match="appeared while this run was writing"):
        b.commit()
    b.abort()
    with open_trace(path) as t:
        assert t.meta["writer"] == "A" and t.meta["run_id"] == a.run_id  # the first run's file, whole
    assert not partials_of(path)


def test_partial_files_are_created_exclusively(tmp_path, monkeypatch):
    import tracer.store.files as files

    path = tmp_path / "t.h5"
    names = iter(["t.h5.1-a.partial", "t.h5.1-a.partial", "t.h5.1-b.partial"])
    monkeypatch.setattr(files, "partial_name", lambda p: next(names))
    first = files.create_partial(path)
    first.write_bytes(b"another run's work")
    second = files.create_partial(path)  # the taken name is skipped, never truncated
    assert second.name == "t.h5.1-b.partial" and first.read_bytes() == b"another run's work"


def test_default_names_are_unique_per_run():
    names = []
    for _ in range(50):
        names.append(str(tracing.default_out("esm2_t6_8M_UR50D", "bfloat16", debug_batch(10))))
        time.sleep(2e-6)
    assert len(set(names)) == 50  # runs started in the same second get different names
    assert sorted(names) == names  # and they still sort by start time
    assert f"-{os.getpid()}.h5" in names[0]


def test_parallel_runs_with_one_out(tmp_path):
    """Two real runs, same --out, started together: exactly one succeeds; the other says so in
    one line; the file at --out is whole (checksums verified) and no partial is left."""
    out = tmp_path / "t.h5"
    cmd = [sys.executable, "-m", "tracer.run", *BASE, "--seq-len", "30", "--out", str(out)]
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=default_signals) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    err = loser[1].strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tracer: error: ") and str(out) in err[0], err
    with open_trace(out) as t:
        assert t.verify() > 0
    assert not partials_of(out) and sorted(p.name for p in tmp_path.iterdir()) == ["t.h5"]


# ---------------------------------------------------------------------------------------------
# 7. signals, the background writer, durable renames


def _real_run(tmp_path, sig):
    out = tmp_path / "t.h5"
    cmd = [sys.executable, "-m", "tracer.run", "--model", "esm2_t12_35M_UR50D", "--weights", "random",
           "--device", "cpu", "--seq-len", "400", "--out", str(out)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=default_signals)
    try:
        for line in p.stderr:  # wait until the forwards are under way (the partial file exists)
            if "packed path" in line:
                break
        assert partials_of(out)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, sig):
    code, err, out = _real_run(tmp_path, sig)
    assert code == 128 + sig, err
    lines = [x for x in err.strip().splitlines() if not x.startswith("tracer: reference")]
    assert lines[-1] == f"tracer: stopped by {signal.Signals(sig).name} (no trace was written)", err
    assert "Traceback" not in err
    assert not out.exists() and not partials_of(out)


def test_ctrl_c_while_torch_imports_is_one_line(tmp_path):
    """A meta-path hook (sitecustomize) pauses ``import torch`` and says so; Ctrl-C lands there."""
    code, err = signal_while_torch_imports(tmp_path, "tracer.run", signal.SIGINT)
    assert code == 130, err
    assert err.strip() == "tracer: interrupted (no trace was written)", err


class _SlowWriter:
    def __init__(self):
        self.written = 0

    def seed(self, key):  # TraceWriter binds each checksum to the run and the name
        return 0

    def write_tap(self, path, name, tensor, crc32=None):
        time.sleep(0.05)
        self.written += 1


def test_background_writer_stops_instead_of_draining():
    import torch

    w = _SlowWriter()
    aw = AsyncTapWriter(w)
    for i in range(40):
        aw.submit("packed", f"t{i}", torch.zeros(2))
    aw.abort()
    assert w.written < 5  # the tap in hand at most, not the 40 queued


def test_interrupted_run_does_not_drain_the_queue(tmp_path, monkeypatch):
    import threading

    calls = []
    real_write = TraceWriter.write_tap
    disk_free = threading.Event()  # the disk is stuck until the interrupt: every tap is queued

    def slow_write(self, path, name, tensor, crc32=None):
        disk_free.wait(30)
        calls.append(name)
        real_write(self, path, name, tensor, crc32)

    def interrupted(*a, **k):
        disk_free.set()
        raise KeyboardInterrupt

    monkeypatch.setattr(TraceWriter, "write_tap", slow_write)
    monkeypatch.setattr(paths, "run_packed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, debug_batch(30))
    assert len(calls) <= 1  # the tap in hand at most; 50 unpacked taps were queued
    assert not list(tmp_path.iterdir())


def test_commit_fsyncs_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append(st.st_ino)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with TraceWriter(tmp_path / "t.h5") as w:
        w.write_sequences(["s"], ["M"], [1], _layout())
        w.set_json("meta", {})
        w.commit()
    assert os.stat(tmp_path).st_ino in synced


# ---------------------------------------------------------------------------------------------
# 8. a full disk


def _older(tmp_path):
    out = tmp_path / "t.h5"
    out.write_bytes(b"an older trace")
    return out


def test_disk_full_is_one_line_and_keeps_the_older_file(tmp_path, monkeypatch, capsys):
    out = _older(tmp_path)
    real = os.pwrite
    count = [0]

    def pwrite(fd, data, offset):
        count[0] += 1
        if count[0] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    msg = one_line_error(capsys, run_cli.main, [*BASE, "--seq-len", "20", "--out", str(out), "--force"], "no space left on the device")
    assert "partial file was removed" in msg and "left untouched" in msg
    assert out.read_bytes() == b"an older trace" and not partials_of(out)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected-ENOSPC test covers the code path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_on_a_real_small_filesystem(tiny_tmpfs, capsys, monkeypatch):
    import tracer.runner.preflight

    real = tracer.runner.preflight.free_resources  # the pre-flight would refuse this run up front:
    monkeypatch.setattr(tracer.runner.preflight, "free_resources",  # let it start, as if the disk filled up later
                        lambda out, device: dataclasses.replace(real(out, device), disk=None))
    out = _older(tiny_tmpfs)
    one_line_error(capsys, run_cli.main, [*BASE, "--seq-len", "200", "--out", str(out), "--force"], "no space left on the device")
    assert out.read_bytes() == b"an older trace"
    assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["t.h5"]


# ---------------------------------------------------------------------------------------------
# 11. plots and bundles: unwritable places, failing --plot, traces of a subset of taps


def test_plot_to_a_file_is_one_line(tmp_path, capsys, trace_file):
    f = tmp_path / "picture.png"
    f.write_bytes(b"not a folder")
    one_line_error(capsys, plot_cli.main, [str(trace_file), "-o", str(f)], "exists and is not a folder")
    assert f.read_bytes() == b"not a folder"


@pytest.mark.parametrize("tool", ["plot", "bundle"])
def test_unwritable_destination_is_one_line(tmp_path, capsys, trace_file, tool):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder would have to be")
    main = plot_cli.main if tool == "plot" else bundle_cli.main
    one_line_error(capsys, main, [str(trace_file), "-o", str(blocker / "sub")], "cannot ")
    if os.geteuid() != 0:  # root writes anywhere; a read-only folder only stops other users
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            one_line_error(capsys, main, [str(trace_file), "-o", str(ro / "out")], "cannot ")
        finally:
            ro.chmod(0o700)
    assert not leftovers(tmp_path)


def test_failing_plot_does_not_hide_the_verdict(tmp_path, monkeypatch, capsys):
    import tracer.plot

    def broken(*a, **k):
        raise TracerError("cannot write the plots into /nowhere: Permission denied")

    monkeypatch.setattr(tracer.plot, "plot_trace", broken)
    out = tmp_path / "t.h5"
    assert run_cli.main([*BASE, "--seq-len", "20", "--out", str(out), "--plot"]) == 2
    captured = capsys.readouterr()
    assert "\nverdict " in captured.out and f"trace     {out}" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "the trace" in err[0] and "was written, but its plots were not" in err[0]
    assert h5py.is_hdf5(out)


@pytest.mark.parametrize("taps", [("ctx",), ("embed", "final_norm"), ("q_rope", "resid_mid")], ids=lambda t: ",".join(t))
def test_plot_and_bundle_draw_a_subset_of_taps(tmp_path, taps):
    t = run(tmp_path, debug_batch(20), dtype="bfloat16", taps=taps).path
    assert plot_cli.main([str(t), "-o", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "curves.png").is_file()
    assert bundle_cli.main([str(t), "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.md").is_file() and (tmp_path / "b.zip").is_file()
