"""The lockstep scheduler: streams advance one group at a time, one thread at a time."""

import threading

import pytest
import torch

from tracer.capture.lockstep import Stream, run_lockstep, tap_group
from tracer.taps import tap_names


def _stream(name, names, log, fail_at=None):
    def run(record):
        for n in names:
            if n == fail_at:
                raise RuntimeError(f"{name} failed at {n}")
            record(n, torch.zeros(1))

    return Stream(name, run, lambda n, t: log.append((name, n, threading.get_ident())))


def test_streams_take_turns_group_by_group():
    names = tap_names(3, sites=("v", "ctx"))
    log, done = [], []
    streams = [_stream(s, names, log) for s in ("a", "b", "c")]
    run_lockstep(streams, sorted({tap_group(n) for n in names}), lambda g: done.append((g, len(log))))
    groups = [tap_group(n) for _, n, _ in log]
    assert groups == sorted(groups)  # no stream ever ran ahead of a group
    assert [s for s, _, _ in log[:3]] == ["a", "b", "c"] and len(log) == 3 * len(names)
    assert [g for g, _ in done] == sorted({tap_group(n) for n in names})
    assert all(n == 3 * sum(1 for x in names if tap_group(x) <= g) for g, n in done)  # groups done before on_group


def test_an_error_in_one_stream_stops_all_and_is_raised():
    names = tap_names(4, sites=("v",))
    log = []
    streams = [_stream("a", names, log), _stream("b", names, log, fail_at="layers.2.v"), _stream("c", names, log)]
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="b failed at layers.2.v"):
        run_lockstep(streams, sorted({tap_group(n) for n in names}), lambda g: None)
    assert threading.active_count() == before  # every stream thread has stopped
    assert max(tap_group(n) for _, n, _ in log) <= 2
