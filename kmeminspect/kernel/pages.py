"""One struct page, decoded in full: for explaining a single pfn (never used on a walk)."""

from __future__ import annotations

from typing import Any

import drgn
from drgn import Program

from ..state import Layout
from .layout import PageFormat, _vmcoreinfo_number


def _flag_names(prog: Program) -> dict[int, str]:
    """Bit -> the first PG_* name the kernel's enum pageflags gives it (later names are aliases)."""
    names: dict[int, str] = {}
    for e in prog.type("enum pageflags").enumerators or ():
        if e.name.startswith("PG_") and e.value not in names:
            names[e.value] = e.name
    return names


def _page_type(prog: Program, fmt: PageFormat, page_type: int) -> str | None:
    """The page type (buddy, offline, ...) per this kernel's encoding, or None."""
    if fmt.offline_type_byte is not None:  # 6.12+: enum pagetype in the top byte
        kinds = {e.value: e.name for e in prog.type("enum pagetype").enumerators or ()}
        name = kinds.get(page_type >> 24)
        if name == "PGTY_mapcount_underflow":
            return None  # page_type_has_type() is false: the top byte 0xff is _mapcount -1 (unmapped), no type
        return name.removeprefix("PGTY_") if name and name.startswith("PGTY_") else None
    for kind in ("BUDDY", "OFFLINE", "SLAB", "HUGETLB", "TABLE", "GUARD"):
        value = _vmcoreinfo_number(prog, f"PAGE_{kind}_MAPCOUNT_VALUE")
        if value is not None and page_type == value & 0xFFFFFFFF:
            return kind.lower()
    return None


def describe_page(prog: Program, layout: Layout, fmt: PageFormat, pfn: int) -> dict[str, Any] | None:
    """Every flag, the page type, refcount and compound head of one pfn's struct page, or None if
    its memmap cannot be read."""
    address = layout.vmemmap_base + pfn * fmt.size
    try:
        raw = prog.read(address, fmt.size)
    except drgn.FaultError:
        return None
    words = [int.from_bytes(raw[i : i + 8], "little") for i in range(0, fmt.size, 8)]
    flags = words[0]
    names = _flag_names(prog)
    nr_flags = layout.pageflags.get("__NR_PAGEFLAGS", max(names) + 1)
    set_flags = [names[bit] for bit in sorted(names) if bit < nr_flags and flags >> bit & 1]
    page_type = int.from_bytes(raw[fmt.page_type_offset : fmt.page_type_offset + 4], "little")
    refcount = int.from_bytes(raw[fmt.refcount_offset : fmt.refcount_offset + 4], "little", signed=True)
    compound = words[fmt.compound_offset // 8]
    head = None
    head_address = None
    if compound & 1:
        head_address = (address & compound) if fmt.compound_is_mask else compound - 1
    elif not fmt.compound_is_mask and flags >> fmt.pg_head & 1:
        # before v7.1 (8c846c879e22) a deduplicated vmemmap (hugetlb HVO, device-DAX) shows page-aligned
        # tails as copies of the head: page_fixed_fake_head() resolves them through the next page
        try:
            following = int.from_bytes(prog.read(address + fmt.size + fmt.compound_offset, 8), "little")
        except drgn.FaultError:
            following = 0
        if following & 1 and following - 1 != address:
            head_address = following - 1
            set_flags = [name for name in set_flags if name != "PG_head"]
    if head_address is not None:
        head = (head_address - layout.vmemmap_base) // fmt.size
    return {
        "address": hex(address),
        "raw_flags": hex(flags),
        "flags": set_flags,
        "page_type": _page_type(prog, fmt, page_type),
        "refcount": refcount,
        "compound_head_pfn": head,
    }
