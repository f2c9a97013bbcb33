"""Timing every side of a comparison the same way: a fresh thread per timed call, repeats
interleaved across sides, medians.

Why: on a CPU the same forward runs at a different speed in the main thread than in a worker
thread (tracer's lockstep runs every path in a worker thread), and a shared machine's load
drifts over minutes. So every timed call (a bare forward, a traced run) runs in a new thread,
and the sides take turns, repeat after repeat, so that drift hits all of them alike.

Example::

    times, _ = interleaved({"bare": bare, "traced": traced}, repeats=3, device=device)
    median(times["bare"])
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Callable

import torch


def sync(device: torch.device | None) -> None:
    """Wait for ``device``'s queued work (CUDA), so a wall clock covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def in_fresh_thread(fn: Callable[[], object], device: torch.device | None = None) -> tuple[float, object]:
    """``(wall seconds, result)`` of ``fn()`` run in a new thread, device work included.

    The thread inherits nothing from the caller's thread-local state: it runs with gradients on
    and outside ``inference_mode`` unless ``fn`` says otherwise, as tracer's own stream threads
    do. An exception in ``fn`` is re-raised here.
    """
    box: dict = {}

    def body() -> None:
        try:
            if device is not None and device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # the current device is per thread
            sync(device)
            t = time.perf_counter()
            box["result"] = fn()
            sync(device)
            box["seconds"] = time.perf_counter() - t
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=body, name="tracer-bench")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["seconds"], box["result"]


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, device: torch.device | None = None,
                warmup: bool = True, before: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], dict]:
    """Seconds of every side's call, ``repeats`` times, the sides taking turns (A B C A B C ...),
    and the last result of each side.

    ``warmup``: one untimed call of each side first (kernels, allocator, caches).
    ``before(side)``: untimed preparation before each call (e.g. setting the model's precision).
    A side that returns :class:`Excluding` has its ``seconds`` left out of its time (e.g. a traced
    run's conversion of the model, which the bare side does outside its clock).
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    last: dict = {}
    for round_ in range(repeats + int(warmup)):
        for name, fn in sides.items():
            if before is not None:
                before(name)
            seconds, result = in_fresh_thread(fn, device)
            if isinstance(result, Excluding):
                seconds, result = seconds - result.seconds, result.result
            last[name] = result
            if round_ >= int(warmup):
                times[name].append(seconds)
    return times, last


class Excluding:
    """A timed call's result, with seconds of untimed work it did (subtracted by :func:`interleaved`)."""

    def __init__(self, result, seconds: float):
        self.result, self.seconds = result, seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def bare_medians(times: dict[str, list[float]], repeats: int) -> tuple[dict[str, float], float]:
    """``({path: median seconds}, median of the per-repeat totals)`` of the ``bare <path>`` sides."""
    bare = [s for s in times if s.startswith("bare ")]
    return {s.removeprefix("bare "): median(times[s]) for s in bare}, median([sum(times[s][i] for s in bare) for i in range(repeats)])
