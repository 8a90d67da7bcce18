"""Synthetic snapshots in states the kernel can reach, for unit tests of the pure model.

Never evidence that reading a kernel works: that is what the VM tests are for.
"""

from __future__ import annotations

import numpy as np

from kmeminspect.state import (
    MEMMAP_NONE,
    MEMMAP_READ,
    Altmap,
    Block,
    Layout,
    Node,
    Pagemap,
    Section,
    Snapshot,
    Zone,
    merge_runs,
    runs_from_arrays,
    uniform_run,
)

PAGES_PER_SECTION = 32768
PAGES_PER_SUBSECTION = 512
FLAGS = {
    "SECTION_MARKED_PRESENT": 0x1,
    "SECTION_HAS_MEM_MAP": 0x2,
    "SECTION_IS_ONLINE": 0x4,
    "SECTION_IS_EARLY": 0x8,
    "SECTION_TAINT_ZONE_DEVICE": 0x10,
    "SECTION_MAP_MASK": ~0x1F & 0xFFFFFFFFFFFFFFFF,
}
ZONE_DMA32, ZONE_NORMAL, ZONE_MOVABLE, ZONE_DEVICE = 1, 2, 3, 4
VMEMMAP = 0xFFFFEA0000000000
PGMAP = 0xFFFF888012340000

#: the kinds of section a kernel can have (see KERNEL-NOTES.md, "How memmaps get initialized")
KINDS = ["boot", "hot-offline", "hot-online", "device", "collision", "absent"]


def layout() -> Layout:
    return Layout(
        release="synthetic",
        page_shift=12,
        section_size_bits=27,
        subsection_shift=21,
        zone_names=("DMA", "DMA32", "Normal", "Movable", "Device"),
        zone_device=ZONE_DEVICE,
        section_flags=FLAGS,
        pageflags={"PG_reserved": 12},
        struct_page_size=64,
        vmemmap_base=VMEMMAP,
        max_pfn=0,
        pfn_to_online_page="taint-pgmap",
        max_physmem_bits=46,
    )


def _pages(n: int, zone: int, zeroed: bool = False, pgmap: int = 0, reserved: int = 0) -> dict[str, np.ndarray]:
    return {
        "memmap": np.full(n, MEMMAP_READ, np.uint8),
        "zone_id": np.full(n, 0 if zeroed else zone, np.int8),
        "nid": np.zeros(n, np.int16),
        "reserved": np.full(n, reserved, np.uint8),
        "offline": np.zeros(n, np.uint8),
        "self_hosted": np.zeros(n, np.uint8),
        "hwpoison": np.zeros(n, np.uint8),
        "zeroed": np.full(n, 1 if zeroed else 0, np.uint8),
        "poisoned": np.zeros(n, np.uint8),
        "pgmap": np.full(n, pgmap, np.uint64),
    }


def build(kinds: list[str], device_subsections: int = 8, altmap_reserve: int = 0) -> Snapshot:
    """One section per kind, in order; device ranges cover the first ``device_subsections`` subsections
    (device) or the last ones (collision); an altmap may reserve pfns at a device range's start."""
    sections, runs, blocks, pagemaps = [], [], [], []
    zone_pfns: dict[int, list[int]] = {}
    for nr, kind in enumerate(kinds):
        start = nr * PAGES_PER_SECTION
        end = start + PAGES_PER_SECTION
        if kind == "absent":
            continue
        flags = FLAGS["SECTION_MARKED_PRESENT"] | FLAGS["SECTION_HAS_MEM_MAP"]
        submap = (1 << 64) - 1
        parts = []
        if kind == "boot":
            flags |= FLAGS["SECTION_IS_ONLINE"] | FLAGS["SECTION_IS_EARLY"]
            parts.append(runs_from_arrays(start, _pages(PAGES_PER_SECTION, ZONE_DMA32)))
            zone_pfns.setdefault(ZONE_DMA32, []).extend((start, end))
        elif kind == "hot-offline":
            parts.append(runs_from_arrays(start, _pages(PAGES_PER_SECTION, 0, zeroed=True)))
        elif kind == "hot-online":
            flags |= FLAGS["SECTION_IS_ONLINE"]
            parts.append(runs_from_arrays(start, _pages(PAGES_PER_SECTION, ZONE_MOVABLE)))
            zone_pfns.setdefault(ZONE_MOVABLE, []).extend((start, end))
        elif kind == "device":
            submap = (1 << device_subsections) - 1
            if device_subsections < 64:  # move_pfn_range_to_zone() taints the section of an unaligned end
                flags |= FLAGS["SECTION_TAINT_ZONE_DEVICE"]
            dev_end = start + device_subsections * PAGES_PER_SUBSECTION
            reserve_end = start + altmap_reserve
            if altmap_reserve:
                parts.append(runs_from_arrays(start, _pages(altmap_reserve, 0, zeroed=True)))
            parts.append(
                runs_from_arrays(reserve_end, _pages(dev_end - reserve_end, ZONE_DEVICE, pgmap=PGMAP + nr, reserved=1))
            )
            parts.append(uniform_run(dev_end, end, MEMMAP_NONE))
            altmap = Altmap(start, dev_end, altmap_reserve, 0, 0, 0) if altmap_reserve else None
            pagemaps.append(Pagemap(PGMAP + nr, "MEMORY_DEVICE_FS_DAX", ((start, dev_end),), altmap, 0))
        elif kind == "collision":
            flags |= FLAGS["SECTION_IS_ONLINE"] | FLAGS["SECTION_IS_EARLY"] | FLAGS["SECTION_TAINT_ZONE_DEVICE"]
            dev_start = end - device_subsections * PAGES_PER_SUBSECTION
            parts.append(runs_from_arrays(start, _pages(dev_start - start, ZONE_DMA32)))
            parts.append(
                runs_from_arrays(dev_start, _pages(end - dev_start, ZONE_DEVICE, pgmap=PGMAP + nr, reserved=1))
            )
            pagemaps.append(Pagemap(PGMAP + nr, "MEMORY_DEVICE_FS_DAX", ((dev_start, end),), None, 0))
            zone_pfns.setdefault(ZONE_DMA32, []).extend((start, dev_start))
        runs.append(merge_runs(parts))
        sections.append(
            Section(
                nr=nr,
                address=0xFFFF888000000000 + nr * 32,
                start_pfn=start,
                nr_pages=PAGES_PER_SECTION,
                section_mem_map=(VMEMMAP - 0) | flags,
                flags=tuple(name for name, mask in FLAGS.items() if name != "SECTION_MAP_MASK" and flags & mask),
                subsection_map=submap,
                usage=0xFFFF888000100000 + nr * 64,
                memmap=VMEMMAP + start * 64,
            )
        )
        if kind in ("boot", "hot-offline", "hot-online", "collision"):
            state = "offline" if kind == "hot-offline" else "online"
            zone = {"boot": "DMA32", "hot-online": "Movable", "collision": "DMA32"}.get(kind)
            blocks.append(Block(nr, start, PAGES_PER_SECTION, state, None, 0, zone, 0))
    zones = []
    for zone_id, name in enumerate(("DMA", "DMA32", "Normal", "Movable", "Device")):
        pfns = zone_pfns.get(zone_id)
        if pfns:
            zones.append(Zone(0, zone_id, name, min(pfns), max(pfns) - min(pfns), max(pfns) - min(pfns)))
        else:
            zones.append(Zone(0, zone_id, name, 0, 0, 0))
    return Snapshot(
        source={"kind": "synthetic"},
        layout=layout(),
        sections=sections,
        blocks=blocks,
        pagemaps=pagemaps,
        zones=zones,
        nodes=[Node(0, 0, len(kinds) * PAGES_PER_SECTION, None)],
        resources=[],
        runs=merge_runs(runs),
    )
