"""``kmeminspect stress``: cycle chosen memory blocks offline and online, and always put them back.

Live mode works on the running kernel through its memory block devices,
``/sys/devices/system/memory/memoryN``: writing ``offline``, ``online_movable`` or ``online_kernel`` to
``state`` makes the kernel offline the block (isolate its pageblocks, migrate every page away, tear down
its memmap's "online" state) or online it into ZONE_MOVABLE or a kernel zone. The kernel answers a write
with an errno when it refuses (``state_store()`` in drivers/base/memory.c): those are counted by reason,
they are what the stress is there to provoke. QEMU mode (a test VM driven from the host) is in
stress_qemu.py and shares the journal, signal and audit machinery defined here.

Safety, in order:

1. Nothing is touched without an explicit choice (``--blocks`` or ``--all-hotpluggable``); a block whose
   way back needs onlining into a kernel zone needs ``--allow-kernel-zone`` (such a block may never
   offline again); the plan is printed before anything changes.
2. Before the first change, a journal records the original state of every block the run may touch
   (JSON lines, fsync'd; the format is below); every transition is appended (fsync'd) as it happens.
3. On normal end, on an exception, on SIGINT, SIGTERM or SIGHUP the run puts every block back and says
   what it restored. After SIGKILL or a crash, ``kmeminspect stress --restore JOURNAL`` does it.
   Restoration reads the blocks' current state from sysfs; the journal's transitions are a record, the
   original states are what counts. A block the kernel will not put back is reported with the errno and
   what the user can do.
4. Nothing else is written: the walkers only read (``/proc/kpageflags``, ``page_idle/bitmap``) or trigger
   compaction (``/proc/sys/vm/compact_memory``, which moves pages and sets nothing).

Journal format (version 1): one JSON object per line. The first line is the header::

    {"format": "kmeminspect-stress-journal", "version": 1, "mode": "live", "created": ISO-8601,
     "pid": N, "boot_id": "...", "kernel": "6.12.117+deb13-amd64", "sysfs": "/sys", "seed": N,
     "blocks": {"33": {"state": "online", "zone": "Movable"}, "34": {"state": "offline", "zone": null}}}

then events, each with ``"event"`` and ``"time"`` (seconds since the epoch)::

    {"event": "begin", "seq": 1, "block": 33, "from": {...state...}, "write": "offline"}
    {"event": "end", "seq": 1, "block": 33, "result": "done" | "refused" | "anomaly" | "interrupted",
     "errno": "EBUSY" | "timeout" | null, "state": {...state after...}, "seconds": 0.31}
    {"event": "audit", "after": 50, "new_errors": 0, "unconfirmed": 0}
    {"event": "restore", "block": 33, "result": "unchanged" | "restored" | "failed" | "gone",
     "errno": null, "state": {...}}
    {"event": "closed", "stopped_by": "transitions", "restored": true, "failed": []}

A line cut short by a crash is ignored when the journal is read back. A run holds an exclusive ``flock``
on its journal (``--restore`` refuses while the run lives) and on the sysfs memory directory (one run at a
time per machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from . import walkers as walkers_mod
from .audit import ERROR, Finding
from .errors import KmemError, UsageError

JOURNAL_FORMAT = "kmeminspect-stress-journal"
JOURNAL_VERSION = 1

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
#: (pages briefly pinned, or isolated by a running compaction)
RESTORE_ATTEMPTS = 5
RESTORE_PAUSE = 1.0
#: seconds a walker gets to print its counters after SIGTERM
WALKER_GRACE = 10.0
#: default stop condition when neither --transitions nor --duration is given
DEFAULT_TRANSITIONS = 100


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived while a write or an audit was in progress."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TransitionTimeout(Exception):
    """The per-transition deadline passed (SIGALRM) while the kernel was still at the write."""


def errno_name(error: OSError) -> str:
    return errno.errorcode.get(error.errno or 0, f"errno {error.errno}")


# -- the kernel's memory blocks ----------------------------------------------------------------------


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


# -- what a run may touch ----------------------------------------------------------------------------


def parse_block_list(text: str) -> list[int]:
    """``32-35,40`` -> [32, 33, 34, 35, 40] (ranges inclusive, as block numbers)."""
    result: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        try:
            lo = int(first)
            hi = int(last) if dash else lo
        except ValueError:
            raise UsageError(f"--blocks {text}: '{part}' is not a block number or a range like 32-35") from None
        if lo < 0 or hi < lo:
            raise UsageError(f"--blocks {text}: '{part}' is not a range of block numbers")
        result.update(range(lo, hi + 1))
    return sorted(result)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The blocks a run may touch with their original state, and those --all-hotpluggable left out."""

    blocks: dict[int, BlockState]
    skipped: dict[int, str]
    allow_kernel_zone: bool

    @property
    def writes(self) -> list[str]:
        """What the run may write to a block's state (restoration aside)."""
        online = [ONLINE_MOVABLE, ONLINE_KERNEL] if self.allow_kernel_zone else [ONLINE_MOVABLE]
        return [OFFLINE, *online]


def _ineligible(state: BlockState, allow_kernel_zone: bool) -> str | None:
    """Why a block cannot be cycled, or None."""
    if state.state not in (ONLINE, OFFLINE):
        return f"in transition ({state.state})"
    if state.state == ONLINE and state.zone is None:
        return "online across several zones (valid_zones 'none'): the kernel cannot offline it"
    if state.state == ONLINE and state.zone != MOVABLE and not allow_kernel_zone:
        return (
            f"online in {state.zone}: putting it back means onlining into a kernel zone, "
            "allowed only with --allow-kernel-zone"
        )
    return None


def plan_blocks(sysfs: MemoryBlocks, chosen: list[int] | None, all_hotpluggable: bool, allow_kernel_zone: bool) -> Plan:
    """Choose the blocks: an explicit list (every block must be eligible) or every hotpluggable block
    (the ineligible ones are skipped, with the reason)."""
    if (chosen is None) == (not all_hotpluggable):
        raise UsageError("choose the blocks to cycle: --blocks LIST or --all-hotpluggable (one of them)")
    existing = sysfs.ids()
    blocks: dict[int, BlockState] = {}
    skipped: dict[int, str] = {}
    if chosen is not None:
        for block in chosen:
            state = sysfs.read(block) if block in existing else None
            if state is None:
                raise UsageError(f"--blocks: no memory block {block} (this machine has {_ranges(existing)})")
            why = _ineligible(state, allow_kernel_zone)
            if why:
                raise UsageError(f"--blocks: block {block} is {why}")
            blocks[block] = state
    else:
        for block in existing:
            if not sysfs.hotpluggable(block):
                continue
            state = sysfs.read(block)
            why = "gone" if state is None else _ineligible(state, allow_kernel_zone)
            if why or state is None:
                skipped[block] = why or "gone"
            else:
                blocks[block] = state
        if not blocks:
            detail = f" ({len(skipped)} skipped: {next(iter(skipped.values()))})" if skipped else ""
            raise UsageError(f"--all-hotpluggable: no hotpluggable memory block to cycle{detail}")
    for block in blocks:
        if not os.access(sysfs.path(block, "state"), os.W_OK):
            raise KmemError(f"cannot write {sysfs.path(block, 'state')}: run as root")
    return Plan(blocks, skipped, allow_kernel_zone)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 32, 33] -> '0-2,32-33'."""
    parts: list[list[int]] = []
    for n in sorted(numbers):
        if parts and parts[-1][1] == n - 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in parts) or "none"


# -- journal -----------------------------------------------------------------------------------------


def new_seed() -> int:
    """A seed for a run that was given none (printed, so the run can be repeated)."""
    return random.SystemRandom().randrange(1 << 31)


def default_journal_path() -> Path:
    """``/var/lib/kmeminspect/stress-<time>-<pid>.journal``, or the same name in the temporary directory
    when /var/lib is not writable (a read-only root)."""
    name = f"stress-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.journal"
    for directory in (Path("/var/lib/kmeminspect"), Path(tempfile.gettempdir())):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory / name
    raise KmemError("no writable directory for the journal: pass --journal PATH")


class Journal:
    """An append-only JSON-lines file, each line fsync'd before the next change (see the module docstring).
    Holds an exclusive flock while open."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.error: str | None = None  # the first failure to write while restoring

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> Journal:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except FileExistsError:
            raise UsageError(
                f"--journal {path}: exists (a journal is never overwritten: choose another path)"
            ) from None
        except OSError as error:
            raise KmemError(f"--journal {path}: cannot create: {error.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        journal = cls(path, fd)
        journal._write({"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, **header})
        # the file's directory entry too: a journal must survive a crash right after the first change
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return journal

    @classmethod
    def reopen(cls, path: Path) -> Journal:
        """Open an existing journal to append restoration records; refuse while its run holds it."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise KmemError(f"--restore {path}: {error.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = read_journal(path)[0].get("pid")
            raise KmemError(
                f"--restore {path}: its run (pid {pid}) is still going: stop it with kill -TERM {pid}, "
                "it puts the blocks back itself"
            ) from None
        return cls(path, fd)

    def _write(self, record: dict[str, Any]) -> None:
        try:
            os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
            os.fsync(self.fd)
        except OSError as error:
            raise KmemError(f"journal {self.path}: cannot write: {error.strerror}") from None

    def append(self, event: str, **fields: Any) -> None:
        """Append an event; a failure raises (no change may happen that the journal does not hold)."""
        self._write({"event": event, "time": round(time.time(), 3), **fields})

    def note(self, event: str, **fields: Any) -> None:
        """Append an event while putting blocks back: a failure to write must not stop that, so it is
        kept in ``self.error`` for the report instead."""
        try:
            self.append(event, **fields)
        except KmemError as error:
            self.error = self.error or str(error)

    def close(self) -> None:
        os.close(self.fd)


def read_journal(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the events of a journal; a last line cut short by a crash is dropped."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        raise KmemError(f"--restore {path}: {error.strerror}") from None
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) - 1 and number > 0:
                break  # the write a SIGKILL or crash cut short
            raise UsageError(f"--restore {path}: line {number + 1} is not JSON (not a stress journal?)") from None
    if not records or records[0].get("format") != JOURNAL_FORMAT:
        raise UsageError(f"--restore {path}: not a kmeminspect stress journal")
    version = records[0].get("version")
    if version != JOURNAL_VERSION:
        raise UsageError(f"--restore {path}: journal version {version} is not supported (this kmeminspect reads 1)")
    return records[0], records[1:]


# -- signals -----------------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Signals:
    """While a run holds blocks: SIGINT, SIGTERM and SIGHUP are noted; inside ``interruptible()`` they also
    raise ``Interrupted``, which aborts a write (an offline backs off with EINTR and is not retried) or
    an audit. ``deadline()`` bounds a write with SIGALRM (``TransitionTimeout``)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._interruptible = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for signum in STOP_SIGNALS:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup: the user asked to survive a hangup
            # SIGINT is handled even when inherited ignored (a background job of a script): kill -INT is meant
            self._previous[signum] = signal.signal(signum, self._on_stop)
        self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)
        return self

    def __exit__(self, *exc: object) -> None:
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
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


# -- restoration -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restoration:
    """What became of one block when it was put back."""

    block: int
    original: BlockState
    found: BlockState | None  # its state before restoring; None when the block is gone
    state: BlockState | None  # its state after
    result: str  # unchanged, restored, failed, gone
    errno: str | None = None
    advice: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "original": self.original.to_json(),
            "found": self.found.to_json() if self.found else None,
            "state": self.state.to_json() if self.state else None,
            "result": self.result,
            "errno": self.errno,
            "advice": self.advice,
        }


def _advice(sysfs: MemoryBlocks, block: int, action: str, reason: str, journal: Path) -> str:
    """What the user can do about a block the kernel did not put back."""
    path = sysfs.path(block, "state")
    retry = f"retry with 'kmeminspect stress --restore {journal}' or 'echo {action} > {path}'"
    if reason == "interrupted":
        return f"restoring was interrupted by another signal: {retry}"
    if action == OFFLINE and reason in ("EBUSY", "timeout", "EINTR", "EAGAIN"):
        return (
            f"the kernel cannot move every page out of the block now: {retry} once memory is less busy; if "
            "it keeps failing, unmovable or pinned pages are there and only a reboot frees the block"
        )
    if reason == "ENOMEM":
        return f"the kernel lacked memory for the operation: free memory, then {retry}"
    if reason == "wrong-zone":
        return f"it came back online in another zone: offline it, then {retry}"
    return f"{retry} (the kernel said {reason}: {REFUSALS.get(reason, 'see dmesg')})"


def restore_blocks(
    sysfs: MemoryBlocks,
    originals: dict[int, BlockState],
    journal: Journal,
    signals: Signals,
    timeout: float,
    say: Callable[[str], None],
) -> list[Restoration]:
    """Put every block back into its original state, as found in sysfs now; blocks to online first (they
    give the offlines that follow room to migrate into). Each write may be aborted by a signal that
    arrives after this began; the block is then reported, never silently left."""
    found = {block: sysfs.read(block) for block in originals}
    order = sorted(originals, key=lambda b: (originals[b].state != ONLINE, b))
    results = []
    for block in order:
        original, current = originals[block], found[block]
        if current is None:
            result = Restoration(block, original, None, None, "gone", advice="the block was removed meanwhile")
        elif current.same_as(original):
            result = Restoration(block, original, current, current, "unchanged")
        else:
            result = _restore_block(sysfs, block, original, current, journal.path, signals, timeout)
        journal.note(
            "restore",
            block=block,
            result=result.result,
            errno=result.errno,
            state=result.state.to_json() if result.state else None,
        )
        if result.result == "restored" and current is not None:
            say(f"block {block}: {current.describe()} -> {original.describe()}: restored")
        elif result.result != "unchanged":
            why = result.errno or result.result
            say(f"block {block}: NOT restored to {original.describe()} ({why}): {result.advice}")
        results.append(result)
    return results


def _restore_block(
    sysfs: MemoryBlocks,
    block: int,
    original: BlockState,
    current: BlockState,
    journal: Path,
    signals: Signals,
    timeout: float,
) -> Restoration:
    if original.state == OFFLINE:
        steps = [OFFLINE]
    elif current.state == ONLINE:  # online in another zone: through offline
        steps = [OFFLINE, online_action(original.zone)]
    else:
        steps = [online_action(original.zone)]
    seen = len(signals.received)
    state: BlockState | None = current
    for action in steps:
        reason: str | None = None
        for attempt in range(RESTORE_ATTEMPTS):
            if attempt:
                time.sleep(RESTORE_PAUSE)
            try:
                with signals.interruptible(seen), signals.deadline(timeout):
                    reason = sysfs.write(block, action)
            except TransitionTimeout:
                reason = "timeout"
            except Interrupted:
                state = sysfs.read(block)
                return Restoration(
                    block, original, current, state, "failed", "interrupted",
                    _advice(sysfs, block, action, "interrupted", journal),
                )  # fmt: skip
            state = sysfs.read(block)
            if state is not None and state.state == (OFFLINE if action == OFFLINE else ONLINE):
                reason = None
                break
            reason = reason or "no-effect"  # accepted, yet the state did not change
            if reason not in ("EBUSY", "timeout", "EAGAIN", "EINTR"):
                break  # retrying will not help
        if reason is not None or state is None:
            why = reason or "gone"
            return Restoration(
                block, original, current, state, "failed", why, _advice(sysfs, block, action, why, journal)
            )
    assert state is not None
    if not state.same_as(original):
        advice = _advice(sysfs, block, OFFLINE, "wrong-zone", journal)
        return Restoration(block, original, current, state, "failed", "wrong-zone", advice)
    return Restoration(block, original, current, state, "restored")


@dataclasses.dataclass
class RestoreReport:
    journal: str
    restorations: list[Restoration]
    note: str | None = None  # why nothing was done

    @property
    def complete(self) -> bool:
        return all(r.result in ("unchanged", "restored") for r in self.restorations)

    def to_json(self) -> dict[str, Any]:
        return {
            "journal": self.journal,
            "complete": self.complete,
            "note": self.note,
            "blocks": [r.to_json() for r in self.restorations],
        }


def restore_journal(
    path: Path,
    say: Callable[[str], None],
    timeout: float = 60.0,
    procfs: Path = Path("/proc"),
    sysfs: MemoryBlocks | None = None,
) -> RestoreReport:
    """``stress --restore JOURNAL``: put back the blocks of a run that could not (SIGKILL, crash, the tool
    itself killed). Refuses while the run lives, and after a reboot (block states start afresh). The blocks
    are those under the journal's sysfs root unless ``sysfs`` is given."""
    header, events = read_journal(path)
    if header.get("mode") != "live":
        raise UsageError(f"--restore {path}: a {header.get('mode')} journal: restore it with --qemu QMP_SOCKET")
    sysfs = sysfs or MemoryBlocks(Path(header["sysfs"]), procfs)
    if sysfs.boot_id() != header.get("boot_id"):
        raise KmemError(
            f"--restore {path}: written during another boot (boot id {header.get('boot_id')}): the reboot reset "
            "every block, there is nothing to restore"
        )
    journal = Journal.reopen(path)
    try:
        originals = {int(b): BlockState.from_json(s) for b, s in header["blocks"].items()}
        closed = [e for e in events if e.get("event") == "closed"]
        if closed:
            failed = closed[-1].get("failed", [])
            if not failed:
                return RestoreReport(str(path), [], note="the run ended and put every block back: nothing to do")
            originals = {b: s for b, s in originals.items() if b in failed}
        with sysfs.exclusive(), Signals() as signals:
            results = restore_blocks(sysfs, originals, journal, signals, timeout, say)
        failed = [r.block for r in results if r.result not in ("unchanged", "restored")]
        journal.note("closed", stopped_by="restore", restored=not failed, failed=failed)
        return RestoreReport(str(path), results)
    finally:
        journal.close()


# -- audit sampling ----------------------------------------------------------------------------------


class AuditSource(Protocol):
    """One read of the kernel's state, audited: (kernel release, findings)."""

    def read(self) -> tuple[str, list[Finding]]: ...


class LiveAudit:
    """Reads the running kernel through /proc/kcore (drgn), keeping one Program across samples."""

    def __init__(self, vmlinux: str | None) -> None:
        from .target import open_live

        self.prog = open_live(Path(vmlinux) if vmlinux else None)

    def read(self) -> tuple[str, list[Finding]]:
        from .audit import audit
        from .kernel import read_snapshot

        snapshot = read_snapshot(self.prog, {"kind": "live", "path": "/proc/kcore"})
        return snapshot.layout.release, audit(snapshot)


def finding_key(finding: Finding) -> tuple[str, int, int]:
    return finding.rule, finding.pfn_start, finding.pfn_end


@dataclasses.dataclass
class AuditLog:
    """Samples of the audit during a run, against the baseline read before the first change.

    A new error is an error finding absent from the baseline. It is reported only when a second read,
    right after the first and with no transition in between, finds it again: a live memmap read while the
    kernel changes it can read torn.
    """

    every: int
    baseline: list[Finding] = dataclasses.field(default_factory=list)
    samples: int = 0
    confirmed: list[tuple[int, Finding]] = dataclasses.field(default_factory=list)  # (after transitions, finding)
    unconfirmed: int = 0
    final: list[Finding] | None = None  # new errors after restoration (confirmed), None when not read

    def new_errors(self, findings: list[Finding]) -> list[Finding]:
        known = {finding_key(f) for f in self.baseline}
        return [f for f in findings if f.severity == ERROR and finding_key(f) not in known]

    def sample(self, source: AuditSource) -> list[Finding]:
        """New errors seen by two reads in a row."""
        self.samples += 1
        first = self.new_errors(source.read()[1])
        if not first:
            return []
        again = {finding_key(f) for f in self.new_errors(source.read()[1])}
        confirmed = [f for f in first if finding_key(f) in again]
        self.unconfirmed += len(first) - len(confirmed)
        return confirmed

    def to_json(self) -> dict[str, Any]:
        from .audit import summary

        return {
            "every": self.every,
            "samples": self.samples,
            "baseline": summary(self.baseline)["by_severity"],
            "baseline_errors": [f.to_json() for f in self.baseline if f.severity == ERROR],
            "new_errors": [dict(f.to_json(), after_transitions=n) for n, f in self.confirmed],
            "unconfirmed": self.unconfirmed,
            "final_new_errors": None if self.final is None else [f.to_json() for f in self.final],
        }


# -- hooks -------------------------------------------------------------------------------------------


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


# -- walkers -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class WalkerRun:
    kind: str
    process: subprocess.Popen[str] | None  # None when unavailable on this kernel
    note: str | None = None
    result: dict[str, Any] | None = None


def parse_walkers(text: str) -> list[str]:
    """``kpageflags,compact`` -> the kinds; ``all`` -> every kind."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if kinds == ["all"]:
        return list(walkers_mod.KINDS)
    unknown = [k for k in kinds if k not in walkers_mod.KINDS]
    if unknown:
        raise UsageError(f"--walkers: unknown {', '.join(unknown)} (choose from {', '.join(walkers_mod.KINDS)}, all)")
    return list(dict.fromkeys(kinds))


def available_walkers(kinds: list[str]) -> dict[str, str | None]:
    """kind -> None when it can run here, else why not (a file the kernel lacks)."""
    return {
        kind: None if walkers_mod.WALKER_FILES[kind].exists() else f"{walkers_mod.WALKER_FILES[kind]} absent"
        for kind in kinds
    }


def start_walkers(kinds: list[str], ranges: list[tuple[int, int]]) -> list[WalkerRun]:
    """Start each walker as a child process (kmeminspect.walkers) over the blocks' pfn ranges."""
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    spec = ",".join(f"{a}-{b}" for a, b in ranges)
    runs = []
    for kind, missing in available_walkers(kinds).items():
        if missing:
            runs.append(WalkerRun(kind, None, note=f"not run: {missing}"))
            continue
        command = [sys.executable, "-m", "kmeminspect.walkers", kind, str(os.getpid()), spec]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        runs.append(WalkerRun(kind, process))
    return runs


def stop_walkers(runs: list[WalkerRun]) -> None:
    """SIGTERM each walker and collect its counters; SIGKILL one that does not answer in time."""
    for run in runs:
        if run.process is not None and run.process.poll() is None:
            run.process.terminate()
    for run in runs:
        if run.process is None:
            continue
        try:
            out, _ = run.process.communicate(timeout=WALKER_GRACE)
        except subprocess.TimeoutExpired:
            run.process.kill()
            out, _ = run.process.communicate()
            run.note = f"killed: no answer {WALKER_GRACE:.0f} s after SIGTERM"
        if out.strip():
            run.result = json.loads(out.strip().splitlines()[-1])
        elif run.note is None:
            run.note = f"exited with status {run.process.returncode} without counters"


# -- the run -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ActionCounts:
    attempted: int = 0
    done: int = 0
    seconds: float = 0.0
    refusals: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"attempted": self.attempted, "done": self.done, "seconds": round(self.seconds, 2), **self.refusals}


@dataclasses.dataclass
class Counters:
    attempted: int = 0
    done: int = 0
    by_action: dict[str, ActionCounts] = dataclasses.field(default_factory=dict)
    refusals: dict[str, int] = dataclasses.field(default_factory=dict)
    anomalies: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def count(self, action: str, result: str, reason: str | None, seconds: float, anomaly: dict[str, Any]) -> None:
        """One transition: ``anomaly`` describes it in the report if its result is "anomaly"."""
        self.attempted += 1
        entry = self.by_action.setdefault(action, ActionCounts())
        entry.attempted += 1
        entry.seconds += seconds
        if result == "done":
            self.done += 1
            entry.done += 1
        elif result == "refused" and reason:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
            entry.refusals[reason] = entry.refusals.get(reason, 0) + 1
        elif result == "anomaly":
            self.anomalies.append(anomaly)


@dataclasses.dataclass
class Report:
    mode: str
    kernel: str
    seed: int
    journal: str
    plan: Plan
    stopped_by: str = ""  # transitions, duration, a signal's name, or error
    error: str | None = None
    seconds: float = 0.0
    counters: Counters = dataclasses.field(default_factory=Counters)
    walkers: list[WalkerRun] = dataclasses.field(default_factory=list)
    audit: AuditLog | None = None
    restorations: list[Restoration] = dataclasses.field(default_factory=list)
    hooks: dict[str, Any] = dataclasses.field(default_factory=dict)
    journal_error: str | None = None  # a journal write that failed while restoring

    @property
    def restored(self) -> bool:
        return all(r.result in ("unchanged", "restored") for r in self.restorations)

    def exit_code(self) -> int:
        """2: a block was not put back, or the run failed; 1: the audit confirmed a new error; else 0."""
        if self.error or not self.restored:
            return 2
        if self.audit and (self.audit.confirmed or self.audit.final):
            return 1
        return 0

    def to_json(self) -> dict[str, Any]:
        c = self.counters
        refusals = {name: {"count": n, "meaning": REFUSALS.get(name, "")} for name, n in sorted(c.refusals.items())}
        return {
            "mode": self.mode,
            "kernel": self.kernel,
            "seed": self.seed,
            "journal": self.journal,
            "blocks": {str(b): s.to_json() for b, s in self.plan.blocks.items()},
            "stopped_by": self.stopped_by,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "transitions": {
                "attempted": c.attempted,
                "done": c.done,
                "per_second": round(c.attempted / self.seconds, 2) if self.seconds else None,
                "by_action": {action: entry.to_json() for action, entry in c.by_action.items()},
                "refusals": refusals,
                "anomalies": c.anomalies,
            },
            "walkers": [
                {"kind": w.kind, **(w.result or {}), **({"note": w.note} if w.note else {})} for w in self.walkers
            ],
            "audit": self.audit.to_json() if self.audit else None,
            "restored": self.restored,
            "restoration": [r.to_json() for r in self.restorations],
            "journal_error": self.journal_error,
            "hooks": self.hooks,
        }


@dataclasses.dataclass(frozen=True)
class Limits:
    transitions: int | None
    duration: float | None
    timeout: float  # per transition

    def reached(self, attempted: int, elapsed: float) -> str | None:
        if self.transitions is not None and attempted >= self.transitions:
            return "transitions"
        if self.duration is not None and elapsed >= self.duration:
            return "duration"
        return None


class LiveStress:
    """One live run: cycle the plan's blocks at random (seeded), sample the audit, journal everything,
    and put every block back whatever happens."""

    def __init__(
        self,
        sysfs: MemoryBlocks,
        plan: Plan,
        limits: Limits,
        journal_path: Path,
        seed: int,
        walkers: list[str],
        audit_every: int,
        audit_source: AuditSource | None,
        hooks: Hooks | None = None,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.sysfs = sysfs
        self.plan = plan
        self.limits = limits
        self.journal_path = journal_path
        self.rng = random.Random(seed)
        self.walker_kinds = walkers
        self.audit_source = audit_source
        self.hooks = hooks or Hooks()
        self.say = say
        self.report = Report("live", platform.release(), seed, str(journal_path), plan)
        if audit_every and audit_source is not None:
            self.report.audit = AuditLog(audit_every)

    def run(self) -> Report:
        sysfs, plan, report = self.sysfs, self.plan, self.report
        header = {
            "mode": "live",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "boot_id": sysfs.boot_id(),
            "kernel": report.kernel,
            "sysfs": str(sysfs.sysfs),
            "seed": report.seed,
            "blocks": {str(b): s.to_json() for b, s in plan.blocks.items()},
        }
        with sysfs.exclusive(), Signals() as signals:
            # the original states are read again under the lock: what the plan saw may be stale
            for block, state in plan.blocks.items():
                now = sysfs.read(block)
                if now is None or not now.same_as(state):
                    raise KmemError(f"block {block} changed since the plan ({state.describe()} -> {now}): start again")
            journal = Journal.create(self.journal_path, header)
            start = time.monotonic()
            try:
                self._churn(journal, signals, start)
            except Interrupted as stop:
                report.stopped_by = signal.Signals(stop.signum).name
            except KmemError as error:
                report.stopped_by, report.error = "error", str(error)
            except Exception as error:  # noqa: BLE001 - any failure still ends with every block put back
                report.stopped_by, report.error = "error", f"{type(error).__name__}: {error}"
            finally:
                stop_walkers(report.walkers)
                report.restorations = restore_blocks(
                    sysfs, plan.blocks, journal, signals, self.limits.timeout, self.say
                )
                report.seconds = time.monotonic() - start
                self._final_audit(signals)
                report.hooks = self.hooks.finished()
                failed = [r.block for r in report.restorations if r.result not in ("unchanged", "restored")]
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
        ranges = [self.sysfs.pfn_range(b) for b in sorted(self.plan.blocks)]
        report.walkers = start_walkers(self.walker_kinds, ranges)
        self.hooks.started()
        blocks = sorted(self.plan.blocks)
        while True:
            if signals.received:
                report.stopped_by = signals.first or ""
                return
            reason = self.limits.reached(report.counters.attempted, time.monotonic() - start)
            if reason:
                report.stopped_by = reason
                return
            self._transition(self.rng.choice(blocks), journal, signals)
            audit = report.audit
            if audit is not None and report.counters.attempted % audit.every == 0:
                self._sample(journal, signals)

    def _next_action(self, state: BlockState) -> str:
        if state.state == ONLINE:
            return OFFLINE
        if self.plan.allow_kernel_zone:
            return self.rng.choice([ONLINE_MOVABLE, ONLINE_KERNEL])
        return ONLINE_MOVABLE

    def _transition(self, block: int, journal: Journal, signals: Signals) -> None:
        before = self.sysfs.read(block)
        if before is None:
            raise KmemError(f"memory block {block} disappeared during the run (removed by someone else)")
        action = self._next_action(before)
        seq = self.report.counters.attempted + 1
        journal.append("begin", seq=seq, block=block, write=action, **{"from": before.to_json()})
        self.hooks.before_transition(f"memory{block}", action)
        reason: str | None = None
        result = "interrupted"
        begun = time.monotonic()
        after: BlockState | None = None
        try:
            try:
                with signals.interruptible(), signals.deadline(self.limits.timeout):
                    reason = self.sysfs.write(block, action)
            except TransitionTimeout:
                reason = "timeout"
            after = self.sysfs.read(block)
            result = self._outcome(action, reason, after)
        finally:
            if result == "interrupted":
                after = self.sysfs.read(block)
            seconds = time.monotonic() - begun
            state = after.to_json() if after else None
            journal.append(
                "end", seq=seq, block=block, result=result, errno=reason, state=state, seconds=round(seconds, 3)
            )
            anomaly = {"seq": seq, "block": block, "write": action, "errno": reason, "state": state}
            self.report.counters.count(action, result, reason, seconds, anomaly)
            self.hooks.after_transition(f"memory{block}", action, result, reason)

    @staticmethod
    def _outcome(action: str, reason: str | None, after: BlockState | None) -> str:
        """done: the block is where the write asked; refused: the kernel said no and it is not; anomaly: the
        kernel said yes and it is not (or it is, in another zone than online_movable asks for)."""
        reached = after is not None and after.state == (OFFLINE if action == OFFLINE else ONLINE)
        if reached and action == ONLINE_MOVABLE and after is not None and after.zone != MOVABLE:
            return "anomaly"
        if reached:
            return "done"
        return "refused" if reason else "anomaly"

    def _sample(self, journal: Journal, signals: Signals) -> None:
        audit, source = self.report.audit, self.audit_source
        assert audit is not None and source is not None
        after = self.report.counters.attempted
        unconfirmed = audit.unconfirmed
        with signals.interruptible():
            confirmed = audit.sample(source)
        known = {finding_key(f) for _, f in audit.confirmed}
        audit.confirmed += [(after, f) for f in confirmed if finding_key(f) not in known]
        journal.append("audit", after=after, new_errors=len(confirmed), unconfirmed=audit.unconfirmed - unconfirmed)
        for f in confirmed:
            self.say(f"audit after {after} transitions: {f.rule} {f.pfn_start:#x}-{f.pfn_end:#x}: {f.message}")

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


# -- texts -------------------------------------------------------------------------------------------


def plan_text(plan: Plan, sysfs: MemoryBlocks, walkers: dict[str, str | None], lines: list[str]) -> str:
    """What a live run will touch, printed before it changes anything."""
    out = [
        f"kmeminspect stress: cycling {len(plan.blocks)} memory blocks (writes: {', '.join(plan.writes)}); "
        "nothing else is changed"
    ]
    for block, state in plan.blocks.items():
        start, end = sysfs.phys_range(block)
        out.append(f"  block {block:<5} {start:#x}-{end:#x}  {state.describe()}")
    for block, why in plan.skipped.items():
        out.append(f"  skipped block {block}: {why}")
    if walkers:
        out.append(
            "  walkers: " + ", ".join(k if why is None else f"{k} (not run: {why})" for k, why in walkers.items())
        )
    return "\n".join(out + [f"  {line}" for line in lines])


def _restoration_line(r: dict[str, Any]) -> str:
    what = f"block {r['block']}" if "block" in r else r["what"]
    reason = r.get("errno") or r.get("reason") or r["result"]
    return f"NOT RESTORED {what} ({reason}): {r['advice']}"


def report_text(data: dict[str, Any]) -> str:
    """A stress report (``--json``'s object) for a terminal."""
    t = data["transitions"]
    rate = f" ({t['per_second']}/s)" if t["per_second"] else ""
    out = [
        f"stopped by: {data['stopped_by']} after {data['seconds']} s" + (f": {data['error']}" if data["error"] else ""),
        f"transitions: {t['attempted']} attempted, {t['done']} done{rate}",
    ]
    for action, c in t["by_action"].items():
        refused = {k: v for k, v in c.items() if k not in ("attempted", "done", "seconds")}
        average = c["seconds"] / c["attempted"] if c["attempted"] else 0
        out.append(
            f"  {action:<15} {c['attempted']:>6} attempted {c['done']:>6} done  {average:.2f} s each"
            + "".join(f"  {k} {v}" for k, v in refused.items())
        )
    for name, r in t["refusals"].items():
        out.append(f"refused {r['count']}x {name}" + (f": {r['meaning']}" if r["meaning"] else ""))
    for a in t["anomalies"]:
        out.append(f"anomaly: {a}")
    for w in data["walkers"]:
        if "note" in w and "passes" not in w:
            out.append(f"walker {w['kind']}: {w['note']}")
        else:
            errors = ", ".join(f"{k} {v}" for k, v in w.get("errors", {}).items())
            work = f"{w.get('pfns', 0)} pfns read in {w.get('passes', 0)} passes" if w.get("pfns") else ""
            out.append(
                f"walker {w['kind']}: {work or str(w.get('passes', 0)) + ' runs'}"
                + (f", errors: {errors}" if errors else "")
                + (f" ({w['note']})" if "note" in w else "")
            )
    audit = data["audit"]
    if audit:
        base = ", ".join(f"{n} {s}" for s, n in audit["baseline"].items())
        new = audit["new_errors"]
        out.append(
            f"audit: {audit['samples']} samples (every {audit['every']} transitions); baseline {base}; "
            f"new errors confirmed: {len(new)}, unconfirmed (torn reads): {audit['unconfirmed']}"
        )
        for f in new:
            out.append(
                f"  after {f['after_transitions']}: {f['rule']} {f['pfn_start']:#x}-{f['pfn_end']:#x} {f['message']}"
            )
        final = audit["final_new_errors"]
        if final is None:
            out.append("  after restoring: not audited (interrupted, failed or not restored)")
        else:
            out.append(f"  after restoring: {len(final)} new errors" + ("" if final else " (back to the baseline)"))
    results = [r["result"] for r in data["restoration"]]
    if data["restored"]:
        out.append(
            f"restored: everything is back in its original state ({results.count('restored')} put back, "
            f"{results.count('unchanged')} unchanged)"
        )
    else:
        out += [_restoration_line(r) for r in data["restoration"] if r["result"] not in ("restored", "unchanged")]
    if data.get("journal_error"):
        out.append(f"journal: {data['journal_error']}")
    traced = (data.get("hooks") or {}).get("trace")
    if traced:
        out.append(
            f"trace: {traced['error']}"
            if "error" in traced
            else f"trace: {traced['races']} races ({traced['race_windows']} windows), "
            f"{traced['handouts_inactive']} inactive hand-outs, {traced['events_lost']} events lost"
        )
    out.append(f"journal: {data['journal']}")
    return "\n".join(out)


def restore_text(data: dict[str, Any]) -> str:
    if data["note"]:
        return f"{data['journal']}: {data['note']}"
    results = [r["result"] for r in data["blocks"]]
    if data["complete"]:
        done, unchanged = results.count("restored"), results.count("unchanged")
        return f"{data['journal']}: everything back ({done} put back, {unchanged} unchanged)"
    return "\n".join(_restoration_line(r) for r in data["blocks"] if r["result"] not in ("restored", "unchanged"))
