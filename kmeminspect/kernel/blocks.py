"""Read memory block devices (``struct memory_block`` in the ``memory_blocks`` xarray)."""

from __future__ import annotations

import drgn
from drgn import Program, TypeKind
from drgn.helpers.linux.xarray import xa_for_each

from ..state import Block, Layout

#: include/linux/memory.h before enum memory_block_state (6.12 has the enum): MEM_* were bit macros,
#: unchanged since 2.6 (MEM_PREPARE_ONLINE, MEM_FINISH_OFFLINE added in v6.9), absent from debug info.
MACRO_MEMORY_STATES = {
    1 << 0: "online",
    1 << 1: "going-offline",
    1 << 2: "offline",
    1 << 3: "going-online",
    1 << 4: "cancel-online",
    1 << 5: "cancel-offline",
    1 << 6: "prepare-online",
    1 << 7: "finish-offline",
}


def _state_names(prog: Program) -> dict[int, str]:
    """Block state value -> sysfs-style name: from enum memory_block_state where the kernel has it."""
    state_type = prog.type("struct memory_block").member("state").type.unaliased()
    if state_type.kind == TypeKind.ENUM:
        return {e.value: e.name.removeprefix("MEM_").lower().replace("_", "-") for e in state_type.enumerators or ()}
    return MACRO_MEMORY_STATES


def _online_types(prog: Program) -> dict[int, str]:
    """MMOP_* by value, from the kernel's enum (an anonymous enum in 6.x)."""
    try:
        enum_type = prog["MMOP_OFFLINE"].type_
    except KeyError:
        return {}
    return {e.value: e.name for e in enum_type.enumerators or ()}


def read_blocks(prog: Program, layout: Layout, unreadable: list[str] | None = None) -> list[Block]:
    """Every ``struct memory_block`` of the ``memory_blocks`` xarray (the sysfs ``memoryN`` devices): its
    pfn range, state, online type, node, zone, and the pages of its memmap it hosts itself (memmap_on_memory).

    The self-hosted memmap is ``nr_vmemmap_pages`` before v6.6 and ``altmap->free`` since (1a8c64e11043).

    Kernel memory that faults (a page a filtered dump excluded, a block removed during a live read) costs
    only the blocks behind it: the others are returned, and ``unreadable`` gets one line saying what was
    not read (without ``unreadable``, the fault is raised)."""
    try:
        registry = prog["memory_blocks"]
    except KeyError:
        return []  # without CONFIG_MEMORY_HOTPLUG there are no memory blocks
    sections_per_block = prog["sections_per_block"].value_()
    pages_per_section = layout.pages_per_section
    online_types = _online_types(prog)
    state_names = _state_names(prog)
    block_type = prog.type("struct memory_block")
    has_zone = block_type.has_member("zone")
    has_nr_vmemmap_pages = block_type.has_member("nr_vmemmap_pages")
    has_altmap = block_type.has_member("altmap")
    has_online_type = block_type.has_member("online_type")
    zone_names: dict[int, str] = {}  # a zone's name by its address: most blocks share a few zones

    def one(entry: drgn.Object, block_id: int) -> Block:
        """One ``struct memory_block`` of the xarray."""
        mem = drgn.cast("struct memory_block *", entry)
        state = mem.state.value_()
        zone_name = None
        if has_zone and (zone_address := mem.zone.value_()):
            if zone_address not in zone_names:
                zone_names[zone_address] = mem.zone.name.string_().decode()
            zone_name = zone_names[zone_address]
        if has_nr_vmemmap_pages:
            vmemmap = mem.nr_vmemmap_pages.value_()
        elif has_altmap and mem.altmap.value_():
            # since v6.6 (1a8c64e11043) the block keeps its memmap_on_memory altmap
            vmemmap = mem.altmap.free.value_()
        else:
            vmemmap = 0
        online_type = None
        if has_online_type:
            # boot memory was never onlined through the block: its online_type stays MMOP_OFFLINE (0)
            recorded = online_types.get(mem.online_type.value_())
            online_type = None if recorded == "MMOP_OFFLINE" else recorded
        return Block(
            id=int(block_id),
            start_pfn=mem.start_section_nr.value_() * pages_per_section,
            nr_pages=sections_per_block * pages_per_section,
            state=state_names.get(state, f"unknown({state:#x})"),
            online_type=online_type,
            nid=mem.nid.value_(),
            zone=zone_name,
            nr_vmemmap_pages=vmemmap,
        )

    blocks: list[Block] = []
    skipped: list[str] = []
    try:
        for block_id, entry in xa_for_each(registry.address_of_()):
            try:
                blocks.append(one(entry, block_id))
            except drgn.FaultError as error:
                if unreadable is None:
                    raise
                skipped.append(f"block {int(block_id)} ({error.message} at {error.address:#x})")
    except drgn.FaultError as error:
        if unreadable is None:
            raise
        skipped.append(
            f"the memory_blocks xarray past block {blocks[-1].id if blocks else -1} "
            f"({error.message} at {error.address:#x})"
        )
    if skipped and unreadable is not None:
        unreadable.append(
            f"memory blocks: {len(blocks)} read; not readable: {'; '.join(skipped[:4])}"
            + (f" and {len(skipped) - 4} more" if len(skipped) > 4 else "")
        )
    return sorted(blocks, key=lambda b: b.id)
