"""Loading ESM-2 (by fair-esm name, checkpoint file, hub cache or seeded random init) and
switching it between precisions without stale state.

fair-esm keeps two pieces of rotary-embedding state that do not follow a precision change the
way weights do, and tracer manages both explicitly:

* ``rot_emb.inv_freq`` is a *buffer*, so ``model.to(bfloat16)`` rounds it to bfloat16, and a
  later ``model.to(float32)`` does not bring the lost bits back. The buffer *as loaded* is
  remembered per rotary module (:func:`loaded_inv_freq`; released ESM-2 checkpoints carry an
  fp16-rounded one, which fair-esm's own loader keeps), and :func:`set_precision` restores
  ``loaded.to(dtype)`` after every change: in bfloat16 exactly what ``model.to(bfloat16)`` gives
  the freshly loaded model, in float32/float64 the loaded values up-cast exactly. It is never
  rewritten from its definition: tracer traces the model as loaded.
* ``rot_emb._cos_cached``/``_sin_cached`` are plain attributes keyed on sequence length and device
  only, *not dtype*: a table built in float32 would be reused by a bfloat16 run of the same length
  and silently promote q/k to float32. :func:`reset_rotary_caches` clears them before every run.

Example::

    model, arch, weights = load_model("esm2_t6_8M_UR50D", weights="random", seed=0)
    set_precision(model, torch.device("cpu"), torch.bfloat16)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pickle
import re
import socket
import sys
import threading
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
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


def build_random(arch: Architecture, seed: int) -> ESM2:
    """fair-esm's ESM-2 with its own default initialisation, seeded, in float32 on the CPU.

    The global RNG state is left as it was. Built on the CPU whatever the run's device, so the
    same seed gives the same weights everywhere.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _esm2(arch)
    remember_loaded(model)
    return model.eval().requires_grad_(False)


def random_cache_path(arch: Architecture, seed: int) -> Path | None:
    """Where the seeded random weights of ``arch`` are cached (``None``: caching is off).

    ``$TRACER_CACHE_DIR`` (``off`` disables), else ``$XDG_CACHE_HOME/tracer``, else
    ``~/.cache/tracer``. The key holds everything the values depend on: the shape, the seed, and
    the fair-esm and torch versions (fair-esm's init code and torch's CPU generator).
    """
    root = os.environ.get("TRACER_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "off", "none", "0"):
        return None
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "tracer")
    from importlib.metadata import version

    key = (
        f"{arch.num_layers}L-{arch.embed_dim}E-{arch.heads}H-td{int(arch.token_dropout)}-seed{seed}-"
        f"fair-esm{version('fair-esm')}-torch{torch.__version__.split('+')[0]}"
    )
    return Path(root) / "random-weights" / f"esm2-{key}.pt"


_CACHE_WRITES: dict[Path, threading.Thread] = {}


def save_random_cache(model: ESM2, arch: Architecture, path: Path, background: bool = False) -> None:
    """Store ``model``'s weights at ``path`` in fair-esm's checkpoint format, atomically.

    Written to a temporary file in the same folder, fsynced and renamed, so a reader never sees a
    partial file; any failure (disk full, read-only cache) leaves no file and only costs the
    next run a fresh build. The file loads with the same code as real checkpoints
    (:func:`read_checkpoint`, :func:`build_from_checkpoint`). ``background``: write in a thread
    (not a daemon: the interpreter waits for it at exit; :func:`wait_for_cache_writes`). The
    tensors are taken now: a later in-place precision change of the model swaps its
    parameters' data, not these tensors.
    """
    data = {
        "model": {f"encoder.{k}": v for k, v in model.state_dict().items()},
        "cfg": {"model": {"encoder_layers": arch.num_layers, "encoder_embed_dim": arch.embed_dim,
                          "encoder_attention_heads": arch.heads, "token_dropout": arch.token_dropout}},
        "tracer": {"random_seed_cache": True},
    }
    if not background:
        _write_atomically(data, path)
        return
    thread = threading.Thread(target=_write_atomically, args=(data, path), name="tracer-weights-cache")
    thread.start()
    _CACHE_WRITES[path] = thread


def wait_for_cache_writes() -> None:
    """Wait until this process's background cache writes are on disk."""
    while _CACHE_WRITES:
        _CACHE_WRITES.popitem()[1].join()


def _write_atomically(data: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _esm2(arch: Architecture) -> ESM2:
    """fair-esm's ESM2 module of this shape (weights as fair-esm initialises them)."""
    return ESM2(
        num_layers=arch.num_layers,
        embed_dim=arch.embed_dim,
        attention_heads=arch.heads,
        alphabet="ESM-1b",
        token_dropout=arch.token_dropout,
    )


def hub_checkpoint_path(name: str) -> Path:
    """Where fair-esm's loader caches ``name``: ``$TORCH_HOME/hub/checkpoints/<name>.pt``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def read_checkpoint(path: str | Path, trust: bool = False) -> dict:
    """Read a fair-esm checkpoint file without copying it into memory twice.

    The file is memory-mapped (``mmap=True``) and unpickled with ``weights_only=True``, allowing
    only ``argparse.Namespace`` beyond tensors and containers (ESM-2 checkpoints keep their
    config in one). ``trust=True`` falls back to a full unpickle for files that need more.
    """
    path = Path(path)
    if not path.exists():
        raise TracerError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise TracerError(f"checkpoint {str(path)!r} is a directory, not a .pt file")
    if not os.access(path, os.R_OK):
        raise TracerError(f"checkpoint {str(path)!r} is not readable (permissions)")
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format of torch >= 1.6
    if mmap:
        check_zip_crcs(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", mmap=mmap, weights_only=not trust)
    except pickle.UnpicklingError as e:
        detail = re.search(r"Unsupported (global|class)[^\n]*", str(e))
        if trust or detail is None:  # not about foreign objects: the bytes are not a checkpoint
            raise TracerError(f"{path} is not a readable PyTorch checkpoint ({_last_line(e)})") from None
        raise TracerError(
            f"{path} holds Python objects beyond tensors ({detail.group(0).rstrip('.')}); "
            "if you trust the file, add --trust-checkpoint"
        ) from None
    except Exception as e:  # whatever torch.load raises on a file that is not a checkpoint
        raise TracerError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(data, dict):
        raise TracerError(f"{path} is not a fair-esm checkpoint (top level is {type(data).__name__})")
    return data


def check_zip_crcs(path: Path) -> None:
    """Raise :class:`TracerError` unless every member of the checkpoint's zip matches its CRC-32.

    ``torch.load(mmap=True)`` does not check them, so a flipped byte in a weight would load
    silently. This reads the file once (the memory-mapped load then finds it in the page cache).
    """
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, ValueError) as e:
        raise TracerError(f"{path} is damaged ({_first_line(e)})") from None
    if bad is not None:
        raise TracerError(f"{path} is damaged: {bad} fails its zip CRC-32 check (a corrupted download or disk?)")


def checkpoint_architecture(data: dict, path: str | Path) -> Architecture:
    """The ESM-2 architecture a fair-esm checkpoint declares in ``cfg['model']``."""
    cfg = data.get("cfg")
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if model_cfg is None or "model" not in data:
        kind = "an ESM-1/ESM-1b checkpoint" if "args" in data else "not a fair-esm ESM-2 checkpoint"
        raise TracerError(f"{path} is {kind} (no cfg.model and model entries); tracer traces ESM-2")
    try:
        shape = (
            int(_cfg(model_cfg, "encoder_layers")),
            int(_cfg(model_cfg, "encoder_embed_dim")),
            int(_cfg(model_cfg, "encoder_attention_heads")),
        )
        token_dropout = bool(_cfg(model_cfg, "token_dropout", True))
    except (KeyError, AttributeError, TypeError, ValueError):
        raise TracerError(f"{path} has an incomplete ESM-2 config in cfg.model") from None
    for arch in ARCHITECTURES.values():
        if (arch.num_layers, arch.embed_dim, arch.heads, arch.token_dropout) == (*shape, token_dropout):
            return arch
    return Architecture("custom", *shape, token_dropout)


def _cfg(cfg, key, default=KeyError):
    if isinstance(cfg, dict):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    if value is KeyError:
        raise KeyError(key)
    return value


def build_from_checkpoint(data: dict, arch: Architecture, path: str | Path) -> ESM2:
    """ESM-2 with the checkpoint's tensors assigned in place (no random init, no second copy).

    Contact-regression weights (a separate file in fair-esm) are not needed for tracing and are
    zero-filled when absent. A rotary ``inv_freq`` the file lacks gets what fair-esm's
    constructor computes; one the file has is kept exactly as stored.
    """
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")  # fair-esm's upgrade_state_dict
    state = {prefix.sub("", k): v for k, v in data["model"].items()}
    with torch.device("meta"):  # no allocation, no init: the checkpoint's tensors are assigned
        model = _esm2(arch)
    expected = set(model.state_dict())
    optional = {k for k in expected if k.startswith("contact_head.") or k.endswith("rot_emb.inv_freq")}
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise TracerError(
            f"{path} does not match ESM-2 ({arch.describe()}): "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TracerError(f"{path}: {k} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided:
            raise TracerError(f"{path}: {k} is a {str(v.layout).removeprefix('torch.')} tensor; tracer needs dense weights (convert with .to_dense())")
        if v.is_meta:
            raise TracerError(f"{path}: {k} is a meta tensor (a shape with no data); the file holds no weights for it")
        if v.shape != shapes[k]:
            bad = [n for n, t in state.items() if t.shape != shapes[n]]
            raise TracerError(
                f"{path} does not match ESM-2 ({arch.describe()}): {k} has shape {tuple(v.shape)} in the file, "
                f"{tuple(shapes[k])} expected ({len(bad)} tensor(s) of the wrong shape)"
            )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3]) or _first_line(e)
        raise TracerError(f"{path} does not match ESM-2 ({arch.describe()}): {detail}") from None
    for module_name, module in model.named_modules():  # what the file may lack is still on the meta device
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.is_meta:
                key = f"{module_name}.{name}" if module_name else name
                if key not in optional:
                    raise TracerError(f"{path}: {key} has no data after loading")  # pragma: no cover (missing keys are refused above)
                if name == "inv_freq":  # what fair-esm's constructor puts there
                    filled = canonical_inv_freq(2 * t.shape[0]).to(t.dtype)
                else:
                    filled = torch.zeros(t.shape, dtype=t.dtype)
                if isinstance(t, torch.nn.Parameter):
                    setattr(module, name, torch.nn.Parameter(filled, requires_grad=False))
                else:
                    setattr(module, name, filled)
    remember_loaded(model)
    return model.eval().requires_grad_(False)


def download_checkpoint(name: str, dest: Path) -> None:
    """fair-esm's normal download, into fair-esm's own cache location (atomically)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        # download_url_to_file writes a temporary file and renames it when complete.
        torch.hub.download_url_to_file(MODEL_URL.format(name=name), str(dest), progress=sys.stderr.isatty())
    finally:
        socket.setdefaulttimeout(old_timeout)


def load_model(
    name: str | None = None,
    weights: str = "auto",
    seed: int = 0,
    trust_checkpoint: bool = False,
    progress=None,
) -> tuple[ESM2, Architecture, Weights]:
    """Load an ESM-2 model in its stored precision on the CPU.

    Args:
        name: fair-esm model name; ``None`` means the default (``esm2_t36_3B_UR50D``), or the
            checkpoint's own architecture when ``weights`` is a path.
        weights: ``auto`` (torch-hub cache, else fair-esm's download), ``random`` (seeded init of
            the named architecture) or a path to a fair-esm ``.pt`` checkpoint.
        seed: RNG seed for ``random``.
        trust_checkpoint: allow arbitrary pickled objects in the checkpoint.
        progress: optional ``callable(str)`` for status lines.

    Returns:
        ``(model, architecture, weights record)``; the model is in eval mode with no gradients.
    """
    say = progress or (lambda msg: None)
    if weights == "random":
        arch = architecture(name or DEFAULT_MODEL)
        cached = random_cache_path(arch, seed)
        if cached in _CACHE_WRITES:
            _CACHE_WRITES.pop(cached).join()  # this process is still writing it
        if cached is not None and cached.exists():
            say(f"loading {arch.name} seeded random weights (seed {seed}) from the cache {cached}")
            try:
                model = build_from_checkpoint(read_checkpoint(cached), arch, cached)
                return model, arch, Weights("random", None, seed, fingerprint(model))
            except TracerError:  # a damaged cache entry is rebuilt, never trusted
                say(f"cache entry {cached} is unreadable; building the weights again")
        say(f"building {arch.name} ({arch.describe()}) with seeded random weights (seed {seed})")
        model = build_random(arch, seed)
        if cached is not None:
            save_random_cache(model, arch, cached, background=True)  # the run does not wait for the disk
        return model, arch, Weights("random", None, seed, fingerprint(model))

    if weights == "auto":
        arch = architecture(name or DEFAULT_MODEL)
        path = hub_checkpoint_path(arch.name)
        source = "hub-cache"
        if not path.exists():
            say(f"{arch.name} is not in the torch-hub cache ({path.parent}); downloading it")
            try:
                download_checkpoint(arch.name, path)
            except Exception as e:  # any network/HTTP/disk failure: one line, and the ways out
                raise TracerError(
                    f"could not get the {arch.name} checkpoint ({_first_line(e)}); "
                    "use --weights PATH for a local .pt file, or --weights random to trace the "
                    "architecture with seeded random weights"
                ) from None
            source = "download"
    else:
        path = Path(weights)
        source = "checkpoint"
        arch = None

    say(f"reading checkpoint {path}")
    data = read_checkpoint(path, trust=trust_checkpoint)
    found = checkpoint_architecture(data, path)
    if arch is None and name is not None:
        arch = architecture(name)
    if arch is not None and not arch.same_shape(found):
        raise TracerError(
            f"checkpoint {path} is {found.name} ({found.describe()}), but the model asked for is "
            f"{arch.name} ({arch.describe()}); pass --model {found.name}"
            if found.name != "custom"
            else f"checkpoint {path} has {found.describe()}, but {arch.name} has {arch.describe()}"
        )
    arch = arch or found
    model = build_from_checkpoint(data, arch, path)
    del data
    return model, arch, Weights(source, str(path), None, fingerprint(model))


_LOADED = "_tracer_loaded_inv_freq"


def remember_loaded(model: ESM2) -> None:
    """Keep each rotary module's ``inv_freq`` as it is now (call right after loading)."""
    for layer in model.layers:
        rot = layer.self_attn.rot_emb
        object.__setattr__(rot, _LOADED, rot.inv_freq.detach().to("cpu", copy=True))


def loaded_inv_freq(rot) -> torch.Tensor:
    """The rotary module's ``inv_freq`` as loaded, in its loaded dtype, on the CPU.

    Remembered by :func:`load_model`; a model that did not come through it is remembered the
    first time it is seen here (so call this before changing its precision).
    """
    if not hasattr(rot, _LOADED):
        object.__setattr__(rot, _LOADED, rot.inv_freq.detach().to("cpu", copy=True))
    return getattr(rot, _LOADED)


def peek_architecture(name: str | None, weights: str, trust_checkpoint: bool = False) -> Architecture:
    """The architecture :func:`load_model` will load, without building it.

    A checkpoint path without a model name has its config read (memory-mapped: the tensors'
    bytes are not read).
    """
    if weights in ("random", "auto") or name is not None:
        return architecture(name or DEFAULT_MODEL)
    return checkpoint_architecture(read_checkpoint(weights, trust=trust_checkpoint), weights)


def fingerprint(model: ESM2) -> str:
    """SHA-256 over the embedding, final layer norm and last layer's fc2 bias, as stored."""
    h = hashlib.sha256()
    for t in (model.embed_tokens.weight, model.emb_layer_norm_after.weight, model.layers[-1].fc2.bias):
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def canonical_inv_freq(dim: int) -> torch.Tensor:
    """RoPE inverse frequencies for head dimension ``dim``, float32 on the CPU, computed exactly as
    ``esm.rotary_embedding.RotaryEmbedding.__init__`` does (what a checkpoint without the buffer
    gets from fair-esm's constructor)."""
    return 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def reset_rotary_caches(model: ESM2) -> None:
    """Drop fair-esm's cos/sin tables (keyed on length and device, not dtype)."""
    for layer in model.layers:
        rot = layer.self_attn.rot_emb
        rot._seq_len_cached = None
        rot._cos_cached = None
        rot._sin_cached = None


def set_precision(model: ESM2, device: torch.device, dtype: torch.dtype, progress=None) -> None:
    """Move ``model`` to ``device``/``dtype`` in place, with no state carried over.

    Weights are converted in place, so only one copy is ever held (an up-cast after a down-cast
    is exact: the reference then computes on the very weights the low-precision paths used).
    Rotary inverse frequencies are the loaded buffer cast to ``dtype`` (exactly what
    ``model.to(dtype)`` does to the loaded model), never the definition, and the rotary caches
    are cleared (see the module docstring). Tensors still on the host go to a CUDA device through
    pinned staging buffers (:func:`to_device_pinned`) in their stored dtype, then are converted
    on the device.
    """
    loaded = [loaded_inv_freq(layer.self_attn.rot_emb) for layer in model.layers]  # before any cast
    if device.type == "cuda":
        to_device_pinned(model, device, progress=progress)
    model.to(device=device, dtype=dtype)
    for layer, inv in zip(model.layers, loaded):
        layer.self_attn.rot_emb.inv_freq = inv.to(device=device, dtype=dtype)
    reset_rotary_caches(model)


def to_device_pinned(model: ESM2, device: torch.device, chunk: int = 64 << 20, progress=None) -> int:
    """Copy every host tensor of ``model`` to CUDA ``device`` through two pinned staging buffers.

    A pageable ``.to("cuda")`` runs at ~1 GB/s on the H100 machine, a pinned copy at ~50 GB/s.
    Each tensor (memory-mapped checkpoint pages or host memory, in its stored dtype) is copied
    chunk by chunk into a pinned buffer (reading the file at disk speed when it is not cached)
    while the previous chunk crosses to the device asynchronously on a side stream. Values are
    not changed (same dtype, bytes copied). Returns the bytes copied.

    Args:
        progress: optional :class:`tracer.runner.progress.Progress` (a bytes ticker).
    """
    host = [(m, name, t, kind) for m in model.modules() for kind, table in (("p", m._parameters), ("b", m._buffers))
            for name, t in table.items() if t is not None and t.device.type == "cpu"]
    total = sum(t.numel() * t.element_size() for _, _, t, _ in host)
    if not host:
        return 0
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done_events: list = [None, None]
    stream = torch.cuda.Stream(device=device)
    moved = 0
    k = 0
    done: dict[int, torch.Tensor] = {}  # id(host tensor) -> its device copy (keeps tied weights tied)
    with torch.no_grad():
        for module, name, t, kind in host:
            if id(t) in done:
                (module._parameters if kind == "p" else module._buffers)[name] = done[id(t)]
                continue
            src = t.detach().contiguous()
            dst = torch.empty(src.shape, dtype=src.dtype, device=device)
            n = src.numel() * src.element_size()
            src_bytes = src.reshape(-1).view(torch.uint8) if n else None
            dst_bytes = dst.reshape(-1).view(torch.uint8) if n else None
            for off in range(0, n, chunk):
                m = min(chunk, n - off)
                if done_events[k] is not None:
                    done_events[k].synchronize()  # this buffer's previous copy has left
                staging[k][:m].copy_(src_bytes[off : off + m])  # host -> pinned (reads the file pages)
                with torch.cuda.stream(stream):
                    dst_bytes[off : off + m].copy_(staging[k][:m], non_blocking=True)
                    done_events[k] = torch.cuda.Event()
                    done_events[k].record(stream)
                k = 1 - k
                moved += m
                if progress is not None:
                    progress.tick("to device", moved, total, bytes_unit=True)
            new = torch.nn.Parameter(dst, requires_grad=False) if kind == "p" else dst
            (module._parameters if kind == "p" else module._buffers)[name] = new
            done[id(t)] = new
    stream.synchronize()
    torch.cuda.current_stream(device).wait_stream(stream)
    if progress is not None:
        progress.tick_done()
    return moved


def _set_rotary(layer, inv_freq: torch.Tensor) -> None:
    """One layer's rotary ``inv_freq``, and its cos/sin caches cleared."""
    rot = layer.self_attn.rot_emb
    rot.inv_freq = inv_freq
    rot._seq_len_cached = rot._cos_cached = rot._sin_cached = None


@contextlib.contextmanager
def upcast_twin(model: ESM2, dtype: torch.dtype):
    """fair-esm's ESM2 of ``model``'s shape whose weights are exact up-casts of ``model``'s, one layer at a time.

    The reference path runs this twin's own ``ESM2.forward`` while ``model`` stays in the run
    dtype (so the paths can run in lockstep). The twin is built on the meta device (no memory);
    its embedding, final norm and heads are up-cast once (``E x E`` at most); each layer's
    weights are up-cast to ``dtype`` on the weights' device by a pre-hook when the layer is
    entered and dropped by a post-hook when the last forward inside it returns, so one layer of
    up-cast weights exists at a time (two while sub-batches in lockstep straddle a boundary).
    The up-cast of a low-precision tensor is exact, and the rotary ``inv_freq`` is the loaded
    buffer cast to ``dtype``, as :func:`set_precision` sets it, so the twin computes what
    ``model`` converted in place to ``dtype`` would compute.

    Example::

        with upcast_twin(model, torch.float32) as ref:
            ref(tokens, repr_layers=[ref.num_layers])
    """
    with torch.device("meta"):
        twin = ESM2(
            num_layers=model.num_layers,
            embed_dim=model.embed_dim,
            attention_heads=model.attention_heads,
            alphabet=model.alphabet,
            token_dropout=model.token_dropout,
        )
    device = model.embed_tokens.weight.device
    outer = {k: v.to(dtype) for k, v in model.state_dict().items() if not k.startswith("layers.")}
    twin.load_state_dict(outer, strict=False, assign=True)
    twin.eval().requires_grad_(False)

    inside = [0] * model.num_layers  # forwards inside each layer (sub-batches park mid-layer)

    def materialise(i):
        def hook(module, args):
            if inside[i] == 0:
                state = {k: v.to(dtype) for k, v in model.layers[i].state_dict().items()}
                module.load_state_dict(state, assign=True)
                module.requires_grad_(False)
                # the loaded buffer cast to dtype, as set_precision does
                _set_rotary(module, loaded_inv_freq(model.layers[i].self_attn.rot_emb).to(device=device, dtype=dtype))
            inside[i] += 1

        return hook

    def drop(i):
        def hook(module, args, output):
            inside[i] -= 1
            if inside[i] == 0:
                module.to_empty(device="meta")
                _set_rotary(module, module.self_attn.rot_emb.inv_freq)

        return hook

    handles = []
    try:
        for i, layer in enumerate(twin.layers):
            handles.append(layer.register_forward_pre_hook(materialise(i)))
            handles.append(layer.register_forward_hook(drop(i)))
        yield twin
    finally:
        for h in handles:
            h.remove()
        del twin


@contextlib.contextmanager
def strict_fp32_matmul():
    """Run float32 matmuls in full float32 (no TF32) and restore the caller's settings after."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _last_line(e: BaseException) -> str:
    text = [t for t in str(e).strip().splitlines() if t.strip()]
    return text[-1].strip() if text else type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
