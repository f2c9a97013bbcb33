"""Known bugs that can be planted on purpose, to prove the tracer finds them.

These are the mistakes packed ESM-2 implementations actually make. Each one is a switch of the
packed path (``Faults``); a :class:`Perturbation` can be planted in either path. The tests
assert that the comparator names the exact first layer, tap and token of each, and
``tracer.run --fault NAME`` plants one on any model (to validate the tool on the real
architecture before trusting it on a real bug).

Example::

    Faults(double_scale=True, layers=(3,))   # softmax scale applied twice, in layer 3 only
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from tracer.errors import TracerError


@dataclass(frozen=True)
class Perturbation:
    """Add a relative error ``eps`` (in L2 norm, in a seeded random direction) to one token, or
    to every token of the tap (``whole_tap``: each token gets exactly ``eps``).

    Attributes:
        path: ``packed`` or ``unpacked``.
        tap: full tap name, e.g. ``layers.2.ffn_out``.
        sequence: canonical sequence index.
        token: token position within that sequence (0 = ``<cls>``).
        eps: size of the change relative to the token's norm.
        seed: seed of the direction.
        whole_tap: perturb every token of the tap (padding included on the padded side, where
            it is masked); ``sequence`` and ``token`` are then ignored.
    """

    path: str
    tap: str
    sequence: int
    token: int
    eps: float = 0.05
    seed: int = 0
    whole_tap: bool = False


@dataclass(frozen=True)
class Faults:
    """Switches of the packed path; all off by default.

    Attributes:
        positions_not_restarted: RoPE positions run on across sequence boundaries (0..N-1)
            instead of restarting at 0 for every sequence.
        positions_low_precision: RoPE positions rounded to bfloat16 before use (exact up to
            256; position 257 becomes 256, the first wrong token).
        double_scale: the softmax scale applied twice (q pre-scaled like fair-esm *and* the
            kernel's default ``1/sqrt(d)``).
        leak_across_sequences: attention over the whole packed stream, ignoring ``cu_seqlens``.
        skip_token_dropout_rescale: the embedding's ``0.88 / (1 - mask ratio)`` rescale skipped.
        layers: layers where the per-layer switches (positions, scale, leak) act; ``None`` = all.
        perturbations: :class:`Perturbation` s to add (either path).
    """

    positions_not_restarted: bool = False
    positions_low_precision: bool = False
    double_scale: bool = False
    leak_across_sequences: bool = False
    skip_token_dropout_rescale: bool = False
    layers: tuple[int, ...] | None = None
    perturbations: tuple[Perturbation, ...] = field(default_factory=tuple)

    def at(self, layer: int) -> bool:
        """Whether the per-layer switches act at ``layer``."""
        return self.layers is None or layer in self.layers

    def perturbations_of(self, path: str) -> list[Perturbation]:
        return [p for p in self.perturbations if p.path == path]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    @property
    def switches(self) -> list[str]:
        """The names of the fault switches that are on (the boolean fields set to ``True``)."""
        return [f.name for f in fields(self) if getattr(self, f.name) is True]

    def describe(self) -> str:
        on = list(self.switches)
        on += [f"perturb {p.path} {p.tap} " + ("every token" if p.whole_tap else f"seq {p.sequence} token {p.token}") + f" eps {p.eps}"
               for p in self.perturbations]
        if self.layers is not None and on:
            on.append(f"layers {list(self.layers)}")
        return ", ".join(on) or "none"


FAULT_NAMES = {
    "positions-not-restarted": "positions_not_restarted",
    "positions-bf16": "positions_low_precision",
    "double-scale": "double_scale",
    "leak": "leak_across_sequences",
    "skip-token-dropout": "skip_token_dropout_rescale",
}


def parse_faults(specs: list[str], sequence_ids: list[str]) -> Faults:
    """Faults from CLI words.

    ``NAME`` or ``NAME@L1,L2`` for the switches in :data:`FAULT_NAMES` (the ``@`` layers apply
    to all per-layer switches), and ``perturb:PATH:TAP:SEQUENCE_ID:TOKEN[:EPS]``.
    """
    switches: dict[str, bool] = {}
    layers: set[int] = set()
    perturbations = []
    for spec in specs:
        if spec.startswith("perturb:"):
            parts = spec.split(":")
            if len(parts) not in (5, 6) or parts[1] not in ("packed", "unpacked"):
                raise TracerError(
                    f"--fault {spec!r}: expected perturb:packed|unpacked:TAP:SEQUENCE_ID:TOKEN[:EPS]"
                )
            if parts[3] not in sequence_ids:
                raise TracerError(f"--fault {spec!r}: no sequence {parts[3]!r}; have {', '.join(sequence_ids)}")
            try:
                token = int(parts[4])
                eps = float(parts[5]) if len(parts) == 6 else 0.05
            except ValueError:
                raise TracerError(f"--fault {spec!r}: TOKEN must be an integer and EPS a number") from None
            perturbations.append(Perturbation(parts[1], parts[2], sequence_ids.index(parts[3]), token, eps))
            continue
        name, _, at = spec.partition("@")
        if name not in FAULT_NAMES:
            raise TracerError(
                f"unknown fault {name!r}; known: {', '.join(FAULT_NAMES)}, perturb:PATH:TAP:SEQ:TOKEN[:EPS]"
            )
        switches[FAULT_NAMES[name]] = True
        if at:
            try:
                layers.update(int(x) for x in at.split(","))
            except ValueError:
                raise TracerError(f"--fault {spec!r}: layers after @ must be integers") from None
    return Faults(**switches, layers=tuple(sorted(layers)) or None, perturbations=tuple(perturbations))
