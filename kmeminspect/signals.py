"""Stop signals, in one place for every long-running command (``stress`` and ``trace``).

SIGINT, SIGTERM and SIGHUP (unless inherited ignored: ``nohup``) are noted while a :class:`Signals` is
entered, never acted on behind the caller's back: the caller looks at ``received`` between steps, and
inside ``interruptible()`` a stop signal raises :class:`Interrupted` at once (an offline backs off with
EINTR; a QMP wait or an audit is abandoned). ``deadline()`` bounds one step with SIGALRM
(:class:`TransitionTimeout`). Everything is put back on exit.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived while a write or an audit was in progress."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TransitionTimeout(Exception):
    """The per-transition deadline passed (SIGALRM) while the kernel was still at the write."""


#: what stops a stress run (it then puts everything back)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signals:
    """While a run holds blocks: SIGINT, SIGTERM and SIGHUP are noted; inside ``interruptible()`` they also
    raise ``Interrupted``, which aborts a write (an offline backs off with EINTR and is not retried) or
    an audit. ``deadline()`` bounds a write with SIGALRM (``TransitionTimeout``).

    ``trace`` enters one with ``stop=(SIGINT, SIGTERM)`` and ``alarm=False``: it stops on those two and
    never interrupts a step."""

    def __init__(self, stop: tuple[signal.Signals, ...] = STOP_SIGNALS, alarm: bool = True) -> None:
        self.stop = stop
        self.alarm = alarm
        self.received: list[int] = []
        self._interruptible = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for signum in self.stop:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup: the user asked to survive a hangup
            # SIGINT is handled even when inherited ignored (a background job of a script): kill -INT is meant
            self._previous[signum] = signal.signal(signum, self._on_stop)
        if self.alarm:
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self._interruptible:
            raise Interrupted(signum)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        raise TransitionTimeout()

    @property
    def first(self) -> str | None:
        """The name of the first stop signal received (``SIGTERM``), or None."""
        return signal.Signals(self.received[0]).name if self.received else None

    @contextlib.contextmanager
    def interruptible(self, seen: int = 0) -> Iterator[None]:
        """Let a stop signal raise ``Interrupted`` here; one among the first ``seen`` received does not.
        Nests (an audit inside an operation)."""
        outer, self._interruptible = self._interruptible, True
        try:
            if len(self.received) > seen:
                raise Interrupted(self.received[-1])
            yield
        finally:
            self._interruptible = outer

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """Raise ``TransitionTimeout`` here once ``seconds`` have passed."""
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
