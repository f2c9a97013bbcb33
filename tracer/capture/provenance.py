"""What code a plug-in runs: the digest of its source file, recorded in the trace and compared
when a campaign resumes (:mod:`tracer.campaigns.campaign`).

The source of a SPEC is one file: ``path/to/file.py:factory`` -> that file; ``pkg.mod:factory``
-> the module's file (as the import system finds it now); a factory callable (Python API) -> the
file ``inspect`` finds for it. The built-in sides (``builtin``, ``fair-esm``, ``hf``) have none:
their code is tracer's, fair-esm's or transformers', whose versions the trace records.

Example::

    >>> plugin_sources(config)                          # doctest: +SKIP
    {'packed': {'spec': 'examples/packed_esm2_adapter.py:make_forward',
                'file': '/abs/examples/packed_esm2_adapter.py', 'sha256': '3f1c...'}}
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from pathlib import Path

from tracer.capture.plugin import BUILTIN

SHIPPED = ("hf",)
"""Side specs that name code shipped with tracer or its dependencies, not a user's file."""


def label(spec) -> str:
    """A SPEC as words: the string itself, or ``callable module:qualname``."""
    if isinstance(spec, str):
        return spec
    return f"callable {getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', spec)}"


def source_file(spec) -> Path | None:
    """The file a plug-in SPEC's factory is defined in, or ``None`` when none can be found."""
    if callable(spec):
        try:
            found = inspect.getsourcefile(spec)
        except TypeError:
            return None
        return Path(found).resolve() if found else None
    target = str(spec).rpartition(":")[0]
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        return path.resolve() if path.is_file() else None
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    return Path(origin).resolve() if origin and Path(origin).is_file() else None


def source_digest(spec) -> dict:
    """``{"spec", "file", "sha256"}`` of one plug-in SPEC (``file``/``sha256`` ``None`` if unknown)."""
    path = source_file(spec)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None
    return {"spec": label(spec), "file": str(path) if path else None, "sha256": digest}


def plugin_sources(config) -> dict:
    """``{side: source_digest}`` for the plug-in sides of a run configuration (``{}`` if none)."""
    out = {}
    for side, builtin in BUILTIN.items():
        spec = getattr(config, side, builtin)
        if spec is not None and not (isinstance(spec, str) and spec in (builtin, *SHIPPED)):
            out[side] = source_digest(spec)
    return out
