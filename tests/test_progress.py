"""The command line's progress display: a live bar on a terminal, clean lines in a log."""
from __future__ import annotations

import io

from fitting.cli.progress import CountProgress, EventProgress
from fitting.core.events import FitEvent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events():
    yield FitEvent("stage", stage="rank", message="ranking 10 materials", progress=0.0)
    for i in range(1, 50):
        yield FitEvent("iteration", stage="refine", message=f"it {i}", progress=i / 50, eta_s=50 - i)
    yield FitEvent("finished", stage="done", message="best: sem_polystyrene_spheres", progress=1.0)


def test_log_output_has_no_bar_redraws_and_keeps_every_message():
    log = io.StringIO()
    bar = EventProgress("fit", stream=log, log_every_s=1e9)
    for ev in _events():
        bar(ev)
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert "ranking 10 materials" in lines[0] and "best: sem_polystyrene_spheres" in lines[-1]
    assert "100/100 %" in lines[-1]
    # iterations are rate-limited by log_every_s (a message line counts as the last log line)
    assert sum("refine: it" in line for line in lines) == 0
    every = io.StringIO()
    bar = EventProgress("fit", stream=every, log_every_s=0.0)
    for ev in _events():
        bar(ev)
    assert sum("refine: it" in line for line in every.getvalue().splitlines()) == 49


def test_terminal_bar_shows_percent_eta_and_rate():
    term = Terminal()
    bar = EventProgress("bulk", total=20, unit="img", stream=term)
    for k in range(1, 21):
        bar(FitEvent("iteration", stage="bulk", message="", progress=k / 20))
    bar(FitEvent("finished", stage="bulk", message="20 images", progress=1.0))
    text = term.getvalue()
    assert "\r" in text                                   # redrawn in place
    assert "20/20 img" in text and "img/s" in text and "<" in text   # count, rate, elapsed<remaining
    assert "20 images" in text


def test_count_progress_for_a_resumed_training_set():
    log = io.StringIO()
    prog = CountProgress("tem_carbon_black", stream=log, log_every_s=0.0)
    for done in (40, 60, 80, 100):
        prog(done, 100, elapsed=float(done))
    lines = log.getvalue().splitlines()
    assert lines[-1].startswith("[tem_carbon_black] 100/100 samples") and "\r" not in log.getvalue()
