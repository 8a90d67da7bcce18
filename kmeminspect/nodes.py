"""The node of each present section, inferred from a snapshot (the model layer: numpy, no drgn).

The kernel keeps no node in ``struct mem_section`` once boot is over (``section_to_node_table`` exists only
without SPARSEMEM_VMEMMAP's node-in-page-flags), so ``sections`` and the map take a section's node from its
first initialized page, else from the memory block that holds it.
"""

from __future__ import annotations

import numpy as np

from .state import Snapshot


def section_nids(snapshot: Snapshot) -> dict[int, int | None]:
    """A section's node: sections keep none after boot; take it from the first initialized page,
    else from its memory block."""
    runs = snapshot.runs
    per = snapshot.layout.pages_per_section
    starts = np.array([s.start_pfn for s in snapshot.sections], dtype=np.uint64)
    initialized = runs[(runs["nid"] >= 0) & (runs["zeroed"] == 0)]
    # the first initialized run ending after a section's start, if it starts inside the section
    first = np.searchsorted(initialized["pfn_end"], starts, side="right")
    found = first < initialized.size
    found[found] = initialized["pfn_start"][first[found]] < starts[found] + np.uint64(per)
    page_nid = initialized["nid"][np.minimum(first, max(initialized.size - 1, 0))] if initialized.size else first
    # a zeroed (offline) memmap: the memory block records the node (blocks do not overlap)
    blocks = sorted(snapshot.blocks, key=lambda b: b.start_pfn)
    block_starts = np.array([b.start_pfn for b in blocks], dtype=np.uint64)
    which = np.searchsorted(block_starts, starts, side="right") - 1
    result: dict[int, int | None] = {}
    for i, s in enumerate(snapshot.sections):
        if found[i]:
            result[s.nr] = int(page_nid[i])
            continue
        b = blocks[which[i]] if which[i] >= 0 else None
        result[s.nr] = b.nid if b is not None and s.start_pfn < b.start_pfn + b.nr_pages else None
    return result
