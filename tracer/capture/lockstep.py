"""Run several traced forwards in lockstep, one layer at a time, so memory is bounded by a layer.

Each *stream* is one forward (fair-esm's ``ESM2.forward`` on a padded (sub-)batch, the packed
path, a user's plug-in, the reference) that delivers its taps to a ``record(name, tensor)``
callback in walk order. That is all a stream has to do: the forward itself is not rewritten.
Every stream runs in its own thread, but only one thread runs at any time (a baton is passed),
so streams that share modules (fair-esm's rotary caches) never race, and the order of work is
the same on every run. For each *group* of taps (``embed``, layer 0, layer 1, ..., ``final_norm``):

1. every stream in turn runs until it delivers its first tap of a later group (it then waits in
   its ``record`` call, before that tap is kept) or its forward returns;
2. ``on_group(group)`` runs in the calling thread: the pairs of that group are computed and
   their tensors released.

So at any time the taps held are those of one group of every stream (plus the one tap each
parked stream holds on its stack); a stream's activations stay alive while it is parked (its
residual stream, O(one layer)), its attention workspace does not.

Errors raised in a stream (out of memory, a bug) stop every other stream (their next ``record``
raises :class:`Aborted`) and are re-raised in the calling thread, as is Ctrl-C; a stream that
does not reach a tap within :data:`STOP_SECONDS` is left to die with the process.

Example::

    streams = [Stream("unpacked", lambda rec: run_unpacked(model, batch, names, rec)), ...]
    run_lockstep(streams, group_of=tap_group, on_group=lambda g: collector.flush())
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tracer.taps import EMBED, FINAL, parse_tap

FINAL_GROUP = 1 << 30
STOP_SECONDS = 5.0
"""How long an interrupted run waits for the other streams to reach a tap and stop."""


@functools.lru_cache(maxsize=1 << 14)
def tap_group(name: str) -> int:
    """Group of a tap: ``-1`` for ``embed``, the layer index, or :data:`FINAL_GROUP`."""
    layer, site = parse_tap(name)
    if site == EMBED:
        return -1
    if site == FINAL:
        return FINAL_GROUP
    return layer


class Aborted(Exception):
    """Raised inside a parked stream when another stream failed (never reaches the user)."""


@dataclass
class Stream:
    """One forward to run in lockstep.

    Attributes:
        name: label (``unpacked[0]``, ``packed``, ``reference[1]``).
        run: ``run(record)``: runs the forward, delivering taps to ``record(name, tensor)``.
        record: where this stream's taps go (called in the stream's thread, under the baton).
        context: a context manager factory entered around each of this stream's turns, in the
            stream's thread (e.g. full-float32 matmuls for the reference).
        seconds: wall seconds of this stream's turns (set by :func:`run_lockstep`).
    """

    name: str
    run: Callable
    record: Callable[[str, torch.Tensor], None]
    context: Callable[[], contextlib.AbstractContextManager] | None = None
    seconds: float = 0.0
    _go: threading.Event = field(default_factory=threading.Event, repr=False)
    _parked: threading.Event = field(default_factory=threading.Event, repr=False)
    _target: int = -(1 << 31)
    _done: bool = False
    _error: BaseException | None = None
    _abort: bool = False


def _turn_context(stream: Stream):
    return stream.context() if stream.context is not None else contextlib.nullcontext()


def _stream_main(stream: Stream, inference: bool, device: torch.device | None) -> None:
    stream._go.wait()
    stream._go.clear()
    ctx = None
    try:
        if stream._abort:
            raise Aborted()
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread

        def gated(name: str, tensor: torch.Tensor) -> None:
            nonlocal ctx
            group = tap_group(name)
            while group > stream._target:  # park until the scheduler allows this group
                ctx.__exit__(None, None, None)
                ctx = None
                stream._parked.set()
                stream._go.wait()
                stream._go.clear()
                if stream._abort:
                    raise Aborted()
                ctx = _turn_context(stream)
                ctx.__enter__()
            stream.record(name, tensor)

        ctx = _turn_context(stream)
        ctx.__enter__()
        with torch.inference_mode(inference):
            stream.run(gated)
    except BaseException as e:  # handed to the scheduler, re-raised in the calling thread
        stream._error = e
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
        stream._done = True
        stream._parked.set()


def run_lockstep(streams: list[Stream], groups: list[int], on_group: Callable[[int], None], inference: bool = True,
                 device: torch.device | None = None) -> None:
    """Run ``streams`` group by group (module docstring); ``groups`` in increasing order.

    ``inference``: run the forwards under ``torch.inference_mode`` (it is per thread, like the
    current CUDA ``device``, which is set in every stream's thread).

    Raises the first stream's error (not :class:`Aborted`) after every thread has stopped.
    """
    threads = [threading.Thread(target=_stream_main, args=(s, inference, device), name=f"tracer-{s.name}", daemon=True) for s in streams]
    for t in threads:
        t.start()
    try:
        for group in [*groups, FINAL_GROUP + 1]:  # the last turn lets every forward return
            for s in streams:
                if s._done:
                    continue
                s._target = group
                t0 = time.perf_counter()
                s._go.set()
                s._parked.wait()
                s._parked.clear()
                s.seconds += time.perf_counter() - t0
                if s._error is not None:
                    raise s._error
            if group <= FINAL_GROUP:
                on_group(group)
    finally:
        for s in streams:
            s._abort = True
        deadline = time.monotonic() + STOP_SECONDS
        for s, t in zip(streams, threads):
            while t.is_alive() and time.monotonic() < deadline:  # a stream stops at its next tap
                s._go.set()
                t.join(0.05)
        # a stream still inside a long call (a hung plug-in) is left behind: it is a daemon
        # thread, and its next tap raises Aborted, so it records and writes nothing more
