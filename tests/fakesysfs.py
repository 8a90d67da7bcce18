"""A fake memory-block sysfs tree and a fake kernel answering writes to it, for stress tests without a VM.

``make_tree`` lays out ``sys/devices/system/memory`` (``state``, ``valid_zones``, ``phys_index``,
``firmware_node``) and ``proc`` (``iomem``, the boot id) under a directory. ``FakeKernel`` is a
``MemoryBlocks`` whose ``write`` does what ``state_store()`` does on those files: EINVAL for a block
already in the state asked for, the state and ``valid_zones`` updated otherwise, and whatever refusals,
delays or hangs a test sets. A slow offline sleeps: a signal whose handler raises aborts it as the
kernel's offline_pages() backs off with EINTR, leaving the block online.

Run as a script (``python fakesysfs.py ROOT JOURNAL SEED TRANSITIONS DELAY``) it is a stress run on the tree
at ROOT, for signal tests: it prints the report as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kmeminspect import stress  # noqa: E402

BLOCK_SIZE = 128 << 20
BOOT_ID = "0b5e55ed-0000-4000-8000-000000000001"
#: (state, zone or None) per block of the default tree: boot memory in DMA32/Normal, a DIMM at 4 GiB
DEFAULT_BLOCKS: dict[int, tuple[str, str | None]] = {
    0: ("online", None),  # spans DMA and DMA32
    1: ("online", "DMA32"),
    32: ("online", "Normal"),
    33: ("online", "Movable"),
    34: ("offline", None),
    35: ("online", "Movable"),
}
DIMM = {32, 33, 34, 35}


def make_tree(root: Path, blocks: dict[int, tuple[str, str | None]] | None = None) -> Path:
    memory = root / "sys/devices/system/memory"
    memory.mkdir(parents=True)
    (memory / "block_size_bytes").write_text(f"{BLOCK_SIZE:x}\n")
    acpi = root / "sys/devices/LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:00"
    acpi.mkdir(parents=True)
    for block, (state, zone) in (blocks or DEFAULT_BLOCKS).items():
        d = memory / f"memory{block}"
        d.mkdir()
        (d / "phys_index").write_text(f"{block:08x}\n")
        (d / "removable").write_text("1\n")
        write_state(d, state, zone)
        if block in DIMM:
            (d / "firmware_node").symlink_to("../../../LNXSYSTM:00/LNXSYBUS:00/PNP0A06:04/PNP0C80:00")
    proc = root / "proc"
    (proc / "sys/kernel/random").mkdir(parents=True)
    (proc / "sys/kernel/random/boot_id").write_text(BOOT_ID + "\n")
    (proc / "iomem").write_text("00001000-0009fbff : System RAM\n100000000-11fffffff : System RAM\n")
    return root


def write_state(directory: Path, state: str, zone: str | None) -> None:
    (directory / "state").write_text(state + "\n")
    (directory / "valid_zones").write_text((zone or "none" if state == "online" else "Normal Movable") + "\n")


def states(root: Path) -> dict[int, stress.BlockState | None]:
    blocks = stress.MemoryBlocks(root / "sys", root / "proc")
    return {block: blocks.read(block) for block in blocks.ids()}


@dataclasses.dataclass
class Behaviour:
    """How the fake kernel answers one block."""

    refuse: dict[str, str] = dataclasses.field(default_factory=dict)  # action -> errno name
    delay: float = 0.0  # seconds an offline takes (interruptible by a signal whose handler raises)
    hang: bool = False  # an offline never ends by itself
    refuse_offline_after_online: str | None = None  # errno once the block has been onlined by a write


class FakeKernel(stress.MemoryBlocks):
    def __init__(self, root: Path, behaviour: dict[int, Behaviour] | None = None, fail_at: int | None = None) -> None:
        super().__init__(root / "sys", root / "proc")
        self.behaviour = behaviour or {}
        self.writes: list[tuple[int, str]] = []
        self.onlined: set[int] = set()
        self.fail_at = fail_at  # raise RuntimeError at this write (a bug in the tool)

    def write(self, block: int, action: str) -> str | None:
        self.writes.append((block, action))
        if self.fail_at is not None and len(self.writes) == self.fail_at:
            raise RuntimeError("injected failure")
        directory = self.directory / f"memory{block}"
        if not directory.is_dir():
            return "ENOENT"
        how = self.behaviour.get(block, Behaviour())
        current = self.read(block)
        assert current is not None
        if action in how.refuse:
            return how.refuse[action]
        if action == "offline":
            if current.state == "offline":
                return "EINVAL"
            if how.refuse_offline_after_online and block in self.onlined:
                return how.refuse_offline_after_online
            if how.hang:
                time.sleep(3600)
            time.sleep(how.delay)
            write_state(directory, "offline", None)
            return None
        if current.state == "online":
            return "EINVAL"
        zone = {"online_movable": "Movable", "online_kernel": "Normal"}[action]
        write_state(directory, "online", zone)
        self.onlined.add(block)
        return None


def main(argv: list[str]) -> int:
    root, journal, seed, transitions, delay = Path(argv[0]), Path(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    kernel = FakeKernel(root, {b: Behaviour(delay=delay) for b in DIMM})
    plan = stress.plan_blocks(kernel, sorted(DIMM - {32}), False, False)
    limits = stress.Limits(transitions, None, 30.0)
    print("started", flush=True)
    runner = stress.LiveStress(kernel, plan, limits, journal, seed, [], 0, None)
    report = runner.run()
    print(json.dumps(report.to_json()), flush=True)
    return report.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
