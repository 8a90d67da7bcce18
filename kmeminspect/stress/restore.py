"""Putting a live run's blocks back: at its end, whatever ended it, and after SIGKILL or a crash from its
journal (``stress --restore JOURNAL``). The blocks' current state is read from sysfs; the journal's
original states are what counts. A block the kernel will not put back is reported with the errno and what
the user can do, never silently left."""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import KmemError, UsageError
from ..signals import Interrupted, Signals, TransitionTimeout
from .journal import Journal, read_journal
from .report import RestoreReport
from .sysfs import OFFLINE, ONLINE, REFUSALS, BlockState, MemoryBlocks, online_action

#: (pages briefly pinned, or isolated by a running compaction)
RESTORE_ATTEMPTS = 5
RESTORE_PAUSE = 1.0


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

    #: how the journal's ``closed`` record names it: by its number
    key = property(operator.attrgetter("block"))

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
        return RestoreReport(str(path), list(results))
    finally:
        journal.close()
