"""Shared pytest fixtures and constants.

Three guarantees for every run: a missing reference-image folder stops the run at once with
a message saying where it was looked for; no Qt dialog can block (every modal entry point is
patched to record and return); a stuck test is ended by pytest-timeout's thread method, which
prints every thread's traceback (the signal method cannot interrupt Qt's nested event loops).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Real micrographs live in the shared folder beside the repository clone (../shared), both here
# and in CI; they are development material, not part of the repository. MATFIT_REFERENCE_IMAGES
# points elsewhere.
REFERENCE_DIR = Path(os.environ.get("MATFIT_REFERENCE_IMAGES",
                                    Path(__file__).resolve().parents[2] / "shared" / "reference-images"))


def missing_reference_message(folder: Path) -> str:
    return (f"matfit tests: the real reference micrographs were not found at {folder}. "
            "Clone the repository beside the project's shared/ folder (so that "
            "../shared/reference-images exists), or set MATFIT_REFERENCE_IMAGES to a folder "
            "holding those images and their labels.json.")


def pytest_sessionstart(session) -> None:
    if not (REFERENCE_DIR / "labels.json").is_file():
        pytest.exit(missing_reference_message(REFERENCE_DIR), returncode=4)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder with the real reference micrographs (fails loudly if it is missing)."""
    assert REFERENCE_DIR.is_dir(), missing_reference_message(REFERENCE_DIR)
    return REFERENCE_DIR


@pytest.fixture(scope="session", autouse=True)
def no_blocking_dialogs():
    """Record every dialog a test's window would show instead of opening it (modal dialogs run
    a nested event loop that nothing in a headless test could close)."""
    if "PySide6" not in __import__("sys").modules:
        yield []
        return
    from PySide6.QtWidgets import QDialog, QFileDialog, QInputDialog, QMessageBox
    shown: list[tuple[str, str, str]] = []

    def recorder(kind: str, result):
        def show(parent=None, title="", text="", *args, **kwargs):
            shown.append((kind, str(title), str(text)))
            return result
        return show

    with pytest.MonkeyPatch.context() as mp:
        for kind in ("critical", "warning", "information", "question", "about"):
            mp.setattr(QMessageBox, kind, staticmethod(recorder(kind, QMessageBox.StandardButton.Ok)))
        mp.setattr(QFileDialog, "getOpenFileName", staticmethod(recorder("open", ("", ""))))
        mp.setattr(QFileDialog, "getSaveFileName", staticmethod(recorder("save", ("", ""))))
        mp.setattr(QFileDialog, "getExistingDirectory", staticmethod(recorder("folder", "")))
        mp.setattr(QInputDialog, "getText", staticmethod(recorder("input", ("", False))))
        mp.setattr(QInputDialog, "getDouble", staticmethod(recorder("input", (0.0, False))))

        def no_exec(self, *a, **k):
            shown.append(("exec", type(self).__name__, self.windowTitle()))
            return QDialog.DialogCode.Rejected
        mp.setattr(QDialog, "exec", no_exec)
        mp.setattr(QMessageBox, "exec", no_exec)
        yield shown
