"""The QEMU guest's side of a QEMU stress run, over QMP: DIMMs added and removed (ACPI memory hotplug,
answered by ``_OST``), virtio-mem resized, and everything a run added or resized put back, at its end or from
its journal after a kill (``--qemu SOCKET stress --restore JOURNAL``)."""

from __future__ import annotations

import dataclasses
import operator
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import KmemError, UsageError
from ..qmp import QMP, QMPError
from ..signals import Interrupted, Signals, TransitionTimeout
from .journal import Journal, read_journal
from .report import RestoreReport

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
    """An ``_OST`` status of an insertion (source 1) or ejection (source 3), as a refusal reason."""
    table = OST_EJECT if source == OST_EJECT_SOURCE else OST_INSERT
    return f"OST {status:#x} ({OST_GENERAL.get(status) or table.get(status, 'unknown')})"


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
    """The virtio-mem device ``device`` (its sizes), or a UsageError saying why it is not one."""
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
    """The memory backends (``/objects``) this run added that QEMU still has."""
    return [o["name"] for o in qmp.execute("qom-list", path="/objects") if o["name"].startswith(prefix + "-")]


@dataclasses.dataclass
class GuestRestoration:
    """What became of one thing a QEMU run changed (a DIMM, the guest, a virtio-mem size) when put back."""

    what: str
    result: str  # unchanged, restored, failed
    reason: str | None = None
    advice: str | None = None

    #: how the journal's ``closed`` record names it: by what it is (``dimm kmi-stress-7-dimm3``)
    key = property(operator.attrgetter("what"))

    def to_json(self) -> dict[str, Any]:
        """``what``, ``result``, ``reason``, ``advice``: a line of the report's ``restoration``."""
        return dataclasses.asdict(self)


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
) -> list[GuestRestoration]:
    """Remove every DIMM the run added, drop their backends, and set virtio-mem back; over a new QMP
    connection (an interrupted command may have left the run's own with an answer not read)."""
    results: list[GuestRestoration] = []

    def record(what: str, result: str, reason: str | None = None, advice: str | None = None) -> None:
        results.append(GuestRestoration(what, result, reason, advice))
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


def restore_qemu_journal(
    path: Path, socket_path: str, say: Callable[[str], None], timeout: float = 60.0
) -> RestoreReport:
    """``--qemu SOCKET stress --restore JOURNAL`` for a QEMU-mode run that was killed."""
    header, events = read_journal(path)
    if header.get("mode") != "qemu":
        raise UsageError(f"--restore {path}: a {header.get('mode')} journal: restore it without --qemu")
    if os.path.realpath(socket_path) != os.path.realpath(header["qmp"]):
        raise UsageError(f"--restore {path}: the run drove {header['qmp']}, not {socket_path}")
    journal = Journal.reopen(path)
    try:
        if any(e.get("event") == "closed" and e.get("restored") for e in events):
            return RestoreReport(str(path), [], note="the run ended and put the guest back: nothing to do")
        with Signals() as signals:
            results = restore_guest(
                socket_path, header["prefix"], header.get("virtio_mem"), journal, signals, timeout, say
            )
        failed = [r.what for r in results if r.result not in ("unchanged", "restored")]
        journal.note("closed", stopped_by="restore", restored=not failed, failed=failed)
        return RestoreReport(str(path), list(results))
    finally:
        journal.close()
