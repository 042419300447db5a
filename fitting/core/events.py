"""Progress events and cancellation shared by long jobs (fit, train, bulk).

The engine calls ``emit(FitEvent(...))``; the CLI prints a progress bar from them, the GUI
forwards them across a process boundary (events are plain picklable data: numbers,
strings, small numpy thumbnails).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fitting.core.errors import Cancelled

EVENT_KINDS = ("stage", "candidates", "iteration", "preview", "finished", "failed", "log")


@dataclass
class FitEvent:
    kind: str                      # one of EVENT_KINDS
    stage: str = ""                # "load", "describe", "rank", "screen", "refine", "export"
    message: str = ""
    progress: float = 0.0          # overall, 0..1
    eta_s: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


EventSink = Callable[[FitEvent], None]


class CancelToken:
    """Checked by long jobs between steps. Works with a threading/multiprocessing Event too."""

    def __init__(self, event=None) -> None:
        self._event = event
        self._flag = False

    def cancel(self) -> None:
        self._flag = True
        if self._event is not None:
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._flag or (self._event is not None and self._event.is_set())

    def check(self, what: str = "the job") -> None:
        if self.cancelled:
            raise Cancelled(f"{what} was cancelled")


def null_sink(_: FitEvent) -> None:
    return None


class MonotoneProgress:
    """Wraps a listener so overall progress never goes backwards (events that carry no
    progress of their own, such as log lines, inherit the last value)."""

    def __init__(self, sink: EventSink) -> None:
        self.sink = sink
        self.progress = 0.0

    def __call__(self, ev: FitEvent) -> None:
        self.progress = max(self.progress, ev.progress)
        ev.progress = self.progress
        self.sink(ev)


def _emit(sink: EventSink, kind: str, **kw) -> None:
    try:
        sink(FitEvent(kind=kind, **kw))
    except Exception:  # a broken listener must not kill the fit
        pass
