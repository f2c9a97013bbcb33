import pytest

from tracer.errors import TracerError
from tracer.inputs.sequences import debug_batch, make_batch, motif_sequence, read_fasta


def test_debug_batch_is_the_user_log_batch():
    batch = debug_batch(400)
    assert [(s.id, s.length) for s in batch] == [("tiny", 3), ("small", 8), ("medium", 160), ("large", 400)]
    assert batch[0].residues == "MKT"
    assert batch[3].residues == "MKTAYIAK" * 50
    assert [s.n_tokens for s in batch] == [5, 10, 162, 402]


def test_motif_cut_to_length():
    assert motif_sequence(10) == "MKTAYIAKMK"


def test_mask_token_counts_as_one_residue():
    (s,) = make_batch([("m", "MK<mask>T")])
    assert s.length == 4


@pytest.mark.parametrize(
    "pairs, fragment",
    [
        ([("a", "MKJT")], "'a' has 'J' at residue 3"),
        ([("a", "MKtT")], "lower case"),
        ([("a", "")], "'a' is empty"),
        ([("a", "MK"), ("a", "TT")], "duplicate sequence id 'a'"),
        ([("", "MK")], "empty id"),
        ([], "no sequences"),
    ],
    ids=["bad-char", "lowercase", "empty", "duplicate", "no-id", "none"],
)
def test_bad_sequences_are_named(pairs, fragment):
    with pytest.raises(TracerError, match=fragment):
        make_batch(pairs)


def test_long_sequences_warn_and_proceed():
    with pytest.warns(UserWarning, match="more than the 1022"):
        (s,) = make_batch([("big", "A" * 1023)])
    assert s.length == 1023


def test_read_fasta(tmp_path):
    f = tmp_path / "x.fasta"
    f.write_text(">first some description\nMKT\nAYI\n\n>second\nGG\n")
    batch = read_fasta(f)
    assert [(s.id, s.residues) for s in batch] == [("first", "MKTAYI"), ("second", "GG")]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "holds no sequences"),
        ("MKT\n>a\nMK\n", "residues before the first '>'"),
        (">\nMK\n", "header has no id"),
        (">a\n\n>b\nMK\n", "'a' is empty"),
        (">a\nMK\n>a\nMK\n", "duplicate sequence id"),
        (">a\nMK1\n", "'1' at residue 3"),
    ],
    ids=["empty-file", "no-header", "no-id", "empty-seq", "dup", "digit"],
)
def test_malformed_fasta(tmp_path, text, fragment):
    f = tmp_path / "x.fasta"
    f.write_text(text)
    with pytest.raises(TracerError, match=fragment):
        read_fasta(f)


def test_missing_fasta(tmp_path):
    with pytest.raises(TracerError, match="does not exist"):
        read_fasta(tmp_path / "nope.fasta")


def test_binary_fasta(tmp_path):
    f = tmp_path / "x.fasta"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TracerError, match="cannot read FASTA"):
        read_fasta(f)
