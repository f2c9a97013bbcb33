"""Inputs, outputs and limits (issue 17, items 15-18 and 20): an input is never an output; only
regular files are replaced; plots never replace another trace's figures and are written as a
set; absurd numbers, NUL bytes and shadowing folders are one line, never a traceback; status
lines stay short; messages say what happened."""

import hashlib
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import BASE, SMALL, one_line_error, run
from tracer import bench as bench_cli
from tracer import bundle as bundle_cli
from tracer import experiments as experiments_cli
from tracer import plot as plot_cli
from tracer import run as run_cli
from tracer import sweep as sweep_cli
from tracer.capture.paths import BuiltinPackedPath, encode, output_vs_final_norm
from tracer.errors import TracerError
from tracer.esm.attention import resolve
from tracer.esm.packed_forward import PackedESM2
from tracer.inputs.sequences import debug_batch, make_batch
from tracer.runner.interrupts import Interrupted
from tracer.runner.progress import MAX_LINE, Progress
from tracer.store.files import partials_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def usage_error(capsys, parse, argv, fragment):
    """An argparse type error: exit status 2 and one line naming the range."""
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    """Two different small traces: A with a reference, B without."""
    folder = tmp_path_factory.mktemp("two")
    small = dict(taps=("resid_out",), layers=(0, 1))  # few figures, small ones: the suite stays fast
    a = run(folder, debug_batch(20), name="A.h5", **small).path
    b = run(folder, make_batch([("x", "MKTAYIAKQR")]), name="B.h5", reference="none", **small).path
    return a, b


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# 15. an input is never an output; only regular files are replaced


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_out_naming_the_input_fasta_is_refused_even_with_force(tmp_path, capsys, how):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    out = fasta
    if how == "symlink":
        out = tmp_path / "link.h5"
        out.symlink_to(fasta)
    elif how == "hardlink":
        out = tmp_path / "hard.h5"
        os.link(fasta, out)
    one_line_error(capsys, run_cli.main, [*BASE, "--fasta", str(fasta), "--out", str(out), "--force"],
                   "an input is never an output, even with --force")
    assert fasta.read_text() == ">a\nMKTAYIAK\n"


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_out_onto_a_fifo_or_folder_is_refused_even_with_force(tmp_path, capsys, kind):
    out = tmp_path / "x.h5"
    os.mkfifo(out) if kind == "fifo" else out.mkdir()
    word = "a FIFO" if kind == "fifo" else "a folder"
    one_line_error(capsys, run_cli.main, [*BASE, "--seq-len", "10", "--out", str(out), "--force"],
                   f"is {word}; only regular files are ever replaced")
    assert (out.is_fifo() if kind == "fifo" else out.is_dir())


def test_plot_never_writes_through_a_link_to_its_input(tmp_path, capsys, traces):
    a, _ = traces
    folder = tmp_path / "p"
    folder.mkdir()
    os.link(a, folder / "curves.png")  # a hard link of the trace where a figure would go
    before = digest(a)
    one_line_error(capsys, plot_cli.main, [str(a), "-o", str(folder), "--force"], "an input is never an output")
    assert digest(a) == before


def test_bundle_with_force_replaces_only_regular_files(tmp_path, capsys, traces):
    a, _ = traces
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "report.md")
    one_line_error(capsys, bundle_cli.main, [str(a), "-o", str(d), "--force"], "is a FIFO; only regular files are ever replaced")
    assert (d / "report.md").is_fifo()


def test_bench_json_file_is_refused_before_measuring(tmp_path, capsys):
    one_line_error(capsys, bench_cli.main, ["--json", str(tmp_path)], "is a folder; only regular files")


def test_experiments_refuses_a_folder_holding_its_input(tmp_path, capsys):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKTAYIAK\n>b\nMKTA\n")
    (tmp_path / "exp" / "traces").mkdir(parents=True)
    os.link(fasta, tmp_path / "exp" / "traces" / "baseline.h5")
    one_line_error(capsys, experiments_cli.main, [*BASE[:-1], "--fasta", str(fasta), "--out", str(tmp_path / "exp"), "--force"],
                   "which is the input")
    assert fasta.read_text().startswith(">a")


def test_sweep_never_replaces_a_folder_with_its_plot(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.png").mkdir()
    one_line_error(capsys, sweep_cli.main, ["--lengths", "10", *BASE, "--out", str(tmp_path / "s"), "--force"],
                   "sweep.png is a folder; only regular files are ever replaced")
    assert (tmp_path / "s" / "sweep.png").is_dir() and not partials_of(tmp_path / "s" / "sweep.svg")


# ---------------------------------------------------------------------------------------------
# 16. plots: never another trace's figures without --force; written as one set


def test_plot_never_replaces_another_traces_figures_without_force(tmp_path, capsys, traces):
    a, b = traces
    p = tmp_path / "P"
    assert plot_cli.main([str(a), "-o", str(p)]) == 0
    assert plot_cli.main([str(a), "-o", str(p)]) == 0  # the same trace's figures: drawn again
    capsys.readouterr()
    before = {f.name: digest(f) for f in p.iterdir()}
    one_line_error(capsys, plot_cli.main, [str(b), "-o", str(p)], f"of another trace ({a.resolve()}); pass --force")
    assert {f.name: digest(f) for f in p.iterdir()} == before
    assert plot_cli.main([str(b), "-o", str(p), "--force"]) == 0
    assert digest(p / "curves.png") != before["curves.png"]


def test_an_interrupted_plot_leaves_the_old_set_whole(tmp_path, capsys, traces, monkeypatch):
    a, b = traces
    p = tmp_path / "P"
    assert plot_cli.main([str(a), "-o", str(p)]) == 0
    before = {f.name: digest(f) for f in p.iterdir()}
    import matplotlib.figure

    real, calls = matplotlib.figure.Figure.savefig, []

    def savefig(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # curves.png and .svg are done: the old set would now be half replaced
            raise Interrupted(15)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    capsys.readouterr()
    assert plot_cli.main([str(b), "-o", str(p), "--force"]) == 143
    assert capsys.readouterr().err.strip() == "tracer: stopped by SIGTERM (no plots were written)"
    assert {f.name: digest(f) for f in p.iterdir()} == before
    assert not [f for f in p.iterdir() if f.name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# 17. no tracebacks: NUL bytes, huge integers, a folder named tracer


def test_nul_byte_in_a_fasta_header_is_one_line(tmp_path, capsys):
    fasta = tmp_path / "nul.fasta"
    fasta.write_bytes(b">a\x00b\nMKTAYIAK\n")
    one_line_error(capsys, run_cli.main, [*BASE, "--fasta", str(fasta), "--out", str(tmp_path / "t.h5")],
                   "holds the control character '\\x00'")


@pytest.mark.parametrize("parse, argv, fragment", [
    (run_cli.build_parser().parse_args, ["--seq-len", "1" + "0" * 20], "--seq-len takes integers from 1 to 100,000"),
    (run_cli.build_parser().parse_args, ["--max-batch-tokens", "9" * 25], "--max-batch-tokens takes integers from 0"),
    (experiments_cli.build_parser().parse_args, ["--seq-len", "9" * 20], "--seq-len takes integers from 1 to 100,000"),
    (experiments_cli.build_parser().parse_args, ["--seed", "9" * 30], "--seed takes integers from 0 to 18,446,744,073,709,551,615"),
], ids=["run-seq-len", "max-batch-tokens", "experiments-seq-len", "campaign-seed"])
def test_huge_integers_are_one_line(capsys, parse, argv, fragment):
    usage_error(capsys, parse, argv, fragment)


def test_bundle_max_mb_1e308_is_one_line(tmp_path, capsys):
    one_line_error(capsys, bundle_cli.main, [str(tmp_path / "t.h5"), "-o", str(tmp_path / "b"), "--max-mb", "1e308"],
                   "--max-mb must be a number above 1 and at most 1e+06")


def test_sweep_huge_length_is_one_line(capsys):
    one_line_error(capsys, sweep_cli.main, ["--lengths", "9" * 20, *BASE], "lengths are positive numbers of residues, at most 100,000")


SHADOWED = textwrap.dedent("""
    import importlib.machinery, os, runpy, sys
    repo = sys.argv[1]
    sys.path = [p for p in sys.path if p not in ("", repo) and not os.path.isdir(os.path.join(p, "tracer"))]
    sys.path.insert(0, os.getcwd())  # what python -m does
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    class Editable:  # as setuptools' editable-install finder: asked after the path finder
        def find_spec(self, name, path=None, target=None):
            if name == "tracer" or name.startswith("tracer."):
                return importlib.machinery.PathFinder.find_spec(name, [os.path.join(repo, *name.split(".")[:-1])])
    sys.meta_path.append(Editable())
    sys.argv = ["tracer.run", *sys.argv[2:]]
    runpy.run_module("tracer.run", run_name="__main__", alter_sys=True)
""")


def test_a_folder_named_tracer_in_the_current_folder_does_not_break_a_run(tmp_path):
    """``python -m tracer.run`` where ./tracer is a clone (no __init__.py): it runs as installed."""
    (tmp_path / "tracer" / "tracer").mkdir(parents=True)
    (tmp_path / "tracer" / "README.md").write_text("a clone of the repository")
    script = tmp_path / "shadowed.py"
    script.write_text(SHADOWED)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(script), REPO, *BASE, "--seq-len", "10", "--out", str(tmp_path / "t.h5")],
                       cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "t.h5").exists()


# ---------------------------------------------------------------------------------------------
# 18. limits


def test_seq_len_3_billion_is_refused_up_front(capsys):
    line = usage_error(capsys, run_cli.build_parser().parse_args, ["--seq-len", "3000000000"], "from 1 to 100,000")
    assert "ESM-2 was trained on 1,022" in line


def test_a_sweep_of_too_many_lengths_is_refused_before_it_is_built():
    with pytest.raises(TracerError, match="asks for 5,000 lengths; a sweep takes at most 1,000"):
        sweep_cli.parse_lengths("1:5000:1")
    with pytest.raises(TracerError, match="asks for 1,000,000,000 lengths"):
        sweep_cli.parse_lengths("1:1000000000:1")


@pytest.mark.parametrize("argv, fragment", [
    (["--repeats", "99999999999999999999"], "--repeats takes integers from 1 to 1,000"),
    (["--production", "-1"], "--production takes integers from 0 to 100,000"),
], ids=["repeats", "production-negative"])
def test_bench_numbers_out_of_range_are_refused(capsys, argv, fragment):
    usage_error(capsys, bench_cli.build_parser().parse_args, argv, fragment)


def test_noise_factor_that_turns_detection_off_is_refused(capsys):
    line = usage_error(capsys, run_cli.build_parser().parse_args, ["--noise-factor", "1e30"], "K must be at most 100")
    assert "turns detection off" in line


def test_status_lines_stay_short_for_a_large_batch(small_model):
    model, _ = small_model
    batch = encode(make_batch([(f"s{i}", "MKTAYIAK") for i in range(2000)]), model.alphabet, "given")
    packed = BuiltinPackedPath(PackedESM2(model, resolve("math", torch.device("cpu"), torch.float32)))
    assert len(packed.describe(batch)) < 200
    stream = io.StringIO()
    Progress(stream=stream)("x" * 75_000)
    assert len(stream.getvalue()) <= MAX_LINE + 10 and "characters]" in stream.getvalue()


# ---------------------------------------------------------------------------------------------
# 20. messages say what happened


def test_a_meta_tensor_output_is_named_as_such(tmp_path, capsys):
    plugin = tmp_path / "meta_plugin.py"
    plugin.write_text(textwrap.dedent("""
        import torch

        def make_forward(model, alphabet):
            def forward(tokens, cu_seqlens, max_seqlen):
                return torch.empty(tokens.shape[0], model.embed_dim, device="meta")
            return forward
    """))
    line = one_line_error(capsys, run_cli.main, [*BASE, "--seq-len", "10", "--packed", f"{plugin}:make_forward",
                                                 "--out", str(tmp_path / "t.h5")], "returned a meta tensor")
    assert "cannot run ESM-2" not in line


def test_nan_output_is_nan_data_not_a_mismatch():
    x = torch.randn(5, 4)
    x[2, 1] = float("nan")
    x[3, 0] = float("inf")
    assert output_vs_final_norm("packed", x, x.clone()) is None
    moved = x.clone()
    moved[2, 1], moved[1, 1] = 0.5, float("nan")
    note = output_vs_final_norm("packed", x, moved)
    assert "NaN/Inf at different places" in note and "nan" not in note.split("(")[1].split(")")[0].split("at most")[1]
    off = x.clone()
    off[0, 0] += 1
    assert "max |diff| 1" in output_vs_final_norm("packed", x, off)


def test_out_on_a_pseudo_file_system_is_not_a_memory_problem(capsys):
    line = one_line_error(capsys, run_cli.main, [*BASE, "--seq-len", "10", "--out", "/proc/x.h5"], "pseudo file system")
    assert "larger machine" not in line and "GB free" not in line


@pytest.mark.parametrize("tool, target, fragment", [
    ("bundle", "make_bundle", "no bundle was written"),
    ("plot", "plot_trace", "no plots were written"),
])
def test_an_interrupted_bundle_or_plot_says_what_was_not_written(tmp_path, capsys, monkeypatch, traces, tool, target, fragment):
    module = bundle_cli if tool == "bundle" else plot_cli

    def stopped(*args, **kwargs):
        raise Interrupted(2)

    monkeypatch.setattr(module, target, stopped)
    assert module.main([str(traces[0]), "-o", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == f"tracer: interrupted ({fragment})"


def test_estimate_counts_the_metric_sums_of_every_tap_and_token():
    """The per-token sums every pair keeps for the whole run (and the float64 table finished from
    them) grow with taps x tokens, and are part of the memory peak (scaled down: 1,000 sequences)."""
    from tracer.esm.models import architecture
    from tracer.runner import preflight
    from tracer.taps import select_taps

    arch = architecture(SMALL)
    names = select_taps(arch.num_layers, None, None)
    small, large = ([402] * k for k in (10, 1000))  # sequences of 400 residues
    est = [preflight.estimate(arch, t, names, torch.bfloat16, torch.float32, metrics_only=True, max_batch_tokens=4096) for t in (small, large)]
    sums = preflight.metric_sums_bytes(len(names), sum(large), 4, torch.float32)
    assert sums == len(names) * sum(large) * (4 * 5 * 4 + 5 * 8 + 3 * 8 + 4 * 3 * 4)  # float32 sums, float64 finishing
    assert est[1].host_peak >= sums + est[1].held_tap_bytes + est[1].weights_bytes
    assert est[1].host_peak - est[0].host_peak > 0.9 * (sums - preflight.metric_sums_bytes(len(names), sum(small), 4, torch.float32))
