"""Short texts shared by widgets."""
from __future__ import annotations


def format_eta(seconds: float | None) -> str:
    """``ETA m:ss`` (``ETA n s`` under a minute); empty when unknown."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"ETA {seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"ETA {seconds} s"
