"""Plots, bug-report bundles and the notebook, on a small CPU trace."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import pytest

from tests.conftest import run
from tracer.inputs.sequences import debug_batch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    return run(tmp_path_factory.mktemp("trace"), debug_batch(300), dtype="bfloat16").path


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


def _valid_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def _valid_svg(path):
    head = Path(path).read_text()[:400]
    return "<svg" in head or head.startswith("<?xml")


def test_plot_command_writes_png_and_svg(small_trace, tmp_path):
    r = cli("tracer.plot", str(small_trace), "-o", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr
    names = {"curves", "sequences", "heatmap-packed-vs-unpacked", "heatmap-unpacked-vs-reference", "heatmap-packed-vs-reference",
             "positions"}
    for name in names:
        assert _valid_png(tmp_path / "plots" / f"{name}.png")
        assert _valid_svg(tmp_path / "plots" / f"{name}.svg")


def test_bundle_is_small_complete_and_rereadable(small_trace, tmp_path):
    out = tmp_path / "report"
    r = cli("tracer.bundle", str(small_trace), "-o", str(out))
    assert r.returncode == 0, r.stderr
    archive = tmp_path / "report.zip"
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < 25_000_000 and archive.stat().st_size < 25_000_000
    report = (out / "report.md").read_text()
    for fragment in ("First divergence", "Attribution", "## Diagnosis", "step-at-position", "## Run", "torch", "| layer | worst tap", "trace-slim.h5"):
        assert fragment in report
    with zipfile.ZipFile(archive) as z:
        assert {"report/report.md", "report/trace-slim.h5", "report/curves.png"} <= set(z.namelist())
    slim = out / "trace-slim.h5"
    assert h5py.is_hdf5(slim)
    with h5py.File(slim) as f:
        taps = json.loads(f.attrs["meta"])["slim"]["taps"]
        assert taps and taps[0] == "layers.0.q_rope"  # the diverging tap comes first
    original = cli("tracer.compare", str(small_trace), "--json")
    again = cli("tracer.compare", str(slim), "--json")
    assert again.returncode == 0, again.stderr
    a, b = json.loads(original.stdout), json.loads(again.stdout)
    for key in ("verdict", "first_divergence", "attribution", "diagnosis", "layers"):
        assert a[key] == b[key], key
    r = cli("tracer.plot", str(slim), "-o", str(tmp_path / "slim-plots"))
    assert r.returncode == 0, r.stderr


def test_bundle_respects_a_tight_budget(small_trace, tmp_path):
    from tracer.bundle import make_bundle

    folder, archive = make_bundle(small_trace, tmp_path / "b", max_mb=5)
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 5_000_000
    assert archive.stat().st_size <= 5_000_000


def test_notebook_runs_top_to_bottom(small_trace):
    import nbclient  # declared test extras ('.[test]'): missing means the set-up is broken, not a skip
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "explore_trace.ipynb", as_version=4)
    old = os.environ.get("TRACER_TRACE")
    os.environ["TRACER_TRACE"] = str(small_trace)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        if old is None:
            os.environ.pop("TRACER_TRACE")
        else:
            os.environ["TRACER_TRACE"] = old
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "FIRST DIVERGENCE" in text and "largest |packed - unpacked|" in text
    assert sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})) >= 4
