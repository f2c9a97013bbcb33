"""Tap names: the stable dotted names of the recorded tensors, shared by every stage.

A *tap* is one named tensor of the forward pass. Names are stable and dotted, and taps are
matched across paths by name::

    embed                     input to layer 0 (embedding, after scale and token-dropout rescale)
    layers.{i}.q_rope         query after rotary embedding, as attention consumes it   (N, H, d)
    layers.{i}.k_rope         key after rotary embedding                              (N, H, d)
    layers.{i}.v              value                                                  (N, H, d)
    layers.{i}.ctx            attention context, before out_proj                     (N, H, d)
    layers.{i}.attn_out       attention block output, after out_proj                 (N, E)
    layers.{i}.resid_mid      residual stream after the attention add                (N, E)
    layers.{i}.ffn_out        feed-forward output (fc2)                              (N, E)
    layers.{i}.resid_out      layer output                                           (N, E)
    final_norm                final layer norm output (fair-esm's last representation) (N, E)

``q_rope`` follows fair-esm's convention: q is multiplied by ``head_dim ** -0.5`` before the
rotation, so the query is recorded exactly as the attention product consumes it.

``N`` is the batch's tokens in canonical order (sequences in input order, tokens 0..L+1 each;
:mod:`tracer.inputs.packing`), whatever layout a path uses inside; how the hooks deliver taps in
that layout is :mod:`tracer.capture.hooks`.
"""

from __future__ import annotations

from tracer.errors import TracerError

SITES = ("q_rope", "k_rope", "v", "ctx", "attn_out", "resid_mid", "ffn_out", "resid_out")
"""Per-layer sites in data-flow order."""
HEAD_SITES = frozenset({"q_rope", "k_rope", "v", "ctx"})
"""Sites stored per head, ``(N, H, d)``; the rest are ``(N, E)``."""
EMBED = "embed"
FINAL = "final_norm"



def tap_name(layer: int, site: str) -> str:
    return f"layers.{layer}.{site}"


def parse_tap(name: str) -> tuple[int | None, str]:
    """``'layers.3.q_rope'`` -> ``(3, 'q_rope')``; ``'embed'`` -> ``(None, 'embed')``."""
    if name in (EMBED, FINAL):
        return None, name
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in SITES:
        return int(parts[1]), parts[2]
    raise TracerError(f"{name!r} is not a tap name (expected embed, final_norm or layers.<i>.<site>)")


def tap_names(num_layers: int, sites=SITES, layers=None, globals_: bool = True) -> list[str]:
    """All tap names in walk order: ``embed``, layer by layer in site order, ``final_norm``.

    Args:
        num_layers: layers of the model.
        sites: per-layer sites to include (kept in data-flow order).
        layers: layer indices to include (``None`` = all).
        globals_: include ``embed`` and ``final_norm``.
    """
    keep = [s for s in SITES if s in set(sites)]
    chosen = range(num_layers) if layers is None else sorted(set(layers))
    names = [EMBED] if globals_ else []
    names += [tap_name(i, s) for i in chosen for s in keep]
    return names + ([FINAL] if globals_ else [])


def walk_key(name: str) -> tuple[int, int]:
    """Sort key putting taps in walk order (embed first, final_norm last)."""
    layer, site = parse_tap(name)
    if site == EMBED:
        return (-1, 0)
    if site == FINAL:
        return (1 << 30, 0)
    return (layer, SITES.index(site))


def select_taps(num_layers: int, taps: list[str] | None, layers: list[int] | None) -> list[str]:
    """Validate ``--taps``/``--layers`` choices into the list of tap names to trace."""
    allowed = set(SITES) | {EMBED, FINAL}
    taps = list(taps) if taps else list(SITES) + [EMBED, FINAL]
    bad = [t for t in taps if t not in allowed]
    if bad:
        raise TracerError(f"unknown tap {bad[0]!r}; taps are: {', '.join([EMBED, *SITES, FINAL])}")
    if layers is not None:
        out = [i for i in layers if not 0 <= i < num_layers]
        if out:
            raise TracerError(f"layer {out[0]} does not exist; this model has layers 0..{num_layers - 1}")
    names = tap_names(num_layers, [t for t in taps if t in SITES], layers, globals_=False)
    if EMBED in taps:
        names.insert(0, EMBED)
    if FINAL in taps:
        names.append(FINAL)
    return names

