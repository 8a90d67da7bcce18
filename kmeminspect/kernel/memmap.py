"""Read every ``struct page`` of the present sections in bulk and decode them with arrays.

One ``prog.read()`` per run of valid subsections of a section (at most 2 MiB of memmap on x86_64);
only when that faults, one read per vmemmap page (64 struct pages), so a memmap that is partly unmapped
or partly missing from a dump is classified page by page of vmemmap, never read as zeros. Nothing here
creates a drgn Object per page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import drgn
import numpy as np
from drgn import Program
from drgn.helpers.linux.mm import follow_phys

from ..state import (
    MEMMAP_NONE,
    MEMMAP_NOT_IN_DUMP,
    MEMMAP_READ,
    MEMMAP_UNMAPPED,
    Layout,
    Section,
    merge_runs,
    runs_from_arrays,
    uniform_run,
)
from .layout import PageFormat

ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


def valid_subsection_runs(section: Section, layout: Layout) -> Iterator[tuple[int, int, bool]]:
    """(first pfn, end pfn, valid) runs of a section's subsections, as pfn_valid() sees them.

    Early (boot) sections are valid as a whole (v5.3 326e1b8f83a4); others per subsection bit.
    """
    per = layout.pages_per_subsection
    count = layout.subsections_per_section
    if "SECTION_HAS_MEM_MAP" not in section.flags:
        yield section.start_pfn, section.start_pfn + section.nr_pages, False
        return
    if "SECTION_IS_EARLY" in section.flags:
        yield section.start_pfn, section.start_pfn + section.nr_pages, True
        return
    bits = [(section.subsection_map >> i) & 1 == 1 for i in range(count)]
    i = 0
    while i < count:
        j = i
        while j < count and bits[j] == bits[i]:
            j += 1
        yield section.start_pfn + i * per, section.start_pfn + j * per, bits[i]
        i = j


class MemmapReader:
    """Reads and decodes struct pages of one kernel."""

    def __init__(self, prog: Program, layout: Layout, fmt: PageFormat) -> None:
        self.prog = prog
        self.layout = layout
        self.fmt = fmt
        self.words = fmt.size // 8
        self.pages_per_vmemmap_page = (1 << layout.page_shift) // fmt.size
        self._init_mm: drgn.Object | None = None

    # -- raw reads -------------------------------------------------------------------------------
    def _classify_fault(self, address: int) -> int:
        """A vmemmap page that could not be read: unmapped by the page tables, or absent from the dump."""
        if self._init_mm is None:
            self._init_mm = self.prog["init_mm"].address_of_()
        try:
            follow_phys(self._init_mm, address)
        except drgn.FaultError:
            return MEMMAP_UNMAPPED
        return MEMMAP_NOT_IN_DUMP

    def read_pages(self, start_pfn: int, end_pfn: int, memmap_base: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw struct pages of [start_pfn, end_pfn) as (words[n, size/8], memmap state[n])."""
        n = end_pfn - start_pfn
        size = self.fmt.size
        address = memmap_base + (start_pfn % self.layout.pages_per_section) * size
        state = np.full(n, MEMMAP_READ, dtype=np.uint8)
        try:
            raw = self.prog.read(address, n * size)
            return np.frombuffer(raw, dtype="<u8").reshape(n, self.words), state
        except drgn.FaultError:
            pass
        words = np.zeros((n, self.words), dtype="<u8")
        step = self.pages_per_vmemmap_page
        # vmemmap pages are page-aligned; the first chunk may start mid-page
        i = 0
        while i < n:
            chunk_address = address + i * size
            page_end = (chunk_address | ((1 << self.layout.page_shift) - 1)) + 1
            count = min(n - i, (page_end - chunk_address) // size, step)
            try:
                raw = self.prog.read(chunk_address, count * size)
                words[i : i + count] = np.frombuffer(raw, dtype="<u8").reshape(count, self.words)
            except drgn.FaultError:
                state[i : i + count] = self._classify_fault(chunk_address)
            i += count
        return words, state

    # -- decode ----------------------------------------------------------------------------------
    def decode(
        self,
        start_pfn: int,
        words: np.ndarray,
        state: np.ndarray,
        head_pgmap: Callable[[np.ndarray], np.ndarray],
    ) -> dict[str, np.ndarray]:
        """Per-pfn state columns (see state.RUN_FIELDS) of pages read at start_pfn."""
        fmt = self.fmt
        flags = words[:, 0]
        read = state == MEMMAP_READ
        zone_id = ((flags >> np.uint64(fmt.zones_pgoff)) & np.uint64(fmt.zones_mask)).astype(np.int8)
        nid = ((flags >> np.uint64(fmt.nodes_pgoff)) & np.uint64(fmt.nodes_mask)).astype(np.int16)
        zone_id[~read] = -1
        nid[~read] = -1

        def bit(number: int | None) -> np.ndarray:
            if number is None:
                return np.zeros(flags.size, dtype=np.uint8)
            result: np.ndarray = ((flags >> np.uint64(number)) & np.uint64(1)).astype(np.uint8) & read
            return result

        type_word = words[:, fmt.page_type_offset // 8]
        page_type = ((type_word >> np.uint64(8 * (fmt.page_type_offset % 8))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        if fmt.offline_type_byte is not None:
            offline = (page_type >> np.uint32(24)) == fmt.offline_type_byte
        elif fmt.offline_mapcount_value is not None:
            offline = page_type == np.uint32(fmt.offline_mapcount_value & 0xFFFFFFFF)
        else:
            offline = np.zeros(flags.size, dtype=bool)
        # only pages with no flags at all can be all zeros: test the whole struct page for those alone
        zeroed = (flags == 0) & read
        candidates = np.flatnonzero(zeroed)
        if candidates.size:
            zeroed[candidates] = ~words[candidates].any(axis=1)
        poisoned = (flags == ALL_ONES) & read
        pgmap = np.zeros(flags.size, dtype=np.uint64)
        device = read & (zone_id == (self.layout.zone_device if self.layout.zone_device is not None else -2))
        if device.any():
            pgmap[device] = head_pgmap(np.flatnonzero(device))
        return {
            "memmap": state,
            "zone_id": zone_id,
            "nid": nid,
            "reserved": bit(fmt.pg_reserved),
            "offline": (offline & read).astype(np.uint8),
            "self_hosted": bit(fmt.pg_self_hosted),
            "hwpoison": bit(fmt.pg_hwpoison),
            "zeroed": zeroed.astype(np.uint8),
            "poisoned": poisoned.astype(np.uint8),
            "pgmap": pgmap,
        }

    def _pgmap_of_heads(
        self, start_pfn: int, words: np.ndarray, memmap_base: int
    ) -> Callable[[np.ndarray], np.ndarray]:
        """For ZONE_DEVICE pages at the given indexes: the pgmap word of each one's head page.

        Tails of compound device pages (device-DAX) keep the head address in compound_head, which
        overlays pgmap; a deduplicated vmemmap (like hugetlb's HVO) shows page-aligned tails as fake
        heads with PG_head, which page_fixed_fake_head() resolves through the next page.
        """
        fmt = self.fmt
        size = fmt.size
        compound = words[:, fmt.compound_offset // 8]
        flags = words[:, 0]
        pgmap_words = words[:, fmt.pgmap_offset // 8]
        first_address = memmap_base + (start_pfn % self.layout.pages_per_section) * size
        n = words.shape[0]

        def heads(indexes: np.ndarray) -> np.ndarray:
            result: np.ndarray = pgmap_words[indexes].copy()
            info = compound[indexes]
            tail = (info & np.uint64(1)) == 1
            page_addresses = np.uint64(first_address) + indexes.astype(np.uint64) * np.uint64(size)
            head_address = np.where(
                tail,
                (page_addresses & info) if fmt.compound_is_mask else (info - np.uint64(1)),
                page_addresses,
            )
            if not fmt.compound_is_mask:
                # fake heads: PG_head set, page-aligned, and the next page is a tail of another head
                is_head = ((flags[indexes] >> np.uint64(fmt.pg_head)) & np.uint64(1)) == 1
                nxt = np.minimum(indexes + 1, n - 1)
                next_info = compound[nxt]
                fake = (
                    is_head
                    & (indexes + 1 < n)
                    & ((next_info & np.uint64(1)) == 1)
                    & (next_info - np.uint64(1) != page_addresses)
                )
                head_address = np.where(fake, next_info - np.uint64(1), head_address)
                tail |= fake
            head_index = (head_address - np.uint64(first_address)).view(np.int64) // size
            inside = tail & (head_index >= 0) & (head_index < n)
            result[inside] = pgmap_words[head_index[inside]]
            # pages initialized by memmap_init_range() but never given a pgmap (the altmap's free part,
            # which holds the device's own memmap) keep INIT_LIST_HEAD(&page->lru): a pointer to itself
            own_field = page_addresses + np.uint64(fmt.pgmap_offset)
            result[~tail & (result == own_field)] = 0
            for i in np.flatnonzero(tail & ~inside).tolist():
                try:
                    raw = self.prog.read(int(head_address[i]) + fmt.pgmap_offset, 8)
                    result[i] = int.from_bytes(raw, "little")
                except drgn.FaultError:
                    result[i] = 0
            return result

        return heads

    def section_runs(self, section: Section) -> np.ndarray:
        """Runs of page state over one present section."""
        parts = []
        for start, end, valid in valid_subsection_runs(section, self.layout):
            if not valid:
                parts.append(uniform_run(start, end, MEMMAP_NONE))
                continue
            words, state = self.read_pages(start, end, section.memmap)
            columns = self.decode(start, words, state, self._pgmap_of_heads(start, words, section.memmap))
            parts.append(runs_from_arrays(start, columns))
        return merge_runs(parts)

    def pages(self, section: Section, start_pfn: int, end_pfn: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw words and memmap states of [start_pfn, end_pfn) inside one section (for ``pfn``)."""
        return self.read_pages(start_pfn, end_pfn, section.memmap)
