"""EngineClient: the window's handle on ONE persistent engine process.

Why a process and not a QThread: Dr.Jit holds the GIL while it compiles and launches kernels,
so the engine in any thread of this process would stall the Qt event loop. The child
(:mod:`app.engine_worker`, started with the 'spawn' context so it never inherits Qt state)
serves requests from a command queue one at a time and answers on a reply queue; a QTimer
polls that queue every ~30 ms and calls the request's callbacks on the GUI thread.

Cancellation: a multiprocessing Event plus the id of the request to cancel (the child checks
both through ``fitting.core.events.CancelToken``). A job the child has started gets
``cancel_grace_s`` to stop cooperatively (the fit checks between iterations); if it has not
stopped by then the child is killed and a fresh one started, so Cancel is always prompt.
Nothing is lost by the kill: the engine writes files atomically and only at the end of a job.

If the child dies, the pending requests fail with an :class:`EngineError`, ``died`` is
emitted (the window shows it) and a new child is started with the next request.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QObject, QTimer, Signal

from .engine_worker import DEFAULT_BACKEND, serve

POLL_INTERVAL_MS = 30
POLL_BUDGET_S = 0.012      # at most this long handling replies per tick: the loop stays fluid
CANCEL_GRACE_S = 1.0


def render_threads() -> int:
    """Render threads for the child: every core but one, which the window keeps.

    (``fitting.core.runtime.default_threads`` keeps both cores of a 2-core machine busy, which is
    right for the CLI but not beside an event loop.) An explicit MATFIT_THREADS wins.
    """
    explicit = os.environ.get("MATFIT_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class EngineError:
    """A failed request, as the window shows it: the engine's message and hint."""
    message: str
    hint: str | None = None
    kind: str = "MatfitError"
    traceback: str = ""


EventCallback = Callable[[Any], None]
ResultCallback = Callable[[dict], None]
ErrorCallback = Callable[[EngineError], None]


@dataclass
class _Pending:
    request: dict
    on_event: EventCallback | None = None
    on_result: ResultCallback | None = None
    on_error: ErrorCallback | None = None
    on_cancelled: Callable[[], None] | None = None
    started: bool = False
    cancel_asked_at: float | None = None
    sent_at: float = field(default_factory=time.monotonic)


def _call(fn, *args) -> None:
    if fn is not None:
        fn(*args)


class EngineClient(QObject):
    """Submit requests to the engine process and get callbacks on the GUI thread."""

    ready = Signal(dict)          # the child's capabilities (variant, backbones, export_scene, ...)
    died = Signal(str)            # the child stopped unexpectedly; the message says how
    busyChanged = Signal(bool)

    def __init__(self, parent: QObject | None = None, *, device: str = "auto", threads: int | None = None,
                 backend: str = DEFAULT_BACKEND, cancel_grace_s: float = CANCEL_GRACE_S) -> None:
        super().__init__(parent)
        self._ctx = multiprocessing.get_context("spawn")
        self.device = device
        self.threads = threads or render_threads()
        self.backend = backend
        self.cancel_grace_s = cancel_grace_s
        self.capabilities: dict = {}
        self._process = None
        self._requests = self._replies = None
        self._cancel_event = self._ctx.Event()
        self._cancel_id = self._ctx.Value("q", 0)
        self._pending: dict[int, _Pending] = {}
        self._dying: list = []   # killed children not yet reaped
        self._next_id = 1
        self._busy = False
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)

    # ------------------------------------------------------------------ process
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def start(self) -> None:
        """Start the child if none is running (idempotent)."""
        if self.running:
            return
        self._requests = self._ctx.Queue()
        self._replies = self._ctx.Queue()
        self._cancel_event.clear()
        self.capabilities = {}
        config = {"threads": self.threads, "device": self.device, "backend": self.backend}
        self._process = self._ctx.Process(target=serve, name="matfit-engine", args=(
            self._requests, self._replies, self._cancel_event, self._cancel_id, config))
        self._process.start()
        self._timer.start()

    def restart(self, device: str | None = None) -> None:
        """A fresh child (e.g. for another device: a process cannot switch Dr.Jit backends)."""
        if device is not None:
            self.device = device
        if self._process is not None:
            self._kill()
        self.start()
        self._resend_pending()

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Stop the child: politely when it is idle, else at once. Killing is safe: the engine
        writes every file atomically, so no half-written recipe can be left behind."""
        self._timer.stop()
        proc, self._process = self._process, None
        if proc is not None:
            if proc.is_alive() and self.capabilities and not self._pending:
                try:
                    self._requests.put(None)
                    proc.join(timeout_s)
                except (OSError, ValueError):
                    pass
            if proc.is_alive():
                proc.kill()
            self._dying.append(proc)
        for p in self._dying:
            p.join(2.0)
        self._dying = []
        self._drop_queues()
        self._pending.clear()
        self._set_busy(False)

    def _kill(self) -> None:
        proc, self._process = self._process, None
        if proc is not None and proc.is_alive():
            proc.kill()
            # Reaped later by _poll: joining here would block the event loop for as long as the
            # kernel takes to tear down a large process (tens of ms).
            self._dying.append(proc)
        # Never read the old reply queue again: a child killed mid-write leaves half a message.
        self._drop_queues()

    def _drop_queues(self) -> None:
        for q in (self._requests, self._replies):
            if q is not None:
                q.cancel_join_thread()
                q.close()
        self._requests = self._replies = None

    # ------------------------------------------------------------------ requests
    def submit(self, op: str, payload: dict | None = None, *, on_event: EventCallback | None = None,
               on_result: ResultCallback | None = None, on_error: ErrorCallback | None = None,
               on_cancelled: Callable[[], None] | None = None) -> int:
        """Queue ``op`` for the child (starting one if needed). Returns the request id."""
        rid = self._next_id
        self._next_id += 1
        req = {**(payload or {}), "id": rid, "op": op}
        self._pending[rid] = _Pending(req, on_event, on_result, on_error, on_cancelled)
        self.start()
        self._requests.put(req)
        self._set_busy(True)
        return rid

    def cancel(self, request_id: int) -> None:
        """Ask the child to stop a request; its on_cancelled follows (at once if not started)."""
        p = self._pending.get(request_id)
        if p is None:
            return
        self._cancel_id.value = request_id
        self._cancel_event.set()
        if not p.started:
            # The child will skip it when it dequeues it; nothing to wait for.
            self._finish(request_id)
            _call(p.on_cancelled)
        elif p.cancel_asked_at is None:
            p.cancel_asked_at = time.monotonic()

    def is_pending(self, request_id: int) -> bool:
        return request_id in self._pending

    def _resend_pending(self) -> None:
        for p in self._pending.values():
            p.started = False
            p.cancel_asked_at = None
            self._requests.put(p.request)

    def _finish(self, rid: int) -> _Pending | None:
        p = self._pending.pop(rid, None)
        if not self._pending:
            self._set_busy(False)
        return p

    def _set_busy(self, busy: bool) -> None:
        if busy != self._busy:
            self._busy = busy
            self.busyChanged.emit(busy)

    # ------------------------------------------------------------------ polling
    def _poll(self) -> None:
        self._dying = [p for p in self._dying if p.is_alive()]   # is_alive() reaps without blocking
        if self._process is None:
            self._timer.stop()
            return
        if not self._process.is_alive():
            self._on_died()
            return
        deadline = time.monotonic() + POLL_BUDGET_S
        while time.monotonic() < deadline and self._replies is not None:
            try:
                kind, rid, payload = self._replies.get_nowait()
            except queue.Empty:
                break
            self._dispatch(kind, rid, payload)
        self._enforce_cancel_grace()

    def _dispatch(self, kind: str, rid: int, payload: Any) -> None:
        if kind == "ready":
            self.capabilities = payload
            self.ready.emit(payload)
            return
        p = self._pending.get(rid)
        if p is None:  # a request cancelled before it started, or after its grace
            return
        if kind == "started":
            p.started = True
        elif p.cancel_asked_at is not None:
            # After cancel() the caller hears only on_cancelled, even if the job finished anyway.
            if kind in ("result", "error", "cancelled"):
                self._finish(rid)
                _call(p.on_cancelled)
        elif kind == "event":
            _call(p.on_event, payload)
        elif kind == "result":
            self._finish(rid)
            _call(p.on_result, payload)
        elif kind == "error":
            self._finish(rid)
            _call(p.on_error, EngineError(**payload))
        elif kind == "cancelled":
            self._finish(rid)
            _call(p.on_cancelled)

    def _enforce_cancel_grace(self) -> None:
        now = time.monotonic()
        late = [rid for rid, p in self._pending.items()
                if p.cancel_asked_at is not None and now - p.cancel_asked_at > self.cancel_grace_s]
        if not late:
            return
        # The job is inside one long step (kernel compilation, a big render): stop it by force.
        for rid in late:
            p = self._finish(rid)
            _call(p.on_cancelled)
        self._kill()
        self.start()
        self._resend_pending()

    def _on_died(self) -> None:
        code = self._process.exitcode
        self._process = None
        self._timer.stop()
        self._drop_queues()
        pending, self._pending = self._pending, {}
        self._set_busy(False)
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        message = f"The engine process {how}."
        err = EngineError(message, hint="It is restarted with your next action. If this repeats, "
                                        "run `matfit doctor` in a terminal.", kind="EngineDied")
        for p in pending.values():
            if p.cancel_asked_at is not None:
                _call(p.on_cancelled)
            else:
                _call(p.on_error, err)
        self.died.emit(message)
