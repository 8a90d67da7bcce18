"""The one stress runner: what every run does whatever it drives. A driver (live memory blocks in live.py,
QEMU DIMMs and virtio-mem in qemu.py) says what the journal header holds, what one step is and how to put
everything back; the runner holds the journal and the signals, samples the audit, counts, calls the hooks
and always restores, then audits once more."""

from __future__ import annotations

import contextlib
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import KmemError
from ..signals import Interrupted, Signals
from .journal import Journal
from .report import PutBack, Report
from .sampling import AuditLog, AuditSource, finding_key


class Hooks:
    """Called around a run's events: where ``kmeminspect trace`` plugs its tracer into a stress run
    (start it, mark transition boundaries to correlate events, add its findings to the report). The
    default does nothing. ``target`` is ``memoryN`` in live mode, a device id in QEMU mode."""

    def started(self) -> None:
        """Before the first transition (after the baseline audit, with the walkers running)."""

    def before_transition(self, target: str, action: str) -> None:
        """Right before the transition starts (live: ``action`` is written to the block's state)."""

    def after_transition(self, target: str, action: str, result: str, reason: str | None) -> None:
        """Right after it ended (result: done, refused, anomaly, interrupted; reason: errno name or else)."""

    def finished(self) -> dict[str, Any]:
        """After restoration; what it returns goes into the report under ``hooks``."""
        return {}


#: what a driver's step returns: (result, reason); result is done, refused or anomaly
Outcome = tuple[str, str | None]
#: what a driver's end record is made of, once the step is over: (journal fields, report fields of an anomaly)
Ending = tuple[dict[str, Any], dict[str, Any]]


class Runner:
    """One run: the template every driver shares. Subclasses implement :meth:`header`, :meth:`stop_reason`,
    :meth:`step` and :meth:`restore`, and may override :meth:`hold`, :meth:`begin`, :meth:`pause` and
    :meth:`release`."""

    #: what the driver's steps are called in the lines it says
    steps = "transitions"
    #: the reason of a step a signal interrupted
    interrupted_reason: str | None = None

    def __init__(
        self,
        report: Report,
        journal_path: Path,
        audit_every: int,
        audit_source: AuditSource | None,
        hooks: Hooks | None,
        say: Callable[[str], None],
    ) -> None:
        self.report = report
        self.journal_path = journal_path
        self.rng = random.Random(report.seed)
        self.audit_source = audit_source
        self.hooks = hooks or Hooks()
        self.say = say
        if audit_every and audit_source is not None:
            self.report.audit = AuditLog(audit_every)

    # -- what a driver says ------------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        """The journal's header: what the run may change, and how to find it again."""
        raise NotImplementedError

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Held for the whole run, restoration included (live: the lock on the memory directory)."""
        yield

    def begin(self) -> None:
        """After the baseline audit, before the first step (live: start the walkers)."""

    def stop_reason(self, elapsed: float) -> str | None:
        """Why the run stops now (its limit is reached), or None."""
        raise NotImplementedError

    def step(self, journal: Journal, signals: Signals) -> None:
        """One step, through :meth:`operation`."""
        raise NotImplementedError

    def pause(self) -> None:
        """Before an audit reads the kernel (QEMU: let go of the QMP socket, drgn needs it)."""

    def release(self) -> None:
        """Once the steps are over, before restoring (live: stop the walkers; QEMU: close QMP)."""

    def restore(self, journal: Journal, signals: Signals) -> list[PutBack]:
        """Put everything back and say so; each result is journaled."""
        raise NotImplementedError

    # -- the run -----------------------------------------------------------------------------------------

    def run(self) -> Report:
        report = self.report
        report.journal = str(self.journal_path)
        header = self.header()
        with self.hold(), Signals() as signals:
            journal = Journal.create(self.journal_path, header)
            start = time.monotonic()
            try:
                self._churn(journal, signals, start)
            except Interrupted as stop:
                report.stopped_by = signal.Signals(stop.signum).name
            except KmemError as error:
                report.stopped_by, report.error = "error", str(error)
            except Exception as error:  # noqa: BLE001 - any failure still ends with everything put back
                report.stopped_by, report.error = "error", f"{type(error).__name__}: {error}"
            finally:
                self.release()
                report.restorations = self.restore(journal, signals)
                report.seconds = time.monotonic() - start
                self._final_audit(signals)
                report.hooks = self.hooks.finished()
                failed = [r.key for r in report.restorations if r.result not in ("unchanged", "restored")]
                journal.note("closed", stopped_by=report.stopped_by, restored=not failed, failed=failed)
                journal.close()
                report.journal_error = journal.error
        return report

    def _churn(self, journal: Journal, signals: Signals, start: float) -> None:
        report = self.report
        if report.audit is not None:
            assert self.audit_source is not None
            with signals.interruptible():
                report.kernel, report.audit.baseline = self.audit_source.read()
        self.begin()
        self.hooks.started()
        while True:
            if signals.received:
                report.stopped_by = signals.first or ""
                return
            reason = self.stop_reason(time.monotonic() - start)
            if reason:
                report.stopped_by = reason
                return
            self.step(journal, signals)

    def operation(
        self,
        journal: Journal,
        signals: Signals,
        action: str,
        target: str,
        begin: dict[str, Any],
        perform: Callable[[], Outcome],
        end: Callable[[str, str | None, float], Ending],
    ) -> str:
        """Journal, count and hook one step, then audit when due (so a sample may see a DIMM in place).
        ``perform`` does it; ``end`` makes its end record from (result, reason, seconds), even when a
        signal interrupted it. Returns the result."""
        seq = self.report.counters.attempted + 1
        journal.append("begin", seq=seq, **begin)
        self.hooks.before_transition(target, action)
        result, reason = "interrupted", self.interrupted_reason
        begun = time.monotonic()
        try:
            result, reason = perform()
        finally:
            seconds = time.monotonic() - begun
            fields, anomaly = end(result, reason, seconds)
            journal.append("end", seq=seq, **fields)
            self.report.counters.count(action, result, reason, seconds, {"seq": seq, **anomaly})
            self.hooks.after_transition(target, action, result, reason)
        audit = self.report.audit
        if audit is not None and self.report.counters.attempted % audit.every == 0:
            self._sample(journal, signals)
        return result

    def _sample(self, journal: Journal, signals: Signals) -> None:
        audit, source = self.report.audit, self.audit_source
        assert audit is not None and source is not None
        self.pause()
        after = self.report.counters.attempted
        unconfirmed = audit.unconfirmed
        with signals.interruptible():
            confirmed = audit.sample(source)
        known = {finding_key(f) for _, f in audit.confirmed}
        audit.confirmed += [(after, f) for f in confirmed if finding_key(f) not in known]
        journal.append("audit", after=after, new_errors=len(confirmed), unconfirmed=audit.unconfirmed - unconfirmed)
        for f in confirmed:
            self.say(f"audit after {after} {self.steps}: {f.rule} {f.pfn_start:#x}-{f.pfn_end:#x}: {f.message}")

    def _final_audit(self, signals: Signals) -> None:
        """After restoration, unless a signal asked to stop or restoration failed: the kernel should be
        back to the baseline's findings."""
        audit, source = self.report.audit, self.audit_source
        if audit is None or source is None or signals.received or self.report.error or not self.report.restored:
            return
        try:
            with signals.interruptible():
                audit.final = audit.sample(source)
        except Interrupted:
            audit.final = None
