"""Read ZONE_DEVICE page maps from the kernel's registry (``pgmap_array``, keyed by pfn)."""

from __future__ import annotations

import drgn
from drgn import Program
from drgn.helpers.linux.slab import slab_object_info
from drgn.helpers.linux.xarray import xa_for_each

from ..state import Altmap, Layout, Pagemap


def percpu_ref_is_live(prog: Program, ref: drgn.Object) -> bool:
    """What ``percpu_ref_tryget_live_rcu()`` would answer for ``ref`` (a ``struct percpu_ref``): true in
    per-cpu mode, false once killed (``__PERCPU_REF_DEAD`` in ``percpu_count_ptr``), else whether the
    atomic count is above zero. ``percpu_ref_exit()`` leaves ATOMIC|DEAD and no data."""
    atomic = prog["__PERCPU_REF_ATOMIC"].value_()
    dead = prog["__PERCPU_REF_DEAD"].value_()
    pointer = ref.percpu_count_ptr.value_()
    if not pointer & (atomic | dead):
        return True
    if pointer & dead:
        return False
    # the shared count moved to struct percpu_ref_data in v5.9 (2b0d3d3e4fcf)
    if ref.type_.has_member("data"):
        return bool(ref.data.value_()) and ref.data.count.counter.value_() != 0
    return bool(ref.count.counter.value_() != 0)


def read_pagemaps(prog: Program, layout: Layout) -> list[Pagemap]:
    """Every ``struct dev_pagemap`` in the ``pgmap_array`` xarray (ZONE_DEVICE memory: pmem, device-DAX, ...),
    which ``get_dev_pagemap()`` searches by pfn: its type, its pfn ranges, its embedded ``struct vmem_altmap``
    when the driver supplied one, and whether its ref is still live."""
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
            live=percpu_ref_is_live(prog, pgmap.ref),
        )
    return sorted(seen.values(), key=lambda p: p.ranges[0] if p.ranges else (0, 0))


def describe_pgmap_pointers(prog: Program, addresses: list[int], registered: set[int]) -> dict[int, str]:
    """What each ``page->pgmap`` value that is not the registry's pgmap for its pfn points to: another
    registered pgmap, a live or freed slab object (drgn's slab helpers; a pgmap is embedded in its
    driver's kmalloc'd device structure), memory that is no slab object, or nothing readable."""
    described = {}
    for address in addresses:
        if address in registered:
            described[address] = "a registered pgmap of another range"
            continue
        try:
            info = slab_object_info(prog, address)
        except (drgn.FaultError, ValueError, LookupError):
            info = None
        if info is not None and info.slab_cache:
            cache = info.slab_cache.name.string_().decode(errors="replace")
            state = "a live" if info.allocated else "a freed"
            described[address] = (
                f"{state} {cache} slab object (offset {address - info.address:#x}), not a registered pgmap"
            )
            continue
        try:
            prog.read(address, 8)
        except drgn.FaultError:
            described[address] = "an address nothing maps (garbage)"
            continue
        described[address] = "readable memory that is no slab object (garbage)"
    return described
