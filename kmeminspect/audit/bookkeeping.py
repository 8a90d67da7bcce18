"""Audit rules on the kernel's bookkeeping around the memmap: sections and their device taint, memory
blocks, nodes, and pages kept back from the buddy allocator."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .. import model
from ..state import MEMMAP_READ, Snapshot
from .rules import Finding, find, grouped


def section_findings(snapshot: Snapshot) -> Iterator[Finding]:
    """``section-inconsistent``: a section's own flags, memmap and usage contradict each other."""
    layout = snapshot.layout
    for s in snapshot.sections:
        end = s.start_pfn + s.nr_pages
        problems = []
        if s.has("SECTION_IS_ONLINE") and not s.has("SECTION_HAS_MEM_MAP"):
            problems.append("ONLINE without HAS_MEM_MAP")
        if s.has("SECTION_HAS_MEM_MAP"):
            expected = (layout.vmemmap_base + s.start_pfn * layout.struct_page_size) & 0xFFFFFFFFFFFFFFFF
            if s.memmap != expected:
                problems.append(f"memmap {s.memmap:#x} is not vmemmap's {expected:#x}")
            if not s.usage:
                problems.append("valid section without mem_section_usage")
            elif not s.subsection_map and not s.has("SECTION_IS_EARLY"):
                problems.append("valid non-early section with an empty subsection map")
        if problems:
            yield find(
                "section-inconsistent",
                s.start_pfn,
                end,
                f"section {s.nr}: " + "; ".join(problems),
                section=s.nr,
                flags=list(s.flags),
            )


def taint_findings(snapshot: Snapshot) -> Iterator[Finding]:
    """``section-taint-missing`` and ``section-taint-stale``: SECTION_TAINT_ZONE_DEVICE against the
    pgmap registry. move_pfn_range_to_zone() taints the sections of a device range's unaligned start and
    end (v5.12 1f90a3477df3); nothing ever clears the taint."""
    if "SECTION_TAINT_ZONE_DEVICE" not in snapshot.layout.section_flags:
        return
    per = snapshot.layout.pages_per_section
    by_nr = {s.nr: s for s in snapshot.sections}
    needs_taint: dict[int, list[str]] = {}
    holds_device: set[int] = set()
    for p in snapshot.pagemaps:
        for start, end in p.ranges:
            holds_device.update(range(start // per, (end - 1) // per + 1))
            if start % per:
                needs_taint.setdefault(start // per, []).append(f"start {start:#x} of pgmap {p.address:#x}")
            if end % per:
                needs_taint.setdefault(end // per, []).append(f"end {end:#x} of pgmap {p.address:#x}")
    for nr, why in sorted(needs_taint.items()):
        s = by_nr.get(nr)
        if s is not None and not s.has("SECTION_TAINT_ZONE_DEVICE"):
            yield find(
                "section-taint-missing",
                s.start_pfn,
                s.start_pfn + s.nr_pages,
                f"section {nr} holds the unaligned {', '.join(why)} but is not tainted ZONE_DEVICE",
                section=nr,
                device_edges=why,
            )
    for s in snapshot.sections:
        if s.has("SECTION_TAINT_ZONE_DEVICE") and s.nr not in holds_device:
            yield find(
                "section-taint-stale",
                s.start_pfn,
                s.start_pfn + s.nr_pages,
                f"section {s.nr} is tainted ZONE_DEVICE but no registered device range lies in it",
                section=s.nr,
            )


def block_findings(snapshot: Snapshot, seg: np.ndarray) -> Iterator[Finding]:
    """``block-section-mismatch`` and ``zone-block-mismatch``: memory blocks against sections and pages."""
    by_nr = {s.nr: s for s in snapshot.sections}
    per = snapshot.layout.pages_per_section
    zone_names = snapshot.layout.zone_names
    page_zone = np.array([zone_names[z] if 0 <= z < len(zone_names) else "?" for z in range(-1, 128)])
    seg_zone = page_zone[np.clip(seg["zone_id"].astype(np.int64), -1, 126) + 1]
    for b in snapshot.blocks:
        nrs = range(b.start_pfn // per, (b.start_pfn + b.nr_pages) // per)
        sections = [by_nr[n] for n in nrs if n in by_nr]
        if b.state == "online":
            # hotplugged sections of an online block have every subsection not claimed by a pgmap
            for s in sections:
                if s.has("SECTION_IS_EARLY"):
                    continue
                missing = [i for i in range(snapshot.layout.subsections_per_section) if not (s.subsection_map >> i) & 1]
                sub = snapshot.layout.pages_per_subsection
                claimed = {
                    i for i in missing for p in snapshot.pagemaps for a, z in p.ranges if a <= s.start_pfn + i * sub < z
                }
                holes = [i for i in missing if i not in claimed]
                if holes:
                    yield find(
                        "block-section-mismatch",
                        s.start_pfn + holes[0] * sub,
                        s.start_pfn + (holes[-1] + 1) * sub,
                        f"block {b.id} is online but section {s.nr} has no memmap for subsections {holes}",
                        block=b.id,
                        section=s.nr,
                        subsections=holes,
                    )
        # an online block's sections are all online; an offline block's are all offline
        contrary = [s.nr for s in sections if s.has("SECTION_IS_ONLINE") != (b.state == "online")]
        if b.state in ("online", "offline") and contrary:
            yield find(
                "block-section-mismatch",
                b.start_pfn,
                b.start_pfn + b.nr_pages,
                f"block {b.id} is {b.state} but sections {contrary} are "
                + ("not" if b.state == "online" else "online"),
                block=b.id,
                sections=contrary,
            )
    # initialized pages whose zone is not the single zone of their online block (one pass over segments)
    block_zone = {b.id: b.zone for b in snapshot.blocks if b.state == "online" and b.zone is not None}
    seg_block_zone = np.array([block_zone.get(int(i)) or "" for i in seg["block"]], dtype=object)
    wrong = (seg_block_zone != "") & (seg["pfn_active"] == 1) & (seg["proposed_online"] == 1)
    wrong &= seg_zone != seg_block_zone
    for start, end, (block_id, zone_id) in grouped(seg, wrong, lambda r: (int(r["block"]), int(r["zone_id"]))):
        yield find(
            "zone-block-mismatch",
            start,
            end,
            f"pages in zone {zone_names[zone_id]}, block {block_id} is in zone {block_zone[block_id]}",
            block=block_id,
            block_zone=block_zone[block_id],
            page_zone=zone_names[zone_id],
        )


def node_findings(snapshot: Snapshot, seg: np.ndarray, invalid: np.ndarray) -> Iterator[Finding]:
    """``page-node-invalid`` and ``page-node-block-mismatch``: the node stored in initialized pages.

    A node id no online node has also makes the page fall outside every zone span (so never active): the
    first rule judges pages the kernel treats as initialized (online section or registered device pfn)
    whose content reads as written by it, however their node reads (``invalid``: :func:`invalid_node`)."""
    active = seg["pfn_active"] == 1
    nids = np.array(sorted(n.nid for n in snapshot.nodes), dtype=np.int64)
    if nids.size:
        for start, end, nid in grouped(seg, invalid, lambda r: int(r["nid"])):
            yield find(
                "page-node-invalid",
                start,
                end,
                f"initialized pages of node {nid}, which is not online (online: {nids.tolist()})",
                nid=nid,
                online_nodes=nids.tolist(),
            )
    block_nid = {b.id: b.nid for b in snapshot.blocks if b.state == "online" and b.nid >= 0}
    if not block_nid:
        return
    ids = np.array(sorted(block_nid), dtype=np.int64)
    values = np.array([block_nid[i] for i in ids.tolist()], dtype=np.int64)
    where = np.minimum(np.searchsorted(ids, seg["block"]), ids.size - 1)
    has_block = ids[where] == seg["block"]
    expected = np.where(has_block, values[where], -1)
    wrong = active & (seg["proposed_online"] == 1) & has_block & (seg["nid"].astype(np.int64) != expected)
    wrong &= ~invalid  # already page-node-invalid
    for start, end, (block_id, nid) in grouped(seg, wrong, lambda r: (int(r["block"]), int(r["nid"]))):
        yield find(
            "page-node-block-mismatch",
            start,
            end,
            f"pages of node {nid} in block {block_id}, which belongs to node {block_nid[block_id]}",
            block=block_id,
            page_nid=nid,
            block_nid=block_nid[block_id],
        )


def invalid_node(snapshot: Snapshot, seg: np.ndarray) -> np.ndarray:
    """Pages whose read, non-zero content names a node with no ``pglist_data``, where the kernel treats
    the memmap as initialized: online sections and registered device ranges (deferred pfns excepted)."""
    nids = np.array(sorted(n.nid for n in snapshot.nodes), dtype=np.int64)
    content = (seg["memmap"] == MEMMAP_READ) & (seg["zeroed"] == 0) & (seg["poisoned"] == 0)
    judged = content & (seg["deferred"] == 0) & ((seg["online_section"] == 1) | (seg["registry_pgmap"] != 0))
    if not nids.size:
        return np.zeros(seg.size, dtype=bool)
    result: np.ndarray = judged & ~np.isin(seg["nid"].astype(np.int64), nids)
    return result


def _driver_managed(snapshot: Snapshot) -> list[tuple[int, int]]:
    """pfn ranges of driver-managed System RAM (virtio-mem, dax kmem): drivers may withhold pages there."""
    shift = snapshot.layout.page_shift
    return [
        (r.start >> shift, r.end >> shift)
        for r in snapshot.resources
        if r.name.startswith("System RAM (") and r.name != "System RAM"
    ]


#: what the kernel's own online_pages() uses when no driver installed an online_page_callback
GENERIC_ONLINE_PAGE = "generic_online_page"


def withheld_findings(snapshot: Snapshot, seg: np.ndarray) -> Iterator[Finding]:
    """``hotplugged-page-withheld``: online hotplugged pages still marked PG_reserved or PageOffline that
    no legitimate owner explains. The explanations, in order:

    - the block's self-hosted vmemmap pages (memmap_on_memory);
    - driver-managed System RAM (``System RAM (virtio_mem)``, ``System RAM (kmem)``);
    - PageOffline itself: the kernel's mark for a page a driver owns (balloon inflation, virtio-mem),
      the only one a balloon sets;
    - a driver's ``online_page_callback`` (hv_balloon, xen's balloon) holding back parts of plain System
      RAM it hot-added;
    - a loaded kexec image's pages (``kimage_alloc_pages()`` sets PG_reserved).
    """
    flags = snapshot.layout.section_flags
    early = (seg["section_flags"] & np.uint64(flags.get("SECTION_IS_EARLY", 0))) != 0
    # PageOffline is explained by definition (a driver owns the page): only PG_reserved is a candidate
    candidate = (seg["proposed_online"] == 1) & ~early & (seg["reserved"] == 1) & (seg["offline"] == 0)
    candidate &= seg["self_hosted"] == 0
    starts = seg["pfn_start"]
    for a, b in _driver_managed(snapshot):
        candidate &= ~((starts >= a) & (starts < b))
    for block in snapshot.blocks:
        if block.nr_vmemmap_pages:
            candidate &= ~((starts >= block.start_pfn) & (starts < block.start_pfn + block.nr_vmemmap_pages))
    callback = snapshot.online_page_callback
    if callback is not None and callback != GENERIC_ONLINE_PAGE:
        return  # a driver decides which pages of what it onlines go to the buddy
    for claim in snapshot.claims:
        candidate &= ~((starts >= claim.start_pfn) & (starts < claim.end_pfn))
    ruled_out = [
        "not self-hosted vmemmap",
        "not driver-managed memory",
        "not PageOffline",
        f"online_page_callback is {callback or 'unknown'}",
        f"no kexec image page ({len(snapshot.claims)} claimed ranges)",
    ]
    for start, end, _ in grouped(seg, candidate, lambda r: 0):
        yield find(
            "hotplugged-page-withheld",
            start,
            end,
            "online hotplugged pages still marked PG_reserved (" + "; ".join(ruled_out) + ")",
            marks=["PG_reserved"],
            ruled_out=ruled_out,
        )


def disagreements(seg: np.ndarray) -> Iterator[Finding]:
    """``proposal-disagrees``: where the kernel's pfn_to_online_page() and the proposal's part."""
    differ = (seg["pfn_to_online_page"] != seg["proposed_online"]) & (seg["deferred"] == 0)
    for start, end, (kernel, cause_bits, onlining) in grouped(
        seg, differ, lambda r: (int(r["pfn_to_online_page"]), int(r["inactive"]), int(r["block_onlining"]))
    ):
        why = model.causes(cause_bits) or (
            ["memory block being onlined: memmap initialized, section not online yet"]
            if onlining
            else ["active ZONE_DEVICE page"]
        )
        yield find(
            "proposal-disagrees",
            start,
            end,
            f"kernel: {'page' if kernel else 'NULL'}, proposal: {'NULL' if kernel else 'page'} ({', '.join(why)})",
            kernel=bool(kernel),
            causes=why,
        )
