"""Loading a user's own forward (``--packed SPEC`` / ``--unpacked SPEC``) and calling it safely.

A SPEC is ``builtin`` (the packed default), ``fair-esm`` (the unpacked default),
``package.module:factory`` or ``path/to/file.py:factory``; the Python API also takes the
factory itself. The factory is called as ``factory(model, alphabet)`` (or ``factory(model)``) with the loaded fair-esm
model already in the run dtype and on the run device, and returns the forward:

* packed: ``forward(tokens, cu_seqlens, max_seqlen) -> (N, E)`` (or ``forward(tokens,
  cu_seqlens)``): ``tokens`` int64 ``(N,)`` in
  pack order, ``cu_seqlens`` int32 ``(B + 1,)``, both on the model's device; the result is the
  final representation (after ``emb_layer_norm_after``), one row per token.
* unpacked: ``forward(tokens) -> (B, T, E)``: fair-esm's padded ``(B, T)`` batch.

Everything the plug-in raises becomes one line naming the plug-in and the line it failed on
(a :class:`TracerError` raised by the tool's own checks inside it passes through unchanged).

Example::

    plugin = load("examples/packed_esm2_adapter.py:make_forward", side="packed")
    forward = plugin.make(model, model.alphabet)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from tracer.errors import TracerError, first_line

BUILTIN = {"packed": "builtin", "unpacked": "fair-esm"}
_TOOL_DIR = str(Path(__file__).resolve().parent)


@dataclass(frozen=True)
class Plugin:
    """A user's forward factory.

    Attributes:
        side: ``packed`` or ``unpacked``.
        label: how it is named in messages and in the trace (the SPEC, or module:qualname).
        factory: ``factory(model, alphabet) -> forward``.
        namespace: the globals of the file it came from (patched too when attention is
            intercepted), or ``None``.
    """

    side: str
    label: str
    factory: Callable
    namespace: dict | None = None

    def make(self, model, alphabet) -> Callable:
        """Call the factory (``factory(model, alphabet)``, or ``factory(model)`` if it takes one
        argument); the forward it returns, checked to be callable."""
        forward = self.call(self.factory, *fitted(self.factory, (model, alphabet), 1), what="factory")
        if not callable(forward):
            raise TracerError(
                f"{self.side} plug-in {self.label}: the factory returned {type(forward).__name__}, "
                f"not a forward function ({_SIGNATURE[self.side]})"
            )
        return forward

    def call(self, fn, *args, what: str = "forward"):
        """``fn(*args)``; an exception becomes one line naming the plug-in and where it failed."""
        try:
            return fn(*args)
        except (TracerError, KeyboardInterrupt, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:
            raise TracerError(
                f"{self.side} plug-in {self.label} raised {type(e).__name__} in its {what}: "
                f"{first_line(e)}{_where(e)}"
            ) from None


def held_modules(forward, cls) -> list:
    """The distinct ``cls`` modules a forward holds: in itself, the object it is bound to, its
    closure, their attributes (one level), and the modules of any ``torch.nn.Module`` among them."""
    roots = [forward, getattr(forward, "__self__", None)]
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            roots.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    candidates = roots + [v for r in roots if r is not None and not isinstance(r, torch.nn.Module) and hasattr(r, "__dict__")
                          for v in vars(r).values()]
    found = {id(m): m for obj in candidates if isinstance(obj, torch.nn.Module) for m in obj.modules() if isinstance(m, cls)}
    return list(found.values())


def fitted(fn, args: tuple, fewest: int) -> tuple:
    """``args``, less the trailing ones ``fn`` does not take (down to ``fewest``): a factory
    ``make(model)`` gets no alphabet, a packed ``forward(tokens, cu_seqlens)`` no ``max_seqlen``.
    Anything else is passed whole, and a mismatch is the plug-in's own one-line error."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): pass everything
        return args
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return args
    taken = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return args[:taken] if fewest <= taken < len(args) else args


_SIGNATURE = {
    "packed": "forward(tokens (N,), cu_seqlens (B+1,) int32, max_seqlen) -> (N, E)",
    "unpacked": "forward(tokens (B, T)) -> (B, T, E)",
}


def is_builtin(spec, side: str) -> bool:
    return isinstance(spec, str) and spec == BUILTIN[side]


def load(spec, side: str) -> Plugin | None:
    """The plug-in for ``spec`` (``None`` for the built-in path); one-line errors otherwise."""
    if side not in BUILTIN:
        raise ValueError(side)
    if spec is None or is_builtin(spec, side):
        return None
    if callable(spec):
        label = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"
        return Plugin(side, label, spec)
    if not isinstance(spec, str) or not spec.strip():
        raise TracerError(f"--{side} {spec!r}: expected {BUILTIN[side]}, package.module:factory or path/to/file.py:factory")
    target, colon, attr = spec.rpartition(":")
    if not colon or not target or not attr:
        raise TracerError(
            f"--{side} {spec!r}: expected {BUILTIN[side]}, package.module:factory or path/to/file.py:factory "
            "(the factory after a colon)"
        )
    if target.endswith(".py") or os.sep in target or "/" in target:
        module = _load_file(Path(target), spec, side)
    else:
        module = _import(target, spec, side)
    factory = getattr(module, attr, None)
    if factory is None:
        have = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == module.__name__)
        raise TracerError(f"--{side} {spec!r}: {target} has no {attr!r}; it defines: {', '.join(have) or 'no functions'}")
    if not callable(factory):
        raise TracerError(f"--{side} {spec!r}: {attr} is a {type(factory).__name__}, not a factory function")
    return Plugin(side, spec, factory, vars(module))


def _load_file(path: Path, spec: str, side: str):
    if not path.is_file():
        raise TracerError(f"--{side} {spec!r}: {path} does not exist" if not path.exists() else f"--{side} {spec!r}: {path} is not a file")
    resolved = path.resolve()
    # keyed by the file's bytes too: an edited file is loaded afresh, so the code that runs is the code whose
    # digest the trace records (tracer.capture.provenance)
    name = "tracer_plugin_" + hashlib.sha1(str(resolved).encode() + resolved.read_bytes()).hexdigest()[:12] + "_" + _identifier(path.stem)
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses, pickling and relative lookups need it registered
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # the plug-in may import files beside it
    try:
        module_spec.loader.exec_module(module)
    except (KeyboardInterrupt, TracerError):
        del sys.modules[name]
        raise
    except BaseException as e:  # SyntaxError, ImportError, SystemExit, anything its top level raises
        del sys.modules[name]
        raise TracerError(f"--{side} {spec!r}: importing {path} failed: {type(e).__name__}: {first_line(e)}{_where(e)}") from None
    return module


def _import(target: str, spec: str, side: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and target.startswith(e.name):
            raise TracerError(f"--{side} {spec!r}: no module named {e.name!r} (is it installed, or on PYTHONPATH?)") from None
        raise TracerError(f"--{side} {spec!r}: importing {target} failed: {type(e).__name__}: {first_line(e)}") from None
    except (KeyboardInterrupt, TracerError):
        raise
    except BaseException as e:
        raise TracerError(f"--{side} {spec!r}: importing {target} failed: {type(e).__name__}: {first_line(e)}{_where(e)}") from None


def _identifier(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _where(e: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame outside tracer and torch, if any."""
    frames = traceback.extract_tb(e.__traceback__)
    if isinstance(e, SyntaxError) and e.filename:
        return f" (at {e.filename}:{e.lineno})"
    for f in reversed(frames):
        if f.filename.startswith(_TOOL_DIR) or f"{os.sep}torch{os.sep}" in f.filename:
            continue
        return f" (at {f.filename}:{f.lineno})"
    return ""
