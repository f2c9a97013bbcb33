"""Input sequences: the debug-log batch, FASTA files, and validation against the ESM alphabet.

Token positions used everywhere in tracer are 0-based positions in the model's token stream:
0 is ``<cls>``, residues are 1..L, and L+1 is ``<eos>``.

Example::

    >>> from tracer.inputs.sequences import debug_batch
    >>> [(s.id, s.length) for s in debug_batch(400)]
    [('tiny', 3), ('small', 8), ('medium', 160), ('large', 400)]
"""

from __future__ import annotations

import gzip
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from esm.constants import proteinseq_toks

from tracer.errors import TracerError

MOTIF = "MKTAYIAK"
"""The repeated motif of the failing batch in ``USER-DEBUG-LOG.md``."""

RESIDUES = frozenset(proteinseq_toks["toks"])
"""Single-character tokens of the ESM-2 alphabet (20 amino acids plus X B U Z O . -)."""

MASK = "<mask>"
"""The mask token may appear literally in a sequence; it counts as one residue position."""

TRAINED_MAX_RESIDUES = 1022
"""ESM-2 was trained on crops of 1024 tokens (1022 residues + <cls> + <eos>)."""

MAX_RESIDUES = 100_000
"""The longest sequence tracer takes: ~100x ESM-2's training crop and ~3x the longest known
protein (titin, 34,350). Longer is refused up front, before a string of that size is built."""


@dataclass(frozen=True)
class Sequence:
    """One protein sequence.

    Attributes:
        id: name used in reports (unique within a batch).
        residues: the residue string as given (may contain ``<mask>``).
        length: number of residue positions L (``<mask>`` counts as one).
    """

    id: str
    residues: str
    length: int

    @property
    def n_tokens(self) -> int:
        """Tokens in the model's stream: ``<cls>`` + L residues + ``<eos>``."""
        return self.length + 2


def motif_sequence(length: int) -> str:
    """``MKTAYIAK`` repeated and cut to ``length`` residues."""
    return (MOTIF * (length // len(MOTIF) + 1))[:length]


def debug_batch(large_length: int = 400) -> list[Sequence]:
    """The failing batch of the user debug log, packed in this order.

    ``tiny`` (3), ``small`` (8), ``medium`` (160) and ``large`` (``large_length``), each made
    of the motif ``MKTAYIAK`` repeated and cut to length.
    """
    if not 1 <= large_length <= MAX_RESIDUES:
        raise TracerError(f"--seq-len must be 1 to {MAX_RESIDUES:,} residues, got {large_length}")
    spec = [("tiny", 3), ("small", 8), ("medium", 160), ("large", large_length)]
    return make_batch([(name, motif_sequence(n)) for name, n in spec])


def count_residues(seq_id: str, residues: str) -> int:
    """Validate ``residues`` against the ESM alphabet and return its length L.

    Raises:
        TracerError: naming the sequence, the 1-based residue position and the character.
    """
    length = 0
    i = 0
    while i < len(residues):
        if residues.startswith(MASK, i):
            i += len(MASK)
        elif residues[i] in RESIDUES:
            i += 1
        else:
            char = residues[i]
            hint = " (lower case: write residues in upper case)" if char.upper() in RESIDUES else ""
            raise TracerError(
                f"sequence {seq_id!r} has {char!r} at residue {length + 1}, which is not in the "
                f"ESM alphabet{hint}; allowed: {''.join(sorted(RESIDUES))} and {MASK}"
            )
        length += 1
    return length


def make_batch(pairs: list[tuple[str, str]]) -> list[Sequence]:
    """Validate ``(id, residues)`` pairs into :class:`Sequence` records.

    Rules: at least one sequence; ids non-empty and unique; every sequence non-empty and in
    the ESM alphabet. Sequences longer than ESM-2's training crop (1022 residues) are traced
    with a warning: the comparison is still valid numerics, but the model never saw such
    lengths.
    """
    if not pairs:
        raise TracerError("no sequences to trace")
    seen: set[str] = set()
    batch = []
    for seq_id, residues in pairs:
        if not seq_id:
            raise TracerError("a sequence has an empty id")
        if not seq_id.isprintable():
            bad = next(c for c in seq_id if not c.isprintable())
            raise TracerError(
                f"sequence id {seq_id!r} holds the control character {bad!r}; ids are printable text "
                "(the trace stores them as strings, and a NUL ends a string there)"
            )
        if seq_id in seen:
            raise TracerError(f"duplicate sequence id {seq_id!r}: ids must be unique")
        seen.add(seq_id)
        if not residues:
            raise TracerError(f"sequence {seq_id!r} is empty")
        length = count_residues(seq_id, residues)
        if length > MAX_RESIDUES:
            raise TracerError(f"sequence {seq_id!r} has {length:,} residues; tracer takes at most {MAX_RESIDUES:,} per sequence")
        if length > TRAINED_MAX_RESIDUES:
            warnings.warn(
                f"sequence {seq_id!r} has {length} residues, more than the {TRAINED_MAX_RESIDUES} "
                "ESM-2 was trained on; tracing it anyway",
                stacklevel=2,
            )
        batch.append(Sequence(seq_id, residues, length))
    return batch


def read_fasta(path: str | Path) -> list[Sequence]:
    """Read a FASTA file: ``>id [description]`` header lines, residues on the following lines.

    Blank lines and ``;`` comment lines are ignored; the id is the first word of the header.
    gzip-compressed files (recognised by their magic bytes, whatever the name) are read as
    such; a UTF-8 byte-order mark is skipped.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise TracerError(f"FASTA file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise TracerError(f"FASTA file {str(path)!r} is a directory") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise TracerError(f"cannot read FASTA file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from None
    except UnicodeDecodeError as e:
        raise TracerError(f"cannot read FASTA file {str(path)!r}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    pairs: list[tuple[str, str]] = []
    chunks: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if pairs:
                pairs[-1] = (pairs[-1][0], "".join(chunks))
            words = line[1:].split()
            if not words:
                raise TracerError(f"{path}:{lineno}: FASTA header has no id")
            pairs.append((words[0], ""))
            chunks = []
        elif not pairs:
            raise TracerError(
                f"{path}:{lineno}: not a FASTA file (residues before the first '>' header)"
            )
        else:
            chunks.append(line)
    if not pairs:
        raise TracerError(f"FASTA file {str(path)!r} holds no sequences")
    pairs[-1] = (pairs[-1][0], "".join(chunks))
    return make_batch(pairs)
