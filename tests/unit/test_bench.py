"""The benchmark's bookkeeping (no timing is asserted): marks against targets, interleaving in
fresh threads, and the docs' table generated from the JSON."""

from __future__ import annotations

import json
import threading

from tracer import bench
from tracer.benchmarks.report import check, format_markdown
from tracer.benchmarks.timing import Excluding, interleaved


def test_marks_against_targets():
    assert check("metrics_only_over_bare", "m", 1.29, "", "cuda").mark == "ok"
    assert check("metrics_only_over_bare", "m", 1.31, "", "cuda").mark == "MISSED"
    assert check("metrics_only_over_bare", "m", 1.45, "", "cpu").mark == "ok"  # 1.5 on CPU
    assert check("write_throughput_over_raw", "w", 0.69, "", "cpu").mark == "MISSED"
    assert check("estimate_over_measured_peak", "e", 1.25, "", "cpu").mark == "MISSED"
    assert check("cached_time_to_verdict_seconds", "t", 30.0, "", "cpu").mark == ""  # a GPU target only


def test_ratio_of_work_including_the_bare_forwards_is_never_printed_below_one():
    c = check("metrics_only_over_bare", "m", 0.85, "8.9 s / 10.5 s", "cpu")
    assert c.mark == "noise"
    table = format_markdown({"machine": {"device": "x"}, "debug": {"model": "m", "dtype": "bf16", "checks": [c.to_json()]}})
    assert "0.85" not in table and "timing noise" in table


def test_sides_interleave_each_in_a_fresh_thread():
    order, threads = [], set()

    def side(name):
        def fn():
            order.append(name)
            threads.add(threading.get_ident())
            return Excluding(name, 0.0)

        return fn

    times, last = interleaved({"a": side("a"), "b": side("b")}, repeats=2)
    assert order == ["a", "b"] * 3  # one warm-up round, then two timed rounds, taking turns
    assert len(times["a"]) == len(times["b"]) == 2 and last == {"a": "a", "b": "b"}
    assert threading.get_ident() not in threads


def test_markdown_table_is_generated_from_the_json(tmp_path, capsys):
    r = {"command": "python -m tracer.bench --device cpu", "date": "2026-12-01", "machine": {"device": "x86_64"},
         "debug": {"model": "esm2_t6_8M_UR50D", "dtype": "bfloat16",
                   "checks": [check("traced_over_bare_plus_raw_write", "full trace / (bare + raw write)", 1.3, "13 s / 10 s", "cpu").to_json()]}}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(r))
    assert bench.main(["--markdown", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| full trace / (bare + raw write) | 13 s / 10 s | 1.30 | <= 1.2 | MISSED |" in out
    assert "x86_64, 2026-12-01" in out
