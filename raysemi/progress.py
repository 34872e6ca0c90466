"""A progress bar with no dependency, for any loop of known length.

`ProgressBar` redraws one line in place on a terminal and prints plain lines elsewhere (CI logs,
files, Ray trial logs), at most every ~10% or every `every_s` seconds, never carriage returns.
`raysemi.train`, `raysemi.evaluate` and the data commands show one (`raysemi.predict` prints a
line per volume); Ray trials
(`trainable.py`) never do: the search prints its own progress table.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """'0:42', '12:05', '3:02:07'; '?' when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressBar:
    """`done/total`, rate, ETA and a caller's text (`info`), for a loop of known length.

    On a terminal (`tty`, by default `stream.isatty()`): one line redrawn with '\\r' at most every
    `refresh_s` seconds, ended by a newline at `close()`. Elsewhere: a plain line each time another
    `every_fraction` of the total is done or `every_s` seconds have passed since the last line,
    plus one at the end, so a log holds at most about `1 / every_fraction + elapsed / every_s + 1`
    lines. `write()` prints a message without tearing the bar. `initial` is where a resumed loop
    starts (the rate counts from there). `columns` is the terminal width (default: asked of the
    terminal each redraw); `clock` is for tests.
    """

    def __init__(self, total: int, desc: str = "", unit: str = "it", stream: TextIO | None = None,
                 tty: bool | None = None, every_fraction: float = 0.1, every_s: float = 60.0,
                 refresh_s: float = 0.1, initial: int = 0, enabled: bool = True, columns: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = max(int(total), 0), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self.every_fraction, self.every_s, self.refresh_s = every_fraction, every_s, refresh_s
        self.enabled, self.columns, self.clock = enabled, columns, clock
        self.done = self._start_done = int(initial)
        self.info = ""
        self._t0 = self._t_draw = self._t_line = clock()
        self._mark = self._fraction_mark(self.done)
        self._width = 0  # characters of the bar currently on the terminal line
        self._dirty = False  # progress not yet shown (non-tty)
        self._shown: tuple[int, str] | None = None  # (done, info) of the last plain line
        self.closed = False

    # -- numbers ---------------------------------------------------------------------------
    def _fraction_mark(self, done: int) -> int:
        if self.total <= 0 or self.every_fraction <= 0:
            return 0
        return int(done / self.total / self.every_fraction + 1e-9)

    def rate(self) -> float:
        elapsed = self.clock() - self._t0
        return (self.done - self._start_done) / elapsed if elapsed > 0 else float("nan")

    def eta(self) -> float:
        r = self.rate()
        return (self.total - self.done) / r if r > 0 else float("nan")

    def text(self) -> str:
        """The plain status line (for logs): desc, done/total (percent), rate, elapsed, ETA, info."""
        r = self.rate()
        rate = f"{r:.1f} {self.unit}/s" if math.isfinite(r) else f"? {self.unit}/s"
        left = "done" if self.done >= self.total else f"ETA {format_duration(self.eta())}"
        line = (f"{self.desc + ' ' if self.desc else ''}{self.done:>{len(str(self.total))}}/{self.total} "
                f"({self._percent():3.0f}%) {rate}, {format_duration(self.clock() - self._t0)} elapsed, {left}")
        return f"{line}; {self.info}" if self.info else line

    def bar_text(self, columns: int) -> str:
        """The terminal line, at most `columns - 1` characters: a compact status with a drawn bar
        as wide as the room left (up to 30 characters; none when under 5)."""
        r = self.rate()
        rate = f"{r:.1f}{self.unit}/s" if math.isfinite(r) else f"?{self.unit}/s"
        eta = "done" if self.done >= self.total else format_duration(self.eta())
        status = (f"{self.done}/{self.total} {self._percent():.0f}% [{format_duration(self.clock() - self._t0)}<{eta}, "
                  f"{rate}]{' ' + self.info if self.info else ''}")
        head = f"{self.desc} " if self.desc else ""
        width = min(30, columns - 1 - len(head) - len(status) - 3)
        if width >= 5:
            filled = int(width * min(self.done / self.total, 1.0)) if self.total else width
            head += f"|{'#' * filled}{'.' * (width - filled)}| "
        return (head + status)[:max(columns - 1, 10)]

    def _percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    # -- output ----------------------------------------------------------------------------
    def update(self, done: int, info: str | None = None) -> None:
        """Set the count (absolute) and, optionally, the text shown after it."""
        if self.closed:
            return
        self.done = int(done)
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        now = self.clock()
        if self.tty:
            if now - self._t_draw >= self.refresh_s or self.done >= self.total:
                self._draw()
            return
        mark = self._fraction_mark(self.done)
        if mark > self._mark or now - self._t_line >= self.every_s:
            self._mark = mark
            self._line()
        else:  # nothing new since the last line (the same count again): no second line at close
            self._dirty = (self.done, self.info) != self._shown

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.update(self.done + n, info)

    def _draw(self) -> None:
        line = self.bar_text(self.columns or shutil.get_terminal_size((100, 20)).columns)
        pad = " " * max(self._width - len(line), 0)
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._width, self._t_draw = len(line), self.clock()

    def _line(self) -> None:
        print(self.text(), file=self.stream, flush=True)
        self._t_line, self._dirty, self._shown = self.clock(), False, (self.done, self.info)

    def _clear(self) -> None:
        if self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def write(self, line: str, stream: TextIO | None = None) -> None:
        """Print `line` (to `stream`, default the bar's) above the bar, then redraw the bar."""
        drawn = self.enabled and self.tty and self._width > 0 and not self.closed
        if drawn:
            self._clear()
        print(line, file=stream or self.stream, flush=True)
        if drawn:
            self._draw()

    def close(self) -> None:
        """Show the final state: the bar with a newline (tty), or the last line if not yet printed."""
        if self.closed:
            return
        if self.enabled:
            if self.tty:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()
                self._width = 0
            elif self._dirty:
                self._line()
        self.closed = True

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
