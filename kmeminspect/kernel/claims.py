"""Pages that a kernel user keeps marked on purpose, and who withholds pages of memory being onlined."""

from __future__ import annotations

import drgn
from drgn import Program
from drgn.helpers.linux.list import list_for_each_entry
from drgn.helpers.linux.mm import page_to_pfn, phys_to_virt

from ..state import Claim

#: include/linux/kexec.h, unchanged since kexec came in (v2.6.13 dc009d92435f); macros, in no debug info
IND_INDIRECTION, IND_DONE, IND_SOURCE = 0x2, 0x4, 0x8
#: a kimage's entry list ends at IND_DONE; a guard against a corrupt list that never does
MAX_KIMAGE_ENTRIES = 1 << 22


def _page_list(head: drgn.Object, owner: str) -> list[Claim]:
    """The pages of a kimage page list (linked by page->lru, each an order-``page_private`` allocation)."""
    claims = []
    for page in list_for_each_entry("struct page", head.address_of_(), "lru"):
        pfn = page_to_pfn(page).value_()
        claims.append(Claim(pfn, pfn + (1 << min(page.private.value_(), 20)), owner))
    return claims


def _entry_pages(prog: Program, image: drgn.Object, owner: str) -> list[Claim]:
    """The indirection and source pages of a kimage's entry list (``for_each_kimage_entry()``): both come
    from ``kimage_alloc_page()``, which sets PG_reserved."""
    claims = []
    page_mask = prog["PAGE_MASK"].value_()
    entries = image.head.address_of_()
    for _ in range(MAX_KIMAGE_ENTRIES):
        entry = entries[0].value_()
        if not entry or entry & IND_DONE:
            break
        if entry & (IND_INDIRECTION | IND_SOURCE):
            pfn = (entry & page_mask) >> prog["PAGE_SHIFT"].value_()
            kind = "indirection" if entry & IND_INDIRECTION else "source"
            claims.append(Claim(pfn, pfn + 1, f"{owner} {kind} page"))
        if entry & IND_INDIRECTION:
            entries = drgn.cast("unsigned long *", phys_to_virt(prog, entry & page_mask))
        else:
            entries = entries + 1
    return claims


def read_claims(prog: Program) -> list[Claim]:
    """pfn ranges a loaded kexec image holds: its control, destination, unusable, indirection and
    source pages, every one PG_reserved by ``kimage_alloc_pages()`` wherever the allocator found it,
    hotplugged memory included. Empty without CONFIG_KEXEC_CORE or with no image loaded."""
    claims: list[Claim] = []
    for name in ("kexec_image", "kexec_crash_image"):
        try:
            image = prog[name]
        except KeyError:
            continue
        if not image.value_():
            continue
        for member in ("control_pages", "dest_pages", "unusable_pages"):
            if image.type_.type.has_member(member):
                claims.extend(_page_list(getattr(image, member), f"{name} {member[:-6]} page"))
        claims.extend(_entry_pages(prog, image, name))
    return _merged(claims)


def _merged(claims: list[Claim]) -> list[Claim]:
    """Adjacent or overlapping claims of one owner as one range (a loaded kernel is thousands of pages)."""
    merged: list[Claim] = []
    for c in sorted(claims, key=lambda c: (c.owner, c.start_pfn)):
        last = merged[-1] if merged else None
        if last is not None and last.owner == c.owner and c.start_pfn <= last.end_pfn:
            merged[-1] = Claim(last.start_pfn, max(last.end_pfn, c.end_pfn), c.owner)
        else:
            merged.append(c)
    return sorted(merged, key=lambda c: (c.start_pfn, c.end_pfn))


def read_online_page_callback(prog: Program) -> str | None:
    """The function ``online_pages()`` hands each onlined range to (``online_page_callback``):
    ``generic_online_page`` frees it to the buddy; virtio-mem, hv_balloon and xen's balloon install their
    own to withhold what is not plugged or backed yet. None without CONFIG_MEMORY_HOTPLUG."""
    try:
        callback = prog["online_page_callback"]
    except KeyError:
        return None
    address = callback.value_()
    try:
        return str(prog.symbol(address).name)
    except LookupError:
        return f"{address:#x}"
