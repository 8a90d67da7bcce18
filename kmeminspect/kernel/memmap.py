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
    RUN_DTYPE,
    Layout,
    Section,
    merge_runs,
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
        #: the page->flags bits a run stores (node, zone and the PG_* bits of state.RUN_FIELDS)
        self.stored_flags = (fmt.nodes_mask << fmt.nodes_pgoff) | (fmt.zones_mask << fmt.zones_pgoff)
        for number in (fmt.pg_reserved, fmt.pg_self_hosted, fmt.pg_hwpoison):
            if number is not None:
                self.stored_flags |= 1 << number
        # three bits of the key that no stored flag uses: PageOffline, all-zero page, all-ones flags
        spare = [b for b in range(64) if not self.stored_flags >> b & 1]
        self.offline_bit, self.zeroed_bit, self.poisoned_bit = spare[:3]

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
    def _offline(self, words: np.ndarray) -> np.ndarray | None:
        """PageOffline per page (one pass over the page_type bytes), or None if this kernel has no test."""
        fmt = self.fmt
        if fmt.offline_type_byte is not None:  # 6.12+: enum pagetype in the top byte of page_type
            top_byte = words.view("u1")[:, fmt.page_type_offset + 3]
            result: np.ndarray = top_byte == np.uint8(fmt.offline_type_byte)
            return result
        if fmt.offline_mapcount_value is not None:  # before: one exact 32-bit value
            page_type = words.view("<u4")[:, fmt.page_type_offset // 4]
            result = page_type == np.uint32(fmt.offline_mapcount_value & 0xFFFFFFFF)
            return result
        return None

    def decode_runs(
        self,
        start_pfn: int,
        words: np.ndarray,
        state: np.ndarray,
        head_pgmap: Callable[[np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """Runs of page state (state.RUN_DTYPE) of pages read at start_pfn.

        Every stored field but pgmap comes from page->flags, page_type, or the all-zeros and all-ones
        tests, so the pages are first reduced to one *key* word each: the flags bits that are stored
        (node, zone, PG_reserved, PG_vmemmap_self_hosted, PG_hwpoison) plus spare bits for PageOffline,
        zeroed and poisoned. Runs are where the key (or the memmap state, or a device page's pgmap)
        changes, and the fields are decoded once per run, not once per page.
        """
        fmt = self.fmt
        n = words.shape[0]
        stored = np.uint64(self.stored_flags)
        key = words[:, 0] & stored
        # only a zero key can be an all-zero struct page, only a key of every stored bit all-ones flags
        if key.min() == 0:
            candidates = np.flatnonzero(key == 0)
            zeroed = candidates[~words[candidates].any(axis=1)]
            key[zeroed] |= np.uint64(1 << self.zeroed_bit)
        if key.max() == stored:
            candidates = np.flatnonzero(key == stored)
            poisoned = candidates[words[candidates, 0] == ALL_ONES]
            key[poisoned] |= np.uint64(1 << self.poisoned_bit)
        offline = self._offline(words)
        if offline is not None and offline.any():
            key |= offline.astype(np.uint64) << np.uint64(self.offline_bit)
        all_read = bool((state == MEMMAP_READ).all())
        if not all_read:
            key[state != MEMMAP_READ] = 0  # words there are zeros: nothing decoded, nothing zeroed
        change = key[1:] != key[:-1]
        if not all_read:
            change |= state[1:] != state[:-1]
        pgmap = None
        if self.layout.zone_device is not None:
            zone_bits = (key >> np.uint64(fmt.zones_pgoff)) & np.uint64(fmt.zones_mask)
            device = zone_bits == np.uint64(self.layout.zone_device)
            if not all_read:
                device &= state == MEMMAP_READ
            if device.any():
                pgmap = np.zeros(n, dtype=np.uint64)
                pgmap[device] = head_pgmap(np.flatnonzero(device))
                change |= pgmap[1:] != pgmap[:-1]
        starts = np.concatenate(([0], np.flatnonzero(change) + 1))
        keys = key[starts]
        read = state[starts] == MEMMAP_READ

        def bit(number: int | None) -> np.ndarray:
            if number is None:
                return np.zeros(starts.size, dtype=np.uint8)
            return ((keys >> np.uint64(number)) & np.uint64(1)).astype(np.uint8)

        runs = np.zeros(starts.size, dtype=RUN_DTYPE)
        runs["pfn_start"] = start_pfn + starts
        runs["pfn_end"] = start_pfn + np.concatenate((starts[1:], [n]))
        runs["memmap"] = state[starts]
        zone_id = ((keys >> np.uint64(fmt.zones_pgoff)) & np.uint64(fmt.zones_mask)).astype(np.int64)
        nid = ((keys >> np.uint64(fmt.nodes_pgoff)) & np.uint64(fmt.nodes_mask)).astype(np.int64)
        runs["zone_id"] = np.where(read, zone_id, -1)
        runs["nid"] = np.where(read, nid, -1)
        runs["reserved"] = bit(fmt.pg_reserved)
        runs["offline"] = bit(self.offline_bit) if offline is not None else 0
        runs["self_hosted"] = bit(fmt.pg_self_hosted)
        runs["hwpoison"] = bit(fmt.pg_hwpoison)
        runs["zeroed"] = bit(self.zeroed_bit)
        runs["poisoned"] = bit(self.poisoned_bit)
        runs["pgmap"] = pgmap[starts] if pgmap is not None else 0
        return runs

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
            parts.append(self.decode_runs(start, words, state, self._pgmap_of_heads(start, words, section.memmap)))
        return merge_runs(parts)

    def pages(self, section: Section, start_pfn: int, end_pfn: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw words and memmap states of [start_pfn, end_pfn) inside one section (for ``pfn``)."""
        return self.read_pages(start_pfn, end_pfn, section.memmap)
