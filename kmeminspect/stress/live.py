"""The live driver: cycle the plan's memory blocks of the running kernel offline and online at random
(seeded), with walkers reading the pfns meanwhile, on the one runner (runner.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..audit import Finding
from ..errors import KmemError
from ..signals import Signals, TransitionTimeout
from .journal import Journal
from .plan import Plan
from .report import PutBack, Report
from .restore import restore_blocks
from .runner import Ending, Hooks, Outcome, Runner
from .sampling import AuditSource
from .sysfs import MOVABLE, OFFLINE, ONLINE, ONLINE_KERNEL, ONLINE_MOVABLE, REFUSALS, BlockState, MemoryBlocks
from .walkers import start_walkers, stop_walkers

#: default stop condition when neither --transitions nor --duration is given
DEFAULT_TRANSITIONS = 100


@dataclasses.dataclass(frozen=True)
class Limits:
    """When a live run stops (``--transitions``, ``--duration``), and how long one write may take."""

    transitions: int | None
    duration: float | None
    timeout: float  # per transition

    def reached(self, attempted: int, elapsed: float) -> str | None:
        if self.transitions is not None and attempted >= self.transitions:
            return "transitions"
        if self.duration is not None and elapsed >= self.duration:
            return "duration"
        return None


class LiveAudit:
    """Reads the running kernel through /proc/kcore (drgn), keeping one Program across samples."""

    def __init__(self, vmlinux: str | None, btf: str | None = None) -> None:
        from ..target import open_live

        self.prog = open_live(Path(vmlinux) if vmlinux else None, Path(btf) if btf else None)

    def read(self) -> tuple[str, list[Finding]]:
        from ..audit import audit
        from ..kernel import read_snapshot

        snapshot = read_snapshot(self.prog, {"kind": "live", "path": "/proc/kcore"})
        return snapshot.layout.release, audit(snapshot)


class LiveStress(Runner):
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
        blocks = {"blocks": {str(b): s.to_json() for b, s in plan.blocks.items()}}
        report = Report("live", platform.release(), seed, str(journal_path), blocks, REFUSALS)
        super().__init__(report, journal_path, audit_every, audit_source, hooks, say)
        self.sysfs = sysfs
        self.plan = plan
        self.limits = limits
        self.walker_kinds = walkers

    def header(self) -> dict[str, Any]:
        return {
            "mode": "live",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "boot_id": self.sysfs.boot_id(),
            "kernel": self.report.kernel,
            "sysfs": str(self.sysfs.sysfs),
            "seed": self.report.seed,
            "blocks": {str(b): s.to_json() for b, s in self.plan.blocks.items()},
        }

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self.sysfs.exclusive():
            # the original states are read again under the lock: what the plan saw may be stale
            for block, state in self.plan.blocks.items():
                now = self.sysfs.read(block)
                if now is None or not now.same_as(state):
                    raise KmemError(f"block {block} changed since the plan ({state.describe()} -> {now}): start again")
            yield

    def begin(self) -> None:
        ranges = [self.sysfs.pfn_range(b) for b in sorted(self.plan.blocks)]
        self.report.walkers = start_walkers(self.walker_kinds, ranges)

    def stop_reason(self, elapsed: float) -> str | None:
        return self.limits.reached(self.report.counters.attempted, elapsed)

    def release(self) -> None:
        stop_walkers(self.report.walkers)

    def restore(self, journal: Journal, signals: Signals) -> list[PutBack]:
        return list(restore_blocks(self.sysfs, self.plan.blocks, journal, signals, self.limits.timeout, self.say))

    def _next_action(self, state: BlockState) -> str:
        if state.state == ONLINE:
            return OFFLINE
        if self.plan.allow_kernel_zone:
            return self.rng.choice([ONLINE_MOVABLE, ONLINE_KERNEL])
        return ONLINE_MOVABLE

    def step(self, journal: Journal, signals: Signals) -> None:
        block = self.rng.choice(sorted(self.plan.blocks))
        before = self.sysfs.read(block)
        if before is None:
            raise KmemError(f"memory block {block} disappeared during the run (removed by someone else)")
        action = self._next_action(before)
        after: BlockState | None = None

        def perform() -> Outcome:
            nonlocal after
            reason: str | None = None
            try:
                with signals.interruptible(), signals.deadline(self.limits.timeout):
                    reason = self.sysfs.write(block, action)
            except TransitionTimeout:
                reason = "timeout"
            after = self.sysfs.read(block)
            return self._outcome(action, reason, after), reason

        def end(result: str, reason: str | None, seconds: float) -> Ending:
            state = (self.sysfs.read(block) if result == "interrupted" else after) or None
            seen = state.to_json() if state else None
            fields = {"block": block, "result": result, "errno": reason, "state": seen, "seconds": round(seconds, 3)}
            return fields, {"block": block, "write": action, "errno": reason, "state": seen}

        begin = {"block": block, "write": action, "from": before.to_json()}
        self.operation(journal, signals, action, f"memory{block}", begin, perform, end)

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
