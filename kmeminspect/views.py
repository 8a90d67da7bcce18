"""The read-only views every front end prints: the CLI, the drgn command ``%kmeminspect`` and the library's
``explain_pfns``. Each view is the command's ``--json`` object and a function making its terminal table.
No click here (the CLI only parses and prints), no drgn (a Program is passed in where one is needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from . import audit as audit_mod
from . import model
from .errors import UsageError
from .files import write_atomically
from .nodes import section_nids
from .state import MEMMAP_NAMES, MEMMAP_NOT_IN_DUMP, Snapshot

#: what a command prints: its ``--json`` object, and a function making its table for a terminal
View = tuple[dict[str, Any], Callable[[], str]]


SECTION_LETTERS = {
    "SECTION_MARKED_PRESENT": "P",
    "SECTION_HAS_MEM_MAP": "M",
    "SECTION_IS_ONLINE": "O",
    "SECTION_IS_EARLY": "E",
    "SECTION_TAINT_ZONE_DEVICE": "D",
    "SECTION_IS_VMEMMAP_PREINIT": "V",
}


def struct_page(prog: Any, snap: Snapshot, pfn: int) -> dict[str, Any] | None:
    """The full decode of one struct page of the kernel open in ``prog`` (a drgn Program), or None if its
    memmap cannot be read."""
    from .kernel.layout import page_format
    from .kernel.pages import describe_page

    return describe_page(prog, snap.layout, page_format(prog, len(snap.layout.zone_names)), pfn)


# -- sections ---------------------------------------------------------------------------------------


def _state_letters(flags: tuple[str, ...]) -> str:
    return "".join(letter for name, letter in SECTION_LETTERS.items() if name in flags)


def sections_view(snap: Snapshot) -> View:
    """`sections`: one row per present section, as JSON data and as a table."""
    nids = section_nids(snap)
    mask = snap.layout.section_flags["SECTION_MAP_MASK"]
    rows: list[dict[str, Any]] = [
        {
            "nr": s.nr,
            "start_pfn": s.start_pfn,
            "nr_pages": s.nr_pages,
            "flags": list(s.flags),
            "subsection_map": hex(s.subsection_map),
            "nid": nids[s.nr],
            "section": hex(s.address),
            "coded_mem_map": hex(s.section_mem_map & mask),
            "mem_map": hex(s.memmap),
        }
        for s in snap.sections
    ]

    def table() -> str:
        return (
            tabulate(
                [
                    [
                        r["nr"],
                        f"{int(r['section'], 16):x}",
                        f"{int(r['coded_mem_map'], 16):x}",
                        f"{int(r['mem_map'], 16):x}",
                        _state_letters(tuple(r["flags"])),
                        r["start_pfn"],
                        f"{int(r['subsection_map'], 16):016x}",
                        "-" if r["nid"] is None else r["nid"],
                    ]
                    for r in rows
                ],
                headers=[
                    "NR",
                    "SECTION",
                    "CODED_MEM_MAP",
                    "MEM_MAP",
                    "STATE",
                    "PFN",
                    "SUBSECTIONS",
                    "NID",
                ],
                colalign=("right", "left", "left", "left", "left", "right", "left", "right"),
            )
            + "\nSTATE: P present, M has memmap, O online, E early, D tainted ZONE_DEVICE, V vmemmap preinit"
        )

    return {"sections": rows}, table


# -- blocks -----------------------------------------------------------------------------------------


def blocks_view(snap: Snapshot) -> View:
    """`blocks`: one row per memory block, as JSON data and as a table."""
    shift = snap.layout.page_shift
    rows = [
        {
            "id": b.id,
            "start_pfn": b.start_pfn,
            "nr_pages": b.nr_pages,
            "phys_start": hex(b.start_pfn << shift),
            "phys_end": hex((b.start_pfn + b.nr_pages) << shift),
            "state": b.state,
            "online_type": b.online_type,
            "zone": b.zone,
            "nid": b.nid,
            "nr_vmemmap_pages": b.nr_vmemmap_pages,
        }
        for b in snap.blocks
    ]

    def table() -> str:
        return tabulate(
            [
                [
                    r["id"],
                    f"{r['phys_start']}-{r['phys_end']}",
                    r["state"],
                    r["zone"] or "-",
                    r["nid"],
                    r["online_type"] or "-",
                    r["nr_vmemmap_pages"],
                ]
                for r in rows
            ],
            headers=["BLOCK", "RANGE", "STATE", "ZONE", "NODE", "ONLINE_TYPE", "VMEMMAP"],
        )

    return {"blocks": rows}, table


# -- pfn --------------------------------------------------------------------------------------------


#: no pfn or address given to kmeminspect reaches 2^64 (a 64-bit physical address space at most)
NUMBER_LIMIT = 1 << 64


def parse_pfns(text: str, what: str = "pfn") -> tuple[int, int, bool]:
    """PFN or START-END (END exclusive; hex with 0x or decimal) -> (start, end, is_range). ``what`` names
    the numbers in errors ("physical address" for ``pfn --phys``)."""

    def number(part: str) -> int:
        try:
            value = int(part.strip(), 0)
        except ValueError:
            raise UsageError(f"'{part}' is not a {what} (decimal, or hex with 0x)") from None
        if value >= NUMBER_LIMIT:
            raise UsageError(f"{part} is not a {what}: no 64-bit machine has one that large")
        return value

    if "-" in text.strip().lstrip("-"):
        a, _, b = text.strip().partition("-")
        start, end = number(a), number(b)
        if start < 0:
            raise UsageError(f"'{text}' is not a {what} range")
        if end <= start:
            raise UsageError(f"empty range {text}: END is exclusive and must be above START")
        return start, end, True
    pfn = number(text)
    if pfn < 0:
        raise UsageError(f"'{text}' is not a {what}")
    return pfn, pfn + 1, False


MARKS = [
    ("reserved", "PG_reserved"),
    ("offline", "PageOffline"),
    ("self_hosted", "PG_vmemmap_self_hosted"),
    ("hwpoison", "PG_hwpoison"),
]


def _memmap_name(snap: Snapshot, memmap: int) -> str:
    """What the reader could say about a memmap; mapped but unreadable means different things live."""
    if memmap == MEMMAP_NOT_IN_DUMP and snap.source.get("kind") == "live":
        return "not-readable-live"  # /proc/kcore does not map ZONE_DEVICE memory (drgn issue 27)
    return MEMMAP_NAMES[memmap]


def describe(snap: Snapshot, row: np.void) -> dict[str, Any]:
    """What ``pfn`` says of one segment of a snapshot (``model.segments``): predicates, zone, node, memmap,
    flags."""
    layout = snap.layout
    zone_id = int(row["zone_id"])
    start = int(row["pfn_start"])
    return {
        "section_nr": start >> (layout.section_size_bits - layout.page_shift),
        "subsection": (start % layout.pages_per_section) // layout.pages_per_subsection,
        "pfn_valid": bool(row["pfn_valid"]),
        "pfn_section_valid": bool(row["subsection_valid"]),
        "online_section": bool(row["online_section"]),
        "pfn_to_online_page": bool(row["pfn_to_online_page"]),
        "pfn_active": bool(row["pfn_active"]),
        "pfn_to_device_page": bool(row["pfn_to_device_page"]),
        "inactive_causes": model.causes(int(row["inactive"])),
        "zone": layout.zone_names[zone_id] if 0 <= zone_id < len(layout.zone_names) else None,
        "zone_id": zone_id if zone_id >= 0 else None,
        "nid": int(row["nid"]) if row["nid"] >= 0 else None,
        "memmap": _memmap_name(snap, int(row["memmap"])),
        "flags": [name for field, name in MARKS if row[field]],
        "pgmap": hex(int(row["pgmap"])) if row["pgmap"] else None,
        "block": int(row["block"]) if row["block"] >= 0 else None,
    }


def pfn_view(snap: Snapshot, start: int, end: int, is_range: bool, prog: Any = None) -> View:
    """`pfn`: explain pfns [start, end) of a snapshot read for that range, as JSON data and as text.

    A single pfn (not ``is_range``) gets the full decode of its struct page when ``prog``, the drgn Program
    the snapshot was read from, is given; a range prints runs of identical state."""
    limit = snap.layout.pfn_limit
    if end > limit:
        bits = snap.layout.max_physmem_bits
        raise UsageError(
            f"pfn {max(start, limit - 1):#x} is beyond what the architecture can address "
            f"(MAX_PHYSMEM_BITS {bits}: pfns end at {limit:#x}); give a pfn below that"
        )
    seg = model.segments(snap, start, end, clip=False)
    runs: list[dict[str, Any]] = []
    for row in seg:
        d = describe(snap, row)
        key = {k: v for k, v in d.items() if k not in ("section_nr", "subsection")}
        if runs and runs[-1]["_key"] == key and runs[-1]["pfn_end"] == int(row["pfn_start"]):
            runs[-1]["pfn_end"] = int(row["pfn_end"])
        else:
            runs.append({"pfn_start": int(row["pfn_start"]), "pfn_end": int(row["pfn_end"]), **d, "_key": key})
    for r in runs:
        del r["_key"]
    if not is_range:
        single = dict(runs[0], pfn=start)
        del single["pfn_start"], single["pfn_end"]
        page = struct_page(prog, snap, start) if prog is not None and single["memmap"] == "read" else None
        if page is not None:
            kind = page["page_type"]
            single["flags"] = page.pop("flags") + ([f"Page{kind.capitalize()}"] if kind else [])
            single["page"] = page
        return {"pfns": [single]}, lambda: "\n".join(f"{k:20} {v}" for k, v in single.items())

    def table() -> str:
        return tabulate(
            [
                [
                    f"{r['pfn_start']:#x}-{r['pfn_end']:#x}",
                    r["pfn_end"] - r["pfn_start"],
                    "y" if r["pfn_valid"] else "-",
                    "y" if r["online_section"] else "-",
                    "y" if r["pfn_to_online_page"] else "-",
                    "y" if r["pfn_active"] else "-",
                    r["zone"] or "-",
                    "-" if r["nid"] is None else r["nid"],
                    ",".join(r["flags"]) or "-",
                    ",".join(r["inactive_causes"]) or "-",
                ]
                for r in runs
            ],
            headers=[
                "PFNS",
                "PAGES",
                "VALID",
                "ONLINE_SEC",
                "ONLINE_PAGE",
                "ACTIVE",
                "ZONE",
                "NID",
                "FLAGS",
                "WHY_INACTIVE",
            ],
        )

    return {"runs": runs}, table


# -- audit ------------------------------------------------------------------------------------------


def audit_view(snap: Snapshot, findings: list[audit_mod.Finding], errors_only: bool) -> View:
    """`audit`: the findings of a snapshot (error findings only with ``errors_only``), as JSON data and as a
    table."""
    shown = [f for f in findings if not errors_only or f.severity == audit_mod.ERROR]
    data = {
        "kernel": snap.layout.release,
        "findings": [f.to_json() for f in shown],
        "summary": audit_mod.summary(findings),
    }

    def table() -> str:
        if not shown:
            return f"{snap.layout.release}: no findings"
        body = tabulate(
            [
                [
                    f.severity,
                    f.category,
                    f.rule,
                    f"{f.pfn_start:#x}-{f.pfn_end:#x}",
                    f.pfn_end - f.pfn_start,
                    f.message,
                ]
                for f in shown
            ],
            headers=["SEVERITY", "CATEGORY", "RULE", "PFNS", "PAGES", "MESSAGE"],
            maxcolwidths=[None, None, None, None, None, 64],
        )
        counts = audit_mod.summary(findings)["by_severity"]
        tally = ", ".join(f"{counts[s]} {s}" for s in audit_mod.SEVERITIES)
        return f"{body}\n{snap.layout.release}: {tally}"

    return data, table


def map_view(snap: Snapshot, html_file: str | None, colour: bool) -> View:
    """`map`: the snapshot's sections x subsections as JSON data and as a terminal drawing (coloured with
    ``colour``); with ``html_file``, also written there as an HTML page."""
    from . import memorymap

    drawing = memorymap.build(snap)
    if html_file:
        try:
            write_atomically(Path(html_file), memorymap.render_html(drawing).encode())
        except OSError as error:
            raise UsageError(f"cannot write {html_file}: {error.strerror}; choose a writable path") from None
    return drawing.to_json(), lambda: memorymap.render_terminal(drawing, colour)


def rules_view() -> View:
    """`audit --rules`: every audit rule with its severity and meaning."""
    rules = [
        {"rule": r.id, "severity": r.severity, "category": r.category, "meaning": r.meaning, "kernels": r.kernels}
        for r in audit_mod.RULES
    ]
    return {"rules": rules}, lambda: tabulate(
        [[r["rule"], r["severity"], r["category"], r["meaning"]] for r in rules],
        headers=["RULE", "SEVERITY", "CATEGORY", "MEANING"],
        maxcolwidths=[None, None, None, 72],
    )


# -- snapshots and the machine --------------------------------------------------------------------------


def diff_view(d: dict[str, Any]) -> View:
    """`diff`: what changed between two snapshots (``snapshot.diff``'s object), as JSON data and as lines."""

    def table() -> str:
        lines = [
            f"section {s['nr']}: {s['change']}" + (f" {s.get('flags')}" if "flags" in s else "") for s in d["sections"]
        ]
        lines += [
            f"block {b['id']}: {b['change']}" + (f" {b.get('state')}" if "state" in b else "") for b in d["blocks"]
        ]
        lines += [f"pagemap {p['address']}: {p['change']}" for p in d["pagemaps"]]
        lines += [f"pfns {r['pfn_start']:#x}-{r['pfn_end']:#x}: {', '.join(r['fields'])}" for r in d["runs"]]
        return "\n".join(lines) or "no differences"

    return d, table


def doctor_view(results: list[Any]) -> View:
    """`doctor`: each check (``doctor.Check``) as JSON data and as a table."""
    data = {"checks": [dataclasses.asdict(c) for c in results]}

    def table() -> str:
        rows = [[("ok" if c.ok else "MISSING"), c.name, c.detail, c.needed_for, c.fix or ""] for c in results]
        return tabulate(rows, headers=["", "CHECK", "FOUND", "NEEDED FOR", "FIX"])

    return data, table
