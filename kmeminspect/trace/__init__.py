"""``kmeminspect trace``: watch the running kernel change its memory bookkeeping (bcc, bpf/*.c).

:func:`run` starts a :class:`session.Session`, streams events (to a callback and, as JSON lines, to a
file), stops on a duration, the end of a traced command, SIGINT or SIGTERM, and always detaches before it
returns the summary. :func:`read_trace` loads a saved trace for ``trace --report``. :class:`StressTracer`
plugs the tracer into ``kmeminspect stress --trace``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .. import schema
from ..errors import UsageError
from ..signals import Signals
from ..state import Snapshot
from ..stress.runner import Hooks
from .plan import TraceOptions
from .session import Session, TraceError

__all__ = ["TraceOptions", "TraceError", "run", "read_trace", "StressTracer"]

FORMAT = 1


def run(
    prog: Any,
    snapshot: Snapshot,
    options: TraceOptions,
    on_event: Callable[[dict[str, Any]], None],
    output: IO[str] | None = None,
    duration: float | None = None,
    command: list[str] | None = None,
    inject_inactive: tuple[int, int] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Trace until ``duration`` seconds pass, ``command`` (started once the probes are attached) exits,
    or SIGINT/SIGTERM arrives; return the summary. Nothing stays attached after it returns or raises."""
    session = Session(prog, snapshot, options)
    stop: list[str] = []  # why it stops, besides a signal
    child: subprocess.Popen[bytes] | None = None

    def emit(event: dict[str, Any]) -> None:
        if output:
            output.write(json.dumps(event) + "\n")
        on_event(event)

    with Signals(stop=(signal.SIGINT, signal.SIGTERM), alarm=False) as signals:
        try:
            session.start(emit)
            if inject_inactive:
                session.inject_inactive(*inject_inactive)
            if output:
                header = {
                    "type": "trace",
                    "format": FORMAT,
                    "written_by": schema.written_by(),
                    "release": snapshot.layout.release,
                    "options": vars(options),
                    "probes": session.attached,
                    "unavailable": session.plan.unavailable,
                }
                output.write(json.dumps(header) + "\n")
            started = time.monotonic()
            if on_ready:
                on_ready()
            if command:
                try:
                    child = subprocess.Popen(command)
                except OSError as error:
                    raise UsageError(f"cannot run {command[0]}: {error.strerror}") from None
            while not signals.received and not stop:
                session.poll(100)
                if signals.received:
                    break
                if child is not None and child.poll() is not None:
                    stop.append(f"command exited with {child.returncode}")
                elif duration is not None and time.monotonic() - started >= duration:
                    stop.append("duration")
            summary = session.summary(time.monotonic() - started)
            summary["stopped_by"] = signals.first or stop[0]
            if child is not None:
                summary["command_status"] = child.returncode
            if output:
                output.write(json.dumps(summary) + "\n")
            return summary
        finally:
            session.close()
            if child is not None and child.poll() is None:
                child.terminate()
                child.wait()


def read_trace(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """A saved trace (``trace --output``): its header, its events, its summary (None if it was cut short).
    Every line is checked against the trace file's schema (:mod:`kmeminspect.schema`) before it is used."""
    header: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    summary = None
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    record = json.loads(raw.decode())
                except (UnicodeDecodeError, ValueError, RecursionError):
                    raise UsageError(f"{path}:{number}: not a JSON line: is this a kmeminspect trace?") from None
                kind = record.get("type") if isinstance(record, dict) else None
                kind = kind if isinstance(kind, str) else None
                if kind == "trace" and record.get("format") != FORMAT:
                    raise schema.newer(str(path), "trace format", record.get("format"), (FORMAT,), record)
                if kind is not None:
                    schema.check_trace_record(record, f"{path}:{number}")
                if kind == "trace":
                    header = record
                elif kind == "event":
                    events.append(record)
                elif kind == "summary":
                    summary = record
    except IsADirectoryError:
        raise UsageError(f"{path}: a directory, not a trace file") from None
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror}") from None
    if header is None:
        raise UsageError(f"{path}: not a kmeminspect trace of format {FORMAT} (written by trace --output)")
    return header, events, summary


class StressTracer(Hooks):
    """``kmeminspect stress --trace``: the tracer's live pfn_active and race detector during a stress run.

    Attached when the run starts (after its baseline audit), read between transitions, detached after
    restoration; never raises into the run (its error goes into the report instead). The report gets,
    under ``hooks.trace``, the tracer's counts (lifecycle events, races, race windows, inactive
    hand-outs, losses) and, under ``hooks.trace_reports``, each race and inactive hand-out event.
    """

    REPORTED = ("race", "race-window", "handout-inactive")

    def __init__(self, prog: Any, snapshot: Snapshot, options: TraceOptions) -> None:
        self.session = Session(prog, snapshot, options)
        self.reports: list[dict[str, Any]] = []
        self.started_at = 0.0
        self.error: str | None = None

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["phase"] in self.REPORTED:
            self.reports.append(event)

    def started(self) -> None:
        self.session.start(self._on_event)
        self.started_at = time.monotonic()

    def before_transition(self, target: str, action: str) -> None:
        self.session.poll(0)

    def after_transition(self, target: str, action: str, result: str, reason: str | None) -> None:
        self.session.poll(0)

    def finished(self) -> dict[str, Any]:
        try:
            if self.session.bpf is None:
                return {"trace": {"error": "the tracer did not start"}}
            summary = self.session.summary(time.monotonic() - self.started_at)
        except Exception as error:  # noqa: BLE001 - the run's restoration report must still be written
            return {"trace": {"error": f"{type(error).__name__}: {error}"}}
        finally:
            self.session.close()
        keys = ("events", "races", "race_windows", "handouts_inactive", "events_lost", "stack_failures")
        return {"trace": {k: summary[k] for k in keys}, "trace_reports": self.reports}
