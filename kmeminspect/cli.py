"""The ``kmeminspect`` command: formatting only. Reading is in kernel/, meaning in model.py and audit.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import numpy as np
from tabulate import tabulate

from . import audit as audit_mod
from . import model
from . import snapshot as snapshot_mod
from .errors import KmemError, UsageError
from .state import MEMMAP_NAMES, MEMMAP_NOT_IN_DUMP, Snapshot

SECTION_LETTERS = {
    "SECTION_MARKED_PRESENT": "P",
    "SECTION_HAS_MEM_MAP": "M",
    "SECTION_IS_ONLINE": "O",
    "SECTION_IS_EARLY": "E",
    "SECTION_TAINT_ZONE_DEVICE": "D",
    "SECTION_IS_VMEMMAP_PREINIT": "V",
}


class Context:
    def __init__(
        self, kind: str, location: str | None, vmlinux: str | None, vmcoreinfo: str | None, as_json: bool
    ) -> None:
        self.kind = kind
        self.location = location
        self.vmlinux = vmlinux
        self.vmcoreinfo = vmcoreinfo
        self.as_json = as_json
        self.prog: Any = None  # the drgn Program once opened (None for --snapshot)

    def snapshot(self, pfn_range: tuple[int, int] | None = None) -> Snapshot:
        if self.kind == "snapshot":
            assert self.location is not None
            return snapshot_mod.load(Path(self.location))
        from .kernel import read_snapshot, terminal_progress
        from .target import open_target

        self.prog, source = open_target(self.kind, self.location, self.vmlinux, self.vmcoreinfo)
        return read_snapshot(self.prog, source, terminal_progress("reading memmap"), pfn_range)

    def page(self, snap: Snapshot, pfn: int) -> dict[str, Any] | None:
        """The full decode of one struct page, when a kernel (not a snapshot file) is open."""
        if self.prog is None:
            return None
        from .kernel.layout import page_format
        from .kernel.pages import describe_page

        return describe_page(self.prog, snap.layout, page_format(self.prog, len(snap.layout.zone_names)), pfn)

    def emit(self, data: dict[str, Any], table: Callable[[], str]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=1))
        else:
            click.echo(table())


def fail(message: str) -> NoReturn:
    click.echo(f"kmeminspect: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--live", "kind", flag_value="live", default=True, help="The running kernel (/proc/kcore; root).")
@click.option("--vmcore", "vmcore", metavar="PATH", help="A vmcore: ELF or kdump-compressed (also flattened).")
@click.option("--qemu", "qemu", metavar="QMP_SOCKET", help="A live QEMU guest through its QMP socket.")
@click.option("--snapshot", "snapshot_file", metavar="FILE", help="A snapshot saved by 'kmeminspect snapshot'.")
@click.option("--vmlinux", metavar="PATH", help="The kernel's vmlinux with DWARF (default: distro paths).")
@click.option(
    "--vmcoreinfo", metavar="FILE", help="VMCOREINFO data for a vmcore without it (dumped during early boot)."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.version_option(package_name="kmeminspect")
@click.pass_context
def main(
    ctx: click.Context,
    kind: str,
    vmcore: str | None,
    qemu: str | None,
    snapshot_file: str | None,
    vmlinux: str | None,
    vmcoreinfo: str | None,
    as_json: bool,
) -> None:
    """The truth about a Linux kernel's physical-memory bookkeeping during memory hotplug."""
    # drgn's own warnings (e.g. its hint on flattened kdump files) would break "one line on stderr"
    logging.getLogger("drgn").setLevel(logging.ERROR)
    chosen = [(k, v) for k, v in (("vmcore", vmcore), ("qemu", qemu), ("snapshot", snapshot_file)) if v]
    if len(chosen) > 1:
        fail("choose one target: --live, --vmcore, --qemu or --snapshot")
    kind, location = chosen[0] if chosen else ("live", None)
    ctx.obj = Context(kind, location, vmlinux, vmcoreinfo, as_json)


def _run(function: Callable[[], int | None]) -> None:
    try:
        code = function()
    except KmemError as error:
        fail(str(error))
    except KeyboardInterrupt:
        fail("interrupted")
    sys.exit(code or 0)


# -- sections ---------------------------------------------------------------------------------------


def _section_nid(snapshot: Snapshot) -> dict[int, int | None]:
    """A section's node: sections keep none after boot; take it from the first initialized page,
    else from its memory block."""
    runs = snapshot.runs
    per = snapshot.layout.pages_per_section
    result: dict[int, int | None] = {}
    for s in snapshot.sections:
        lo = np.searchsorted(runs["pfn_end"], s.start_pfn, side="right")
        nid = None
        for r in runs[lo:]:
            if int(r["pfn_start"]) >= s.start_pfn + per:
                break
            if r["nid"] >= 0 and r["zeroed"] == 0:
                nid = int(r["nid"])
                break
        if nid is None:  # a zeroed (offline) memmap: the memory block records the node
            nid = next((b.nid for b in snapshot.blocks if b.start_pfn <= s.start_pfn < b.start_pfn + b.nr_pages), None)
        result[s.nr] = nid
    return result


def _state_letters(flags: tuple[str, ...]) -> str:
    return "".join(letter for name, letter in SECTION_LETTERS.items() if name in flags)


@main.command()
@click.pass_obj
def sections(obj: Context) -> None:
    """One row per present section (like crash's kmem -n)."""

    def run() -> None:
        snap = obj.snapshot()
        nids = _section_nid(snap)
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

        obj.emit({"sections": rows}, table)

    _run(run)


# -- blocks -----------------------------------------------------------------------------------------


@main.command()
@click.pass_obj
def blocks(obj: Context) -> None:
    """Memory blocks: range, state, zone, node, memmap_on_memory pages."""

    def run() -> None:
        snap = obj.snapshot()
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

        obj.emit({"blocks": rows}, table)

    _run(run)


# -- pfn --------------------------------------------------------------------------------------------


def parse_pfns(text: str) -> tuple[int, int, bool]:
    """PFN or START-END (END exclusive; hex with 0x or decimal) -> (start, end, is_range)."""

    def number(part: str) -> int:
        try:
            return int(part, 0)
        except ValueError:
            raise UsageError(f"'{part}' is not a pfn (decimal, or hex with 0x)") from None

    if "-" in text:
        a, _, b = text.partition("-")
        start, end = number(a), number(b)
        if end <= start:
            raise UsageError(f"empty range {text}: END is exclusive and must be above START")
        return start, end, True
    pfn = number(text)
    if pfn < 0:
        raise UsageError(f"'{text}' is not a pfn")
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


@main.command()
@click.argument("pfns")
@click.pass_obj
def pfn(obj: Context, pfns: str) -> None:
    """Explain PFN, or START-END (END exclusive) as runs of identical state."""

    def run() -> None:
        start, end, is_range = parse_pfns(pfns)
        snap = obj.snapshot(pfn_range=(start, end))
        limit = snap.end_pfn()
        if start >= limit:
            raise UsageError(f"pfn {start:#x} is beyond the highest present section (pfns end at {limit:#x})")
        seg = model.segments(snap, start, min(end, limit))
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
            page = obj.page(snap, start) if single["memmap"] == "read" else None
            if page is not None:
                kind = page["page_type"]
                single["flags"] = page.pop("flags") + ([f"Page{kind.capitalize()}"] if kind else [])
                single["page"] = page
            obj.emit({"pfns": [single]}, lambda: "\n".join(f"{k:20} {v}" for k, v in single.items()))
            return

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

        obj.emit({"runs": runs}, table)

    _run(run)


# -- audit ------------------------------------------------------------------------------------------


@main.command()
@click.option("--rules", "list_rules", is_flag=True, help="List the rules and their meanings.")
@click.option("--errors-only", is_flag=True, help="Show error findings only.")
@click.pass_obj
def audit(obj: Context, list_rules: bool, errors_only: bool) -> None:
    """Findings; exit 0 clean, 1 when any error finding, 2 when it could not run."""

    def run() -> int:
        if list_rules:
            rules = [
                {"rule": r.id, "severity": r.severity, "meaning": r.meaning, "kernels": r.kernels}
                for r in audit_mod.RULES
            ]
            obj.emit(
                {"rules": rules},
                lambda: tabulate(
                    [[r["rule"], r["severity"], r["meaning"]] for r in rules],
                    headers=["RULE", "SEVERITY", "MEANING"],
                    maxcolwidths=[None, None, 80],
                ),
            )
            return 0
        snap = obj.snapshot()
        findings = audit_mod.audit(snap)
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
                        f.rule,
                        f"{f.pfn_start:#x}-{f.pfn_end:#x}",
                        f.pfn_end - f.pfn_start,
                        f.message,
                    ]
                    for f in shown
                ],
                headers=["SEVERITY", "RULE", "PFNS", "PAGES", "MESSAGE"],
                maxcolwidths=[None, None, None, None, 70],
            )
            counts = audit_mod.summary(findings)["by_severity"]
            tally = ", ".join(f"{counts[s]} {s}" for s in ("error", "warning", "info"))
            return f"{body}\n{snap.layout.release}: {tally}"

        obj.emit(data, table)
        return audit_mod.exit_code(findings)

    _run(run)


# -- snapshots --------------------------------------------------------------------------------------


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Snapshot file to write.")
@click.pass_obj
def snapshot(obj: Context, output: str) -> None:
    """Save everything read to FILE (versioned, compressed JSON; loads without drgn)."""

    def run() -> None:
        snap = obj.snapshot()
        snapshot_mod.save(snap, Path(output))
        obj.emit(
            {"snapshot": output, "sections": len(snap.sections), "runs": int(snap.runs.size)},
            lambda: f"{output}: {len(snap.sections)} sections, {len(snap.blocks)} blocks, {snap.runs.size} runs",
        )

    _run(run)


@main.command()
@click.argument("before", type=click.Path(dir_okay=False))
@click.argument("after", type=click.Path(dir_okay=False))
@click.pass_obj
def diff(obj: Context, before: str, after: str) -> None:
    """What changed between two snapshots."""

    def run() -> None:
        d = snapshot_mod.diff(snapshot_mod.load(Path(before)), snapshot_mod.load(Path(after)))

        def table() -> str:
            lines = [
                f"section {s['nr']}: {s['change']}" + (f" {s.get('flags')}" if "flags" in s else "")
                for s in d["sections"]
            ]
            lines += [
                f"block {b['id']}: {b['change']}" + (f" {b.get('state')}" if "state" in b else "") for b in d["blocks"]
            ]
            lines += [f"pagemap {p['address']}: {p['change']}" for p in d["pagemaps"]]
            lines += [f"pfns {r['pfn_start']:#x}-{r['pfn_end']:#x}: {', '.join(r['fields'])}" for r in d["runs"]]
            return "\n".join(lines) or "no differences"

        obj.emit(d, table)

    _run(run)


@main.command()
@click.pass_obj
def doctor(obj: Context) -> None:
    """What each command needs on this machine, and the command that fixes what is missing."""
    from .doctor import checks

    def run() -> None:
        results = checks()
        data = {"checks": [dataclasses.asdict(c) for c in results]}

        def table() -> str:
            rows = [[("ok" if c.ok else "MISSING"), c.name, c.detail, c.needed_for, c.fix or ""] for c in results]
            return tabulate(rows, headers=["", "CHECK", "FOUND", "NEEDED FOR", "FIX"])

        obj.emit(data, table)

    _run(run)
