"""What a live run may touch: the blocks chosen (``--blocks`` or ``--all-hotpluggable``) with their original
state, checked before anything changes, and the plan printed before the first write."""

from __future__ import annotations

import dataclasses
import os

from ..errors import KmemError, UsageError
from .sysfs import MOVABLE, OFFLINE, ONLINE, ONLINE_KERNEL, ONLINE_MOVABLE, BlockState, MemoryBlocks


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
