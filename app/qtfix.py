"""Contain a PySide6 6.12.0 reference-count bug on Python < 3.12.

PySide6/shiboken6 6.12.0 hands Python the ``None`` that void methods return (``setText``,
``update``, a slot called by a timer, ...) and the ``True`` that ``Signal.emit()`` returns
without taking a reference to it. That is harmless on Python >= 3.12, where these singletons
are immortal, but on 3.10/3.11 every such call drops a reference, and after minutes of GUI use
the interpreter aborts: "Fatal Python error: none_dealloc: deallocating None" (or
``bool_dealloc``). Measured: 300 ``QLabel.setText`` calls lose 300 references to None with
6.12.0 and none with 6.11.3.

Remedy, until the dependency pin excludes 6.12.0: when a probe at start-up sees references
lost, give None, True and False a reference count no session can exhaust, which is what
Python 3.12 does for them anyway (they are static objects; CPython never frees them).
"""
from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, Signal

PROBES = 32
PAD = 1 << 40          # ~10^12 lost references before trouble: years of continuous use

PYSIDE_LOSES_REFERENCES: bool | None = None   # set by protect_singletons()


class _Probe(QObject):
    ping = Signal()


def _references_lost() -> bool:
    probe = _Probe()
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(PROBES):
        probe.setObjectName("probe")   # a void method: returns None
        probe.ping.emit()              # returns True
    lost = max(none_before - sys.getrefcount(None), true_before - sys.getrefcount(True))
    return lost >= PROBES // 2


def _pad(obj: object) -> None:
    refcnt = ctypes.c_ssize_t.from_address(id(obj))   # ob_refcnt, the first field of PyObject
    if refcnt.value == sys.getrefcount(obj) - 1:        # layout as expected (not a debug build)
        refcnt.value += PAD


def protect_singletons() -> bool:
    """Apply the remedy if this PySide6 needs it (idempotent). Returns whether it was needed."""
    global PYSIDE_LOSES_REFERENCES
    if PYSIDE_LOSES_REFERENCES is None:
        PYSIDE_LOSES_REFERENCES = sys.version_info < (3, 12) and _references_lost()
        if PYSIDE_LOSES_REFERENCES:
            for obj in (None, True, False):
                _pad(obj)
    return PYSIDE_LOSES_REFERENCES
