"""Audit rules: compare what the kernel would answer with what its memmap and bookkeeping say.

Each rule has an id, a severity, a category, a one-line meaning and the kernels it holds for, and turns
model segments (see model.py) into findings with pfn ranges (end exclusive) and evidence. Adjacent
segments with the same finding are grouped into one range. ``docs/audit-rules.md`` explains each rule.
The verdict: :func:`exit_code` fails on findings at or above a severity (``--fail-on``, default error);
for a running kernel :func:`confirm` keeps an error only if a second read shows it again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import model
from ..state import Snapshot
from .bookkeeping import (
    block_findings,
    disagreements,
    invalid_node,
    node_findings,
    section_findings,
    taint_findings,
    withheld_findings,
)
from .rules import (
    CATEGORIES,
    DUMP,
    ERROR,
    INFO,
    KERNEL,
    LIVE_RACE,
    RULES,
    RULES_BY_ID,
    SEVERITIES,
    WARNING,
    Finding,
    Rule,
    find,
    grouped,
)

__all__ = [
    "CATEGORIES", "DUMP", "ERROR", "INFO", "KERNEL", "LIVE_RACE", "RULES", "RULES_BY_ID", "SEVERITIES",
    "WARNING", "Finding", "Rule", "audit", "confirm", "exit_code", "summary",
]  # fmt: skip


def _zone_name(snapshot: Snapshot, zone_id: int) -> str:
    names = snapshot.layout.zone_names
    return names[zone_id] if 0 <= zone_id < len(names) else f"#{zone_id}"


def _past_last_zone(snapshot: Snapshot, seg: np.ndarray) -> np.ndarray:
    """The stock-kernel signature of reserved pfns no zone spans: PG_reserved, zone id == MAX_NR_ZONES,
    and no zone of any node spans the pfn (init_reserved_page() and its 7.x successors)."""
    signature: np.ndarray = (seg["reserved"] == 1) & (seg["zone_id"] == len(snapshot.layout.zone_names))
    for z in snapshot.zones:
        if z.spanned:
            signature &= ~((seg["pfn_start"] < z.start_pfn + z.spanned) & (seg["pfn_end"] > z.start_pfn))
    return signature


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
    deferred = seg["deferred"] == 1

    insane = np.uint32(
        bits["zeroed"] | bits["poisoned"] | bits["zone-out-of-range"] | bits["device-zone-without-pgmap"]
    )
    past_last_zone = _past_last_zone(snapshot, seg)
    mask = p2op & ((inactive & insane) != 0) & ~deferred
    for start, end, (cause_bits, zone_id) in grouped(
        seg, mask & ~past_last_zone, lambda r: (int(r["inactive"]) & int(insane), int(r["zone_id"]))
    ):
        findings.append(
            find(
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
    for start, end, _ in grouped(seg, mask & past_last_zone, lambda r: 0):
        findings.append(
            find(
                "reserved-page-past-last-zone",
                start,
                end,
                f"pfn_to_online_page() returns PG_reserved pages with zone id {len(layout.zone_names)} "
                f"(MAX_NR_ZONES) that no zone spans: stock init_reserved_page() (7.x: __init_deferred_page())",
                zone_id=len(layout.zone_names),
            )
        )

    # a deferred pfn's memmap is not initialized yet: its content (zone, node) means nothing. The boot
    # memmap is allocated raw (memblock), so it may hold leftovers rather than zeros (seen under SeaBIOS).
    outside = p2op & ((inactive & np.uint32(bits["outside-zone-span"])) != 0) & ((inactive & insane) == 0) & ~deferred
    invalid = invalid_node(snapshot, seg)
    outside &= ~invalid  # page-node-invalid says more
    for start, end, (zone_id, nid, reserved) in grouped(
        seg, outside, lambda r: (int(r["zone_id"]), int(r["nid"]), int(r["reserved"]))
    ):
        f = find(
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
    for start, end, (zone_id, pgmap, taint, live) in grouped(
        seg,
        device,
        lambda r: (
            int(r["zone_id"]),
            int(r["registry_pgmap"]),
            bool(int(r["section_flags"]) & layout.section_flags.get("SECTION_TAINT_ZONE_DEVICE", 0)),
            bool(r["registry_live"]),
        ),
    ):
        if pgmap and not live:
            why = " (its pgmap is being torn down: memunmap_pages() killed the ref, get_dev_pagemap() fails)"
        else:
            why = "" if taint else " (section not tainted ZONE_DEVICE)"
        findings.append(
            find(
                "online-device-page",
                start,
                end,
                "pfn_to_online_page() returns ZONE_DEVICE pages" + why,
                zone_id=zone_id,
                registry_pgmap=hex(pgmap),
                section_tainted=taint,
                pgmap_ref_live=bool(live) if pgmap else None,
            )
        )

    unreachable = (seg["proposed_online"] == 1) & ~p2op & (seg["online_section"] == 1) & (seg["reserved"] == 0)
    for start, end, section_nr in grouped(seg, unreachable, lambda r: int(r["section_nr"])):
        findings.append(
            find(
                "online-memory-unreachable",
                start,
                end,
                f"initialized RAM of online section {section_nr} that pfn_to_online_page() does not return",
                section=section_nr,
                subsection_valid=False,
            )
        )

    unmapped = (inactive & np.uint32(bits["memmap-unmapped"])) != 0
    for start, end, (online, device_pfn) in grouped(
        seg, unmapped, lambda r: (int(r["online_section"]), int(r["registry_pgmap"] != 0))
    ):
        kind = "device" if device_pfn else ("online" if online else "offline")
        findings.append(
            find(
                "memmap-unmapped",
                start,
                end,
                f"pfn_valid() accepts these {kind} pfns but their struct pages are not mapped (vmemmap hole)",
                kind=kind,
            )
        )
    missing = (inactive & np.uint32(bits["memmap-unreadable"])) != 0
    source = snapshot.source.get("kind", "vmcore")
    holder = "/proc/kcore" if source == "live" else ("the guest" if source == "qemu" else "the dump")
    for start, end, _ in grouped(seg, missing, lambda r: 0):
        findings.append(
            find(
                "dump-pages-missing",
                start,
                end,
                f"{holder} does not hold these pfns' struct pages: zone, node, flags and pgmap not checked",
                source=source,
            )
        )

    findings.extend(section_findings(snapshot))
    findings.extend(taint_findings(snapshot))
    findings.extend(block_findings(snapshot, seg))
    findings.extend(node_findings(snapshot, seg, invalid))

    data = (
        (seg["pfn_to_device_page"] == 1)
        & (seg["altmap_part"] == model.ALTMAP_NONE)
        & (seg["pgmap"] != seg["registry_pgmap"])
    )
    registry = {p.address: p for p in snapshot.pagemaps}
    for start, end, (pgmap, registered) in grouped(seg, data, lambda r: (int(r["pgmap"]), int(r["registry_pgmap"]))):
        points_to = snapshot.pgmap_pointers.get(pgmap) or (
            "a registered pgmap of another range" if pgmap in registry else "no registered pgmap"
        )
        order = registry[registered].vmemmap_shift if registered in registry else 0
        compound = (
            f"; the range has compound pages of order {order}, so these pages read their own pgmap: they carry "
            "no tail marker, a memmap memmap_init_zone_device() did not initialize"
            if order
            else ""
        )
        findings.append(
            find(
                "device-pgmap-mismatch",
                start,
                end,
                f"ZONE_DEVICE pages point to pgmap {pgmap:#x} ({points_to}), the registry has {registered:#x}"
                + compound,
                page_pgmap=hex(pgmap),
                registry_pgmap=hex(registered),
                page_pgmap_points_to=points_to,
                compound_order=order,
            )
        )

    findings.extend(withheld_findings(snapshot, seg))
    findings.extend(disagreements(seg))
    for start, end, _ in grouped(seg, deferred, lambda r: 0):
        findings.append(find("deferred-init", start, end, "deferred struct page init has not reached these pfns"))
    findings.extend(find("kernel-data-unreadable", 0, 0, note) for note in snapshot.unreadable)
    findings.sort(key=lambda f: (f.pfn_start, f.rule))
    return findings


def summary(findings: list[Finding]) -> dict[str, Any]:
    by_rule: dict[str, dict[str, int]] = {}
    for f in findings:
        entry = by_rule.setdefault(f.rule, {"findings": 0, "pfns": 0})
        entry["findings"] += 1
        entry["pfns"] += f.pfn_end - f.pfn_start
    counts = {sev: sum(1 for f in findings if f.severity == sev) for sev in SEVERITIES}
    categories = {cat: sum(1 for f in findings if f.category == cat) for cat in CATEGORIES}
    return {"by_severity": counts, "by_category": categories, "by_rule": by_rule}


def exit_code(findings: list[Finding], fail_on: str = ERROR) -> int:
    """1 when a finding is at least as serious as ``fail_on`` (error, warning or info), else 0."""
    failing = SEVERITIES[: SEVERITIES.index(fail_on) + 1]
    return 1 if any(f.severity in failing for f in findings) else 0


def finding_key(finding: Finding) -> tuple[str, int, int]:
    return (finding.rule, finding.pfn_start, finding.pfn_end)


def confirm(first: list[Finding], second: list[Finding]) -> list[Finding]:
    """The first read's findings, each error checked against a second read of the same running kernel:
    an error the second read shows again (same rule, same pfns) stays an error; one it does not is a
    transient state caught mid-change (onlining, memremap_pages(), ...): a ``live-race`` warning."""
    again = {finding_key(f) for f in second if f.severity == ERROR}
    out = []
    for f in first:
        if f.severity == ERROR and finding_key(f) not in again:
            f.severity, f.category = WARNING, LIVE_RACE
            f.message += " (gone in a second read: a transient state of the running kernel)"
            f.evidence["confirmed"] = False
        elif f.severity == ERROR:
            f.evidence["confirmed"] = True
        out.append(f)
    return out
