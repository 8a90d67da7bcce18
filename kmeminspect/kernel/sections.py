"""Read the SPARSEMEM section table: every present ``struct mem_section``, in bulk.

One read per section root (``SECTIONS_PER_ROOT`` entries) and one per section's subsection map,
decoded with arrays; cross-checked against drgn's own ``for_each_present_section`` in the tests.
"""

from __future__ import annotations

import drgn
import numpy as np
from drgn import Program, TypeKind, offsetof, sizeof

from ..errors import ReadError
from ..state import Layout, Section


def decode_flags(word: int, flags: dict[str, int]) -> tuple[str, ...]:
    """The SECTION_* names set in a section_mem_map word, in bit order."""
    return tuple(
        name for name, mask in sorted(flags.items(), key=lambda kv: kv[1]) if name != "SECTION_MAP_MASK" and word & mask
    )


def read_sections(prog: Program, layout: Layout) -> list[Section]:
    """Every present ``struct mem_section`` up to ``__highest_present_section_nr``: its ``section_mem_map``
    flags (present, has memmap, online, early, ZONE_DEVICE taint) and the memmap pointer they encode, and the
    ``subsection_map`` of its ``struct mem_section_usage``, the 2 MiB parts of the section that hold memory.

    Subsections since v5.3 (f46edbd1b151); SECTION_TAINT_ZONE_DEVICE since v5.12 (1f90a3477df3)."""
    try:
        mem_section = prog["mem_section"]
    except KeyError:
        raise ReadError("no mem_section: this kernel is not SPARSEMEM (not supported)") from None
    per_root = prog["SECTIONS_PER_ROOT"].value_()
    highest = prog["__highest_present_section_nr"].value_()
    nr_roots = highest // per_root + 1
    section_type = prog.type("struct mem_section")
    entry_size = sizeof(section_type)
    usage_offset = offsetof(section_type, "usage")
    usage_type = prog.type("struct mem_section_usage")
    subsection_offset = offsetof(usage_type, "subsection_map")
    pages_per_section = layout.pages_per_section
    flags = layout.section_flags
    present = flags["SECTION_MARKED_PRESENT"]
    has_mem_map = flags["SECTION_HAS_MEM_MAP"]
    map_mask = flags["SECTION_MAP_MASK"]

    # SPARSEMEM_EXTREME: struct mem_section ** (roots allocated on demand); else a static 2-D array
    if mem_section.type_.unaliased_kind() == TypeKind.POINTER:
        base = mem_section.value_()
        if not base:
            raise ReadError("mem_section is NULL: the kernel has not set up its memory map yet")
        roots = np.frombuffer(prog.read(base, 8 * nr_roots), dtype="<u8")
    else:
        base = mem_section.address_
        roots = np.array([base + i * per_root * entry_size for i in range(nr_roots)], dtype="<u8")

    sections: list[Section] = []
    for root_nr, root in enumerate(roots.tolist()):
        if not root:
            continue
        try:
            raw = prog.read(root, per_root * entry_size)
        except drgn.FaultError as error:
            raise ReadError(f"section root {root_nr} at {root:#x} cannot be read: {error}") from None
        words = np.frombuffer(raw, dtype="<u8").reshape(per_root, entry_size // 8)
        maps = words[:, 0]
        usages = words[:, usage_offset // 8]
        for index in np.flatnonzero(maps & present).tolist():
            nr = root_nr * per_root + index
            if nr > highest:
                break
            word = int(maps[index])
            usage = int(usages[index])
            subsection_map = 0
            if usage:
                try:
                    subsection_map = int.from_bytes(prog.read(usage + subsection_offset, 8), "little")
                except drgn.FaultError:
                    subsection_map = 0
            start_pfn = nr * pages_per_section
            # the upper bits encode mem_map - section_start_pfn (see sparse_encode_mem_map())
            memmap = ((word & map_mask) + start_pfn * layout.struct_page_size) & 0xFFFFFFFFFFFFFFFF
            sections.append(
                Section(
                    nr=nr,
                    address=root + index * entry_size,
                    start_pfn=start_pfn,
                    nr_pages=pages_per_section,
                    section_mem_map=word,
                    flags=decode_flags(word, flags),
                    subsection_map=subsection_map,
                    usage=usage,
                    memmap=memmap if word & has_mem_map else 0,
                )
            )
    return sections
