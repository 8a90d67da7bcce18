"""``kmeminspect --qemu QMP_SOCKET stress``: hotplug churn of a QEMU test guest, driven from the host.

Two kinds of operations, in a random (seeded) order:

DIMM rounds
    ``object-add`` a RAM backend and ``device_add`` a ``pc-dimm``: QEMU signals an ACPI memory device
    check; the guest's ACPI memory hotplug driver adds the memory (``add_memory()``), onlines it when
    its policy says so (``memhp_default_state=``, udev rules) and answers with ``_OST``, which QEMU
    reports as an ``ACPI_DEVICE_OST`` event (source 1, status 0 on success). Then ``device_del``: QEMU
    sends an eject request; the guest offlines every block of the DIMM (``offline_pages()``: isolate,
    migrate away) and removes it, answers ``_OST`` (source 3) and ejects it, and QEMU emits
    ``DEVICE_DELETED``. A guest that cannot offline the DIMM answers with a failure status (0x82: device
    busy): a refusal, counted by reason. The backend is ``object-del``'d once the DIMM is gone.
virtio-mem resizes
    ``qom-set requested-size`` on a virtio-mem device: the guest's driver plugs or unplugs device blocks
    (adding and onlining memory blocks, or offlining and removing them, or fake-offlining parts of
    them as PageOffline) until ``size`` reaches the request. A request the guest does not reach within
    the per-operation timeout is refused as ``incomplete`` (unplugging needs the memory to be free).

The audit reads the guest over QMP with drgn between operations (drgn attaches anew each time: it maps
guest memory at attach time, and QEMU serves one client per socket, so the run's own QMP connection is
closed meanwhile). Journal and restoration as in live mode (kmeminspect/stress.py); restoration
removes every DIMM the run added (they carry the run's id prefix, so even one whose ``device_add`` the
journal could not record is found) and sets the virtio-mem device back to its original requested size.

Journal header (version 1, ``mode`` ``qemu``)::

    {"format": "kmeminspect-stress-journal", "version": 1, "mode": "qemu", "created": ..., "pid": N,
     "qmp": "/path/qmp.sock", "prefix": "kmi-stress-1234", "dimm_size": 134217728, "seed": N,
     "virtio_mem": {"id": "vmem0", "requested_size": 209715200} | null}

events ``begin``/``end`` (``op``: ``dimm-add``, ``dimm-remove``, ``resize``; ``device``, ``size``),
``audit``, ``restore`` (``what``, ``result``, ``reason``) and ``closed``, as in live mode.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .audit import Finding
from .errors import KmemError, UsageError
from .qmp import QMP, QMPError
from .stress import (
    AuditLog,
    Counters,
    Hooks,
    Interrupted,
    Journal,
    Signals,
    TransitionTimeout,
    finding_key,
    read_journal,
)

#: _OST status codes (ACPI 6.5, 6.3.5): general, then for insertion (source 1) and ejection (source 3)
OST_GENERAL = {0: "success", 1: "non-specific failure", 2: "unrecognized notify code"}
OST_INSERT = {0x80: "insertion in progress", 0x81: "driver load failure", 0x82: "insertion not supported"}
OST_EJECT = {
    0x80: "ejection not supported",
    0x81: "device in use",
    0x82: "device busy (the guest could not offline its memory)",
    0x83: "ejection dependency busy",
    0x84: "ejection in progress",
}
OST_INSERT_SOURCE, OST_EJECT_SOURCE = 1, 3
OST_EJECT_IN_PROGRESS = 0x84
#: what each refusal reason means
REASONS = {
    "timeout": "the guest did not finish within the per-operation timeout",
    "incomplete": "virtio-mem did not reach the requested size in time (unplug needs free memory)",
}
RESIZE_POLL = 0.2
MiB = 1 << 20


def ost_reason(source: int, status: int) -> str:
    table = OST_EJECT if source == OST_EJECT_SOURCE else OST_INSERT
    return f"OST {status:#x} ({OST_GENERAL.get(status) or table.get(status, 'unknown')})"


def parse_size(text: str) -> int:
    """``128M``, ``1G`` or bytes."""
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    try:
        if text[-1:].upper() in units:
            return int(text[:-1]) * units[text[-1].upper()]
        return int(text)
    except ValueError:
        raise UsageError(f"--dimm-size {text}: not a size (like 128M or 1G)") from None


@dataclasses.dataclass(frozen=True)
class VirtioMem:
    """A virtio-mem device: its QOM path and sizes (bytes)."""

    id: str
    requested_size: int
    block_size: int
    max_size: int

    @property
    def path(self) -> str:
        return f"/machine/peripheral/{self.id}"


def find_virtio_mem(qmp: QMP, device: str) -> VirtioMem:
    path = f"/machine/peripheral/{device}"
    try:
        kind = qmp.execute("qom-get", path=path, property="type")
        if kind != "virtio-mem-pci":
            raise UsageError(f"--virtio-mem {device}: a {kind}, not a virtio-mem-pci device")
        memdev = qmp.execute("qom-get", path=path, property="memdev")
        return VirtioMem(
            device,
            int(qmp.execute("qom-get", path=path, property="requested-size")),
            int(qmp.execute("qom-get", path=path, property="block-size")),
            int(qmp.execute("qom-get", path=memdev, property="size")),
        )
    except QMPError as error:
        raise UsageError(f"--virtio-mem {device}: {error.desc}") from None


def our_devices(qmp: QMP, prefix: str) -> list[str]:
    """The memory devices (DIMM ids) this run added that QEMU still has."""
    devices = qmp.execute("query-memory-devices")
    ids = [d.get("data", {}).get("id") or "" for d in devices]
    return [i for i in ids if i.startswith(prefix + "-")]


def backend_of(device: str) -> str:
    """``kmi-stress-7-dimm3`` -> ``kmi-stress-7-mem3``."""
    head, _, n = device.rpartition("-dimm")
    return f"{head}-mem{n}"


def our_backends(qmp: QMP, prefix: str) -> list[str]:
    return [o["name"] for o in qmp.execute("qom-list", path="/objects") if o["name"].startswith(prefix + "-")]


class QemuAudit:
    """drgn over QMP, attached for one read and detached (QEMU serves one client per socket)."""

    def __init__(self, socket_path: str, vmlinux: str | None) -> None:
        self.socket_path = socket_path
        self.vmlinux = vmlinux

    def read(self) -> tuple[str, list[Finding]]:
        from .audit import audit
        from .kernel import read_snapshot
        from .target import open_qemu

        prog = open_qemu(self.socket_path, Path(self.vmlinux) if self.vmlinux else None)
        try:
            snapshot = read_snapshot(prog, {"kind": "qemu", "path": self.socket_path})
        finally:
            del prog
            gc.collect()  # drgn lets the socket go with the Program
        return snapshot.layout.release, audit(snapshot)


@dataclasses.dataclass(frozen=True)
class QemuLimits:
    dimm_rounds: int
    dimm_size: int
    resizes: int
    timeout: float  # per operation


@dataclasses.dataclass
class QemuReport:
    kernel: str
    seed: int
    journal: str
    prefix: str
    stopped_by: str = ""
    error: str | None = None
    seconds: float = 0.0
    counters: Counters = dataclasses.field(default_factory=Counters)
    audit: AuditLog | None = None
    restorations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    hooks: dict[str, Any] = dataclasses.field(default_factory=dict)
    journal_error: str | None = None

    @property
    def restored(self) -> bool:
        return all(r["result"] in ("unchanged", "restored") for r in self.restorations)

    def exit_code(self) -> int:
        if self.error or not self.restored:
            return 2
        if self.audit and (self.audit.confirmed or self.audit.final):
            return 1
        return 0

    def to_json(self) -> dict[str, Any]:
        c = self.counters
        return {
            "mode": "qemu",
            "kernel": self.kernel,
            "seed": self.seed,
            "journal": self.journal,
            "prefix": self.prefix,
            "stopped_by": self.stopped_by,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "transitions": {
                "attempted": c.attempted,
                "done": c.done,
                "per_second": round(c.attempted / self.seconds, 2) if self.seconds else None,
                "by_action": {action: entry.to_json() for action, entry in c.by_action.items()},
                "refusals": {
                    name: {"count": n, "meaning": REASONS.get(name, "")} for name, n in sorted(c.refusals.items())
                },
                "anomalies": c.anomalies,
            },
            "walkers": [],
            "audit": self.audit.to_json() if self.audit else None,
            "restored": self.restored,
            "restoration": self.restorations,
            "journal_error": self.journal_error,
            "hooks": self.hooks,
        }


class QemuStress:
    """One run against a QEMU guest: DIMM rounds and virtio-mem resizes at random, audits between them,
    everything journaled, and everything the run added or resized put back."""

    def __init__(
        self,
        socket_path: str,
        limits: QemuLimits,
        virtio_mem: str | None,
        journal_path: Path,
        seed: int,
        audit_every: int,
        audit_source: QemuAudit | None,
        hooks: Hooks | None = None,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.socket_path = socket_path
        self.limits = limits
        self.virtio_mem_id = virtio_mem
        self.journal_path = journal_path
        self.rng = random.Random(seed)
        self.audit_source = audit_source
        self.hooks = hooks or Hooks()
        self.say = say
        self.prefix = f"kmi-stress-{os.getpid()}"
        self.report = QemuReport("", seed, "", self.prefix)
        if audit_every and audit_source is not None:
            self.report.audit = AuditLog(audit_every)
        self.qmp: QMP | None = None
        self.virtio_mem: VirtioMem | None = None
        self.dimms = 0

    def prepare(self) -> VirtioMem | None:
        """Check the guest before anything changes: reachable, the virtio-mem device as named."""
        qmp = QMP(self.socket_path)
        try:
            if self.virtio_mem_id is not None:
                self.virtio_mem = find_virtio_mem(qmp, self.virtio_mem_id)
            elif self.limits.resizes:
                raise UsageError("--resizes needs --virtio-mem DEVICE_ID")
        finally:
            qmp.close()
        return self.virtio_mem

    def run(self) -> QemuReport:
        report = self.report
        report.journal = str(self.journal_path)
        virtio_mem = (
            {"id": self.virtio_mem.id, "requested_size": self.virtio_mem.requested_size} if self.virtio_mem else None
        )
        header = {
            "mode": "qemu",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "qmp": self.socket_path,
            "prefix": self.prefix,
            "dimm_size": self.limits.dimm_size,
            "seed": report.seed,
            "virtio_mem": virtio_mem,
        }
        with Signals() as signals:
            journal = Journal.create(self.journal_path, header)
            start = time.monotonic()
            try:
                self._churn(journal, signals, start)
            except Interrupted as stop:
                report.stopped_by = signal.Signals(stop.signum).name
            except KmemError as error:
                report.stopped_by, report.error = "error", str(error)
            except Exception as error:  # noqa: BLE001 - any failure still ends with the guest put back
                report.stopped_by, report.error = "error", f"{type(error).__name__}: {error}"
            finally:
                self._close()
                report.restorations = restore_guest(
                    self.socket_path, self.prefix, virtio_mem, journal, signals, self.limits.timeout, self.say
                )
                report.seconds = time.monotonic() - start
                self._final_audit(signals)
                report.hooks = self.hooks.finished()
                failed = [r["what"] for r in report.restorations if r["result"] not in ("unchanged", "restored")]
                journal.note("closed", stopped_by=report.stopped_by, restored=not failed, failed=failed)
                journal.close()
                report.journal_error = journal.error
        return report

    def _connect(self) -> QMP:
        if self.qmp is None:
            self.qmp = QMP(self.socket_path)
        return self.qmp

    def _close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def _churn(self, journal: Journal, signals: Signals, start: float) -> None:
        report = self.report
        if report.audit is not None:
            assert self.audit_source is not None
            with signals.interruptible():
                report.kernel, report.audit.baseline = self.audit_source.read()
        self.hooks.started()
        operations = ["dimm"] * self.limits.dimm_rounds + ["resize"] * self.limits.resizes
        self.rng.shuffle(operations)
        for operation in operations:
            if signals.received:
                report.stopped_by = signals.first or ""
                return
            with signals.interruptible():
                if operation == "dimm":
                    self._dimm_round(journal, signals)
                else:
                    self._resize(journal, signals)
        report.stopped_by = "operations"

    def _operation(
        self, journal: Journal, signals: Signals, op: str, run: Callable[[], str | None], **fields: Any
    ) -> bool:
        """Journal and count one operation, then audit when due (so a sample may see a DIMM in place);
        ``run`` returns None when it succeeded, else the reason."""
        seq = self.report.counters.attempted + 1
        journal.append("begin", seq=seq, op=op, **fields)
        target = str(fields.get("device", ""))
        self.hooks.before_transition(target, op)
        begun = time.monotonic()
        reason: str | None = "interrupted"
        try:
            reason = run()
        finally:
            seconds = time.monotonic() - begun
            result = "done" if reason is None else "interrupted" if reason == "interrupted" else "refused"
            journal.append("end", seq=seq, op=op, result=result, reason=reason, seconds=round(seconds, 3), **fields)
            self.report.counters.count(op, result, reason, seconds, {"seq": seq, "op": op, **fields})
            self.hooks.after_transition(target, op, result, reason)
        audit = self.report.audit
        if audit is not None and self.report.counters.attempted % audit.every == 0:
            self._sample(journal, signals)
        return reason is None

    def _dimm_round(self, journal: Journal, signals: Signals) -> None:
        self.dimms += 1
        device = f"{self.prefix}-dimm{self.dimms}"
        backend = backend_of(device)
        timeout = self.limits.timeout

        def add() -> str | None:
            qmp = self._connect()
            try:
                qmp.execute(
                    "object-add", **{"qom-type": "memory-backend-ram", "id": backend}, size=self.limits.dimm_size
                )
                qmp.execute("device_add", driver="pc-dimm", id=device, memdev=backend)
            except QMPError as error:
                if device not in our_devices(qmp, self.prefix):
                    drop_backend(qmp, backend)
                return f"QMP {error.error_class}"
            ost = qmp.wait_event(_ost(device, OST_INSERT_SOURCE), timeout)
            if ost is None:
                return "timeout"
            status = int(ost["data"]["info"]["status"])
            return None if status == 0 else ost_reason(OST_INSERT_SOURCE, status)

        def remove() -> str | None:
            return remove_dimm(self._connect(), device, backend, timeout)

        added = self._operation(journal, signals, "dimm-add", add, device=device, size=self.limits.dimm_size)
        if added or device in our_devices(self._connect(), self.prefix):
            self._operation(journal, signals, "dimm-remove", remove, device=device)

    def _resize(self, journal: Journal, signals: Signals) -> None:
        vmem = self.virtio_mem
        assert vmem is not None
        qmp = self._connect()
        current = int(qmp.execute("qom-get", path=vmem.path, property="requested-size"))
        steps = vmem.max_size // vmem.block_size
        target = current
        while target == current:
            target = self.rng.randrange(steps + 1) * vmem.block_size

        def resize() -> str | None:
            return set_virtio_mem(qmp, vmem.path, target, self.limits.timeout)

        self._operation(journal, signals, "resize", resize, device=vmem.id, size=target)

    def _sample(self, journal: Journal, signals: Signals) -> None:
        audit, source = self.report.audit, self.audit_source
        assert audit is not None and source is not None
        self._close()  # QEMU serves one client: drgn's
        after = self.report.counters.attempted
        unconfirmed = audit.unconfirmed
        with signals.interruptible():
            confirmed = audit.sample(source)
        known = {finding_key(f) for _, f in audit.confirmed}
        audit.confirmed += [(after, f) for f in confirmed if finding_key(f) not in known]
        journal.append("audit", after=after, new_errors=len(confirmed), unconfirmed=audit.unconfirmed - unconfirmed)
        for f in confirmed:
            self.say(f"audit after {after} operations: {f.rule} {f.pfn_start:#x}-{f.pfn_end:#x}: {f.message}")

    def _final_audit(self, signals: Signals) -> None:
        audit, source = self.report.audit, self.audit_source
        if audit is None or source is None or signals.received or self.report.error or not self.report.restored:
            return
        try:
            with signals.interruptible():
                audit.final = audit.sample(source)
        except Interrupted:
            audit.final = None


def _ost(device: str, source: int) -> Callable[[dict[str, Any]], bool]:
    """Matches the guest's final _OST answer for ``device`` (not "ejection in progress")."""

    def match(event: dict[str, Any]) -> bool:
        if event.get("event") != "ACPI_DEVICE_OST":
            return False
        info = event.get("data", {}).get("info", {})
        return bool(
            info.get("device") == device
            and info.get("source") == source
            and info.get("status") != OST_EJECT_IN_PROGRESS
        )

    return match


def remove_dimm(qmp: QMP, device: str, backend: str, timeout: float) -> str | None:
    """``device_del`` and wait for the guest to offline, remove and eject it; then drop its backend.
    A DIMM whose removal a killed run had already asked for is waited for, not asked again."""

    def present() -> bool:
        return any(d.get("data", {}).get("id") == device for d in qmp.execute("query-memory-devices"))

    try:
        qmp.execute("device_del", id=device)
    except QMPError as error:
        if "unplug" not in error.desc:  # QEMU: "Device ... is already in the process of unplug"
            return f"QMP {error.error_class}"

    def gone_or_refused(event: dict[str, Any]) -> bool:
        deleted = event.get("event") == "DEVICE_DELETED" and event.get("data", {}).get("device") == device
        return deleted or _ost(device, OST_EJECT_SOURCE)(event)

    event = qmp.wait_event(gone_or_refused, timeout)
    if event is None:
        if present():
            return "timeout"
        drop_backend(qmp, backend)  # gone before this connection could see its DEVICE_DELETED
        return None
    if event["event"] == "ACPI_DEVICE_OST":
        status = int(event["data"]["info"]["status"])
        if status != 0:
            return ost_reason(OST_EJECT_SOURCE, status)
        if qmp.wait_event(lambda e: e.get("event") == "DEVICE_DELETED", timeout) is None:
            return "timeout"
    drop_backend(qmp, backend)
    return None


def drop_backend(qmp: QMP, backend: str) -> None:
    """``object-del`` a DIMM's RAM backend once the DIMM is gone (QEMU keeps it otherwise)."""
    try:
        qmp.execute("object-del", id=backend)
    except QMPError:
        pass  # already gone


def set_virtio_mem(qmp: QMP, path: str, size: int, timeout: float) -> str | None:
    """Ask for ``size`` and wait until the device has it plugged."""
    try:
        qmp.execute("qom-set", path=path, property="requested-size", value=size)
    except QMPError as error:
        return f"QMP {error.error_class}"
    deadline = time.monotonic() + timeout
    while int(qmp.execute("qom-get", path=path, property="size")) != size:
        if time.monotonic() > deadline:
            return "incomplete"
        time.sleep(RESIZE_POLL)
    return None


def restore_guest(
    socket_path: str,
    prefix: str,
    virtio_mem: dict[str, Any] | None,
    journal: Journal,
    signals: Signals,
    timeout: float,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Remove every DIMM the run added, drop their backends, and set virtio-mem back; over a new QMP
    connection (an interrupted command may have left the run's own with an answer not read)."""
    results: list[dict[str, Any]] = []

    def record(what: str, result: str, reason: str | None = None, advice: str | None = None) -> None:
        results.append({"what": what, "result": result, "reason": reason, "advice": advice})
        journal.note("restore", what=what, result=result, reason=reason)
        if result == "restored":
            say(f"{what}: put back")
        elif result != "unchanged":
            say(f"{what}: NOT put back ({reason}): {advice}")

    seen = len(signals.received)
    try:
        qmp = QMP(socket_path)
    except KmemError as error:
        record(
            "guest", "failed", str(error), "when QEMU answers again: kmeminspect --qemu SOCKET stress --restore JOURNAL"
        )
        return results
    try:
        for device in our_devices(qmp, prefix):
            try:
                with signals.interruptible(seen), signals.deadline(timeout * 2):
                    reason = remove_dimm(qmp, device, backend_of(device), timeout)
            except (Interrupted, TransitionTimeout):
                reason = "interrupted"
            if reason is None:
                record(f"dimm {device}", "restored")
            else:
                advice = (
                    "the guest keeps its memory in use: retry later with 'kmeminspect --qemu SOCKET stress --restore "
                    f"{journal.path}', or device_del {device} over QMP"
                )
                record(f"dimm {device}", "failed", reason, advice)
        remaining = {backend_of(device) for device in our_devices(qmp, prefix)}
        for backend in our_backends(qmp, prefix):
            if backend not in remaining:
                drop_backend(qmp, backend)
        if virtio_mem is not None:
            path = f"/machine/peripheral/{virtio_mem['id']}"
            want = int(virtio_mem["requested_size"])
            now = int(qmp.execute("qom-get", path=path, property="size"))
            requested = int(qmp.execute("qom-get", path=path, property="requested-size"))
            what = f"virtio-mem {virtio_mem['id']} at {want // MiB} MiB"
            if now == want and requested == want:
                record(what, "unchanged")
            else:
                try:
                    with signals.interruptible(seen):
                        reason = set_virtio_mem(qmp, path, want, timeout)
                except Interrupted:
                    reason = "interrupted"
                advice = (
                    "requested-size is set back; the guest plugs or unplugs on its own: check qom-get size later"
                    if reason == "incomplete"
                    else f"retry with 'kmeminspect --qemu SOCKET stress --restore {journal.path}'"
                )
                record(what, "restored" if reason is None else "failed", reason, None if reason is None else advice)
    finally:
        qmp.close()
    return results


@dataclasses.dataclass
class QemuRestoreReport:
    journal: str
    restorations: list[dict[str, Any]]
    note: str | None = None

    @property
    def complete(self) -> bool:
        return all(r["result"] in ("unchanged", "restored") for r in self.restorations)

    def to_json(self) -> dict[str, Any]:
        return {"journal": self.journal, "complete": self.complete, "note": self.note, "blocks": self.restorations}


def restore_qemu_journal(
    path: Path, socket_path: str, say: Callable[[str], None], timeout: float = 60.0
) -> QemuRestoreReport:
    """``--qemu SOCKET stress --restore JOURNAL`` for a QEMU-mode run that was killed."""
    header, events = read_journal(path)
    if header.get("mode") != "qemu":
        raise UsageError(f"--restore {path}: a {header.get('mode')} journal: restore it without --qemu")
    if os.path.realpath(socket_path) != os.path.realpath(header["qmp"]):
        raise UsageError(f"--restore {path}: the run drove {header['qmp']}, not {socket_path}")
    journal = Journal.reopen(path)
    try:
        if any(e.get("event") == "closed" and e.get("restored") for e in events):
            return QemuRestoreReport(str(path), [], note="the run ended and put the guest back: nothing to do")
        with Signals() as signals:
            results = restore_guest(
                socket_path, header["prefix"], header.get("virtio_mem"), journal, signals, timeout, say
            )
        failed = [r["what"] for r in results if r["result"] not in ("unchanged", "restored")]
        journal.note("closed", stopped_by="restore", restored=not failed, failed=failed)
        return QemuRestoreReport(str(path), results)
    finally:
        journal.close()


def plan_text(runner: QemuStress, vmem: VirtioMem | None, every: int, seed: int) -> str:
    """What a QEMU run will do to the guest, printed before it changes anything."""
    limits, socket_path, path = runner.limits, runner.socket_path, runner.journal_path
    plan = [f"kmeminspect stress: the QEMU guest behind {socket_path}; nothing else is changed"]
    if limits.dimm_rounds:
        plan.append(
            f"  {limits.dimm_rounds} DIMM rounds: add a {limits.dimm_size >> 20} MiB pc-dimm "
            f"({runner.prefix}-dimmN), let the guest take it, device_del it"
        )
    if vmem and limits.resizes:
        plan.append(
            f"  {limits.resizes} resizes of virtio-mem {vmem.id}: 0-{vmem.max_size >> 20} MiB in "
            f"{vmem.block_size >> 20} MiB steps, back to {vmem.requested_size >> 20} MiB at the end"
        )
    plan += [
        f"  audit: every {every} operations (drgn over QMP)" if every else "  audit: off",
        f"  seed {seed}; per-operation timeout {limits.timeout:g} s",
        f"  journal: {path} (after a crash: kmeminspect --qemu {socket_path} stress --restore {path})",
    ]
    return "\n".join(plan)
