"""The audit's vocabulary: rules, findings, severities and categories, and how findings are grouped.

A finding's *category* says what it is about: ``kernel`` (the kernel's bookkeeping is wrong), ``dump``
(the dump, or /proc/kcore, lacks what would be needed to check), ``live-race`` (seen in one read of a
running kernel and gone in the next: a transient state, not a broken one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

ERROR, WARNING, INFO = "error", "warning", "info"
#: severities from the most to the least serious; ``--fail-on S`` fails on S and everything before it
SEVERITIES = (ERROR, WARNING, INFO)
KERNEL, DUMP, LIVE_RACE = "kernel", "dump", "live-race"
CATEGORIES = (KERNEL, DUMP, LIVE_RACE)


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    meaning: str
    kernels: str
    category: str = KERNEL


@dataclasses.dataclass
class Finding:
    rule: str
    severity: str
    pfn_start: int
    pfn_end: int
    message: str
    evidence: dict[str, Any]
    category: str = KERNEL

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RULES = [
    Rule(
        "online-memmap-not-sane",
        ERROR,
        "pfn_to_online_page() hands out a page whose memmap is not initialized or not sane "
        "(zeroed, poisoned, a zone id past the last zone other than the reserved-page signature below, "
        "a ZONE_DEVICE page without pgmap)",
        "all (v4.13+)",
    ),
    Rule(
        "reserved-page-past-last-zone",
        WARNING,
        "pfn_to_online_page() hands out PG_reserved pages with zone id MAX_NR_ZONES that no zone spans: "
        "stock kernels initialize memblock-reserved deferred pfns outside every zone that way "
        "(init_reserved_page() in 6.1 and 6.12, __init_deferred_page() in 7.3; unfixed as of 7.3), "
        "page_zone() on them indexes past node_zones[]",
        "all with CONFIG_DEFERRED_STRUCT_PAGE_INIT",
    ),
    Rule(
        "online-page-outside-zone",
        WARNING,
        "pfn_to_online_page() hands out a page whose (node, zone) does not span it "
        "(error unless the page is PG_reserved: boot holes are initialized outside zone spans)",
        "all",
    ),
    Rule(
        "online-device-page",
        ERROR,
        "pfn_to_online_page() hands out a ZONE_DEVICE page, or a pfn the pgmap registry claims "
        "(missing SECTION_TAINT_ZONE_DEVICE, or a pgmap being torn down: get_dev_pagemap() fails once "
        "memunmap_pages() killed its ref)",
        "v5.12+ (1f90a3477df3)",
    ),
    Rule(
        "online-memory-unreachable",
        ERROR,
        "initialized RAM in an online section for which pfn_to_online_page() returns NULL "
        "(its subsection bit is clear), unless PG_reserved (a hole)",
        "v5.12+ (9f9b02e5b346)",
    ),
    Rule(
        "memmap-unmapped",
        ERROR,
        "pfn_valid() accepts the pfn but the vmemmap page tables map nothing for its struct page: any "
        "pfn walker (online, offline or device pfn) that trusts pfn_valid() faults",
        "all",
    ),
    Rule(
        "section-inconsistent",
        ERROR,
        "section state contradicts itself: ONLINE without a memmap, memmap not at vmemmap, "
        "a valid non-early section without usage",
        "all",
    ),
    Rule(
        "section-taint-missing",
        ERROR,
        "a section holding the unaligned start or end of a registered device range lacks "
        "SECTION_TAINT_ZONE_DEVICE: once the section is online, pfn_to_online_page() hands out device pages",
        "v5.12+ (1f90a3477df3)",
    ),
    Rule(
        "section-taint-stale",
        WARNING,
        "a section carries SECTION_TAINT_ZONE_DEVICE but no registered device range lies in it: "
        "pfn_to_online_page() takes its get_dev_pagemap() slow path for nothing (the kernel never clears "
        "the taint, so this follows the removal of a device that shared the section)",
        "v5.12+ (1f90a3477df3)",
    ),
    Rule(
        "block-section-mismatch",
        ERROR,
        "a memory block's state contradicts its sections' ONLINE bits",
        "all",
    ),
    Rule(
        "device-pgmap-mismatch",
        ERROR,
        "an initialized ZONE_DEVICE data page whose pgmap is not the registry's for its pfn",
        "all (pgmap via the folio since v7.1)",
    ),
    Rule(
        "hotplugged-page-withheld",
        ERROR,
        "an online hotplugged page still marked as not given to the buddy (PG_reserved before v6.11, "
        "PageOffline since 503b158fc30f) that nothing explains: not self-hosted vmemmap, not "
        "driver-managed memory, not a driver's PageOffline page, not held back by a driver's "
        "online_page_callback, not a loaded kexec image's page",
        "all",
    ),
    Rule(
        "zone-block-mismatch",
        ERROR,
        "an initialized page's zone differs from the single zone of its online memory block",
        "all",
    ),
    Rule(
        "page-node-invalid",
        ERROR,
        "an initialized page names a node that is not online (no pglist_data)",
        "all",
    ),
    Rule(
        "page-node-block-mismatch",
        ERROR,
        "an initialized RAM page's node differs from its online memory block's node",
        "all",
    ),
    Rule(
        "dump-pages-missing",
        WARNING,
        "the dump (or /proc/kcore) does not hold these pfns' struct pages although the vmemmap maps them: "
        "their zone, node, flags and pgmap could not be checked",
        "all",
        DUMP,
    ),
    Rule(
        "kernel-data-unreadable",
        WARNING,
        "kernel memory the reader needed faulted (a page a filtered dump excluded, a structure freed during "
        "a live read): what it held (memory blocks, page maps, zones...) was not read or checked",
        "all",
        DUMP,
    ),
    Rule(
        "proposal-disagrees",
        INFO,
        "pfn_to_online_page() and the proposed pfn_active()-based answer differ (grouped by cause)",
        "all",
    ),
    Rule(
        "deferred-init",
        INFO,
        "deferred struct page init has not initialized these pfns yet: online sections, no memmap yet",
        "all (CONFIG_DEFERRED_STRUCT_PAGE_INIT)",
    ),
]
RULES_BY_ID = {r.id: r for r in RULES}


def grouped(seg: np.ndarray, mask: np.ndarray, key: Callable[[np.void], Any]) -> Iterator[tuple[int, int, Any]]:
    """(start, end, key) ranges of adjacent masked segments with equal key."""
    current: tuple[int, int, Any] | None = None
    for row in seg[mask]:
        start, end, k = int(row["pfn_start"]), int(row["pfn_end"]), key(row)
        if current and current[1] == start and current[2] == k:
            current = (current[0], end, k)
        else:
            if current:
                yield current
            current = (start, end, k)
    if current:
        yield current


def find(rule_id: str, start: int, end: int, message: str, **evidence: Any) -> Finding:
    """A finding of ``rule_id`` with the rule's severity and category."""
    rule = RULES_BY_ID[rule_id]
    return Finding(rule.id, rule.severity, start, end, message, evidence, rule.category)
