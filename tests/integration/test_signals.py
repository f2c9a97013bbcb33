"""Signals end every command with one line and 128 + the signal number (issue 17, item 19):
experiments and sweep as run does, while torch imports, and after a file is committed (the
line then says the file was written in full), and no command sits in a signal-deaf teardown.

Children get default signal dispositions (the suite may run as a background job that ignores
SIGINT, or under nohup)."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import BASE, default_signals, run, signal_while_torch_imports
from tracer import bundle as bundle_cli
from tracer import experiments as experiments_cli
from tracer import run as run_cli
from tracer import sweep as sweep_cli
from tracer.inputs.sequences import debug_batch
from tracer.runner.interrupts import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    return run(tmp_path_factory.mktemp("t"), debug_batch(20), taps=("resid_out",), layers=(0, 1)).path


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("tool", ["experiments", "sweep"])
def test_campaigns_exit_128_plus_the_signal(tmp_path, capsys, monkeypatch, tool, sig):
    module, work = (experiments_cli, "run_matrix") if tool == "experiments" else (sweep_cli, "run_sweep")

    def stopped(*args, **kwargs):
        raise Interrupted(sig)

    monkeypatch.setattr(module, work, stopped)
    argv = (["--seq-len", "10"] if tool == "experiments" else ["--lengths", "10"]) + [*BASE, "--out", str(tmp_path / "o")]
    assert module.main(argv) == 128 + sig
    err = capsys.readouterr().err.strip().splitlines()
    how = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    assert len(err) == 1 and err[0].startswith(f"tracer: {how}; finished ") and "rerun the same command to resume" in err[0], err


@pytest.mark.parametrize("tool", ["experiments", "sweep"])
def test_campaigns_end_with_one_line_while_torch_imports(tmp_path, tool):
    code, err = signal_while_torch_imports(tmp_path, f"tracer.{tool}", signal.SIGTERM)
    assert code == 143, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("tracer: stopped by SIGTERM ("), err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_after_the_trace_is_committed_says_it_was_written(tmp_path, capsys, monkeypatch, sig):
    real = run_cli.trace

    def then_stopped(*args, **kwargs):
        real(*args, **kwargs)  # the trace is committed
        raise Interrupted(sig)  # the signal lands while the verdict is printed

    monkeypatch.setattr(run_cli, "trace", then_stopped)
    out = tmp_path / "t.h5"
    assert run_cli.main([*BASE, "--seq-len", "10", "--out", str(out)]) == 128 + sig
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tracer: stopped by {signal.Signals(sig).name} ({out} was written in full)"], err
    assert out.exists()


def test_a_signal_after_the_bundle_is_committed_says_what_was_written(tmp_path, capsys, monkeypatch, trace_file):
    real = bundle_cli.make_bundle

    def then_stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(bundle_cli, "make_bundle", then_stopped)
    assert bundle_cli.main([str(trace_file), "-o", str(tmp_path / "b")]) == 143
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("tracer: wrote ")]
    assert err == [f"tracer: stopped by SIGTERM ({tmp_path / 'b.zip'} was written in full)"], err


AT_EXIT = textwrap.dedent("""
    import atexit, sys, time
    def teardown():  # stands for the interpreter's slow teardown after a command is done
        print("TEARING DOWN", file=sys.stderr, flush=True)
        time.sleep(20)
    atexit.register(teardown)
""")


@pytest.mark.parametrize("tool", ["compare", "run"])
def test_no_signal_deaf_teardown_after_the_work_is_done(tmp_path, trace_file, tool):
    """Once a command is done it ends at once: a signal can no longer find it dying with no line
    and status -N (Python stops handling signals while it tears the interpreter down)."""
    (tmp_path / "sitecustomize.py").write_text(AT_EXIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    argv = [str(trace_file)] if tool == "compare" else [*BASE, "--seq-len", "10", "--out", str(tmp_path / "t.h5")]
    p = subprocess.Popen([sys.executable, "-m", f"tracer.{tool}", *argv], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env, preexec_fn=default_signals)
    try:
        for line in p.stderr:
            if "TEARING DOWN" in line:  # reached only if the command left through the interpreter's exit
                p.send_signal(signal.SIGTERM)
                break
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode >= 0, p.returncode  # never killed by the raw signal
