"""Capture taps from a forward the tool did not write (a user's plug-in), without editing it.

Three sources, all passive (each records ``x.detach()`` and returns nothing that changes the
forward):

1. **Module hooks** on the fair-esm submodules the implementation calls, keyed by module
   identity, so the layer of a tap is the layer whose module was called (never call order):

   ==========================================  ========  ==========================================
   module                                      hook      tap
   ==========================================  ========  ==========================================
   ``layers[i].self_attn_layer_norm``          input     ``embed`` (i = 0) or ``layers.{i-1}.resid_out``
   ``layers[i].final_layer_norm``              input     ``layers.{i}.resid_mid``
   ``emb_layer_norm_after``                    input     ``layers.{L-1}.resid_out``
   ``emb_layer_norm_after``                    output    ``final_norm``
   ``layers[i].self_attn.out_proj``            input     ``layers.{i}.ctx`` (viewed ``(N, H, d)``)
   ``layers[i].self_attn.out_proj``            output    ``layers.{i}.attn_out``
   ``layers[i].fc2``                           output    ``layers.{i}.ffn_out``
   ``layers[i].self_attn.v_proj``              output    ``layers.{i}.v`` (when no attention call is seen)
   ``layers[i].self_attn.rot_emb``             output    ``q_rope``/``k_rope`` (forwards calling
                                                         fair-esm's own attention module: a padded
                                                         batch, or the packed stream as one sequence)
   ``layers[i].self_attn_layer_norm``,         input     marks layer ``i`` as the current attention layer
   ``layers[i].self_attn.{q,k,v}_proj``
   ``embed_tokens``                            input     the forward's own token stream (below)
   ==========================================  ========  ==========================================

2. **The attention call** (:mod:`tracer.capture.intercept`): flash-attn's functions, xformers'
   ``memory_efficient_attention``, ``torch.nn.attention.varlen.varlen_attn`` and ``torch.nn.functional.scaled_dot_product_attention``
   are replaced, for the duration of the path, by wrappers that record q, k, v as the kernel
   consumes them and call the original with the very same arguments. The softmax scale the
   kernel applies (its argument, or its default ``head_dim ** -0.5``) is recorded and ``q_rope``
   is stored in fair-esm's convention, ``q * scale``, so it compares with the unpacked path.
   Layouts: ``(N, H, d)`` (varlen kernels), ``(1, H, N, d)`` and ``(H, N, d)`` (SDPA over the
   packed stream), ``(B, H, T, d)`` (SDPA over a padded batch). Calls that cover part of the
   tokens (a loop over sequences) are concatenated in call order.

3. **The one-line helper** :func:`tap` for values computed functionally or by a kernel the
   tool cannot see: ``tracer.tap("q_rope", i, q, scale=s)``. It returns its tensor and costs one
   attribute read when no trace is active.

Packed tensors may come as ``(N, ...)`` or with a batch axis of one (``(1, N, ...)``,
``(N, 1, ...)``), per-head ones with their heads merged (:func:`_packed_rows`). A forward that
embeds the batch's sequences in its own order, or pads its stream with padding tokens, is read
as it runs: its ``embed_tokens`` call gives the order (:func:`stream_rows`), and every tap is
read at the batch's rows.

Whatever could not be captured is reported by name with the line that would capture it
(:func:`missing_advice`). A tap seen from more than one source keeps the helper's value
(decided once, on a probe run: :meth:`Observer.choose`).
Example::

    probe = Observer(model, probe_geometry, names, record=None)   # which source gives which tap
    with probe:
        user_forward(probe_tokens, probe_cu_seqlens, probe_max_seqlen)
    obs = Observer(model, geometry, names, record, sources=probe.choose())
    with obs:
        out = user_forward(tokens, cu_seqlens, max_seqlen)
    obs.finish()            # raises TracerError for a tap with a partial token count
    obs.captured            # tap names delivered to ``record``
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from tracer.capture.intercept import Patch, attention_targets, bind, qkv_of
from tracer.errors import TracerError
from tracer.esm.sites import observed_sites
from tracer.taps import EMBED, FINAL, HEAD_SITES, SITES, parse_tap, tap_name

_state = threading.local()


def tap(site: str, layer: int | None, tensor: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Record ``tensor`` as tap ``site`` of ``layer`` when a trace is active; return it unchanged.

    Args:
        site: ``embed``, ``final_norm`` or a per-layer site (``q_rope``, ``k_rope``, ``v``,
            ``ctx``, ``attn_out``, ``resid_mid``, ``ffn_out``, ``resid_out``); a full tap name
            (``layers.3.q_rope``) with ``layer=None`` works too.
        layer: layer index, ``None`` for ``embed``/``final_norm``.
        tensor: the value in the path's own layout (packed ``(N, E)`` / ``(N, H, d)``, or padded).
        scale: for ``q_rope`` when q is not yet scaled: the softmax scale the kernel applies
            (the tap stores ``q * scale``, fair-esm's convention).
    """
    obs = getattr(_state, "observer", None)
    if obs is not None:
        obs.explicit(site, layer, tensor, scale)
    return tensor


@dataclass(frozen=True)
class Geometry:
    """Where a path's token rows live, and how to bring them to canonical order.

    Attributes:
        kind: ``packed`` (rows ``(N, ...)`` in pack order) or ``padded`` (``(B, T, ...)``).
        n_tokens: N.
        batch, padded_len: B and T of a padded path.
        embed_dim, heads: E and H.
        to_canonical: packed: ``packed_row_of_canonical`` ``(N,)``; padded: flat ``b * T + t``
            index of every canonical token ``(N,)``; ``None`` = identity.
        tokens, cu_seqlens: packed: the token ids handed to the forward ``(N,)`` and the sequence
            bounds, to recognise a forward that runs the sequences in its own order
            (:meth:`Observer._stream_order`).
    """

    kind: str
    n_tokens: int
    embed_dim: int
    heads: int
    to_canonical: torch.Tensor | None
    batch: int = 0
    padded_len: int = 0
    tokens: torch.Tensor | None = None
    cu_seqlens: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    def expected(self, name: str) -> tuple[int, ...]:
        _, site = parse_tap(name)
        tail = (self.heads, self.head_dim) if site in HEAD_SITES else (self.embed_dim,)
        return (self.n_tokens, *tail)


@dataclass
class _Pieces:
    rows: int = 0
    parts: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Which fair-esm module gives which tap.


def module_roles(model, sites=None, num_layers: int | None = None) -> dict[int, tuple[object, list[tuple[str, str, int]]]]:
    """``{id(module): (module, [(hook, role, layer)])}`` from the observed rows of
    :data:`tracer.esm.sites.SITES_TABLE` (the table in the module docstring), or from ``sites``
    (rows of another model's table, e.g. Hugging Face's, with its ``num_layers``)."""
    roles: dict[int, tuple[object, list]] = {}
    n = len(model.layers) if num_layers is None else num_layers
    last = n - 1
    for site in observed_sites() if sites is None else sites:
        layers = range(n) if site.per_layer else [last]  # a whole-model module ends the last layer
        for i in layers:
            layer = i + site.layer_shift
            role = EMBED if (site.role == "resid_out" and layer < 0) else site.role
            module = site.module(model, i)
            roles.setdefault(id(module), (module, []))[1].append((site.hook, role, -1 if role in (EMBED, FINAL) else layer))
    return roles


def _name(role: str, layer: int) -> str:
    return role if role in (EMBED, FINAL) else tap_name(layer, role)


# ---------------------------------------------------------------------------------------------


class Observer:
    """Captures taps of one opaque forward (see module docstring) and hands them to ``record``.

    Args:
        model: the fair-esm ``ESM2`` whose submodules the forward calls.
        geometry: where the path's rows live (:class:`Geometry`).
        names: tap names wanted.
        record: ``record(name, canonical_tensor)``, called once per tap when all its rows are in.
        sources: ``{name: source}``: the one source accepted per tap and delivered to ``record``
            (:meth:`choose` of a probe run); ``None`` = probe mode: nothing is delivered, every
            complete source is noted in :attr:`seen`.
        namespaces: extra global namespaces to patch (a plug-in loaded from a file).
    """

    def __init__(self, model, geometry: Geometry, names, record, sources: dict[str, str] | None = None, namespaces=()):
        self.model = model
        self.geo = geometry
        self.wanted = set(names)
        self.record = record
        self.sources = sources
        self.namespaces = namespaces
        self.pieces: dict[tuple[str, str], _Pieces] = defaultdict(_Pieces)
        self.delivered: dict[str, str] = {}  # name -> source
        self.seen: dict[str, set[str]] = defaultdict(set)  # name -> every source that gave all its rows
        self.current_layer: int | None = None
        self.unattributed_attention = 0
        self.attention_calls = 0
        self.reordered: str | None = None  # how the forward reordered the sequences, if it did
        self._rows = geometry.to_canonical  # tap rows -> canonical (a reordering forward's own order)
        self._stream_len = geometry.n_tokens  # rows of a tap: the forward's stream (a padded one is longer)
        self._order_seen = False
        self._moved = False
        self._in_attention: int | None = None  # the layer whose fair-esm attention module is running
        self._handles = []
        self._patch = Patch()

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> "Observer":
        if getattr(_state, "observer", None) is not None:
            raise RuntimeError("an Observer is already active in this thread")
        _state.observer = self
        try:
            self._install_hooks()
            self._install_attention()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._patch.undo()
        if getattr(_state, "observer", None) is self:
            _state.observer = None

    def _mine(self) -> bool:
        return getattr(_state, "observer", None) is self

    def _roles(self) -> dict:
        """``{id(module): (module, [(hook, role, layer)])}`` of the model observed (subclasses: other models)."""
        return module_roles(self.model)

    def _install_hooks(self) -> None:
        embed = getattr(self.model, "embed_tokens", None)
        if self.geo.kind == "packed" and self.geo.tokens is not None and isinstance(embed, torch.nn.Module):
            self._handles.append(embed.register_forward_pre_hook(lambda module, args: self._stream_order(args[0]) if args else None))
        for i, layer in enumerate(getattr(self.model, "layers", ())):  # fair-esm's own attention modules running
            attn = getattr(layer, "self_attn", None)
            if isinstance(attn, torch.nn.Module):
                self._handles.append(attn.register_forward_pre_hook(lambda module, args, i=i: self._attention_running(i)))
                self._handles.append(attn.register_forward_hook(lambda module, args, output: self._attention_running(None)))
        for module, roles in self._roles().values():
            pre = [r for r in roles if r[0] == "pre"]
            post = [r for r in roles if r[0] == "post"]
            if pre:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(pre)))
            if post:
                self._handles.append(module.register_forward_hook(self._post_hook(post)))

    def _pre_hook(self, roles):
        def hook(module, args):
            if not self._mine():
                return None
            for _, role, layer in roles:
                if role == "layer_mark":
                    self.current_layer = layer
                elif args and isinstance(args[0], torch.Tensor):
                    self._offer(_name(role, layer), "module", args[0])
            return None

        return hook

    def _post_hook(self, roles):
        def hook(module, args, output):
            if not self._mine():
                return None
            for _, role, layer in roles:
                if role == "rot_emb":  # fair-esm's own attention: (B*H, T, d) q, k, already scaled
                    if self._in_attention == layer and self._one_rotation(output):  # called by that attention, not by the user
                        for site, x in zip(("q_rope", "k_rope"), output):
                            self._offer(tap_name(layer, site), "module", self._bhtd(x))
                elif isinstance(output, torch.Tensor):
                    self._offer(_name(role, layer), "module", output)
            return None

        return hook

    def _attention_running(self, layer: int | None) -> None:
        if self._mine():
            self._in_attention = layer

    def _one_rotation(self, output) -> bool:
        """Whether fair-esm's ``rot_emb`` output is this path's q and k: a padded batch, or a packed
        stream run through fair-esm's attention as one sequence (``(H, N, d)``; its positions run
        over the whole stream, as that forward computes them)."""
        if not (isinstance(output, tuple) and len(output) == 2 and all(isinstance(x, torch.Tensor) and x.dim() == 3 for x in output)):
            return False
        return self.geo.kind == "padded" or output[0].shape[0] == self.geo.heads

    def _stream_order(self, ids) -> None:
        """The first embedding call of the whole stream: if the forward embeds the batch's
        sequences in another order (it sorts them by length, say), its taps are read in that
        order; every tap is put back in the batch's order from then on. Undecidable orders (the
        stream is not the batch's sequences) are left alone: the return-value check reports them."""
        if not self._mine() or self._order_seen or not isinstance(ids, torch.Tensor) or ids.numel() < self.geo.n_tokens:
            return
        self._order_seen = True
        if ids.dim() > 2 or (ids.dim() == 2 and 1 not in ids.shape):  # a padded (B, T) batch, unpadded later: not a stream
            return
        flat = ids.reshape(-1)
        given = self.geo.tokens.to(flat.device)
        if flat.numel() == given.numel() and torch.equal(flat, given):  # the usual case: one comparison on the device
            return
        pad = getattr(self.model, "padding_idx", None)
        inv = stream_rows(given.tolist(), self.geo.cu_seqlens, flat.tolist(), int(given[0]), pad)
        if inv is None:
            return
        rows = torch.tensor(inv, dtype=torch.long, device=flat.device)  # batch row -> the forward's row
        self._rows = rows if self.geo.to_canonical is None else rows[self.geo.to_canonical.to(flat.device)]
        self._stream_len = flat.numel()
        moved = self._moved = inv != sorted(inv)
        extra = flat.numel() - given.numel()
        self.reordered = " and ".join(
            (["runs the sequences in its own order"] if moved else [])
            + ([f"pads the stream with {extra} token(s) beyond the batch's {given.numel()}"] if extra else []))

    def _bhtd(self, x: torch.Tensor) -> torch.Tensor:
        bh, t, d = x.shape  # (B*H, T, d)
        return x.view(bh // self.geo.heads, self.geo.heads, t, d).transpose(1, 2)  # (B, T, H, d)

    def _install_attention(self) -> None:
        replacements = {}
        for label, original, kind, scale_arg in attention_targets():
            replacements[id(original)] = self._wrap(label, original, kind, scale_arg)
        self._patch.apply(replacements, self.namespaces)

    def _wrap(self, label, original, kind, scale_arg):
        observer = self

        def wrapper(*args, **kwargs):
            if observer._mine():
                observer._attention(original, kind, scale_arg, args, kwargs)
            return original(*args, **kwargs)

        wrapper.__wrapped__ = original
        wrapper.__name__ = getattr(original, "__name__", label)
        wrapper.__doc__ = getattr(original, "__doc__", None)
        return wrapper

    # -- attention ------------------------------------------------------------------------------
    def _attention(self, original, kind, scale_arg, args, kwargs) -> None:
        self.attention_calls += 1
        try:
            a = bind(original, args, kwargs)
        except TypeError:
            return  # the kernel will raise its own error for these arguments
        q, k, v = qkv_of(kind, a)
        if not all(isinstance(x, torch.Tensor) for x in (q, k, v)):
            return
        layer = self.current_layer
        if layer is None:
            self.unattributed_attention += 1
            return
        self._offer_qkv(layer, q, k, v, a.get(scale_arg), sdpa=kind == "sdpa")

    def _offer_qkv(self, layer: int, q, k, v, scale, sdpa: bool) -> None:
        """An attention call's query (scaled as the product consumes it), key and value as layer
        ``layer``'s ``q_rope``, ``k_rope`` and ``v`` (``sdpa``: in SDPA's ``(..., H, L, d)``)."""
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        if sdpa:
            q, k, v = (self._from_sdpa(x) for x in (q, k, v))
        self._offer(tap_name(layer, "q_rope"), "attention", _scaled(q, scale))
        self._offer(tap_name(layer, "k_rope"), "attention", k)
        self._offer(tap_name(layer, "v"), "attention", v)

    def _from_sdpa(self, x: torch.Tensor) -> torch.Tensor:
        """SDPA's ``(..., H, L, d)`` -> the path's token-major layout."""
        if x.dim() == 4:
            if self.geo.kind == "padded" or x.shape[0] != 1:
                return x.transpose(1, 2)  # (B, T, H, d)
            return x[0].transpose(0, 1)  # (1, H, N, d) -> (N, H, d)
        if x.dim() == 3:
            return x.transpose(0, 1)  # (H, N, d) -> (N, H, d)
        return x  # unexpected: the shape check names it

    # -- the helper -----------------------------------------------------------------------------
    def explicit(self, site: str, layer: int | None, tensor: torch.Tensor, scale: float | None) -> None:
        if layer is None:
            name = site
            parse_tap(name)  # TracerError for a bad name
        else:
            if site not in SITES:
                raise TracerError(f"tracer.tap({site!r}, {layer}, ...): site must be one of {', '.join(SITES)}")
            if not 0 <= int(layer) < len(self.model.layers):
                raise TracerError(f"tracer.tap({site!r}, {layer}, ...): the model has layers 0..{len(self.model.layers) - 1}")
            name = tap_name(int(layer), site)
        if scale is not None:
            tensor = _scaled(tensor, float(scale))
        self._offer(name, "helper", tensor)

    # -- delivery -------------------------------------------------------------------------------
    def _offer(self, name: str, source: str, x: torch.Tensor) -> None:
        if name not in self.wanted or name in self.delivered:
            return
        if self.sources is not None and self.sources.get(name) != source:
            return
        x = self._token_major(name, x.detach())
        p = self.pieces[(name, source)]
        p.parts.append(x)
        p.rows += x.shape[0]
        n = self._stream_len
        if n != self.geo.n_tokens and not self._moved and len(p.parts) == 1 and p.rows == self.geo.n_tokens:
            n = p.rows  # a padded stream the forward has unpadded by now: the batch's own rows, in its order
        if p.rows > n:
            raise TracerError(
                f"tap {name} ({source}): received {p.rows} token rows, the forward's stream has {n}; "
                "is a module called twice per layer, or does the forward pad its stream without embedding it "
                "through model.embed_tokens (where tracer reads a padded or reordered stream)?"
            )
        if p.rows == n:
            full = p.parts[0] if len(p.parts) == 1 else torch.cat(p.parts)
            del self.pieces[(name, source)]
            self.seen[name].add(source)
            if self.sources is not None:
                self.delivered[name] = source
                self.record(name, self._canonical(full, self._rows if n == self._stream_len else self.geo.to_canonical))

    def _token_major(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Bring one captured piece to ``(rows, E)`` / ``(rows, H, d)`` (packed) or canonical (padded)."""
        layer, site = parse_tap(name)
        g = self.geo
        head = site in HEAD_SITES
        tail = (g.heads, g.head_dim) if head else (g.embed_dim,)
        got = tuple(x.shape)
        if g.kind == "padded":
            x = self._padded_rows(name, x, tail, got)
        else:
            x = _packed_rows(x, tail, g.embed_dim)
            if x is None:
                raise _layout_error(name, layer, g.expected(name), got)
        return x

    def _padded_rows(self, name, x, tail, got):
        g = self.geo
        b, t = g.batch, g.padded_len
        head = len(tail) == 2
        if head and x.dim() == 3 and x.shape[-1] == g.embed_dim:
            x = x.view(*x.shape[:2], g.heads, g.head_dim)
        if x.dim() != len(tail) + 2 or tuple(x.shape[2:]) != tail:
            raise _layout_error(name, parse_tap(name)[0], (b, t, *tail), got)
        lead = tuple(x.shape[:2])
        if lead == (b, t):
            flat = x.reshape(b * t, *tail)  # batch-first
            return flat.index_select(0, g.to_canonical.to(x.device))
        if lead == (t, b):
            flat = x.transpose(0, 1).reshape(b * t, *tail)  # fair-esm's (T, B, ...)
            return flat.index_select(0, g.to_canonical.to(x.device))
        raise _layout_error(name, parse_tap(name)[0], (b, t, *tail), got)

    def canonical(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The forward's return value, a whole tensor of tap ``name`` in the batch's order ->
        canonical rows (shape-checked)."""
        return self._canonical(self._token_major(name, x), self.geo.to_canonical)

    def _canonical(self, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Packed rows -> canonical by ``rows`` (``None``: identity): :attr:`_rows` for a tap (the
        forward's own order, :meth:`_stream_order`), the geometry's for the return value."""
        if self.geo.kind == "padded" or rows is None:
            return x
        return x.index_select(0, rows.to(x.device))

    # -- end of the forward -----------------------------------------------------------------------
    def finish(self) -> None:
        """Deliver held values; fail on a tap whose calls covered only part of the tokens."""
        for (name, source), p in list(self.pieces.items()):
            if name in self.delivered:
                continue
            layer, _ = parse_tap(name)
            raise TracerError(
                f"tap {name} ({source}): the calls covered {p.rows} of {self._stream_len} token rows "
                f"(shapes {[tuple(x.shape) for x in p.parts][:3]}); every token must pass through it once"
            )

    @property
    def captured(self) -> set[str]:
        return set(self.delivered)

    def choose(self) -> dict[str, str]:
        """After a probe: the source to use per tap (the helper wins, then the attention call)."""
        rank = {"helper": 0, "attention": 1, "module": 2}
        return {name: min(srcs, key=rank.__getitem__) for name, srcs in self.seen.items() if srcs}


def stream_rows(given: list[int], bounds: tuple[int, ...], stream: list[int], start_token: int, pad_token: int | None = None) -> list[int] | None:
    """For a forward that embeds the batch's sequences in another order, or with padding tokens
    between or after them (a stream padded to a multiple of 8, say): the row of its stream that
    holds each row of the batch. ``None`` when the stream is not the batch's sequences (each
    starting with ``start_token``), in some order, plus ``pad_token`` s. Equal sequences are
    matched in order."""
    cuts = [i for i, t in enumerate(stream) if t == start_token] + [len(stream)]
    if any(t != pad_token for t in stream[:cuts[0]]) or len(cuts) != len(bounds):
        return None
    where: dict[tuple, list[int]] = defaultdict(list)  # sequence content -> its starts in the stream
    for a, b in zip(cuts, cuts[1:]):
        while b > a and stream[b - 1] == pad_token:
            b -= 1
        where[tuple(stream[a:b])].append(a)
    rows = []
    for a, b in zip(bounds, bounds[1:]):
        starts = where.get(tuple(given[a:b]))
        if not starts:
            return None
        start = starts.pop(0)
        rows.extend(range(start, start + b - a))
    return rows


def _packed_rows(x: torch.Tensor, tail: tuple[int, ...], embed_dim: int) -> torch.Tensor | None:
    """A packed piece as ``(rows, *tail)``, or ``None`` if its shape cannot be read as one.

    Accepted: ``(N, *tail)``; a batch axis of one on either side of the token axis, ``(1, N,
    *tail)`` (batch-first, as Hugging Face's padding-free rows) or ``(N, 1, *tail)`` (fair-esm's
    ``(T, B, ...)`` with ``B = 1``); and a per-head tap with its heads merged, ``(..., E)`` for
    ``(..., H, d)``. All are views of the same rows, in the same order.
    """
    if len(tail) == 2 and x.dim() >= 1 and x.shape[-1] == embed_dim and tuple(x.shape[-2:]) != tail:
        x = x.unflatten(-1, tail)  # (..., E) -> (..., H, d)
    lead = tuple(x.shape[: x.dim() - len(tail)])
    if tuple(x.shape[len(lead):]) != tail or not lead:
        return None
    if len(lead) == 2 and 1 in lead:
        return x.reshape(-1, *tail)  # (1, N, ...) or (N, 1, ...) -> (N, ...)
    return x if len(lead) == 1 else None


def _scaled(q: torch.Tensor, scale: float) -> torch.Tensor:
    """``q * scale`` with one rounding to q's dtype (exact for the power-of-two scales of ESM-2)."""
    if scale == 1.0:
        return q
    wide = torch.promote_types(q.dtype, torch.float32)
    return (q.to(wide) * scale).to(q.dtype)


def _layout_error(name: str, layer, expected, got) -> TracerError:
    """The one-line error for a tensor whose shape fits no layout; marked ``layout_mismatch``."""
    where = f"layer {layer}" if layer is not None else "model level"
    error = TracerError(
        f"tap {name} ({where}): expected shape {tuple(expected)}, received {tuple(got)}; "
        "the plug-in's tensor cannot be matched to the other path's tap"
    )
    error.layout_mismatch = True
    return error


_ADVICE = {
    "q_rope": 'tracer.tap("q_rope", i, q, scale=softmax_scale)   # before your attention kernel call',
    "k_rope": 'tracer.tap("k_rope", i, k)                         # before your attention kernel call',
    "v": 'tracer.tap("v", i, v)                                   # before your attention kernel call',
    "ctx": 'tracer.tap("ctx", i, ctx)                             # attention output, before out_proj',
    "attn_out": 'tracer.tap("attn_out", i, a)                     # out_proj output',
    "resid_mid": 'tracer.tap("resid_mid", i, x)                   # residual stream after the attention add',
    "ffn_out": 'tracer.tap("ffn_out", i, y)                       # fc2 output',
    "resid_out": 'tracer.tap("resid_out", i, x)                   # layer output',
    EMBED: 'tracer.tap("embed", None, x)                          # input of layer 0',
    FINAL: 'tracer.tap("final_norm", None, x)                     # after emb_layer_norm_after',
}


def missing_advice(missing: list[str]) -> list[str]:
    """One line per missing site: which taps, and the line of code that would capture them."""
    by_site: dict[str, list[int | None]] = defaultdict(list)
    for name in missing:
        layer, site = parse_tap(name)
        by_site[site].append(layer)
    lines = []
    for site in [EMBED, *SITES, FINAL]:
        if site not in by_site:
            continue
        layers = [x for x in by_site[site] if x is not None]
        which = site if not layers else f"layers.{_ranges(layers)}.{site}"
        lines.append(f"not captured: {which}; add {' '.join(_ADVICE[site].split())}")
    return lines


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    if len(values) == 1:
        return str(values[0])
    out, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return "{" + ",".join(out) + "}"
