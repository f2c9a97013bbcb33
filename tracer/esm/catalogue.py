"""The ESM-2 architectures tracer knows (fair-esm names and shapes), and the record of which weights a run used."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from esm.model.esm2 import ESM2

from tracer.errors import TracerError



@dataclass(frozen=True)
class Architecture:
    """Shape of an ESM-2 model.

    Attributes:
        name: fair-esm model name (``esm2_t36_3B_UR50D``) or ``custom``.
        num_layers: transformer layers.
        embed_dim: residual stream width E.
        heads: attention heads H; the head dimension is ``embed_dim // heads``.
        token_dropout: whether the embedding is rescaled for masked tokens (all ESM-2 releases).
    """

    name: str
    num_layers: int
    embed_dim: int
    heads: int
    token_dropout: bool = True

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    def known(self) -> "Architecture":
        """The catalogue's architecture of this shape (its name), or this one if none has it."""
        return next((a for a in ARCHITECTURES.values() if a.same_shape(self)), self)

    def same_shape(self, other: "Architecture") -> bool:
        return (self.num_layers, self.embed_dim, self.heads, self.token_dropout) == (
            other.num_layers,
            other.embed_dim,
            other.heads,
            other.token_dropout,
        )

    def describe(self) -> str:
        return f"{self.num_layers} layers, {self.embed_dim} dims, {self.heads} heads"


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("esm2_t6_8M_UR50D", 6, 320, 20),
        Architecture("esm2_t12_35M_UR50D", 12, 480, 20),
        Architecture("esm2_t30_150M_UR50D", 30, 640, 20),
        Architecture("esm2_t33_650M_UR50D", 33, 1280, 20),
        Architecture("esm2_t36_3B_UR50D", 36, 2560, 40),
        Architecture("esm2_t48_15B_UR50D", 48, 5120, 40),
    ]
}


DEFAULT_MODEL = "esm2_t36_3B_UR50D"


MODEL_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"


@dataclass(frozen=True)
class Weights:
    """Which weights a run used (recorded in every trace).

    Attributes:
        source: ``random`` (seeded init), ``checkpoint`` (a file the user named),
            ``hub-cache`` (fair-esm's checkpoint found in the torch-hub cache) or ``download``.
        path: checkpoint file, if any.
        seed: RNG seed of a random init, if any.
        fingerprint: SHA-256 over a few weight tensors as loaded (identifies the weights across
            traces cheaply; not a checksum of the file).
    """

    source: str
    path: str | None
    seed: int | None
    fingerprint: str

    def describe(self) -> str:
        if self.source == "random":
            return f"random init (seed {self.seed})"
        return f"{self.source} {self.path}"

    def to_dict(self) -> dict:
        return asdict(self)


def architecture(name: str) -> Architecture:
    """The architecture of a fair-esm ESM-2 model name; lists the known names otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise TracerError(
            f"unknown model {name!r}; known ESM-2 models: {', '.join(ARCHITECTURES)}"
        ) from None


def empty_esm2(arch: Architecture, skeleton: bool = False) -> ESM2:
    """fair-esm's ESM2 module of this shape (weights as fair-esm initialises them; ``skeleton``:
    on the meta device, no initialisers run, :mod:`tracer.esm.skeleton`)."""
    from tracer.esm.skeleton import esm2_skeleton

    return (esm2_skeleton if skeleton else ESM2)(
        num_layers=arch.num_layers,
        embed_dim=arch.embed_dim,
        attention_heads=arch.heads,
        alphabet="ESM-1b",
        token_dropout=arch.token_dropout,
    )
