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
a traceback from deep inside ``import torch``. The same handlers are back once the command's
work is done (its files are committed, its output printed) while the interpreter shuts down
(torch takes about half a second): a signal then is one line too, with the same status.

The line says what the signal cost: ``(no trace was written)`` -- each command names its own
output, e.g. ``no bundle was written`` -- or, once a file is in place,
``(traces/x.h5 was written in full)`` (:func:`tracer.store.files.committed`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from tracer.store import files

SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

NOTHING_WRITTEN = "no trace was written"

_CLI_PROCESS = [False]
"""Set by :func:`quiet_during_imports`: this process is a ``python -m tracer.X`` command."""

_UNWRITTEN = [NOTHING_WRITTEN, 0]
"""What the running command has not written if stopped before any file is in place, and how
many files this process had committed when the command began."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``signum`` says which (SIGINT raises it too)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def set_unwritten(text: str) -> None:
    """Name what the running command writes, for the line of a signal before it is written
    (``no trace was written``, ``no bundle was written``, ``nothing was written``); files
    committed from now on are the command's own."""
    _UNWRITTEN[:] = [text, len(files.committed())]


def message(signum: int) -> str:
    """The line printed when a command is stopped by ``signum``: what was or was not written."""
    done = files.committed()[_UNWRITTEN[1]:]
    if done:
        more = f" and {len(done) - 1} more file{'s' if len(done) > 2 else ''}" if len(done) > 1 else ""
        what = f"{done[0]}{more} {'were' if more else 'was'} written in full"
    else:
        what = _UNWRITTEN[0]
    if signum == signal.SIGINT:
        return f"tracer: interrupted ({what})"
    return f"tracer: stopped by {signal.Signals(signum).name} ({what})"


def _catchable(signum: int) -> bool:
    """Not ignored by the parent, and not a handler someone else installed."""
    current = signal.getsignal(signum)
    return current in (signal.SIG_DFL, signal.default_int_handler, None) or getattr(current, "_tracer", False)


def own_package() -> None:
    """Make ``tracer`` this installation's package when a folder named ``tracer`` shadows it.

    ``python -m tracer.run`` puts the current folder first on ``sys.path``. If it holds a folder
    ``tracer`` without ``__init__.py`` (a clone of this repository, say), Python makes that
    folder a namespace package ``tracer``; an editable install still supplies the submodules, but
    ``tracer/__init__.py`` never runs, and ``from tracer import __version__`` (or a plug-in's
    ``tracer.tap``) fails after the model has loaded. Here the package gets its own
    ``__init__`` and search path back, so the command runs as installed.
    """
    package = sys.modules.get("tracer")
    if package is None or getattr(package, "__file__", None) is not None:
        return
    folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../tracer (this module is tracer/runner/interrupts.py)
    init = os.path.join(folder, "__init__.py")
    package.__path__ = [folder]
    package.__file__ = init
    with open(init, encoding="utf-8") as f:
        exec(compile(f.read(), init, "exec"), package.__dict__)


def quiet_during_imports(unwritten: str = NOTHING_WRITTEN) -> None:
    """Until :func:`handling` takes over, and again after it: a signal prints one line and exits at once.

    Called by the ``python -m tracer.X`` entry points before they import torch; ``unwritten``
    names what the command writes (for the line).
    """
    set_unwritten(unwritten)
    _CLI_PROCESS[0] = True
    own_package()

    def stop(signum, frame):
        with contextlib.suppress(Exception):  # what the command printed is not lost to os._exit
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.write(message(signum) + "\n")
            sys.stderr.flush()
        os._exit(128 + signum)

    stop._tracer = True
    stop._process = True  # stays after handling(): the process ends the same way while it shuts down
    for s in SIGNALS:
        if _catchable(s):
            signal.signal(s, stop)


def end_process(status: int) -> int:
    """A command's last step: once its work is done, end the process without the interpreter's
    slow teardown (torch's takes about half a second, during which Python no longer handles
    signals and one would kill the process with no line and status -N).

    In a ``python -m tracer.X`` process (:func:`quiet_during_imports` ran): wait for the
    non-daemon threads (a weights-cache write), flush stdout and stderr, and ``os._exit(status)``;
    a signal meanwhile is one line and 128 + its number. Elsewhere (a call from Python) it
    returns ``status``.
    """
    if not _CLI_PROCESS[0] or threading.current_thread() is not threading.main_thread():
        return status
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


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
            if getattr(previous, "_tracer", False) and previous is not raise_interrupted and not getattr(previous, "_process", False):
                previous = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
            signal.signal(s, previous)
