"""Where the window keeps its state: settings, recent files and the autosaved last fit.

Everything lives under one folder, ``MATFIT_GUI_STATE_DIR`` when set (tests, portable use), else
Qt's per-user application data folder. With the variable set the settings are an INI file in
that folder too, so a test never touches the user's real settings.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from PySide6.QtCore import QSettings, QStandardPaths

STATE_DIR_ENV = "MATFIT_GUI_STATE_DIR"
AUTOSAVE_NAME = "last_fit.json"
MAX_RECENT = 10


def state_dir() -> Path:
    explicit = os.environ.get(STATE_DIR_ENV)
    path = Path(explicit) if explicit else Path(
        QStandardPaths.writableLocation(QStandardPaths.StandardLocation.AppDataLocation))
    path.mkdir(parents=True, exist_ok=True)
    return path


def settings() -> QSettings:
    if os.environ.get(STATE_DIR_ENV):
        return QSettings(str(state_dir() / "settings.ini"), QSettings.Format.IniFormat)
    return QSettings()


def autosave_path() -> Path:
    return state_dir() / AUTOSAVE_NAME


def describe_autosave(path: Path) -> str | None:
    """One line about an autosaved recipe ('carbon_black, saved 2024-05-01 14:03'), or None."""
    if not path.is_file():
        return None
    from datetime import datetime
    when = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    try:
        material = json.loads(path.read_text(encoding="utf-8"))["material"]["id"]
    except (OSError, ValueError, KeyError, TypeError):
        material = "unknown material"
    return f"{material}, saved {when}"


def recent_files() -> list[str]:
    value = settings().value("recent_files", [])
    if isinstance(value, str):   # QSettings returns a bare string for a one-item list
        value = [value]
    return [v for v in (value or []) if isinstance(v, str)]


def add_recent_file(path: str | os.PathLike) -> list[str]:
    path = str(Path(path).resolve())
    files = [path] + [p for p in recent_files() if p != path]
    files = files[:MAX_RECENT]
    s = settings()
    s.setValue("recent_files", files)
    s.sync()
    return files
