"""The progress bar: carriage returns on a terminal, a bounded number of plain lines elsewhere."""

from __future__ import annotations

import inspect
import io

import pytest

from raysemi.progress import ProgressBar, format_duration


class Clock:
    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        return self.t

    def tick(self) -> None:
        self.t += self.step


def run_bar(total: int, step_s: float, tty: bool, **kw) -> str:
    out, clock = io.StringIO(), Clock(step_s)
    bar = ProgressBar(total, "train", stream=out, tty=tty, clock=clock, **kw)
    for i in range(1, total + 1):
        clock.tick()
        bar.update(i, f"loss {1 / i:.4f}")
    bar.close()
    return out.getvalue()


@pytest.mark.parametrize("total,step_s,max_lines", [
    (10_000, 0.001, 11),   # fast: one line per 10%
    (1_000, 1.0, 11 + 1_000 // 60 + 1),  # slow (1000 s): also one line a minute at most
    (3, 0.1, 3),  # fewer steps than marks: one line per step
])
def test_non_tty_prints_few_plain_lines(total, step_s, max_lines):
    text = run_bar(total, step_s, tty=False)
    lines = text.splitlines()
    assert "\r" not in text and len(lines) <= max_lines
    assert lines[-1].startswith(f"train {total}/{total} (100%)") and "done" in lines[-1] and "loss" in lines[-1]


def test_non_tty_prints_on_time_when_progress_is_slow():
    out, clock = io.StringIO(), Clock(10.0)
    bar = ProgressBar(1_000, "x", stream=out, tty=False, clock=clock, every_s=30)
    for i in range(1, 13):  # 1.2% done in 120 s
        clock.tick()
        bar.update(i)
    assert len(out.getvalue().splitlines()) == 4  # every 30 s


def test_non_tty_does_not_repeat_the_last_line_for_the_same_count():
    # evaluate_volumes reports the same count again while it collects the metrics in order
    out = io.StringIO()
    bar = ProgressBar(6, "test volumes", stream=out, tty=False, clock=Clock(0.1))
    for done in (1, 2, 3, 4, 5, 6, 6, 6):
        bar.update(done, "6 segmented" if done >= 5 else None)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and lines[-1].startswith("test volumes 6/6 (100%)"), lines
    # a count not yet shown is still shown at close
    out = io.StringIO()
    bar = ProgressBar(100, "x", stream=out, tty=False, clock=Clock(0.1))
    bar.update(1)
    bar.update(2)  # within the first 10%: not printed yet
    bar.close()
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["x   2/100"]


def test_tty_redraws_one_line_with_carriage_returns():
    text = run_bar(10_000, 0.001, tty=True, columns=100)
    assert text.count("\r") <= 10_000 * 0.001 / 0.1 + 2  # redrawn at most every refresh_s (0.1 s)
    assert text.count("\n") == 1 and text.endswith("\n")
    last = text.rstrip("\n").split("\r")[-1]
    assert last.startswith("train |") and "10000/10000 100% [0:10<done, 1000.0it/s] loss 0.0001" in last
    assert len(last) < 100  # fits the terminal
    narrow = run_bar(10, 0.1, tty=True, columns=40).rstrip("\n").split("\r")[-1]
    assert len(narrow) == 39 and narrow.startswith("train 10/10 100%")  # no room for the bar: none


def test_tty_message_goes_above_the_bar():
    out, clock = io.StringIO(), Clock(1.0)
    bar = ProgressBar(10, "train", stream=out, tty=True, clock=clock, columns=100)
    clock.tick()
    bar.update(3, "loss 0.5")
    bar.write("[3] val dice 0.5")
    text = out.getvalue()
    cleared, message, redrawn = text.rsplit("\r", 1)[0], text.split("\n")[0], text.split("\n")[1]
    assert message.endswith("[3] val dice 0.5") and "\r" in cleared
    assert redrawn.startswith("\rtrain |") and "3/10" in redrawn


def test_eta_rate_and_resumed_start():
    clock = Clock(2.0)
    bar = ProgressBar(100, stream=io.StringIO(), tty=False, clock=clock, initial=50)
    clock.tick()
    bar.update(60)
    assert bar.rate() == pytest.approx(5.0) and bar.eta() == pytest.approx(8.0)
    assert "60/100 ( 60%) 5.0 it/s" in bar.text() and "ETA 0:08" in bar.text()
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(float("nan")) == "?"


def test_disabled_bar_prints_nothing_but_messages():
    out = io.StringIO()
    bar = ProgressBar(5, stream=out, tty=True, enabled=False)
    bar.update(5)
    bar.write("hello")
    bar.close()
    assert out.getvalue() == "hello\n"


def test_ray_trials_show_no_progress_bar():
    """The search prints its own table; a bar per trial would flood the trial logs."""
    import raysemi.trainable

    source = inspect.getsource(raysemi.trainable)
    assert "ConsoleCallback" not in source and "ProgressBar" not in source
    assert "raysemi.console" not in source and "raysemi.progress" not in source


def test_a_validation_line_leaves_out_hd95_when_it_was_not_computed():
    """--no-eval-hd95 validates without HD95 (NaN in the metrics): the line says nothing of it
    rather than 'hd95 nan'; with it computed, the line gives it."""
    import io
    import math

    from raysemi.console import ConsoleCallback

    out = io.StringIO()
    console = ConsoleCallback(stream=out)
    console.on_eval(None, 10, {"val/dice": 0.5, "val/hd95": math.nan, "val/best_dice": 0.5}, True)
    console.on_eval(None, 20, {"val/dice": 0.6, "val/hd95": 3.25, "val/best_dice": 0.6}, True)
    assert out.getvalue().splitlines() == ["[10] val dice 0.5000 (best 0.5000) *",
                                           "[20] val dice 0.6000 hd95 3.25 (best 0.6000) *"]
