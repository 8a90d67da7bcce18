"""Everything about the kernel's data layout that the readers need, from debug info.

Numbers that are enums (section flags, ``enum pageflags``, ``enum zone_type``, ``enum pagetype``) are
read from DWARF. Numbers that are only macros (``SUBSECTION_SHIFT``, the node and zone fields of
``page->flags``) are derived from types whose sizes depend on them, and the zone/node derivation is
cross-checked against the zones' own spans by :func:`check_flags_layout`.
"""

from __future__ import annotations

import dataclasses
import re

import drgn
from drgn import Program, TypeKind, offsetof, sizeof

from ..errors import ReadError
from ..state import Layout


def _enum(prog: Program, type_name: str) -> dict[str, int]:
    return {e.name: e.value for e in prog.type(type_name).enumerators or ()}


def section_flags(prog: Program) -> dict[str, int]:
    """SECTION_* name -> mask, from the anonymous enum of ``*_BIT`` values (since v6.0, ed7802dd48f7)."""
    try:
        enum_type = prog["SECTION_MARKED_PRESENT_BIT"].type_
    except KeyError:
        raise ReadError("this kernel has no SECTION_*_BIT enum (before 6.0): not supported") from None
    flags = {}
    for e in enum_type.enumerators or ():
        if e.name.endswith("_BIT") and e.name != "SECTION_MAP_LAST_BIT":
            flags[e.name[: -len("_BIT")]] = 1 << e.value
        elif e.name == "SECTION_MAP_LAST_BIT":
            flags["SECTION_MAP_MASK"] = ~((1 << e.value) - 1) & 0xFFFFFFFFFFFFFFFF
    return flags


def _order_base_2(n: int) -> int:
    return (n - 1).bit_length() if n > 1 else 0


@dataclasses.dataclass(frozen=True)
class PageFormat:
    """How to decode a ``struct page`` read as raw bytes."""

    size: int
    refcount_offset: int
    page_type_offset: int
    compound_offset: int  # compound_head (compound_info since v7.1)
    compound_is_mask: bool  # v7.1 8c846c879e22: a tail's compound_info may be a mask of the head address
    pgmap_offset: int  # page->pgmap, or folio->pgmap (v7.x) of the head page
    zones_pgoff: int
    zones_mask: int
    nodes_pgoff: int
    nodes_mask: int
    pg_reserved: int
    pg_head: int
    pg_hwpoison: int | None
    pg_self_hosted: int | None
    #: 6.12+ (enum pagetype): PageOffline when page_type >> 24 == this; else exact page_type value
    offline_type_byte: int | None
    offline_mapcount_value: int | None


def _vmcoreinfo_number(prog: Program, name: str) -> int | None:
    try:
        text = prog["VMCOREINFO"].string_()
    except (KeyError, drgn.FaultError):
        return None
    m = re.search(rb"^NUMBER\(" + name.encode() + rb"\)=(-?\d+)$", text, re.M)
    return int(m.group(1)) if m else None


def page_format(prog: Program, zone_count: int) -> PageFormat:
    """How this kernel lays out a ``struct page``: its size, where ``flags`` keeps the zone and node, and the
    offsets of the fields the memmap decoder reads (``compound_head``, renamed ``compound_info`` in v7.1
    (d50569612c29); ``pgmap``, in the folio on 7.x)."""
    page = prog.type("struct page")
    if not page.has_member("flags"):
        raise ReadError("struct page has no flags in the debug info: is this the kernel's vmlinux?")
    # compound_head became compound_info in v7.1 (d50569612c29)
    compound = "compound_info" if page.has_member("compound_info") else "compound_head"
    compound_is_mask = (
        compound == "compound_info"
        and (sizeof(page) & (sizeof(page) - 1)) == 0
        and prog.type("struct zone").has_member("vmemmap_tails")
    )
    if page.has_member("pgmap"):
        pgmap_offset = offsetof(page, "pgmap")
    else:  # v7.x: the pgmap lives in the folio, i.e. in the head page
        pgmap_offset = offsetof(prog.type("struct folio"), "pgmap")
    pageflags = _enum(prog, "enum pageflags")
    # page->flags, from the top: [SECTION][NODE][ZONE]...; with SPARSEMEM_VMEMMAP there is no section
    # field. NODES_SHIFT from node_data[MAX_NUMNODES], ZONES_SHIFT from MAX_NR_ZONES.
    nodes_width = _order_base_2(prog["node_data"].type_.length or 1)
    zones_width = _order_base_2(zone_count)
    flags_bits = 8 * sizeof(prog.type("unsigned long"))
    nodes_pgoff = flags_bits - nodes_width
    zones_pgoff = nodes_pgoff - zones_width
    try:
        pagetype = _enum(prog, "enum pagetype")
    except LookupError:
        pagetype = {}
    return PageFormat(
        size=sizeof(page),
        refcount_offset=offsetof(page, "_refcount"),
        page_type_offset=offsetof(page, "page_type"),
        compound_offset=offsetof(page, compound),
        compound_is_mask=compound_is_mask,
        pgmap_offset=pgmap_offset,
        zones_pgoff=zones_pgoff,
        zones_mask=(1 << zones_width) - 1,
        nodes_pgoff=nodes_pgoff,
        nodes_mask=(1 << nodes_width) - 1,
        pg_reserved=pageflags["PG_reserved"],
        pg_head=pageflags["PG_head"],
        pg_hwpoison=pageflags.get("PG_hwpoison"),
        pg_self_hosted=pageflags.get("PG_vmemmap_self_hosted"),
        # the page_type encoding changed in v6.12 (enum pagetype, type in the top byte)
        offline_type_byte=pagetype.get("PGTY_offline"),
        offline_mapcount_value=None if pagetype else _vmcoreinfo_number(prog, "PAGE_OFFLINE_MAPCOUNT_VALUE"),
    )


def zone_names(prog: Program) -> tuple[tuple[str, ...], int | None]:
    """Zone names by id (the kernel's own ``zone->name``) and ZONE_DEVICE's id."""
    zone_type = _enum(prog, "enum zone_type")
    count = zone_type["__MAX_NR_ZONES"]
    pgdat = prog["node_data"][0] if prog["node_data"].type_.kind == TypeKind.ARRAY else None
    names: list[str] = []
    for i in range(count):
        name = None
        if pgdat is not None and pgdat.value_():
            try:
                name = pgdat.node_zones[i].name.string_().decode()
            except drgn.FaultError:
                name = None
        if name is None:
            enum_name = next(k for k, v in zone_type.items() if v == i and k.startswith("ZONE_"))
            name = enum_name[len("ZONE_") :].capitalize()
        names.append(name)
    return tuple(names), zone_type.get("ZONE_DEVICE")


def subsection_shift(prog: Program, section_size_bits: int) -> int:
    """SUBSECTION_SHIFT, a macro: subsection_map has SUBSECTIONS_PER_SECTION bits (x86_64: 64)."""
    bits = 8 * sizeof(prog.type("struct mem_section_usage").member("subsection_map").type)
    return section_size_bits - _order_base_2(bits)


def pfn_to_online_page_kind(prog: Program) -> str:
    """Which implementation of pfn_to_online_page() this kernel has (see model.py)."""
    try:
        prog.symbol("pfn_to_online_page")
    except LookupError:
        # without CONFIG_MEMORY_HOTPLUG it is a macro equal to pfn_valid()
        return "pfn_valid"
    # v5.12 1f90a3477df3: ZONE_DEVICE section collisions checked through get_dev_pagemap()
    flags = section_flags(prog)
    return "taint-pgmap" if "SECTION_TAINT_ZONE_DEVICE" in flags else "online-section"


def max_physmem_bits(prog: Program) -> int | None:
    """MAX_PHYSMEM_BITS: VMCOREINFO's NUMBER(MAX_PHYSMEM_BITS) (since v5.9), else from the paging the kernel
    set up (x86_64: 52 with 5-level paging, ``__pgtable_l5_enabled``, else 46); None if neither is there."""
    number = _vmcoreinfo_number(prog, "MAX_PHYSMEM_BITS")
    if number is not None:
        return number
    try:
        return 52 if prog["__pgtable_l5_enabled"].value_() else 46
    except (KeyError, drgn.FaultError):
        return None


def read_layout(prog: Program) -> tuple[Layout, PageFormat]:
    """The constants every other reader needs: release, ``PAGE_SHIFT``, ``SECTION_SIZE_BITS``, the subsection
    shift, the zone names (and ZONE_DEVICE's index), the section flag bits, ``enum pageflags``, ``vmemmap``,
    ``max_pfn``, the ``pfn_to_online_page()`` variant, ``MAX_PHYSMEM_BITS``, and how a ``struct page`` is
    laid out."""
    try:
        release = prog["UTS_RELEASE"].string_().decode()
    except KeyError:
        release = prog["init_uts_ns"].name.release.string_().decode()
    page_shift = prog["PAGE_SHIFT"].value_()
    section_bits = prog["SECTION_SIZE_BITS"].value_()
    names, zone_device = zone_names(prog)
    fmt = page_format(prog, len(names))
    layout = Layout(
        release=release,
        page_shift=page_shift,
        section_size_bits=section_bits,
        subsection_shift=subsection_shift(prog, section_bits),
        zone_names=names,
        zone_device=zone_device,
        section_flags=section_flags(prog),
        pageflags=_enum(prog, "enum pageflags"),
        struct_page_size=fmt.size,
        vmemmap_base=prog["vmemmap"].value_(),
        max_pfn=prog["max_pfn"].value_(),
        pfn_to_online_page=pfn_to_online_page_kind(prog),
        max_physmem_bits=max_physmem_bits(prog),
    )
    return layout, fmt
