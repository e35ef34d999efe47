"""soilnet/progress.py: lines in a log every SOILNET_PROGRESS_S seconds, a bar on a terminal; a fake clock."""

from __future__ import annotations

import io
import re

import pytest

from soilnet.progress import ENV, Progress, duration, interval_s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_a_line_every_interval_with_done_total_rate_and_eta_then_a_final_line():
    clock, out = Clock(), io.StringIO()
    with Progress("pack[0/1]", 100, "sample", stream=out, interval=30, clock=clock) as p:
        for _ in range(10):
            clock.now += 4  # 10 samples in 40 s: one line, at 32 s
            p.update(1)
    lines = _lines(out)
    assert lines[0] == "pack[0/1]: 0/100 samples (0%), started"
    assert lines[1] == "pack[0/1]: 8/100 samples (8%), 0.25 samples/s, ETA 0:06:08"
    assert lines[2] == "pack[0/1]: finished 10/100 samples (10%) in 0:00:40, 0.25 samples/s"
    assert len(lines) == 3


def test_interval_zero_reports_every_update_and_the_postfix():
    clock, out = Clock(), io.StringIO()
    p = Progress("fit fold 0", 4, "batch", stream=out, interval=0, clock=clock)
    p.set_postfix(epoch="1/2")
    for _ in range(4):
        clock.now += 0.5
        p.update(1)
    p.close()
    p.close()  # once
    lines = _lines(out)
    assert len(lines) == 6
    assert lines[1] == "fit fold 0: 1/4 batches (25%), 2.0 batches/s, ETA 0:00:02, epoch 1/2"
    assert lines[4].endswith("4/4 batches (100%), 2.0 batches/s, ETA 0:00:00, epoch 1/2")
    assert lines[5].startswith("fit fold 0: finished 4/4 batches (100%) in 0:00:02")


def test_resumed_work_counts_in_done_but_not_in_the_rate():
    clock, out = Clock(), io.StringIO()
    p = Progress("pretrain", 1000, "step", initial=900, stream=out, interval=0, clock=clock)
    clock.now += 10
    p.update(10)
    assert _lines(out)[-1] == "pretrain: 910/1000 steps (91%), 1.0 steps/s, ETA 0:01:30"


def test_an_error_inside_ends_with_a_stopped_line():
    clock, out = Clock(), io.StringIO()
    with pytest.raises(KeyError), Progress("cross-validation", 5, "fold", stream=out, clock=clock) as p:
        p.update(2)
        raise KeyError("x")
    assert _lines(out)[-1].startswith("cross-validation: stopped at 2/5 folds (40%)")


def test_disabled_on_other_ranks_writes_nothing():
    out = io.StringIO()
    with Progress("pretrain", 10, "step", enabled=False, stream=out, interval=0) as p:
        p.update(5)
        p.set_postfix(loss="0.1")
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_not_lines():
    out = io.StringIO()
    with Progress("pack[0/1]", 10, "sample", stream=out, interval=0, tty=True) as p:
        p.update(10)
    text = out.getvalue()
    assert "\r" in text and "10/10" in text and "ETA" not in text


def test_no_rate_yet_gives_an_unknown_eta():
    clock, out = Clock(), io.StringIO()
    p = Progress("predict-map", None, "tile", stream=out, interval=0, clock=clock)
    p.update(0)
    assert _lines(out)[-1] == "predict-map: 0 tiles, 0 tiles/s, ETA ?"


def test_the_interval_comes_from_the_environment_and_a_bad_value_names_the_variable():
    assert interval_s({}) == 30
    assert interval_s({ENV: "2.5"}) == 2.5
    assert interval_s({ENV: "0"}) == 0
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ValueError, match=re.escape(ENV)):
            interval_s({ENV: bad})


def test_durations():
    assert duration(0) == "0:00:00"
    assert duration(3725.4) == "1:02:05"
    assert duration(float("inf")) == "?"
