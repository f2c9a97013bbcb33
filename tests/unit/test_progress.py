"""Progress: tickers on a terminal only; logs get status lines; --quiet gets nothing."""

import io
import time

from tracer.runner.progress import Progress, Steps


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _phase(p: Progress):
    p("loading")
    for i in range(1, 4):
        p.tick("forwards", i, 3, "layers")
        time.sleep(0.01)
    p.tick_done()
    p.tick("writing", 5e8, 1e9, bytes_unit=True)
    p.tick_done()


def test_terminal_shows_layers_bytes_and_time_left():
    out = _Terminal()
    _phase(Progress(stream=out, interval=0))
    text = out.getvalue()
    assert "tracer: loading\n" in text
    assert "forwards: 2/3 layers, 0 s left" in text and "forwards: 3/3 layers" in text
    assert "writing: 0.50 GB/1.00 GB" in text
    assert text.endswith("\r")  # the ticker line is cleared when the phase ends


def test_logs_get_status_lines_only():
    out = io.StringIO()  # not a terminal: a log file or a pipe
    _phase(Progress(stream=out, interval=0))
    assert out.getvalue() == "tracer: loading\n"


def test_quiet_prints_nothing():
    out = _Terminal()
    _phase(Progress(quiet=True, stream=out, interval=0))
    assert out.getvalue() == ""


def test_steps_count_resume_and_time_left():
    out = io.StringIO()
    steps = Steps(Progress(stream=out, interval=0), total=3, already=1)
    steps.finish(steps.start("row b"), "agree")
    lines = out.getvalue().splitlines()
    assert lines[0] == "tracer: resuming: 1 of 3 already done"
    assert lines[1] == "tracer: [2/3] row b"
    assert lines[2].startswith("tracer:       agree (0 s; 1 left, about 0 s")


def test_steps_say_nothing_when_quiet():
    out = io.StringIO()
    steps = Steps(Progress(quiet=True, stream=out), total=2, already=1)
    steps.finish(steps.start("x"), "done")
    assert out.getvalue() == ""
