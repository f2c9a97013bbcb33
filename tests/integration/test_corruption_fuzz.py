"""Seeded corruption fuzz of a trace's structure (issue 17): datasets swapped in from another
trace of the same sequences, deleted datasets and groups, datasets renamed into each other,
records transplanted, extra datasets. Every corrupted file is one ``tracer: error:`` line from
``tracer.compare`` (and, for a sample, from ``tracer.plot``), never a verdict.

(Byte flips are fuzzed in ``test_checksums.py``.)"""

import random
import shutil

import h5py

from tracer import compare
from tracer import plot as plot_cli

CASES = 40
KINDS = ("swap-in", "delete-dataset", "delete-group", "rename-pair", "record", "extra")


def _datasets(path) -> list[str]:
    with h5py.File(path) as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return sorted(names)


def _corrupt(x, other, kind: str, rng: random.Random, names: list[str]) -> str:
    with h5py.File(x, "r+") as f, h5py.File(other) as g:
        if kind == "swap-in":  # one dataset (with its attributes) from the other run
            name = rng.choice(names)
            del f[name]
            g.copy(g[name], f, name=name)
        elif kind == "delete-dataset":
            name = rng.choice(names)
            del f[name]
        elif kind == "delete-group":
            groups = sorted({n.rsplit("/", 1)[0] for n in names if "/" in n})
            name = rng.choice(groups)
            del f[name]
        elif kind == "rename-pair":  # two datasets of the same shape and type, names exchanged
            while True:
                a, b = rng.sample(names, 2)
                if f[a].shape == f[b].shape and f[a].dtype == f[b].dtype:
                    break
            f.move(a, "tmp")
            f.move(b, a)
            f.move("tmp", b)
            name = f"{a}<->{b}"
        elif kind == "record":  # meta, summary or manifest of the other run, with its checksum
            name = rng.choice(("meta", "summary", "manifest"))
            f.attrs[name], f.attrs[f"{name}_crc32"] = g.attrs[name], g.attrs[f"{name}_crc32"]
        else:  # a dataset the run did not write
            name = rng.choice(names) + "-extra"
            f[name] = [1.0]
    return f"{kind} {name}"


def test_fuzz_structural_corruption_is_always_a_one_line_refusal(seed_pair, tmp_path, capsys):
    rng = random.Random(20261201)
    names = _datasets(seed_pair[0])
    assert names == _datasets(seed_pair[1])
    x = tmp_path / "x.h5"
    for case in range(CASES):
        shutil.copy(seed_pair[0], x)
        what = _corrupt(x, seed_pair[1], KINDS[case % len(KINDS)], rng, names)
        code = compare.main([str(x), "--json"])
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert code == 2 and captured.out == "", f"case {case} ({what}): a verdict from a corrupted file"
        assert len(err) == 1 and err[0].startswith("tracer: error: "), (case, what, err)
        if case % 8 == 0:
            assert plot_cli.main([str(x), "-o", str(tmp_path / f"p{case}")]) == 2, what
            assert len(capsys.readouterr().err.strip().splitlines()) == 1
            assert not (tmp_path / f"p{case}").exists()
