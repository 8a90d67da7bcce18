"""Audit rules: compare what the kernel would answer with what its memmap and bookkeeping say.

Each rule has an id, a severity, a one-line meaning and the kernels it holds for, and turns model
segments (see model.py) into findings with pfn ranges (end exclusive) and evidence. Adjacent segments
with the same finding are grouped into one range. ``docs/audit-rules.md`` explains each rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import model
from .state import Snapshot

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    severity: str
    meaning: str
    kernels: str


@dataclasses.dataclass
class Finding:
    rule: str
    severity: str
    pfn_start: int
    pfn_end: int
    message: str
    evidence: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


RULES = [
    Rule(
        "online-memmap-not-sane",
        ERROR,
        "pfn_to_online_page() hands out a page whose memmap is not initialized or not sane "
        "(zeroed, poisoned, unreadable, zone id past the last zone)",
        "all (v4.13+)",
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
        "(missing SECTION_TAINT_ZONE_DEVICE, or pgmap not found)",
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
        "section-inconsistent",
        ERROR,
        "section state contradicts itself: ONLINE without a memmap, memmap not at vmemmap, "
        "a valid non-early section without usage",
        "all",
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
        "all (pgmap via the folio since v7.x)",
    ),
    Rule(
        "hotplugged-page-withheld",
        ERROR,
        "an online hotplugged page still marked as not given to the buddy (PG_reserved before v6.11, "
        "PageOffline since 503b158fc30f), outside self-hosted vmemmap and driver-managed memory",
        "all",
    ),
    Rule(
        "zone-block-mismatch",
        ERROR,
        "an initialized page's zone differs from the single zone of its online memory block",
        "all",
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
        "deferred struct page init still runs: these pfns have online sections and no memmap yet",
        "all (CONFIG_DEFERRED_STRUCT_PAGE_INIT)",
    ),
]
RULES_BY_ID = {r.id: r for r in RULES}


def _grouped(seg: np.ndarray, mask: np.ndarray, key: Callable[[np.void], Any]) -> Iterator[tuple[int, int, Any]]:
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


def _find(rule_id: str, start: int, end: int, message: str, **evidence: Any) -> Finding:
    rule = RULES_BY_ID[rule_id]
    return Finding(rule.id, rule.severity, start, end, message, evidence)


def _zone_name(snapshot: Snapshot, zone_id: int) -> str:
    names = snapshot.layout.zone_names
    return names[zone_id] if 0 <= zone_id < len(names) else f"#{zone_id}"


def audit(snapshot: Snapshot, seg: np.ndarray | None = None) -> list[Finding]:
    """Every finding on a snapshot, sorted by pfn."""
    layout = snapshot.layout
    if seg is None:
        seg = model.segments(snapshot)
    findings: list[Finding] = []
    p2op = seg["pfn_to_online_page"] == 1
    inactive = seg["inactive"]
    bits = model.CAUSE_BITS
    zone_device = layout.zone_device if layout.zone_device is not None else -2

    insane = np.uint32(
        bits["zeroed"]
        | bits["poisoned"]
        | bits["zone-out-of-range"]
        | bits["memmap-unreadable"]
        | bits["device-zone-without-pgmap"]
    )
    mask = p2op & ((inactive & insane) != 0) & (seg["deferred"] == 0)
    for start, end, (cause_bits, zone_id) in _grouped(
        seg, mask, lambda r: (int(r["inactive"]) & int(insane), int(r["zone_id"]))
    ):
        findings.append(
            _find(
                "online-memmap-not-sane",
                start,
                end,
                f"pfn_to_online_page() returns pages whose memmap is {', '.join(model.causes(cause_bits))}"
                + (
                    f" (zone id {zone_id}, MAX_NR_ZONES {len(layout.zone_names)})"
                    if zone_id >= len(layout.zone_names)
                    else ""
                ),
                causes=model.causes(cause_bits),
                zone_id=zone_id,
            )
        )

    # a deferred pfn's memmap is not initialized yet: its content (zone, node) means nothing. The boot
    # memmap is allocated raw (memblock), so it may hold leftovers rather than zeros (seen under SeaBIOS).
    deferred = seg["deferred"] == 1
    outside = p2op & ((inactive & np.uint32(bits["outside-zone-span"])) != 0) & ((inactive & insane) == 0) & ~deferred
    for start, end, (zone_id, nid, reserved) in _grouped(
        seg, outside, lambda r: (int(r["zone_id"]), int(r["nid"]), int(r["reserved"]))
    ):
        f = _find(
            "online-page-outside-zone",
            start,
            end,
            f"pages of node {nid} zone {_zone_name(snapshot, zone_id)} outside that zone's span"
            + (" (PG_reserved: a hole initialized outside the zone)" if reserved else ""),
            zone_id=zone_id,
            nid=nid,
            reserved=bool(reserved),
        )
        if not reserved:
            f.severity = ERROR
        findings.append(f)

    device = p2op & (((seg["zone_id"] == zone_device) & ~deferred) | (seg["registry_pgmap"] != 0))
    for start, end, (zone_id, pgmap, taint) in _grouped(
        seg,
        device,
        lambda r: (
            int(r["zone_id"]),
            int(r["registry_pgmap"]),
            bool(int(r["section_flags"]) & layout.section_flags.get("SECTION_TAINT_ZONE_DEVICE", 0)),
        ),
    ):
        findings.append(
            _find(
                "online-device-page",
                start,
                end,
                "pfn_to_online_page() returns ZONE_DEVICE pages"
                + ("" if taint else " (section not tainted ZONE_DEVICE)"),
                zone_id=zone_id,
                registry_pgmap=hex(pgmap),
                section_tainted=taint,
            )
        )

    unreachable = (seg["proposed_online"] == 1) & ~p2op & (seg["online_section"] == 1) & (seg["reserved"] == 0)
    for start, end, section_nr in _grouped(seg, unreachable, lambda r: int(r["section_nr"])):
        findings.append(
            _find(
                "online-memory-unreachable",
                start,
                end,
                f"initialized RAM of online section {section_nr} that pfn_to_online_page() does not return",
                section=section_nr,
                subsection_valid=False,
            )
        )

    findings.extend(_section_findings(snapshot))
    findings.extend(_block_findings(snapshot, seg))

    data = (
        (seg["pfn_to_device_page"] == 1)
        & (seg["altmap_part"] == model.ALTMAP_NONE)
        & (seg["pgmap"] != seg["registry_pgmap"])
    )
    for start, end, (pgmap, registry) in _grouped(seg, data, lambda r: (int(r["pgmap"]), int(r["registry_pgmap"]))):
        findings.append(
            _find(
                "device-pgmap-mismatch",
                start,
                end,
                f"ZONE_DEVICE pages point to pgmap {pgmap:#x}, the registry has {registry:#x}",
                page_pgmap=hex(pgmap),
                registry_pgmap=hex(registry),
            )
        )

    findings.extend(_withheld_findings(snapshot, seg))
    findings.extend(_disagreements(seg))
    for start, end, _ in _grouped(seg, seg["deferred"] == 1, lambda r: 0):
        findings.append(_find("deferred-init", start, end, "deferred struct page init has not reached these pfns"))
    findings.sort(key=lambda f: (f.pfn_start, f.rule))
    return findings


def _section_findings(snapshot: Snapshot) -> Iterator[Finding]:
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
            yield _find(
                "section-inconsistent",
                s.start_pfn,
                end,
                f"section {s.nr}: " + "; ".join(problems),
                section=s.nr,
                flags=list(s.flags),
            )


def _block_findings(snapshot: Snapshot, seg: np.ndarray) -> Iterator[Finding]:
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
                    yield _find(
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
            yield _find(
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
    for start, end, (block_id, zone_id) in _grouped(seg, wrong, lambda r: (int(r["block"]), int(r["zone_id"]))):
        yield _find(
            "zone-block-mismatch",
            start,
            end,
            f"pages in zone {zone_names[zone_id]}, block {block_id} is in zone {block_zone[block_id]}",
            block=block_id,
            block_zone=block_zone[block_id],
            page_zone=zone_names[zone_id],
        )


def _driver_managed(snapshot: Snapshot) -> list[tuple[int, int]]:
    """pfn ranges of driver-managed System RAM (virtio-mem, dax kmem): drivers may withhold pages there."""
    shift = snapshot.layout.page_shift
    return [
        (r.start >> shift, r.end >> shift)
        for r in snapshot.resources
        if r.name.startswith("System RAM (") and r.name != "System RAM"
    ]


def _withheld_findings(snapshot: Snapshot, seg: np.ndarray) -> Iterator[Finding]:
    flags = snapshot.layout.section_flags
    early = (seg["section_flags"] & np.uint64(flags.get("SECTION_IS_EARLY", 0))) != 0
    marked = (seg["reserved"] == 1) | (seg["offline"] == 1)
    candidate = (seg["proposed_online"] == 1) & ~early & marked & (seg["self_hosted"] == 0)
    managed = _driver_managed(snapshot)
    starts = seg["pfn_start"]
    for a, b in managed:
        candidate &= ~((starts >= a) & (starts < b))
    for block in snapshot.blocks:
        if block.nr_vmemmap_pages:
            candidate &= ~((starts >= block.start_pfn) & (starts < block.start_pfn + block.nr_vmemmap_pages))
    for start, end, (reserved, offline) in _grouped(seg, candidate, lambda r: (int(r["reserved"]), int(r["offline"]))):
        marks = [m for m, on in (("PG_reserved", reserved), ("PageOffline", offline)) if on]
        yield _find(
            "hotplugged-page-withheld",
            start,
            end,
            f"online hotplugged pages still marked {'+'.join(marks)}",
            marks=marks,
        )


def _disagreements(seg: np.ndarray) -> Iterator[Finding]:
    differ = (seg["pfn_to_online_page"] != seg["proposed_online"]) & (seg["deferred"] == 0)
    for start, end, (kernel, cause_bits) in _grouped(
        seg, differ, lambda r: (int(r["pfn_to_online_page"]), int(r["inactive"]))
    ):
        why = model.causes(cause_bits) or ["active ZONE_DEVICE page"]
        yield _find(
            "proposal-disagrees",
            start,
            end,
            f"kernel: {'page' if kernel else 'NULL'}, proposal: {'NULL' if kernel else 'page'} ({', '.join(why)})",
            kernel=bool(kernel),
            causes=why,
        )


def summary(findings: list[Finding]) -> dict[str, Any]:
    by_rule: dict[str, dict[str, int]] = {}
    for f in findings:
        entry = by_rule.setdefault(f.rule, {"findings": 0, "pfns": 0})
        entry["findings"] += 1
        entry["pfns"] += f.pfn_end - f.pfn_start
    counts = {sev: sum(1 for f in findings if f.severity == sev) for sev in (ERROR, WARNING, INFO)}
    return {"by_severity": counts, "by_rule": by_rule}


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.severity == ERROR for f in findings) else 0
