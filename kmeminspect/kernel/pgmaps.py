"""Read ZONE_DEVICE page maps from the kernel's registry (``pgmap_array``, keyed by pfn)."""

from __future__ import annotations

import drgn
from drgn import Program
from drgn.helpers.linux.xarray import xa_for_each

from ..state import Altmap, Layout, Pagemap


def read_pagemaps(prog: Program, layout: Layout) -> list[Pagemap]:
    """Every ``struct dev_pagemap`` in the ``pgmap_array`` xarray (ZONE_DEVICE memory: pmem, device-DAX, ...):
    its type, its pfn ranges, and its embedded ``struct vmem_altmap`` when the driver supplied one."""
    try:
        registry = prog["pgmap_array"]
    except KeyError:
        return []  # no CONFIG_ZONE_DEVICE
    memory_types = {e.value: e.name for e in prog.type("enum memory_type").enumerators or ()}
    seen: dict[int, Pagemap] = {}
    shift = layout.page_shift
    for _, entry in xa_for_each(registry.address_of_()):
        address = entry.value_()
        if not address or address in seen:
            continue
        pgmap = drgn.cast("struct dev_pagemap *", entry)
        nr_range = pgmap.nr_range.value_()
        ranges = []
        for i in range(nr_range):
            r = pgmap.ranges[i]
            ranges.append((r.start.value_() >> shift, (r.end.value_() + 1) >> shift))
        a = pgmap.altmap
        altmap = None
        # an embedded altmap is all zeros unless the driver supplied one (PGMAP_ALTMAP_VALID)
        if a.base_pfn.value_() or a.free.value_() or a.reserve.value_():
            altmap = Altmap(
                base_pfn=a.base_pfn.value_(),
                end_pfn=a.end_pfn.value_(),
                reserve=a.reserve.value_(),
                free=a.free.value_(),
                align=a.align.value_(),
                alloc=a.alloc.value_(),
            )
        seen[address] = Pagemap(
            address=address,
            type=memory_types.get(pgmap.type.value_(), str(pgmap.type.value_())),
            ranges=tuple(ranges),
            altmap=altmap,
            vmemmap_shift=pgmap.vmemmap_shift.value_() if pgmap.type_.type.has_member("vmemmap_shift") else 0,
        )
    return sorted(seen.values(), key=lambda p: p.ranges[0] if p.ranges else (0, 0))
