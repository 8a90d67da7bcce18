"""The QEMU driver of ``kmeminspect --qemu QMP_SOCKET stress``: hotplug churn of a QEMU test guest,
driven from the host, on the one runner (runner.py); the QMP side of each operation is in guest.py.

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
closed meanwhile). Journal and restoration as in live mode (the runner, runner.py); restoration
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..audit import Finding
from ..errors import UsageError
from ..qmp import QMP, QMPError
from ..signals import Signals
from .guest import (
    OST_EJECT_SOURCE,
    OST_INSERT_SOURCE,
    REASONS,
    VirtioMem,
    _ost,
    backend_of,
    drop_backend,
    find_virtio_mem,
    ost_reason,
    our_devices,
    remove_dimm,
    restore_guest,
    restore_qemu_journal,
    set_virtio_mem,
)
from .journal import Journal
from .report import PutBack, Report
from .runner import Ending, Hooks, Outcome, Runner

__all__ = [
    "OST_EJECT_SOURCE",
    "OST_INSERT_SOURCE",
    "QemuAudit",
    "QemuLimits",
    "QemuStress",
    "backend_of",
    "ost_reason",
    "parse_size",
    "plan_text",
    "restore_qemu_journal",
]

MiB = 1 << 20


def parse_size(text: str) -> int:
    """``128M``, ``1G`` or bytes."""
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    try:
        if text[-1:].upper() in units:
            return int(text[:-1]) * units[text[-1].upper()]
        return int(text)
    except ValueError:
        raise UsageError(f"--dimm-size {text}: not a size (like 128M or 1G)") from None


class QemuAudit:
    """drgn over QMP, attached for one read and detached (QEMU serves one client per socket)."""

    def __init__(self, socket_path: str, vmlinux: str | None, btf: str | None = None) -> None:
        self.socket_path = socket_path
        self.vmlinux = vmlinux
        self.btf = btf

    def read(self) -> tuple[str, list[Finding]]:
        from ..audit import audit
        from ..kernel import read_snapshot
        from ..target import open_qemu

        prog = open_qemu(
            self.socket_path, Path(self.vmlinux) if self.vmlinux else None, Path(self.btf) if self.btf else None
        )
        try:
            snapshot = read_snapshot(prog, {"kind": "qemu", "path": self.socket_path})
        finally:
            del prog
            gc.collect()  # drgn lets the socket go with the Program
        return snapshot.layout.release, audit(snapshot)


@dataclasses.dataclass(frozen=True)
class QemuLimits:
    """How many DIMM rounds (of which size) and virtio-mem resizes a QEMU run does, and the per-operation time limit."""

    dimm_rounds: int
    dimm_size: int
    resizes: int
    timeout: float  # per operation


class QemuStress(Runner):
    """One run against a QEMU guest: DIMM rounds and virtio-mem resizes at random, audits between them,
    everything journaled, and everything the run added or resized put back."""

    steps = "operations"
    interrupted_reason = "interrupted"

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
        self.prefix = f"kmi-stress-{os.getpid()}"
        report = Report("qemu", "", seed, "", {"prefix": self.prefix}, REASONS)
        super().__init__(report, journal_path, audit_every, audit_source, hooks, say)
        self.socket_path = socket_path
        self.limits = limits
        self.virtio_mem_id = virtio_mem
        self.qmp: QMP | None = None
        self.virtio_mem: VirtioMem | None = None
        self.dimms = 0
        self.operations: list[str] = []

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

    def _virtio_mem_header(self) -> dict[str, Any] | None:
        vmem = self.virtio_mem
        return {"id": vmem.id, "requested_size": vmem.requested_size} if vmem else None

    def header(self) -> dict[str, Any]:
        return {
            "mode": "qemu",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "qmp": self.socket_path,
            "prefix": self.prefix,
            "dimm_size": self.limits.dimm_size,
            "seed": self.report.seed,
            "virtio_mem": self._virtio_mem_header(),
        }

    def begin(self) -> None:
        self.operations = ["dimm"] * self.limits.dimm_rounds + ["resize"] * self.limits.resizes
        self.rng.shuffle(self.operations)

    def stop_reason(self, elapsed: float) -> str | None:
        return None if self.operations else "operations"

    def step(self, journal: Journal, signals: Signals) -> None:
        operation = self.operations.pop(0)
        with signals.interruptible():
            if operation == "dimm":
                self._dimm_round(journal, signals)
            else:
                self._resize(journal, signals)

    def pause(self) -> None:
        self._close()  # QEMU serves one client: drgn's

    def release(self) -> None:
        self._close()

    def restore(self, journal: Journal, signals: Signals) -> list[PutBack]:
        virtio_mem, timeout = self._virtio_mem_header(), self.limits.timeout
        return list(restore_guest(self.socket_path, self.prefix, virtio_mem, journal, signals, timeout, self.say))

    def _connect(self) -> QMP:
        if self.qmp is None:
            self.qmp = QMP(self.socket_path)
        return self.qmp

    def _close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None

    def _operation(
        self, journal: Journal, signals: Signals, op: str, run: Callable[[], str | None], **fields: Any
    ) -> bool:
        """One operation on the runner: ``run`` returns None when it succeeded, else the reason."""

        def perform() -> Outcome:
            reason = run()
            return ("done" if reason is None else "interrupted" if reason == "interrupted" else "refused"), reason

        def end(result: str, reason: str | None, seconds: float) -> Ending:
            record = {"op": op, "result": result, "reason": reason, "seconds": round(seconds, 3), **fields}
            return record, {"op": op, **fields}

        target = str(fields.get("device", ""))
        return self.operation(journal, signals, op, target, {"op": op, **fields}, perform, end) == "done"

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
