"""examples/train_small_esm.py: a seeded, loadable fair-esm checkpoint in seconds on the CPU."""

import importlib.util
import json
from pathlib import Path

import torch

from tracer.esm.models import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_small_esm.py"
TINY = ["--layers", "2", "--dim", "64", "--heads", "4", "--steps", "2", "--batch", "4",
        "--min-len", "8", "--max-len", "24", "--offsets", "3,7", "--device", "cpu", "--log-every", "1"]


def _script():
    spec = importlib.util.spec_from_file_location("train_small_esm", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_corpus_is_periodic_up_to_the_noise():
    mod = _script()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(20, generator=g)
    seq = mod.corpus_batch(g, 1, 50, 50, [7], perm, noise=0.0)[0]
    assert all(seq[i] == perm[seq[i - 7]] for i in range(7, 50))


def test_checkpoint_loads_in_tracer_and_is_reproducible(tmp_path, capsys):
    mod = _script()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert mod.main(["--out", str(a), *TINY]) == 0
    assert mod.main(["--out", str(b), *TINY]) == 0
    model, arch, weights = load_model(weights=str(a))
    assert (arch.num_layers, arch.embed_dim, arch.heads) == (2, 64, 4) and weights.source == "checkpoint"
    other, _, _ = load_model(weights=str(b))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), other.state_dict().values()))
    log = json.loads(a.with_suffix(".json").read_text())
    assert len(log["loss"]) == 2 and log["settings"]["seed"] == 0
    assert mod.main(["--out", str(a), *TINY]) == 2  # never overwritten without --force
    assert "exists" in capsys.readouterr().err
