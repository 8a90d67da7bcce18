"""The kernel's memory block devices, ``/sys/devices/system/memory/memoryN``: what a live stress run reads
and writes. Writing ``offline``, ``online_movable`` or ``online_kernel`` to a block's ``state`` makes the
kernel offline it (isolate its pageblocks, migrate every page away) or online it into ZONE_MOVABLE or a
kernel zone; a refusal is an errno (``state_store()`` in drivers/base/memory.c).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import KmemError

OFFLINE, ONLINE = "offline", "online"
ONLINE_MOVABLE, ONLINE_KERNEL = "online_movable", "online_kernel"
MOVABLE = "Movable"
#: the zones a block can be onlined into with online_kernel (include/linux/mmzone.h, x86_64)
KERNEL_ZONES = ("DMA", "DMA32", "Normal")
#: ``firmware_node`` of a block backed by an ACPI memory device (a DIMM that can be ejected)
ACPI_MEMORY_DEVICE = "PNP0C80"
#: /proc/iomem name of RAM that dax's kmem driver hot-added (a device, given back by offlining)
KMEM_RAM = "System RAM (kmem)"

#: what the kernel means by each errno of a write to a block's ``state`` (drivers/base/memory.c
#: state_store(), mm/memory_hotplug.c online_pages()/offline_pages(), v6.1 to v7.3)
REFUSALS = {
    "EBUSY": "the kernel could not isolate or migrate every page away (unmovable, pinned or reserved pages), "
    "or a memory notifier vetoed",
    "EINVAL": "already in that state, the block has holes (not all of it is System RAM: offline_pages() "
    "refuses), spans several zones, or the zone asked for is not allowed",
    "EINTR": "a signal aborted the offline (offline_pages() backs off on any pending signal)",
    "ENOMEM": "the kernel lacked memory for the operation (migration targets, page tables)",
    "EAGAIN": "temporarily impossible (e.g. a racing hotplug operation)",
    "EPERM": "not permitted (root is needed to write a block's state)",
    "ENODEV": "the block went away",
    "timeout": "the offline did not end within the per-transition timeout: stress interrupted it "
    "(the kernel rolls it back, the block stays online)",
}

#: attempts and pause when putting a block back: an offline refused with EBUSY often succeeds a little later


def errno_name(error: OSError) -> str:
    """``EBUSY`` for an OSError with errno 16: how refusals are counted and journaled."""
    return errno.errorcode.get(error.errno or 0, f"errno {error.errno}")


@dataclasses.dataclass(frozen=True)
class BlockState:
    """What sysfs says of a block: ``state`` and, when online, the zone ``valid_zones`` names."""

    state: str  # online, offline, going-offline
    zone: str | None  # the zone of an online block; None when offline, or online across several zones

    def describe(self) -> str:
        return f"{self.state} ({self.zone})" if self.state == ONLINE and self.zone else self.state

    def to_json(self) -> dict[str, str | None]:
        return {"state": self.state, "zone": self.zone}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BlockState:
        return cls(str(data["state"]), data.get("zone"))

    def same_as(self, other: BlockState) -> bool:
        """Same state, and same zone when online."""
        return self.state == other.state and (self.state != ONLINE or self.zone == other.zone)


def online_action(zone: str | None) -> str:
    """The write that onlines a block into ``zone``."""
    return ONLINE_MOVABLE if zone == MOVABLE else ONLINE_KERNEL


class MemoryBlocks:
    """The memory block devices under a sysfs root (``/sys`` on a real machine, a fake tree in tests)
    and the few /proc files stress reads (``iomem``, the boot id)."""

    def __init__(self, sysfs: Path = Path("/sys"), procfs: Path = Path("/proc")) -> None:
        self.sysfs = sysfs
        self.procfs = procfs
        self.directory = sysfs / "devices/system/memory"

    def path(self, block: int, attribute: str) -> Path:
        return self.directory / f"memory{block}" / attribute

    def ids(self) -> list[int]:
        if not self.directory.is_dir():
            raise KmemError(f"{self.directory}: no memory block devices (a kernel without CONFIG_MEMORY_HOTPLUG?)")
        return sorted(int(p.name[6:]) for p in self.directory.glob("memory*") if p.name[6:].isdigit())

    def block_size(self) -> int:
        """Bytes per block (``block_size_bytes`` is hex without 0x)."""
        return int((self.directory / "block_size_bytes").read_text().strip(), 16)

    def phys_range(self, block: int) -> tuple[int, int]:
        """[start, end) physical addresses of a block."""
        size = self.block_size()
        return block * size, (block + 1) * size

    def pfn_range(self, block: int) -> tuple[int, int]:
        """[start, end) pfns of a block: block ids are in block units (``phys_index`` is the same number)."""
        pages = self.block_size() // os.sysconf("SC_PAGE_SIZE")
        return block * pages, (block + 1) * pages

    def read(self, block: int) -> BlockState | None:
        """The block's state, or None when it is gone. ``valid_zones`` of an online block names its zone,
        or ``none`` when it spans several (it cannot be offlined then); of an offline block, the zones
        it could be onlined to."""
        try:
            state = self.path(block, "state").read_text().strip()
            zones = self.path(block, "valid_zones").read_text().split()
        except FileNotFoundError:
            return None
        zone = zones[0] if state == ONLINE and zones and zones[0] != "none" else None
        return BlockState(state, zone)

    def write(self, block: int, action: str) -> str | None:
        """Write ``action`` to the block's ``state``: None when the kernel accepted it, else its errno name.

        An offline can take long (pages are migrated) and backs off with EINTR on any signal: callers
        bound it with ``Signals.deadline`` and ``Signals.interruptible``.
        """
        try:
            fd = os.open(self.path(block, "state"), os.O_WRONLY)
        except OSError as error:
            return errno_name(error)
        try:
            os.write(fd, action.encode())
        except OSError as error:
            return errno_name(error)
        finally:
            os.close(fd)
        return None

    def hotpluggable(self, block: int) -> bool:
        """Backed by memory that can be unplugged: an ACPI memory device (a DIMM: the block's
        ``firmware_node`` is a PNP0C80 device) or RAM hot-added by dax kmem. Boot RAM and virtio-mem
        blocks are not (virtio-mem onlines and offlines its own blocks)."""
        node = self.path(block, "firmware_node")
        if node.is_symlink() and os.readlink(node).rsplit("/", 1)[-1].startswith(ACPI_MEMORY_DEVICE):
            return True
        start, end = self.pfn_range(block)
        page = os.sysconf("SC_PAGE_SIZE")
        return any(a < end * page and start * page < b for a, b in self.iomem(KMEM_RAM))

    def iomem(self, name: str) -> list[tuple[int, int]]:
        """[start, end) byte ranges of /proc/iomem entries called ``name`` (addresses read as 0 unless root)."""
        ranges = []
        try:
            text = (self.procfs / "iomem").read_text()
        except OSError:
            return []
        for line in text.splitlines():
            span, _, entry = line.strip().partition(" : ")
            if entry == name:
                a, _, b = span.partition("-")
                ranges.append((int(a, 16), int(b, 16) + 1))
        return ranges

    def boot_id(self) -> str:
        return (self.procfs / "sys/kernel/random/boot_id").read_text().strip()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold an flock on the memory directory: one stress run (or restore) per machine at a time."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KmemError(f"another kmeminspect stress run holds {self.directory}: wait for it to end") from None
            yield
        finally:
            os.close(fd)
