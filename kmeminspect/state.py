"""The shared vocabulary: plain data describing a kernel's physical-memory bookkeeping.

Readers (``kmeminspect.kernel``) produce it from a live kernel, a vmcore or a QEMU guest; snapshot files
store it; the model and the audit consume it. Nothing here imports drgn.

Page state is kept as *runs*: maximal pfn ranges over which every stored field is identical. A machine
with terabytes of RAM has thousands of runs, not billions of pages.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: what the reader could say about a pfn's ``struct page`` (the ``memmap`` field of a run)
MEMMAP_NONE = 0  # no memmap: section absent, or subsection not valid (pfn_valid() false)
MEMMAP_READ = 1  # read and decoded
MEMMAP_UNMAPPED = 2  # the vmemmap page tables map nothing there
MEMMAP_NOT_IN_DUMP = 3  # mapped, but the dump does not hold that page (filtered or missing)
MEMMAP_NAMES = {
    MEMMAP_NONE: "none",
    MEMMAP_READ: "read",
    MEMMAP_UNMAPPED: "unmapped",
    MEMMAP_NOT_IN_DUMP: "not-in-dump",
}

#: the fields of a page-state run, in order, with their numpy types
RUN_FIELDS: list[tuple[str, str]] = [
    ("pfn_start", "<u8"),
    ("pfn_end", "<u8"),
    ("memmap", "u1"),  # MEMMAP_*
    ("zone_id", "i1"),  # the zone number stored in page->flags (-1 when not read)
    ("nid", "<i2"),  # the node number stored in page->flags (-1 when not read)
    ("reserved", "u1"),  # PG_reserved
    ("offline", "u1"),  # PageOffline (page type)
    ("self_hosted", "u1"),  # PG_vmemmap_self_hosted (memmap_on_memory vmemmap pages)
    ("hwpoison", "u1"),  # PG_hwpoison
    ("zeroed", "u1"),  # the whole struct page reads as zeros (never initialized, on Debian builds)
    ("poisoned", "u1"),  # page->flags is all ones (PAGE_POISON_PATTERN of an uninitialized memmap)
    ("pgmap", "<u8"),  # struct dev_pagemap * of a ZONE_DEVICE page (via its head), else 0
]
RUN_DTYPE = np.dtype(RUN_FIELDS)
#: fields that identify a run's state (all but its pfn range)
STATE_FIELDS = [name for name, _ in RUN_FIELDS if name not in ("pfn_start", "pfn_end")]


@dataclasses.dataclass(frozen=True)
class Section:
    """One present SPARSEMEM section (``struct mem_section``)."""

    nr: int
    address: int  # of the struct mem_section
    start_pfn: int
    nr_pages: int
    section_mem_map: int  # the raw word: flags in the low bits, encoded memmap above
    flags: tuple[str, ...]  # the kernel's own names, e.g. SECTION_IS_ONLINE
    subsection_map: int  # bit i set: subsection i has a memmap (0 when usage is NULL)
    usage: int  # address of struct mem_section_usage, 0 when NULL
    memmap: int  # address of the struct page of start_pfn (0 without SECTION_HAS_MEM_MAP)

    def has(self, flag: str) -> bool:
        return flag in self.flags


@dataclasses.dataclass(frozen=True)
class Block:
    """One memory block device (``/sys/devices/system/memory/memoryN``)."""

    id: int
    start_pfn: int
    nr_pages: int
    state: str  # online, offline, going-offline, ...
    online_type: str | None  # the MMOP_* the block was onlined with, when the kernel records it
    nid: int
    zone: str | None  # None when offline or spanning several zones
    nr_vmemmap_pages: int  # memmap_on_memory: pages at the block's start holding its own memmap


@dataclasses.dataclass(frozen=True)
class Altmap:
    """``struct vmem_altmap``: a device range holding its own memmap."""

    base_pfn: int
    end_pfn: int
    reserve: int  # pfns at the start never given a memmap (the namespace's info block)
    free: int  # pfns available for the memmap
    align: int
    alloc: int  # pfns of the free part actually used for the memmap


@dataclasses.dataclass(frozen=True)
class Pagemap:
    """One ``struct dev_pagemap`` of the kernel's pgmap registry (``pgmap_array``)."""

    address: int
    type: str  # MEMORY_DEVICE_FS_DAX, MEMORY_DEVICE_GENERIC, ...
    ranges: tuple[tuple[int, int], ...]  # [start_pfn, end_pfn)
    altmap: Altmap | None
    vmemmap_shift: int
    #: ``pgmap->ref`` is live: ``get_dev_pagemap()`` finds the pgmap only then. ``memunmap_pages()`` kills
    #: the ref first and removes the registry entry last, waiting in between for page references to drop
    live: bool = True


@dataclasses.dataclass(frozen=True)
class Resource:
    """One entry of the kernel's iomem resource tree (byte addresses, end exclusive)."""

    start: int
    end: int
    name: str
    depth: int


@dataclasses.dataclass(frozen=True)
class Zone:
    """One ``struct zone`` of a node: its span (``zone_start_pfn``, ``spanned_pages``) and ``present_pages``."""

    nid: int
    zone_id: int
    name: str
    start_pfn: int
    spanned: int
    present: int


@dataclasses.dataclass(frozen=True)
class Node:
    """One online node (``pg_data_t``): its pfn span and, while deferred init runs, ``first_deferred_pfn``."""

    nid: int
    start_pfn: int
    spanned: int
    first_deferred_pfn: int | None  # None when deferred struct page init is done (or absent)
    #: the ``deferred_pages`` static key is still enabled: some node's deferred init may still be running.
    #: ``deferred_init_memmap()`` resets first_deferred_pfn before it initializes anything, and
    #: ``page_alloc_init_late()`` disables the key only after every pgdatinit thread finished.
    deferred_init_running: bool = False


@dataclasses.dataclass(frozen=True)
class Layout:
    """What the reader derived from the kernel's debug info."""

    release: str
    page_shift: int
    section_size_bits: int
    subsection_shift: int
    zone_names: tuple[str, ...]  # by zone id; len() == MAX_NR_ZONES
    zone_device: int | None  # ZONE_DEVICE's id, None without CONFIG_ZONE_DEVICE
    section_flags: dict[str, int]  # name -> mask
    pageflags: dict[str, int]  # PG_* -> bit number
    struct_page_size: int
    vmemmap_base: int
    max_pfn: int
    #: how this kernel's pfn_to_online_page() checks ZONE_DEVICE collisions (see model.py)
    pfn_to_online_page: str
    #: MAX_PHYSMEM_BITS: the physical addresses the architecture can address, as this kernel set it up
    #: (VMCOREINFO; 46, or 52 with 5-level paging, on x86_64). None when not known (an older snapshot)
    max_physmem_bits: int | None = None

    @property
    def pfn_limit(self) -> int:
        """One past the highest pfn the architecture can address (2^(64 - PAGE_SHIFT) when not known)."""
        return 1 << ((self.max_physmem_bits or 64) - self.page_shift)

    @property
    def pages_per_section(self) -> int:
        return 1 << (self.section_size_bits - self.page_shift)

    @property
    def pages_per_subsection(self) -> int:
        return 1 << (self.subsection_shift - self.page_shift)

    @property
    def subsections_per_section(self) -> int:
        return 1 << (self.section_size_bits - self.subsection_shift)


@dataclasses.dataclass(frozen=True)
class Claim:
    """A pfn range [start_pfn, end_pfn) that a kernel user keeps marked on purpose, e.g. the pages of a
    loaded kexec image (``kimage_alloc_pages()`` sets PG_reserved on each)."""

    start_pfn: int
    end_pfn: int
    owner: str  # e.g. "kexec_image control page"


@dataclasses.dataclass
class Snapshot:
    """Everything read from one kernel at one moment."""

    source: dict[str, Any]  # what was read: kind (live, vmcore, qemu), path, time
    layout: Layout
    sections: list[Section]
    blocks: list[Block]
    pagemaps: list[Pagemap]
    zones: list[Zone]
    nodes: list[Node]
    resources: list[Resource]
    runs: np.ndarray  # RUN_DTYPE, sorted, non-overlapping, covering every present section
    #: pfn ranges a known kernel user holds on purpose (kexec image pages, ...): see :class:`Claim`
    claims: list[Claim] = dataclasses.field(default_factory=list)
    #: the function behind ``online_page_callback`` (``generic_online_page`` unless a driver such as
    #: virtio-mem, hv_balloon or xen's balloon withholds pages of memory it onlines); None if unknown
    online_page_callback: str | None = None
    #: what each page->pgmap value that no registered pgmap explains for its pfn points to (reader's
    #: words: "a freed kmalloc-1k slab object ...", "a registered pgmap of another range", ...)
    pgmap_pointers: dict[int, str] = dataclasses.field(default_factory=dict)
    #: what the reader could not read (kernel memory that faulted: a page a filtered dump excluded, a
    #: structure freed during a live read), one line each; everything else was read
    unreadable: list[str] = dataclasses.field(default_factory=list)

    def section(self, nr: int) -> Section | None:
        for s in self.sections:
            if s.nr == nr:
                return s
        return None

    def end_pfn(self) -> int:
        """One past the last pfn of the highest present section."""
        if not self.sections:
            return 0
        last = max(s.nr for s in self.sections)
        return (last + 1) * self.layout.pages_per_section


def merge_runs(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-section runs and merge neighbours whose state is identical."""
    if not parts:
        return np.zeros(0, dtype=RUN_DTYPE)
    runs = np.concatenate(parts)
    if runs.size < 2:
        return runs
    same = np.ones(runs.size - 1, dtype=bool)
    for name in STATE_FIELDS:
        same &= runs[name][1:] == runs[name][:-1]
    same &= runs["pfn_start"][1:] == runs["pfn_end"][:-1]
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    merged = runs[starts].copy()
    ends = np.concatenate((starts[1:], [runs.size])) - 1
    merged["pfn_end"] = runs["pfn_end"][ends]
    return merged


def runs_from_arrays(start_pfn: int, columns: dict[str, np.ndarray]) -> np.ndarray:
    """Run-length encode per-pfn state columns (every STATE_FIELDS name) starting at start_pfn."""
    n = len(next(iter(columns.values())))
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for name in STATE_FIELDS:
        col = columns[name]
        change[1:] |= col[1:] != col[:-1]
    starts = np.flatnonzero(change)
    runs = np.zeros(starts.size, dtype=RUN_DTYPE)
    runs["pfn_start"] = start_pfn + starts
    runs["pfn_end"] = start_pfn + np.concatenate((starts[1:], [n]))
    for name in STATE_FIELDS:
        runs[name] = columns[name][starts]
    return runs


def uniform_run(start_pfn: int, end_pfn: int, memmap: int) -> np.ndarray:
    """One run of pfns whose memmap was not read (no memmap, unmapped, or not in the dump)."""
    run = np.zeros(1, dtype=RUN_DTYPE)
    run["pfn_start"] = start_pfn
    run["pfn_end"] = end_pfn
    run["memmap"] = memmap
    run["zone_id"] = -1
    run["nid"] = -1
    return run
