"""Signals a command may receive, and how tracer ends on them: one line, nothing half-written.

Ctrl-C (SIGINT), SIGTERM (what ``timeout``, ``kill`` and batch schedulers send) and SIGHUP (a
closed terminal) all end a command the same way: the signal becomes an :class:`Interrupted`
exception in the main thread, so every ``with`` block unwinds as it does for Ctrl-C (the trace
writer removes its partial file, the background writer stops without draining its queue), and
the entry point prints one line and exits with ``128 + signal number`` (130, 143, 129). Only
SIGKILL, which cannot be caught, can leave a partial file behind.

A signal that the parent set to be ignored (``nohup`` ignores SIGHUP) stays ignored.

While a command is still importing torch (seconds), there is nothing to clean up yet: the
handlers installed by :func:`quiet_during_imports` print the line and exit at once, instead of
a traceback from deep inside ``import torch``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

NOTHING_WRITTEN = "no trace was written"


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``signum`` says which (SIGINT raises it too)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def message(signum: int) -> str:
    """The line printed when a command is stopped by ``signum``."""
    if signum == signal.SIGINT:
        return f"tracer: interrupted ({NOTHING_WRITTEN})"
    return f"tracer: stopped by {signal.Signals(signum).name} ({NOTHING_WRITTEN})"


def _catchable(signum: int) -> bool:
    """Not ignored by the parent, and not a handler someone else installed."""
    current = signal.getsignal(signum)
    return current in (signal.SIG_DFL, signal.default_int_handler, None) or getattr(current, "_tracer", False)


def quiet_during_imports() -> None:
    """Until :func:`handling` takes over: a signal prints one line and exits at once.

    Called by the ``python -m tracer.X`` entry points before they import torch.
    """

    def stop(signum, frame):
        sys.stderr.write(message(signum) + "\n")
        sys.stderr.flush()
        os._exit(128 + signum)

    stop._tracer = True
    for s in SIGNALS:
        if _catchable(s):
            signal.signal(s, stop)


@contextlib.contextmanager
def handling():
    """Inside, SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` in the main thread (where not
    ignored); the previous handlers are restored after. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    raise_interrupted._tracer = True
    saved = {}
    for s in SIGNALS:
        if _catchable(s):
            saved[s] = signal.getsignal(s)
            signal.signal(s, raise_interrupted)
    try:
        yield
    finally:
        for s, previous in saved.items():
            if getattr(previous, "_tracer", False) and previous is not raise_interrupted:
                previous = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
            signal.signal(s, previous)
