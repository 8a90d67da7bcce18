"""``make bench-large``: the pure layers (model, audit, map) on synthetic multi-TiB snapshots.

A real multi-TiB guest cannot be booted on the development machine, so this builds the snapshot a
reader would produce for one — what ``read_snapshot`` returns — and times only what runs after the
read: ``model.segments``, ``audit.audit`` and ``memorymap.build``, with their peak traced memory
(tracemalloc, numpy included). It measures nothing of reading a kernel.

The layout is a mix a large hotplug machine has, per NUMA node (4 nodes), in 2 GiB memory blocks
(16 sections): half boot RAM (early, online; a PG_reserved run every 97th section; node 0 starts with
a DMA32 zone, all-zero struct pages and an absent PCI hole), a quarter hotplugged Movable blocks
online, an eighth hotplugged blocks offline (all-zero memmap), a pmem range (ZONE_DEVICE, starting at
a subsection boundary inside its first section, the first one with an altmap reserve), and absent
sections. Each size is timed ``--repeat`` times (medians); the scaling row compares time per section
with the smallest size's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# this checkout's kmeminspect, and the synthetic kernel of the unit tests (its layout and constants)
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]

from markdown import markdown_header, markdown_row  # noqa: E402
from synthetic import (  # noqa: E402
    FLAGS,
    PAGES_PER_SECTION,
    PAGES_PER_SUBSECTION,
    PGMAP,
    VMEMMAP,
    ZONE_DEVICE,
    ZONE_DMA32,
    ZONE_MOVABLE,
    ZONE_NORMAL,
    layout,
)

from kmeminspect import audit, memorymap, model  # noqa: E402
from kmeminspect.state import (  # noqa: E402
    MEMMAP_NONE,
    MEMMAP_READ,
    RUN_DTYPE,
    Altmap,
    Block,
    Node,
    Pagemap,
    Section,
    Snapshot,
    Zone,
    merge_runs,
)

SUBSECTIONS = PAGES_PER_SECTION // PAGES_PER_SUBSECTION
SECTIONS_PER_BLOCK = 16
NODES = 4


def _section(nr: int, flags: int, subsection_map: int = (1 << SUBSECTIONS) - 1) -> Section:
    start = nr * PAGES_PER_SECTION
    return Section(
        nr=nr,
        address=0xFFFF888000000000 + nr * 32,
        start_pfn=start,
        nr_pages=PAGES_PER_SECTION,
        section_mem_map=VMEMMAP | flags,
        flags=tuple(name for name, mask in FLAGS.items() if name != "SECTION_MAP_MASK" and flags & mask),
        subsection_map=subsection_map,
        usage=0xFFFF888000100000 + nr * 64,
        memmap=VMEMMAP + start * 64,
    )


def build(sections_total: int) -> Snapshot:
    """A snapshot of a machine of ``sections_total`` 128 MiB sections (see the module docstring)."""
    sections: list[Section] = []
    runs: list[tuple[Any, ...]] = []
    blocks: list[Block] = []
    pagemaps: list[Pagemap] = []
    zones: list[Zone] = []
    nodes: list[Node] = []
    online = FLAGS["SECTION_MARKED_PRESENT"] | FLAGS["SECTION_HAS_MEM_MAP"] | FLAGS["SECTION_IS_ONLINE"]
    offline = FLAGS["SECTION_MARKED_PRESENT"] | FLAGS["SECTION_HAS_MEM_MAP"]

    def run(start: int, end: int, memmap: int, zone: int, nid: int, **fields: int) -> None:
        read = memmap == MEMMAP_READ
        runs.append(
            (
                start,
                end,
                memmap,
                zone if read else -1,
                nid if read else -1,
                fields.get("reserved", 0),
                0,
                0,
                0,
                fields.get("zeroed", 0),
                0,
                fields.get("pgmap", 0),
            )
        )

    per_node = sections_total // NODES
    for nid in range(NODES):
        first = nid * per_node
        boot_end = first + per_node // 2
        online_end = boot_end + per_node // 4
        offline_end = online_end + per_node // 8
        device_end = offline_end + per_node // 16
        nodes.append(Node(nid, first * PAGES_PER_SECTION, per_node * PAGES_PER_SECTION, None))
        boot_zone_start = first
        for nr in range(first, boot_end):
            if nid == 0 and 24 <= nr < 32:
                continue  # the PCI hole below 4 GiB
            start = nr * PAGES_PER_SECTION
            zone = ZONE_DMA32 if nid == 0 and nr < 24 else ZONE_NORMAL
            sections.append(_section(nr, online | FLAGS["SECTION_IS_EARLY"]))
            if nr == 0:
                run(start, start + 256, MEMMAP_READ, 0, 0, zeroed=1)
                run(start + 256, start + PAGES_PER_SECTION, MEMMAP_READ, zone, nid)
            elif nr % 97 == 0:
                run(start, start + 1000, MEMMAP_READ, zone, nid)
                run(start + 1000, start + 3000, MEMMAP_READ, zone, nid, reserved=1)
                run(start + 3000, start + PAGES_PER_SECTION, MEMMAP_READ, zone, nid)
            else:
                run(start, start + PAGES_PER_SECTION, MEMMAP_READ, zone, nid)
        if nid == 0:
            zones.append(Zone(0, ZONE_DMA32, "DMA32", 0, 24 * PAGES_PER_SECTION, 24 * PAGES_PER_SECTION))
            boot_zone_start = 32
        boot_pages = (boot_end - boot_zone_start) * PAGES_PER_SECTION
        zones.append(Zone(nid, ZONE_NORMAL, "Normal", boot_zone_start * PAGES_PER_SECTION, boot_pages, boot_pages))
        for nr in range(online_end, offline_end):
            sections.append(_section(nr, offline))
            start = nr * PAGES_PER_SECTION
            run(start, start + PAGES_PER_SECTION, MEMMAP_READ, 0, 0, zeroed=1)
        for nr in range(boot_end, online_end):
            sections.append(_section(nr, online))
            start = nr * PAGES_PER_SECTION
            run(start, start + PAGES_PER_SECTION, MEMMAP_READ, ZONE_MOVABLE, nid)
        movable = (online_end - boot_end) * PAGES_PER_SECTION
        zones.append(Zone(nid, ZONE_MOVABLE, "Movable", boot_end * PAGES_PER_SECTION, movable, movable))
        for block_start in range(first, offline_end, SECTIONS_PER_BLOCK):
            if nid == 0 and block_start < 32:
                continue
            state = "online" if block_start < online_end else "offline"
            zone_name = "Normal" if block_start < boot_end else "Movable" if state == "online" else None
            blocks.append(
                Block(
                    block_start // SECTIONS_PER_BLOCK,
                    block_start * PAGES_PER_SECTION,
                    SECTIONS_PER_BLOCK * PAGES_PER_SECTION,
                    state,
                    None,
                    nid,
                    zone_name,
                    0,
                )
            )
        # pmem: from 8 subsections into its first section to the end of the node's device part
        pgmap = PGMAP + nid * 0x1000
        device_start = offline_end * PAGES_PER_SECTION + 8 * PAGES_PER_SUBSECTION
        device_stop = device_end * PAGES_PER_SECTION
        reserve = 2 * PAGES_PER_SUBSECTION if nid == 0 else 0
        sections.append(_section(offline_end, offline, ((1 << SUBSECTIONS) - 1) & ~0xFF))
        run(offline_end * PAGES_PER_SECTION, device_start, MEMMAP_NONE, 0, 0)
        if reserve:
            run(device_start, device_start + reserve, MEMMAP_READ, 0, 0, zeroed=1)
        run(device_start + reserve, (offline_end + 1) * PAGES_PER_SECTION, MEMMAP_READ, ZONE_DEVICE, nid, pgmap=pgmap)
        for nr in range(offline_end + 1, device_end):
            sections.append(_section(nr, offline))
            start = nr * PAGES_PER_SECTION
            run(start, start + PAGES_PER_SECTION, MEMMAP_READ, ZONE_DEVICE, nid, reserved=1, pgmap=pgmap)
        altmap = Altmap(device_start, device_stop, reserve, 4096, 0, 4096) if reserve else None
        pagemaps.append(Pagemap(pgmap, "MEMORY_DEVICE_FS_DAX", ((device_start, device_stop),), altmap, 0))
        zones.append(Zone(nid, ZONE_DEVICE, "Device", device_start, device_stop - device_start, 0))
    sections.sort(key=lambda s: s.nr)
    table = np.array(sorted(runs), dtype=RUN_DTYPE)
    return Snapshot(
        source={"kind": "synthetic"},
        layout=layout(),
        sections=sections,
        blocks=sorted(blocks, key=lambda b: b.id),
        pagemaps=pagemaps,
        zones=zones,
        nodes=nodes,
        resources=[],
        runs=merge_runs([table]),
    )


def measured(work: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    """Median seconds of ``repeat`` calls (after one to warm up), peak traced MiB of one more, and its result."""
    work()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    result = work()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return statistics.median(times), peak, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,1024,4096,16384", help="machine sizes in GiB, comma separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    header = [
        "machine",
        "sections",
        "runs",
        "segments",
        "findings",
        "model.segments (s)",
        "audit.audit (s)",
        "memorymap.build (s)",
        "peak traced (MiB)",
        "µs per section",
        "per section vs smallest",
    ]
    print(markdown_header(header))
    baseline = None
    section_mib = layout().pages_per_section << layout().page_shift >> 20
    for gib in [int(s) for s in args.sizes.split(",")]:
        sections_total = gib * 1024 // section_mib
        snapshot = build(sections_total)
        seg_s, seg_peak, seg = measured(lambda: model.segments(snapshot), args.repeat)  # noqa: B023
        audit_s, audit_peak, findings = measured(lambda: audit.audit(snapshot, seg), args.repeat)  # noqa: B023
        map_s, map_peak, _ = measured(lambda: memorymap.build(snapshot, seg, findings), args.repeat)  # noqa: B023
        total = seg_s + audit_s + map_s
        per_section = total / len(snapshot.sections) * 1e6
        baseline = baseline or per_section
        size = f"{gib // 1024} TiB" if gib >= 1024 else f"{gib} GiB"
        cells = [
            size,
            str(len(snapshot.sections)),
            str(snapshot.runs.size),
            str(seg.size),
            str(len(findings)),
            f"{seg_s:.3f}",
            f"{audit_s:.3f}",
            f"{map_s:.3f}",
            f"{max(seg_peak, audit_peak, map_peak):.0f}",
            f"{per_section:.1f}",
            f"{per_section / baseline:.2f}",
        ]
        print(markdown_row(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
