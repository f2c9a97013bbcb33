"""Shared test helpers: small seeded random ESM-2 models and in-process traced runs.

Every model here is fair-esm's ESM-2 architecture with seeded random weights (no checkpoint
download): ``esm2_t6_8M_UR50D`` (6 layers, 320 dims, 20 heads) unless a test says otherwise.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

from tracer.inputs.sequences import debug_batch, make_batch, motif_sequence
from tracer.runner.config import RunConfig
from tracer.runner.execute import trace

SMALL = "esm2_t6_8M_UR50D"
BASE = ["--model", SMALL, "--weights", "random", "--device", "cpu", "--quiet"]
"""CLI arguments of a quiet CPU run of the small random model."""

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# seeded random weights are cached (tracer.esm.models.random_cache_path): keep the tests' cache out of ~/.cache
os.environ.setdefault("TRACER_CACHE_DIR", tempfile.mkdtemp(prefix="tracer-test-cache-"))


def mixed_batch(long: int = 300):
    """A 1-residue, a short and a long sequence (the long one crosses position 256)."""
    return make_batch([("one", "M"), ("short", motif_sequence(12)), ("long", motif_sequence(long))])


def run(tmp_path, sequences=None, name="trace.h5", **kwargs):
    """A quiet in-process ``tracer.run`` on the CPU with random weights of the small model."""
    config = dict(model=SMALL, weights="random", device="cpu", out=str(tmp_path / name))
    config.update(kwargs)
    return trace(RunConfig(**config), sequences if sequences is not None else mixed_batch(), quiet=True)


@pytest.fixture
def small_model():
    from tracer.esm.models import load_model

    model, arch, _ = load_model(SMALL, "random", seed=0)
    return model, arch


TINY_ARCH = ("custom", 2, 64, 4)
"""A 2-layer, 64-dim, 4-head ESM-2 (head dim 16): campaigns run many traces on it."""


@pytest.fixture
def tiny():
    """The 2-layer model with seeded random weights, as ``load_model`` returns a model: (model, arch, weights)."""
    from tracer.esm.models import Architecture, Weights, build_random, fingerprint

    arch = Architecture(*TINY_ARCH)
    model = build_random(arch, seed=0)
    return model, arch, Weights("random", None, 0, fingerprint(model))


def campaign_config(**kw) -> RunConfig:
    """The base configuration of campaign tests: random weights, CPU, bfloat16."""
    return RunConfig(**{"weights": "random", "device": "cpu", "dtype": "bfloat16", **kw})


def one_line_error(capsys, main, argv, fragment, code=2):
    """Run a CLI main in-process; assert exit code, exactly one stderr line, the fragment."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("tracer: error: "), err
    assert fragment in err[0], err[0]
    return err[0]


SIGNALS_TO_RESET = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def default_signals():
    """``preexec_fn`` of a child: default dispositions, whatever the test runner's shell set
    (a background job inherits SIG_IGN for SIGINT, nohup for SIGHUP)."""
    for s in SIGNALS_TO_RESET:
        signal.signal(s, signal.SIG_DFL)


PAUSE_IN_TORCH = textwrap.dedent("""
    import sys, time
    class Pause:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                print("PAUSED IN IMPORT TORCH", file=sys.stderr, flush=True)
                time.sleep(30)
            return None
    sys.meta_path.insert(0, Pause())
""")
"""A sitecustomize that pauses ``import torch`` and says so, so a signal lands mid-import."""


def signal_while_torch_imports(tmp_path, module: str, sig: int) -> tuple[int, str]:
    """Run ``python -m MODULE --help``, send ``sig`` while it imports torch; (return code, stderr)."""
    (tmp_path / "sitecustomize.py").write_text(PAUSE_IN_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-m", module, "--help"], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env, preexec_fn=default_signals)
    try:
        assert p.stderr.readline().strip() == "PAUSED IN IMPORT TORCH"
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, err


@pytest.fixture(scope="session")
def seed_pair(tmp_path_factory):
    """Two small bfloat16 traces with a reference, of the same sequences, weights seeds 0 and 1."""
    d = tmp_path_factory.mktemp("pair")
    a = run(d, debug_batch(20), name="seed0.h5", dtype="bfloat16").path
    b = run(d, debug_batch(20), name="seed1.h5", dtype="bfloat16", seed=1).path
    return a, b
