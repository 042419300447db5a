"""Progress display of long commands (fit, bulk, train) on stderr, built on tqdm.

On a terminal: one live bar with percent, elapsed time, ETA and rate, and messages printed above
it. When stderr is a file or a pipe (CI logs, ``2> log.txt``): no carriage returns or bar
redraws, only plain lines: every stage change and message, and the progress at most every
``log_every_s`` seconds.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from fitting.core.events import FitEvent

_MESSAGE_KINDS = ("stage", "candidates", "finished", "failed", "log")


def _is_terminal(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _clock(seconds: float) -> str:
    return tqdm.format_interval(max(0.0, seconds))


class EventProgress:
    """A :class:`FitEvent` listener that shows the job's progress.

    Parameters
    ----------
    desc : str
        Label in front of the bar (``"fit"``, ``"bulk"``).
    total : int
        Units of work the bar counts; an event's ``progress`` (0..1) is scaled to it.
    unit : str
        Name of one unit (``"%"`` for a fit, ``"img"`` for a bulk set).
    stream : file
        Where to write (stderr by default).
    log_every_s : float
        Without a terminal, the least time between two progress lines.
    """

    def __init__(self, desc: str = "fit", total: int = 100, unit: str = "%", stream=None,
                 log_every_s: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = int(total)
        self.unit = unit
        self.desc = desc
        self.tty = _is_terminal(self.stream)
        self.log_every_s = log_every_s
        self.t0 = time.monotonic()
        self._last_log = -1e9
        self._stage = ""
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, disable=not self.tty,
                        dynamic_ncols=True, leave=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")

    def __call__(self, ev: FitEvent) -> None:
        done = int(round(max(0.0, min(1.0, ev.progress)) * self.total))
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if ev.stage and ev.stage != self._stage:
            self._stage = ev.stage
            self.bar.set_postfix_str(ev.stage, refresh=False)
        if ev.kind in _MESSAGE_KINDS:
            self._message(ev, done)
        elif not self.tty and time.monotonic() - self._last_log >= self.log_every_s:
            self._message(ev, done)
        if ev.kind in ("finished", "failed"):
            self.close()

    def _message(self, ev: FitEvent, done: int) -> None:
        if self.tty:
            if ev.message:
                self.bar.write(f"{ev.stage:<8} {ev.message}", file=self.stream)
            return
        elapsed = time.monotonic() - self.t0
        eta = f", ETA {_clock(ev.eta_s)}" if ev.eta_s is not None and ev.kind not in ("finished", "failed") else ""
        self.stream.write(f"[{self.desc} {_clock(elapsed)}] {done}/{self.total} {self.unit}{eta} "
                          f"{ev.stage}: {ev.message}".rstrip() + "\n")
        self.stream.flush()
        self._last_log = time.monotonic()

    def close(self) -> None:
        self.bar.close()


class CountProgress:
    """A ``progress(done, total, elapsed)`` callback (predictor training sets) shown like
    :class:`EventProgress`: a tqdm bar on a terminal, plain lines every ``log_every_s`` otherwise."""

    def __init__(self, desc: str, unit: str = "sample", stream=None, log_every_s: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.desc = desc
        self.unit = unit
        self.tty = _is_terminal(self.stream)
        self.log_every_s = log_every_s
        self.bar: tqdm | None = None
        self._last_log = -1e9

    def __call__(self, done: int, total: int, elapsed: float) -> None:
        if self.bar is None:   # resumed sets start part-way: the rate counts only new work
            self.bar = tqdm(total=total, initial=done, desc=self.desc, unit=self.unit, file=self.stream,
                            disable=not self.tty, dynamic_ncols=True)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if not self.tty and (time.monotonic() - self._last_log >= self.log_every_s or done >= total):
            self.stream.write(f"[{self.desc}] {done}/{total} {self.unit}s, {_clock(elapsed)} elapsed\n")
            self.stream.flush()
            self._last_log = time.monotonic()
        if done >= total:
            self.bar.close()
