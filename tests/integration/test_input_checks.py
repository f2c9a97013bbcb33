"""Every input checked before the model loads: flags, FASTA files, checkpoints.

Each bad input is one ``error`` line and exit 2; the flag checks must happen before any model
is loaded (``load_model`` is replaced by a tripwire).
"""

import gzip
import struct
import zipfile

import pytest
import torch

from tests.conftest import BASE
from tests.unit.test_models import TINY, write_checkpoint
from tracer import bench as bench_cli
from tracer import bundle as bundle_cli
from tracer.esm import models
from tracer import run as run_cli
from tracer.errors import TracerError
from tracer.esm.models import build_random, load_model
from tracer.inputs.sequences import read_fasta



def one_line(capsys, main, argv, fragment, prefix="error: "):
    """Exit 2 and one stderr line (``tracer: error: ...``, or argparse's ``<prog>: error: ...``)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and prefix in err[0] and fragment in err[0], (code, err)
    return err[0]


@pytest.fixture
def no_model_load(monkeypatch):
    def tripwire(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", tripwire)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--layers", "3-1"], "the range 3-1 is empty"),
        (["--layers", ""], "--layers is empty"),
        (["--taps", ""], "--taps is empty"),
        (["--taps", "ctx,"], "has an empty name"),
        (["--out", ""], "--out is empty"),
        (["--min-cos", "nan"], "a cosine similarity lies in [-1, 1], got 'nan'"),
        (["--min-cos", "2"], "got '2'"),
        (["--max-rel-l2", "inf"], "must be a finite positive number"),
        (["--max-rel-l2", "ctx=nan"], "must be a finite positive number"),
        (["--noise-factor", "inf"], "K must be a finite positive number"),
        (["--seed", "99999999999999999999"], "--seed takes integers from 0 to 18,446,744,073,709,551,615"),
        (["--seed", "-1"], "--seed takes integers from 0 to 18,446,744,073,709,551,615"),
        (["--layers", "0-999999999999"], "layer 999999999999 does not exist"),
        (["--layers", "6"], "layer 6 does not exist; this model has layers 0..5"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, list) else None,
)
def test_bad_flags_are_one_line_before_the_model_loads(tmp_path, capsys, no_model_load, argv, fragment):
    one_line(capsys, run_cli.main, [*BASE, "--out", str(tmp_path / "t.h5"), *argv], fragment)
    assert not list(tmp_path.iterdir())


def test_seq_len_100000_on_cpu_is_refused_before_loading(tmp_path, capsys, no_model_load):
    """The bound is the pre-flight estimate (memory the run needs vs available);
    the only other line is the >1022-residue warning."""
    assert run_cli.main([*BASE, "--seq-len", "100000", "--out", str(tmp_path / "t.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("tracer: warning: sequence 'large' has 100000 residues") and len(err) == 2, err
    assert err[1].startswith("tracer: error: ") and "pre-flight estimate, nothing loaded yet" in err[1], err
    assert not list(tmp_path.iterdir())


def test_bench_and_bundle_numbers(tmp_path, capsys):
    one_line(capsys, bench_cli.main, ["--repeats", "0"], "--repeats takes integers from 1 to 1,000")
    one_line(capsys, bundle_cli.main, ["x.h5", "-o", str(tmp_path / "b"), "--max-mb", "inf"], "--max-mb must be a number above 1 and at most 1e+06")
    one_line(capsys, bundle_cli.main, ["x.h5", "-o", str(tmp_path / "b"), "--max-mb", "nan"], "--max-mb must be a number above 1 and at most 1e+06")


# ---------------------------------------------------------------------------------------------
# FASTA


def test_gzipped_fasta_with_bom_and_comments(tmp_path):
    text = "\ufeff;a comment line\n>p1 first\nMKT\n;another\nAYI\n>p2\nAK\n"
    plain = tmp_path / "in.fasta"
    plain.write_text(text, encoding="utf-8")
    packed = tmp_path / "in.fasta.gz"
    packed.write_bytes(gzip.compress(text.encode("utf-8")))
    for path in (plain, packed):
        seqs = read_fasta(path)
        assert [(s.id, s.residues) for s in seqs] == [("p1", "MKTAYI"), ("p2", "AK")]


def test_broken_gzip_and_non_utf8_fasta_are_one_line(tmp_path):
    bad = tmp_path / "bad.fasta.gz"
    bad.write_bytes(gzip.compress(b">p\nMKT\n")[:-6])
    with pytest.raises(TracerError, match="cannot read FASTA file"):
        read_fasta(bad)
    latin = tmp_path / "latin.fasta"
    latin.write_bytes(b">p\xe9\nMKT\n")
    with pytest.raises(TracerError, match="cannot read FASTA file .*: not UTF-8 text"):
        read_fasta(latin)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _checkpoint(tmp_path, change=None):
    path = tmp_path / "c.pt"
    model = build_random(TINY, 0)
    data = write_checkpoint(path, model, TINY)
    if change is not None:
        change(data["model"])
        torch.save(data, path)
    return path


KEY = "encoder.sentence_encoder.layers.0.fc1.weight"


def test_sparse_tensor_is_one_line(tmp_path):
    path = _checkpoint(tmp_path, lambda s: s.__setitem__(KEY, s[KEY].to_sparse()))
    with pytest.raises(TracerError, match="layers.0.fc1.weight is a sparse_coo tensor; tracer needs dense weights"):
        load_model(None, str(path))


def test_meta_tensor_is_refused_not_zero_filled(tmp_path):
    path = _checkpoint(tmp_path, lambda s: s.__setitem__(KEY, torch.empty(s[KEY].shape, device="meta")))
    with pytest.raises(TracerError, match="layers.0.fc1.weight is a meta tensor"):
        load_model(None, str(path))


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    path = _checkpoint(tmp_path, lambda s: s.__setitem__(KEY, s[KEY][:, :32].clone()))
    with pytest.raises(TracerError, match=r"layers.0.fc1.weight has shape \(256, 32\) in the file, \(256, 64\) expected"):
        load_model(None, str(path))


def test_bad_zip_crc_is_one_line(tmp_path):
    path = _checkpoint(tmp_path)
    with zipfile.ZipFile(path) as z:  # the largest tensor record
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start + info.file_size // 2)
        b = f.read(1)[0]
        f.seek(start + info.file_size // 2)
        f.write(bytes([b ^ 0x10]))
    with pytest.raises(TracerError, match="fail their zip CRC-32 check"):
        load_model(None, str(path))


def test_a_good_checkpoint_still_loads(tmp_path):
    model, arch, weights = load_model(None, str(_checkpoint(tmp_path)))
    assert arch.num_layers == 2 and weights.source == "checkpoint"
