"""Plug-ins cannot change what the other paths trace: the shared model is fingerprinted.

A ``--packed``/``--unpacked`` plug-in's factory receives the very model that fair-esm's unpacked
path and the reference run on (one copy of the weights on the device). Whatever the factory or
its forward does to that model -- casts it (``model.float()``, ``model.half()``), scales or
replaces a weight, edits a buffer (``rot_emb.inv_freq``), flips a flag (``token_dropout``),
swaps a layer, leaves a hook -- or to the functions every path calls (``F.softmax`` patched
globally) would silently change the other paths too, and the verdict would compare two changed
forwards while the trace claims the model as loaded.

So a run with a plug-in takes a :class:`Fingerprint` of everything a plug-in can touch, right
after the model is set to the run dtype, and checks it again after each factory, after the
probe forward and after the traced forwards. A difference refuses the run with one line naming
what changed (:meth:`Fingerprint.changes`); the model object is marked (:func:`mark_changed`), so
a later run on the same loaded model (``tracer.experiments`` reuses it for every row) is refused
too rather than compounding the change. What is fingerprinted:

* **tensors** -- every parameter and buffer, and every tensor attribute of a module (the
  remembered loaded ``inv_freq``): name, dtype, shape, strides, device and storage address, and
  the values: on the CPU the CRC-32 of the bytes (:func:`tracer.esm.integrity.crc32s`), on a GPU an exact
  integer fingerprint computed on the device (:func:`device_digest`; three int64 per tensor,
  fetched in one transfer). Both compare bits, so NaN, -0.0 and a 1-ulp change all show;
* **modules** -- each named module's type and identity, and its plain attributes (flags such as
  ``token_dropout``, ``scaling``, ``training``), except fair-esm's rotary cos/sin caches, which
  every forward rebuilds;
* **hooks** -- every hook dictionary of every module, and torch's global module hooks;
* **functions** -- the identity of every function in ``torch``, ``torch.nn.functional``,
  ``torch.Tensor``, ``torch.nn.Module``, the classes of the model's modules and the modules that
  define them (fair-esm's ``esm.*``, ``torch.nn.modules.*``), and tracer's own packed forward and
  attention backends;
* **settings** -- torch's default dtype, deterministic mode, float32 matmul precision and the
  TF32 / reduced-precision / SDPA backend switches.

Cost: one read of the weights per check (a ``sum`` reduction), see ``docs/trust.md``.

Example::

    guard = Guard(model, "the --packed plug-in my_forward.py:make")
    forward = plugin.make(model, model.alphabet)
    guard.check("factory")        # TracerError naming what the factory changed, if anything
"""

from __future__ import annotations

import os
import sys
import time
import types
from dataclasses import dataclass

import torch

from tracer.errors import TracerError
from tracer.esm import integrity
from tracer.esm.precision import ROTARY_CACHES

_CACHES = frozenset(ROTARY_CACHES)
"""fair-esm's rotary cos/sin tables: rebuilt by every forward (tracer clears them per run)."""
_CHANGED = "_tracer_changed_by_plugin"
_TOOL_MODULES = ("tracer.esm.packed_forward", "tracer.esm.attention", "tracer.esm.models", "tracer.capture.hooks")


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def device_digest(t: torch.Tensor) -> torch.Tensor:
    """Three int64 numbers on ``t``'s device (a CUDA tensor: no copy to the host) that change
    when any value of ``t`` does.

    ``t``'s bits read as integers of its element size, viewed ``(rows, -1)``: the sum of all of
    them and the row- and column-position-weighted sums of its row and column sums, in int64
    (exact and order-independent, so the same on every run; overflow wraps). A scaled, shifted
    or copied tensor and swapped rows or columns all show; a change that keeps every row and
    column sum (a planted 2x2 pattern) does not: this is a fingerprint, not a hash.
    """
    x = t.detach().contiguous()
    if x.numel() == 0:
        return torch.zeros(3, dtype=torch.int64, device=x.device)
    x = x.reshape(-1).view(_INT[x.element_size()])
    x = x.reshape(t.shape[0], -1) if t.dim() > 0 else x.reshape(1, -1)  # (rows, cols)
    rows = x.sum(1, dtype=torch.int64)  # (rows,)
    cols = x.sum(0, dtype=torch.int64)  # (cols,)
    wr = torch.arange(1, rows.numel() + 1, dtype=torch.int64, device=x.device)
    wc = torch.arange(1, cols.numel() + 1, dtype=torch.int64, device=x.device)
    return torch.stack([rows.sum(), (rows * wr).sum(), (cols * wc).sum()])


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and tensor attribute of every module, by dotted name."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is not None:
                    out[dot + name] = t
        for name, v in vars(module).items():
            if isinstance(v, torch.Tensor) and name not in _CACHES:
                out[dot + name] = v
    return out


def _plain(v) -> object:
    """A comparable stand-in for a module attribute: simple values as they are, objects by identity."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list, set, frozenset)) and all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return (type(v).__name__, tuple(sorted(v, key=repr)) if isinstance(v, (set, frozenset)) else tuple(v))
    return (type(v).__name__, id(v))


def _modules(model) -> tuple[dict, dict]:
    """``({name: attributes}, {name: hooks})`` of every named module."""
    attrs, hooks = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        a = {"<type>": type(module).__qualname__, "<id>": id(module)}
        h = {}
        for key, v in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules") or key in _CACHES or isinstance(v, torch.Tensor):
                continue
            if "hook" in key:
                h[key] = tuple((k, id(fn)) for k, fn in v.items()) if isinstance(v, dict) else _plain(v)
            else:
                a[key] = _plain(v)
        a["<children>"] = tuple((k, id(m)) for k, m in module._modules.items())
        attrs[name or "model"], hooks[name or "model"] = a, h
    return attrs, hooks


def _global_hooks() -> dict:
    import torch.nn.modules.module as mm

    return {k: tuple((i, id(fn)) for i, fn in v.items()) for k, v in vars(mm).items()
            if k.startswith("_global_") and k.endswith("hooks") and isinstance(v, dict)}


def _namespaces(model) -> list[tuple[str, dict]]:
    """The namespaces whose functions the paths call."""
    import torch.nn.functional as F

    spaces = [("torch", vars(torch)), ("torch.nn.functional", vars(F)), ("torch.Tensor", vars(torch.Tensor)),
              ("torch.Tensor", vars(torch._C.TensorBase)), ("torch.nn.Module", vars(torch.nn.Module))]
    classes = {cls for m in model.modules() for cls in type(m).__mro__ if cls is not object}
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        spaces.append((f"{cls.__module__}.{cls.__qualname__}", vars(cls)))
    names = {cls.__module__ for cls in classes} | set(_TOOL_MODULES)
    for name in sorted(names):
        module = sys.modules.get(name)
        if module is not None:
            spaces.append((name, vars(module)))
    return spaces


def _functions(model) -> dict[str, object]:
    out = {}
    for label, space in _namespaces(model):
        for key, v in list(space.items()):
            if callable(v) and not isinstance(v, (type, types.ModuleType)):
                out[f"{label}.{key}"] = v
            elif isinstance(v, (staticmethod, classmethod, property)):
                out[f"{label}.{key}"] = v
    return out


_TORCH_DIR = os.path.dirname(torch.__file__)


def _torch_rewrap(old, new) -> bool:
    """Whether ``new`` is torch's own wrapper of ``old``: torch rebinds a few functions when one
    of its modules is first imported (``torch._dynamo`` wraps ``torch.manual_seed`` in its
    disable decorator, and its mutation guard wraps ``torch.nn.Module.__init__`` in a closure over
    it), which may happen inside any forward. A wrapper written outside torch's installation, or
    one that does not wrap or close over the very same function, is a change."""
    code = getattr(new, "__code__", None)
    inner = getattr(new, "__wrapped__", None)
    while inner is not None and inner is not old:
        inner = getattr(inner, "__wrapped__", None)
    closes_over = any(_cell(c) is old for c in getattr(new, "__closure__", None) or ())  # torch._dynamo's Module.__init__ tracker
    return (inner is old or closes_over) and code is not None and os.path.abspath(code.co_filename).startswith(_TORCH_DIR + os.sep)


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _settings() -> dict:
    b = torch.backends
    s = {
        "default dtype": torch.get_default_dtype(),
        "deterministic algorithms": (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "grad mode": torch.is_grad_enabled(),
    }
    with_cuda = {
        "TF32 matmul": lambda: b.cuda.matmul.allow_tf32,
        "cuDNN TF32": lambda: b.cudnn.allow_tf32,
        "fp16 reduced-precision reduction": lambda: b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "bf16 reduced-precision reduction": lambda: b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "SDPA backends": lambda: (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled()),
    }
    for k, get in with_cuda.items():
        try:
            s[k] = get()
        except (AttributeError, RuntimeError):
            s[k] = None
    return s


@dataclass(frozen=True)
class Fingerprint:
    """What a plug-in could change, taken at one moment (see module docstring).

    Attributes:
        tensors: name -> (dtype, shape, stride, device, storage address, value digest bytes).
        modules: module name -> {attribute: plain value}.
        hooks: module name -> {hook dict: ((id, id(fn)), ...)}, plus ``<global>``.
        functions: ``namespace.name`` -> the function object (compared by identity).
        settings: torch switch -> value.
    """

    tensors: dict
    modules: dict
    hooks: dict
    functions: dict
    settings: dict

    @classmethod
    def take(cls, model) -> "Fingerprint":
        tensors = _tensors(model)
        digests: dict[tuple, bytes] = {}
        with torch.no_grad():
            keyed = {}
            for name, t in tensors.items():
                key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), str(t.device))
                keyed[name] = key
                if key not in digests:
                    digests[key] = t if t.device.type == "cpu" else device_digest(t)
            on_host = [k for k, v in digests.items() if k[4] == "cpu"]  # CRC-32 of the bytes, threads in parallel
            for k, crc in zip(on_host, integrity.crc32s([integrity.tensor_bytes(digests[k]) for k in on_host])):
                digests[k] = crc.to_bytes(4, "little")
            on_device = [k for k, v in digests.items() if isinstance(v, torch.Tensor)]
            if on_device:  # one transfer for all of them
                values = torch.stack([digests[k].to(on_device[0][4]) for k in on_device]).cpu().numpy()
                for k, row in zip(on_device, values):
                    digests[k] = row.tobytes()
        table = {name: (str(k[1]).removeprefix("torch."), k[2], k[3], k[4], k[0], digests[k]) for name, k in keyed.items()}
        modules, hooks = _modules(model)
        hooks["<global>"] = _global_hooks()
        return cls(table, modules, hooks, _functions(model), _settings())

    def changes(self, now: "Fingerprint") -> list[str]:
        """What differs in ``now``, one short phrase per item (``layers.2.fc1.weight (values)``),
        in model order; what lies inside a replaced module is not listed again."""
        out, replaced = [], []

        def inside(name: str) -> bool:
            return any(name.startswith(f"{r}.") for r in replaced)

        for name in _union(self.modules, now.modules):
            a, b = self.modules.get(name, {}), now.modules.get(name, {})
            if inside(name):
                continue
            if a.get("<id>") != b.get("<id>"):
                replaced.append(name)
                out.append(f"{name} ({'module replaced' if a and b else 'module added' if b else 'module removed'})")
                continue
            for key in _union(a, b):
                if a.get(key) != b.get(key):
                    what = {"<type>": "module type", "<children>": "submodules"}.get(key)
                    out.append(f"{name} ({what})" if what else f"{name}.{key} ({_show(a.get(key))} -> {_show(b.get(key))})")
        for name in _union(self.tensors, now.tensors):
            a, b = self.tensors.get(name), now.tensors.get(name)
            if a == b or inside(name):
                continue
            if a is None or b is None:
                out.append(f"{name} ({'added' if a is None else 'removed'})")
            elif a[0] != b[0]:
                out.append(f"{name} (dtype {a[0]} -> {b[0]})")
            elif a[1] != b[1]:
                out.append(f"{name} (shape {tuple(a[1])} -> {tuple(b[1])})")
            elif a[3] != b[3]:
                out.append(f"{name} (device {a[3]} -> {b[3]})")
            elif a[5] != b[5]:
                out.append(f"{name} (values)")
            else:
                out.append(f"{name} (replaced by another tensor)")
        for name in _union(self.hooks, now.hooks):
            a, b = self.hooks.get(name, {}), now.hooks.get(name, {})
            for key in _union(a, b):
                if a.get(key) != b.get(key) and not inside(name):
                    out.append(f"{name if name != '<global>' else 'torch global'} {key.strip('_').replace('_', ' ')}")
        for name in self.functions:
            if name not in now.functions:
                out.append(f"{name} (function removed)")
            elif self.functions[name] is not now.functions[name] and not _torch_rewrap(self.functions[name], now.functions[name]):
                out.append(f"{name} (function replaced)")
        for key in self.settings:
            if self.settings[key] != now.settings.get(key):
                out.append(f"torch setting {key} ({self.settings[key]} -> {now.settings.get(key)})")
        return out


def _union(a: dict, b: dict) -> list:
    """Keys of ``a`` in order, then those only in ``b``."""
    return [*a, *(k for k in b if k not in a)]


def _show(v) -> str:
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], int) and isinstance(v[0], str):
        return f"a {v[0]}"
    return repr(v)


def mark_changed(model, message: str) -> None:
    """Remember on the model object that a plug-in changed it (:func:`refuse_changed`)."""
    object.__setattr__(model, _CHANGED, message)


def refuse_changed(model) -> None:
    """Raise :class:`TracerError` if a plug-in changed ``model`` in an earlier run of this process."""
    message = getattr(model, _CHANGED, None)
    if message is not None:
        raise TracerError(f"this model was changed by a plug-in in an earlier run ({message}); load it again")


class Guard:
    """Checks that the shared model is what it was when the guard was made (module docstring).

    Args:
        model: the shared fair-esm model, in the run dtype on the run device.
        who: the plug-in(s), for messages (``the --packed plug-in x.py:make``).
    """

    def __init__(self, model, who: str):
        t = time.perf_counter()
        self.model, self.who = model, who
        self.before = Fingerprint.take(model)
        self.seconds = time.perf_counter() - t

    def check(self, stage: str, who: str | None = None) -> None:
        """Refuse (one line) if anything changed since the guard was made; ``stage``: ``factory`` / ``forward``."""
        t = time.perf_counter()
        changed = self.before.changes(Fingerprint.take(self.model))
        self.seconds += time.perf_counter() - t
        if not changed:
            return
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        message = f"{who or self.who} changed the shared model in its {stage}: {shown}"
        mark_changed(self.model, message)
        raise TracerError(
            f"{message}; tracer runs the other paths on the model as loaded and cannot trace a changed one: "
            "give the plug-in its own copy (copy.deepcopy(model) in the factory) or do not modify the model"
        )


def who(plugins: dict) -> str:
    """``the --packed plug-in x.py:make`` (or both sides) for ``{side: Plugin | None}``."""
    return " or ".join(f"the --{side} plug-in {p.label}" for side, p in plugins.items() if p is not None)


def guard_for(model, plugins: dict) -> Guard | None:
    """A :class:`Guard` of ``model`` when a plug-in will be given it; ``None`` for built-in paths."""
    return Guard(model, who(plugins)) if any(p is not None for p in plugins.values()) else None
