"""The kernel's pfn predicates and the 2019 ``pfn_active()`` proposal, over pfn ranges of a snapshot.

Pure Python and numpy; no drgn. A snapshot's page-state runs are refined into *segments*: maximal pfn
ranges over which the section, the subsection bit, the page state, the pagemap registry, the altmap
part, the memory block, the zone span and deferred init are all constant. Every predicate is then one
value per segment, so a terabyte is thousands of segments, never billions of pfns.

The kernel's predicates, as each generation implements them (x86_64, SPARSEMEM_VMEMMAP):

``pfn_valid``            section has a memmap (SECTION_HAS_MEM_MAP) and (early section or subsection
                         bit set) — include/linux/mmzone.h.
``pfn_section_valid``    the pfn's subsection bit is set (v5.3 f46edbd1b151).
``online_section``       SECTION_IS_ONLINE (v4.13 2d070eab2e82).
``online_device_section``  SECTION_IS_ONLINE and SECTION_TAINT_ZONE_DEVICE (v5.12 1f90a3477df3).
``pfn_to_online_page``   online_section and pfn_section_valid; and, in an online device section, NULL
                         when get_dev_pagemap() finds the pfn's pgmap: a registry entry whose ref is
                         still live (percpu_ref_tryget_live_rcu(); a pgmap being torn down by
                         memunmap_pages() is not found) — mm/memory_hotplug.c, identical in 6.1, 6.12
                         and 7.x ("taint-pgmap"). Without CONFIG_MEMORY_HOTPLUG it is pfn_valid.

The proposal (David Hildenbrand, linux-mm, 2019; never merged):

``pfn_active``           the pfn's memmap is initialized and sane (see :func:`evaluate`).
``pfn_to_device_page``   pfn_active and zone == ZONE_DEVICE.
``proposed_online``      pfn_active and zone != ZONE_DEVICE.
"""

from __future__ import annotations

import numpy as np

from .state import MEMMAP_READ, MEMMAP_UNMAPPED, RUN_FIELDS, Snapshot

#: why a pfn is not active (bit values of the ``inactive`` column); 0 means active
INACTIVE_CAUSES = {
    1 << 0: "no-memmap",  # pfn_valid() is false
    1 << 1: "memmap-unreadable",  # mapped, but the dump (or /proc/kcore) does not hold the page
    1 << 2: "zeroed",  # an all-zero struct page: never initialized (Debian: DEBUG_VM off)
    1 << 3: "poisoned",  # page->flags all ones: PAGE_POISON_PATTERN, never initialized
    1 << 4: "zone-out-of-range",  # zone id >= MAX_NR_ZONES
    1 << 5: "outside-zone-span",  # the page's (node, zone) does not span the pfn
    1 << 6: "section-offline",  # RAM whose section is not online: memmap not (or no longer) initialized
    1 << 7: "altmap-reserve",  # device pfns before the altmap's free part: memmap never initialized
    1 << 8: "device-not-initialized",  # pgmap registered, memmap not (yet) a ZONE_DEVICE page
    1 << 9: "deferred",  # past first_deferred_pfn while deferred struct page init runs
    1 << 10: "device-zone-without-pgmap",  # ZONE_DEVICE page where no pgmap is registered
    1 << 11: "memmap-unmapped",  # pfn_valid(), but the vmemmap page tables map nothing there
    1 << 12: "altmap-memmap",  # a device pfn holding the device's own memmap: no valid page->pgmap
}
CAUSE_BITS = {name: bit for bit, name in INACTIVE_CAUSES.items()}

ALTMAP_NONE, ALTMAP_RESERVE, ALTMAP_FREE = 0, 1, 2

SEGMENT_FIELDS = RUN_FIELDS + [
    ("section_nr", "<i8"),  # -1: no present section
    ("section_flags", "<u8"),  # the raw flag bits of section_mem_map
    ("subsection_valid", "u1"),
    ("registry_pgmap", "<u8"),  # the pgmap the registry (pgmap_array) holds for the pfn, 0 if none
    ("registry_live", "u1"),  # that pgmap's ref is live: get_dev_pagemap() finds it
    ("altmap_part", "u1"),  # ALTMAP_*
    ("block", "<i8"),  # memory block id, -1 if none
    ("in_zone_span", "u1"),  # the page's (nid, zone_id) spans the pfn
    ("deferred", "u1"),
    ("block_onlining", "u1"),  # the pfn's memory block is being onlined (online_type set, still offline)
    # results
    ("pfn_valid", "u1"),
    ("online_section", "u1"),
    ("online_device_section", "u1"),
    ("pfn_to_online_page", "u1"),
    ("inactive", "<u4"),  # INACTIVE_CAUSES bits; 0 == pfn_active
    ("pfn_active", "u1"),
    ("pfn_to_device_page", "u1"),
    ("proposed_online", "u1"),
]
SEGMENT_DTYPE = np.dtype(SEGMENT_FIELDS)


def _boundaries(snapshot: Snapshot) -> np.ndarray:
    """Every pfn where some input of the model may change."""
    layout = snapshot.layout
    points: list[int] = []
    runs = snapshot.runs
    points.extend(runs["pfn_start"].tolist())
    points.extend(runs["pfn_end"].tolist())
    for s in snapshot.sections:
        points.extend((s.start_pfn, s.start_pfn + s.nr_pages))
    # where a section's subsection bit changes: between subsections i - 1 and i
    bits = _subsection_bits(snapshot)
    section_index, subsection = np.nonzero(bits[:, 1:] != bits[:, :-1])
    starts = np.array([s.start_pfn for s in snapshot.sections], dtype=np.uint64)
    changes = starts[section_index] + (subsection + 1).astype(np.uint64) * np.uint64(layout.pages_per_subsection)
    for p in snapshot.pagemaps:
        for start, end in p.ranges:
            points.extend((start, end))
        if p.altmap:
            a = p.altmap
            points.extend((a.base_pfn, a.base_pfn + a.reserve, a.base_pfn + a.reserve + a.free))
    for b in snapshot.blocks:
        points.extend((b.start_pfn, b.start_pfn + b.nr_pages))
    for z in snapshot.zones:
        if z.spanned:
            points.extend((z.start_pfn, z.start_pfn + z.spanned))
    for n in snapshot.nodes:
        points.extend((n.start_pfn, n.start_pfn + n.spanned))
        if n.first_deferred_pfn is not None:
            points.append(n.first_deferred_pfn)
    return np.unique(np.concatenate((np.array(points, dtype=np.uint64), changes)))


def _subsection_bits(snapshot: Snapshot) -> np.ndarray:
    """The subsection maps of the snapshot's sections, in order, as a (sections, subsections) bool array."""
    count = snapshot.layout.subsections_per_section
    width = (count + 7) // 8
    maps = b"".join(s.subsection_map.to_bytes(width, "little") for s in snapshot.sections)
    packed = np.frombuffer(maps, dtype=np.uint8).reshape(len(snapshot.sections), width)
    bits: np.ndarray = np.unpackbits(packed, axis=1, bitorder="little")[:, :count].astype(bool)
    return bits


def segments(snapshot: Snapshot, start: int | None = None, end: int | None = None, clip: bool = True) -> np.ndarray:
    """The snapshot's runs refined into model segments and evaluated, optionally clipped to [start, end).

    With ``clip=False`` the segments cover exactly [start, end), pfns before the first run and after the
    last one too (not present, no memmap): what ``pfn`` answers for any pfn the architecture can address."""
    layout = snapshot.layout
    runs = snapshot.runs
    cuts = _boundaries(snapshot)
    lo = int(runs["pfn_start"][0]) if runs.size else 0
    hi = int(runs["pfn_end"][-1]) if runs.size else 0
    if start is not None:
        lo = max(lo, start) if clip else start
        cuts = np.append(cuts, np.uint64(start))
    if end is not None:
        hi = min(hi, end) if clip else end
        cuts = np.append(cuts, np.uint64(end))
    cuts = np.unique(cuts)
    cuts = cuts[(cuts >= lo) & (cuts <= hi)]
    if cuts.size < 2:
        return np.zeros(0, dtype=SEGMENT_DTYPE)
    seg = np.zeros(cuts.size - 1, dtype=SEGMENT_DTYPE)
    seg["pfn_start"] = cuts[:-1]
    seg["pfn_end"] = cuts[1:]
    starts = seg["pfn_start"]

    # page state: the run containing each segment's start (runs are sorted, contiguous per section)
    idx = np.searchsorted(runs["pfn_start"], starts, side="right") - 1
    covered = (idx >= 0) & (starts < runs["pfn_end"][np.maximum(idx, 0)])
    for name, _ in RUN_FIELDS[2:]:
        seg[name] = np.where(covered, runs[name][np.maximum(idx, 0)], 0)
    seg["zone_id"][~covered] = -1
    seg["nid"][~covered] = -1

    # sections and subsections
    flags = layout.section_flags
    section_nr = (starts >> np.uint64(layout.section_size_bits - layout.page_shift)).astype(np.int64)
    sub_index = ((starts % np.uint64(layout.pages_per_section)) // np.uint64(layout.pages_per_subsection)).astype(
        np.int64
    )
    order = sorted(range(len(snapshot.sections)), key=lambda i: snapshot.sections[i].nr)
    present_nrs = np.array([snapshot.sections[i].nr for i in order], dtype=np.int64)
    section_flag_bits = np.array(
        [snapshot.sections[i].section_mem_map & ~flags["SECTION_MAP_MASK"] & 0xFFFFFFFFFFFFFFFF for i in order],
        dtype=np.uint64,
    )
    subsection_bits = _subsection_bits(snapshot)[order]
    seg["section_nr"] = -1
    if present_nrs.size:  # each segment's section, by binary search over the present ones
        which = np.minimum(np.searchsorted(present_nrs, section_nr), present_nrs.size - 1)
        present = present_nrs[which] == section_nr
        seg["section_nr"] = np.where(present, section_nr, -1)
        seg["section_flags"] = np.where(present, section_flag_bits[which], 0)
        seg["subsection_valid"] = present & subsection_bits[which, sub_index]
    sf = seg["section_flags"]
    has_map = (sf & np.uint64(flags["SECTION_HAS_MEM_MAP"])) != 0
    early = (sf & np.uint64(flags.get("SECTION_IS_EARLY", 0))) != 0
    online = (sf & np.uint64(flags.get("SECTION_IS_ONLINE", 0))) != 0
    taint_mask = flags.get("SECTION_TAINT_ZONE_DEVICE", 0)
    tainted = (sf & np.uint64(taint_mask)) != 0 if taint_mask else np.zeros(seg.size, dtype=bool)
    sub_valid = seg["subsection_valid"] == 1

    # the pgmap registry (get_dev_pagemap) and altmap parts
    for p in snapshot.pagemaps:
        for a, b in p.ranges:
            inside = (starts >= a) & (starts < b)
            seg["registry_pgmap"][inside] = p.address
            seg["registry_live"][inside] = p.live
        if p.altmap:
            base, reserve, free = p.altmap.base_pfn, p.altmap.reserve, p.altmap.free
            seg["altmap_part"][(starts >= base) & (starts < base + reserve)] = ALTMAP_RESERVE
            seg["altmap_part"][(starts >= base + reserve) & (starts < base + reserve + free)] = ALTMAP_FREE

    # memory blocks do not overlap: find each segment's block by binary search, not a pass per block
    blocks = sorted(snapshot.blocks, key=lambda b: b.start_pfn)
    block_starts = np.array([b.start_pfn for b in blocks], dtype=np.uint64)
    block_ends = np.array([b.start_pfn + b.nr_pages for b in blocks], dtype=np.uint64)
    block_ids = np.array([b.id for b in blocks], dtype=np.int64)
    which = np.searchsorted(block_starts, starts, side="right") - 1
    inside = (which >= 0) & (starts < block_ends[np.maximum(which, 0)]) if blocks else np.zeros(seg.size, bool)
    seg["block"] = np.where(inside, block_ids[np.maximum(which, 0)] if blocks else -1, -1)
    # memory_subsys_online() sets online_type for the duration of onlining only (MMOP_OFFLINE otherwise)
    onlining = np.array([b.state == "offline" and b.online_type is not None for b in blocks], dtype=bool)
    if blocks:
        seg["block_onlining"] = inside & onlining[np.maximum(which, 0)]

    spans = {(z.nid, z.zone_id): (z.start_pfn, z.start_pfn + z.spanned) for z in snapshot.zones}
    for (span_nid, span_zone), (a, b) in spans.items():
        match = (seg["nid"] == span_nid) & (seg["zone_id"] == span_zone) & (starts >= a) & (seg["pfn_end"] <= b)
        seg["in_zone_span"][match] = 1

    # the kernel's predicates
    pfn_valid = has_map & (early | sub_valid)
    seg["pfn_valid"] = pfn_valid
    seg["online_section"] = online
    seg["online_device_section"] = online & tainted
    # get_dev_pagemap(): a registry entry whose ref percpu_ref_tryget_live_rcu() can still take
    found = (seg["registry_pgmap"] != 0) & (seg["registry_live"] == 1)
    if layout.pfn_to_online_page == "pfn_valid":
        p2op = pfn_valid
    elif layout.pfn_to_online_page == "online-section":
        p2op = online & sub_valid
    else:  # "taint-pgmap"
        p2op = online & sub_valid & ~(online & tainted & found)
    seg["pfn_to_online_page"] = p2op

    # the proposal: is the memmap initialized and sane?
    zone_device = layout.zone_device if layout.zone_device is not None else -2
    max_zones = len(layout.zone_names)
    device_pfn = seg["registry_pgmap"] != 0
    readable = seg["memmap"] == MEMMAP_READ
    zone_id = seg["zone_id"]
    inactive = np.zeros(seg.size, dtype=np.uint32)

    def cause(name: str, mask: np.ndarray) -> None:
        inactive[mask] |= np.uint32(CAUSE_BITS[name])

    sane_content = readable & (seg["zeroed"] == 0) & (seg["poisoned"] == 0)
    in_range = sane_content & (zone_id >= 0) & (zone_id < max_zones)
    initialized_ram = in_range & (zone_id != zone_device) & (seg["in_zone_span"] == 1)
    _mark_deferred(snapshot, seg, initialized_ram)

    cause("no-memmap", ~pfn_valid)
    cause("memmap-unmapped", pfn_valid & (seg["memmap"] == MEMMAP_UNMAPPED))
    cause("memmap-unreadable", pfn_valid & ~readable & (seg["memmap"] != MEMMAP_UNMAPPED))
    cause("zeroed", readable & (seg["zeroed"] == 1))
    cause("poisoned", readable & (seg["poisoned"] == 1))
    cause("zone-out-of-range", sane_content & ((zone_id < 0) | (zone_id >= max_zones)))
    # ZONE_DEVICE spans are tracked loosely by the kernel (never shrunk): check RAM zones only
    cause("outside-zone-span", in_range & (zone_id != zone_device) & (seg["in_zone_span"] == 0))
    # RAM of an offline section, except while its block is being onlined: move_pfn_range_to_zone() has
    # initialized the memmap (the zone spans it, the page names that zone) before online_mem_sections()
    onlining = (seg["block_onlining"] == 1) & initialized_ram
    cause("section-offline", pfn_valid & ~device_pfn & ~online & ~onlining)
    cause("altmap-reserve", device_pfn & (seg["altmap_part"] == ALTMAP_RESERVE))
    # the altmap's free part holds the device's own memmap: memmap_init_range() initialized these pages as
    # ZONE_DEVICE, but page->pgmap shares its word with page->lru (a pointer to itself): not a device page
    cause("altmap-memmap", device_pfn & (seg["altmap_part"] == ALTMAP_FREE))
    cause(
        "device-not-initialized",
        device_pfn & (seg["altmap_part"] != ALTMAP_RESERVE) & sane_content & (zone_id != zone_device),
    )
    cause("device-zone-without-pgmap", in_range & ~device_pfn & (zone_id == zone_device))
    cause("deferred", seg["deferred"] == 1)
    seg["inactive"] = inactive
    active = inactive == 0
    seg["pfn_active"] = active
    seg["pfn_to_device_page"] = active & (zone_id == zone_device)
    seg["proposed_online"] = active & (zone_id != zone_device)
    return seg


def _mark_deferred(snapshot: Snapshot, seg: np.ndarray, initialized_ram: np.ndarray) -> None:
    """Set ``deferred`` on the pfns whose struct pages deferred init has not reached (yet).

    While ``first_deferred_pfn`` is set, that is the node's pfns from it to the node's end. Once
    ``deferred_init_memmap()`` has started it resets the mark to ULONG_MAX *before* initializing anything;
    until ``page_alloc_init_late()`` disables the ``deferred_pages`` key no kernel state says how far it
    got, so a pfn of the node is deferred unless its struct page already reads as initialized RAM (a zone
    that spans it, the node's id).
    """
    starts = seg["pfn_start"]
    for n in snapshot.nodes:
        node = (starts >= n.start_pfn) & (starts < n.start_pfn + n.spanned)
        if n.first_deferred_pfn is not None:
            seg["deferred"][node & (starts >= n.first_deferred_pfn)] = 1
        elif n.deferred_init_running:
            in_flight = node & (seg["pfn_valid"] == 1) & ~(initialized_ram & (seg["nid"] == n.nid))
            seg["deferred"][in_flight] = 1


def causes(bits: int) -> list[str]:
    """Names of the INACTIVE_CAUSES set in bits."""
    return [name for bit, name in INACTIVE_CAUSES.items() if bits & bit]


def per_pfn(seg: np.ndarray, field: str) -> np.ndarray:
    """Expand one segment column to one value per pfn (for tests and small ranges only)."""
    lengths = (seg["pfn_end"] - seg["pfn_start"]).astype(np.int64)
    return np.repeat(seg[field], lengths)
