"""Status lines, and on a terminal a live ticker for long phases (load, forwards, writing).

Lines go to stderr as ``tracer: <message>``, one short line each (at most :data:`MAX_LINE`
characters: a long batch is summarised where it is described, and anything longer is cut). Tickers (``\\r  forwards: 12/38 layers, 3 s left``)
are shown only when stderr is a terminal, and never under ``--quiet``: logs and pipes get the
status lines alone. Time left is extrapolated from the phase's own rate so far.

Example::

    say = Progress(quiet=False)
    say("loading")
    for i in range(n):
        say.tick("forwards", i + 1, n, "layers")
    say.tick_done()
"""

from __future__ import annotations

import sys
import time


MAX_LINE = 300
"""Characters of a status line; a longer message is cut in the middle (and says so)."""


def short_line(msg: str, limit: int = MAX_LINE) -> str:
    """``msg`` if it fits in ``limit`` characters, else its head and tail around ``... [N characters] ...``."""
    if len(msg) <= limit:
        return msg
    keep = (limit - 40) // 2
    return f"{msg[:keep]} ... [{len(msg) - 2 * keep} characters] ... {msg[-keep:]}"


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class Progress:
    """``say(msg)`` prints a status line; :meth:`tick` updates a one-line ticker (terminal only).

    Args:
        quiet: print nothing.
        stream: where to print (default ``sys.stderr``).
        interval: seconds between ticker redraws.
    """

    def __init__(self, quiet: bool = False, stream=None, interval: float = 0.2):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self._start: dict[str, float] = {}
        self._drawn = 0.0
        self._shown = False

    def __call__(self, msg: str) -> None:
        if self.quiet:
            return
        if self._shown:
            self._clear()
        print(f"tracer: {short_line(msg)}", file=self.stream, flush=True)

    def tick(self, label: str, done: float, total: float, unit: str = "", bytes_unit: bool = False) -> None:
        """``done`` of ``total`` (layers, or bytes when ``bytes_unit``) of phase ``label``."""
        if self.quiet or not self.tty:
            return
        now = time.perf_counter()
        start = self._start.setdefault(label, now)
        if now - self._drawn < self.interval and done < total:
            return
        self._drawn = now
        left = ""
        if 0 < done < total and now > start:
            left = f", {_fmt_seconds((now - start) / done * (total - done))} left"
        amount = f"{_fmt_bytes(done)}/{_fmt_bytes(total)}" if bytes_unit else f"{done:g}/{total:g} {unit}"
        print(f"\r  {label}: {amount}{left}".ljust(60), end="", file=self.stream, flush=True)
        self._shown = True

    def tick_done(self) -> None:
        """End the current ticker (clears its line)."""
        self._start.clear()
        if self._shown:
            self._clear()

    def _clear(self) -> None:
        print("\r" + " " * 60 + "\r", end="", file=self.stream, flush=True)
        self._shown = False


class Steps:
    """``[k/n] label`` lines with the time left, estimated from the steps done so far, printed
    through a :class:`Progress` (campaigns: one step per traced run).

    Args:
        say: the :class:`Progress` that prints (and knows whether to be quiet).
        total: number of steps; ``already``: steps done before (a resume).
    """

    def __init__(self, say: Progress, total: int, already: int = 0):
        self.say, self.total, self.count = say, total, already
        self.spent: list[float] = []
        if already:
            say(f"resuming: {already} of {total} already done")

    def start(self, label: str) -> float:
        self.say(f"[{self.count + 1}/{self.total}] {label}")
        return time.perf_counter()

    def finish(self, started: float, outcome: str) -> None:
        self.spent.append(time.perf_counter() - started)
        self.count += 1
        left = self.total - self.count
        eta = f"; {left} left, about {duration(left * sum(self.spent) / len(self.spent))}" if left else ""
        self.say(f"      {outcome} ({duration(self.spent[-1])}{eta})")


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"
