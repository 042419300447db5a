"""Work around a PySide6 6.12.0 bug: ``SignalInstance.emit()`` returns ``True`` without owning a
reference to it, so every emit from Python drops one reference to ``True``. On Python < 3.12
(where ``True`` is not immortal) the interpreter aborts after a few hundred emits with
"Fatal Python error: bool_dealloc: deallocating True or False".

Every emit in ``app/`` goes through :func:`emit`, which hands the missing reference back, but
only where a probe at import finds the installed PySide6 to have the bug (a fixed PySide6, or
an immortal ``True``, makes it a plain emit).
"""
from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, Signal, SignalInstance

_py_incref = ctypes.pythonapi.Py_IncRef
_py_incref.argtypes = [ctypes.py_object]
_py_incref.restype = None
_PROBES = 16


class _Probe(QObject):
    ping = Signal()


def _emit_drops_a_reference() -> bool:
    probe = _Probe()
    before = sys.getrefcount(True)
    for _ in range(_PROBES):
        probe.ping.emit()
    dropped = before - sys.getrefcount(True)
    for _ in range(max(0, dropped)):   # give the probe's own losses back
        _py_incref(True)
    return dropped == _PROBES


EMIT_DROPS_A_REFERENCE = _emit_drops_a_reference()


def emit(signal: SignalInstance, *args) -> None:
    """``signal.emit(*args)``, without PySide6 6.12.0's reference loss."""
    result = signal.emit(*args)
    if EMIT_DROPS_A_REFERENCE and isinstance(result, bool):
        _py_incref(result)
