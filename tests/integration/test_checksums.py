"""Nothing invented: a damaged trace gives one line, never a made-up verdict.

Every dataset carries a CRC-32 written with it; readers verify them, the comparator cross-checks
stored against recomputed metrics, and a seeded fuzz test flips bytes all over a small trace.
"""

import json
import random
import shutil

import h5py
import numpy as np
import pytest

from tests.conftest import run
from tracer import bundle as bundle_cli
from tracer import compare
from tracer import plot as plot_cli
from tracer.inputs.sequences import debug_batch
from tracer.store.binding import seed
from tracer.store.trace_file import checksum, open_trace


def outcome(capsys, main, argv):
    """(exit code, stdout, stderr lines) of a CLI main run in-process."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def assert_one_line(code, err, fragment=""):
    assert code == 2 and len(err) == 1 and err[0].startswith("tracer: error: ") and fragment in err[0], (code, err)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A small bfloat16 trace with a reference (3 paths x 50 taps x 35 tokens)."""
    d = tmp_path_factory.mktemp("clean")
    return run(d, debug_batch(20), dtype="bfloat16").path


def copy(clean, tmp_path, name="x.h5"):
    dest = tmp_path / name
    shutil.copy(clean, dest)
    return dest


def tap_offset(path, key):
    with h5py.File(path) as f:
        ds = f[key]
        return ds.id.get_offset(), ds.id.get_storage_size()


def flip(path, offset, mask=0x40):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def test_every_dataset_has_a_checksum_written_with_it(clean):
    with h5py.File(clean) as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert len(names) > 150
        run_id = f.attrs["run_id"]
        for n in names:  # bound to the run and the name (tracer.store.binding)
            assert int(f[n].attrs["crc32"]) == checksum(f[n][()], seed(run_id, n)) != checksum(f[n][()]), n
        assert int(f.attrs["meta_crc32"]) == checksum(f.attrs["meta"], seed(run_id, "meta"))
        assert sorted(json.loads(f.attrs["manifest"])["datasets"]) == sorted(names)
    with open_trace(clean) as t:
        assert t.verify() == len(names)


def test_one_flipped_byte_of_a_tap_is_named_not_judged(clean, tmp_path, capsys):
    x = copy(clean, tmp_path)
    offset, size = tap_offset(x, "taps/packed/layers.2.ffn_out")
    flip(x, offset + size // 2)
    code, out, err = outcome(capsys, compare.main, [str(x)])
    assert_one_line(code, err, "/taps/packed/layers.2.ffn_out fails its checksum")
    assert out == ""  # no verdict
    code, out, err = outcome(capsys, compare.main, [str(x), "--verify", "--stored"])
    assert_one_line(code, err, "fails its checksum")
    code, out, err = outcome(capsys, compare.main, [str(clean), str(x)])  # two traces
    assert_one_line(code, err, "fails its checksum")


def test_verify_passes_on_a_clean_trace(clean, capsys):
    code, out, err = outcome(capsys, compare.main, [str(clean), "--verify"])
    assert code == 0 and "checksums verified" in err[0] and "\nverdict" in out


def test_verify_reads_each_tap_once_when_the_metrics_are_recomputed(clean, tmp_path, capsys, monkeypatch):
    """``--verify`` leaves the taps to the recompute, which checks each one as it reads it."""
    from tracer.store.trace_file import Trace

    checked = []
    real = Trace.check
    monkeypatch.setattr(Trace, "check", lambda self, ds, data: (checked.append(ds.name), real(self, ds, data))[1])
    code, out, err = outcome(capsys, compare.main, [str(clean), "--verify"])
    assert code == 0 and not [n for n in checked if n.startswith("/taps/")]
    x = copy(clean, tmp_path)  # a damaged tap is still named, by the recompute's own check
    offset, size = tap_offset(x, "taps/unpacked/layers.1.ctx")
    flip(x, offset + size // 2)
    code, out, err = outcome(capsys, compare.main, [str(x), "--verify"])
    assert_one_line(code, err[-1:], "/taps/unpacked/layers.1.ctx fails its checksum")  # after the line of verified non-tap data
    assert out == ""


def test_edited_sequence_lengths_are_one_line(clean, tmp_path, capsys):
    x = copy(clean, tmp_path)
    with h5py.File(x, "r+") as f:
        f["sequences/lengths"][3] = 7
    for main, extra in ((compare.main, []), (plot_cli.main, ["-o", str(tmp_path / "p")]), (bundle_cli.main, ["-o", str(tmp_path / "b")])):
        code, out, err = outcome(capsys, main, [str(x), *extra])
        assert_one_line(code, err, "sequences/lengths fails its checksum")
    with h5py.File(x, "r+") as f:  # the checksum updated too: the records still disagree
        f["sequences/lengths"].attrs["crc32"] = checksum(f["sequences/lengths"][()], seed(f.attrs["run_id"], "sequences/lengths"))
    code, out, err = outcome(capsys, compare.main, [str(x)])
    assert_one_line(code, err, "sequence records")


def test_stored_metrics_are_cross_checked_against_the_tensors(clean, tmp_path, capsys):
    x = copy(clean, tmp_path)
    with h5py.File(x, "r+") as f:
        ds = f["metrics/packed-vs-unpacked/rel_l2"]
        values = ds[()]
        values[5, 10] *= 3
        ds[...] = values
        ds.attrs["crc32"] = checksum(values, seed(f.attrs["run_id"], ds.name))  # consistent checksum: only the cross-check can tell
    code, out, err = outcome(capsys, compare.main, [str(x)])
    assert_one_line(code, err, "the stored packed-vs-unpacked rel_l2 of")
    assert "but the tensors give" in err[0] and out == ""


def test_a_bit_flipped_dtype_is_caught(clean, tmp_path, capsys):
    x = copy(clean, tmp_path)
    with h5py.File(x, "r+") as f:
        f["taps/packed/layers.1.ctx"].attrs["dtype"] = "float16"  # same bytes, other meaning
    code, out, err = outcome(capsys, compare.main, [str(x)])
    assert_one_line(code, err, "is stored as uint16, not as a float16 tap")


def _data_ranges(path):
    with h5py.File(path) as f:
        spans = []
        f.visititems(lambda n, o: spans.append((o.id.get_offset(), o.id.get_storage_size()))
                     if isinstance(o, h5py.Dataset) and o.id.get_offset() is not None else None)
    return spans


CASES = 120


def test_fuzz_random_corruption_never_gives_a_traceback_or_a_verdict(clean, tmp_path, capsys):
    """Seeded, bounded: 120 damaged copies (one to three random bytes XORed with a random
    non-zero value): a third in the first 4 KiB (superblock, root group), a third elsewhere
    outside dataset data (object headers, B-trees, heaps, attributes), a third anywhere. Each
    must give one ``tracer: error:`` line, or exactly the clean trace's output (a byte nobody
    reads). Never a traceback, never another verdict."""
    rng = random.Random(20261125)
    size = clean.stat().st_size
    data = _data_ranges(clean)
    inside = np.zeros(size, dtype=bool)
    for off, n in data:
        inside[off:off + n] = True
    meta_bytes = np.flatnonzero(~inside)
    x = tmp_path / "fuzz.h5"
    shutil.copy(clean, x)
    code, reference, _ = outcome(capsys, compare.main, [str(x), "--json"])
    assert code == 0
    results = {"error": 0, "same": 0}
    for case in range(CASES):
        shutil.copy(clean, x)
        kind = case % 3
        for _ in range(rng.randint(1, 3)):
            if kind == 0:
                offset = rng.randrange(min(4096, size))
            elif kind == 1:
                offset = int(meta_bytes[rng.randrange(len(meta_bytes))])
            else:
                offset = rng.randrange(size)
            flip(x, offset, rng.randrange(1, 256))
        code, out, err = outcome(capsys, compare.main, [str(x), "--json"])
        if code == 0:
            assert out == reference, f"case {case}: a verdict from a damaged file"
            results["same"] += 1
        else:
            assert_one_line(code, err)
            assert out == ""
            results["error"] += 1
    print(results)
    assert results["error"] >= CASES // 2, results  # most damage is detected, none is judged
