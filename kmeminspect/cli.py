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
        self.colour = False

    def snapshot(self, pfn_range: tuple[int, int] | None = None, device_memmap_only: bool = False) -> Snapshot:
        if self.kind == "snapshot":
            assert self.location is not None
            return snapshot_mod.load(Path(self.location))
        from .kernel import read_snapshot, terminal_progress
        from .target import open_target

        self.prog, source = open_target(self.kind, self.location, self.vmlinux, self.vmcoreinfo)
        return read_snapshot(self.prog, source, terminal_progress("reading memmap"), pfn_range, device_memmap_only)

    def emit(self, data: dict[str, Any], table: Callable[[], str]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=1))
        else:
            click.echo(table(), color=self.colour)  # click strips colour off a terminal unless told


def struct_page(prog: Any, snap: Snapshot, pfn: int) -> dict[str, Any] | None:
    """The full decode of one struct page of the kernel open in ``prog`` (a drgn Program), or None if its
    memmap cannot be read."""
    from .kernel.layout import page_format
    from .kernel.pages import describe_page

    return describe_page(prog, snap.layout, page_format(prog, len(snap.layout.zone_names)), pfn)


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
@click.option(
    "--color/--no-color",
    "colour",
    default=None,
    help="Colour the map (default: when stdout is a terminal and NO_COLOR is not set).",
)
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
    colour: bool | None,
) -> None:
    """The truth about a Linux kernel's physical-memory bookkeeping during memory hotplug."""
    # drgn's own warnings (e.g. its hint on flattened kdump files) would break "one line on stderr"
    logging.getLogger("drgn").setLevel(logging.ERROR)
    chosen = [(k, v) for k, v in (("vmcore", vmcore), ("qemu", qemu), ("snapshot", snapshot_file)) if v]
    if len(chosen) > 1:
        fail("choose one target: --live, --vmcore, --qemu or --snapshot")
    kind, location = chosen[0] if chosen else ("live", None)
    ctx.obj = Context(kind, location, vmlinux, vmcoreinfo, as_json)
    if colour is None:
        from .memorymap import colour_by_default

        colour = colour_by_default()
    ctx.obj.colour = colour


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


def _state_letters(flags: tuple[str, ...]) -> str:
    return "".join(letter for name, letter in SECTION_LETTERS.items() if name in flags)


def sections_view(snap: Snapshot) -> View:
    """`sections`: one row per present section, as JSON data and as a table."""
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

    return {"sections": rows}, table


@main.command()
@click.pass_obj
def sections(obj: Context) -> None:
    """One row per present section (like crash's kmem -n)."""

    def run() -> None:
        obj.emit(*sections_view(obj.snapshot()))

    _run(run)


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


@main.command()
@click.pass_obj
def blocks(obj: Context) -> None:
    """Memory blocks: range, state, zone, node, memmap_on_memory pages."""

    def run() -> None:
        obj.emit(*blocks_view(obj.snapshot()))

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


def pfn_view(snap: Snapshot, start: int, end: int, is_range: bool, prog: Any = None) -> View:
    """`pfn`: explain pfns [start, end) of a snapshot read for that range, as JSON data and as text.

    A single pfn (not ``is_range``) gets the full decode of its struct page when ``prog``, the drgn Program
    the snapshot was read from, is given; a range prints runs of identical state."""
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


@main.command()
@click.argument("pfns")
@click.pass_obj
def pfn(obj: Context, pfns: str) -> None:
    """Explain PFN, or START-END (END exclusive) as runs of identical state."""

    def run() -> None:
        start, end, is_range = parse_pfns(pfns)
        snap = obj.snapshot(pfn_range=(start, end))
        obj.emit(*pfn_view(snap, start, end, is_range, obj.prog))

    _run(run)


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


@main.command()
@click.option("--rules", "list_rules", is_flag=True, help="List the rules and their meanings.")
@click.option("--errors-only", is_flag=True, help="Show error findings only.")
@click.option(
    "--fail-on",
    type=click.Choice(audit_mod.SEVERITIES),
    default=audit_mod.ERROR,
    show_default=True,
    help="Exit 1 when a finding is at least this serious.",
)
@click.pass_obj
def audit(obj: Context, list_rules: bool, errors_only: bool, fail_on: str) -> None:
    """Findings; exit 0 clean, 1 when any error (or --fail-on) finding, 2 when it could not run.

    On a running kernel (--live, --qemu) an error is confirmed by a second read; one that is gone by then
    is reported as a live-race warning."""

    def run() -> int:
        if list_rules:
            rules = [
                {
                    "rule": r.id,
                    "severity": r.severity,
                    "category": r.category,
                    "meaning": r.meaning,
                    "kernels": r.kernels,
                }
                for r in audit_mod.RULES
            ]
            obj.emit(
                {"rules": rules},
                lambda: tabulate(
                    [[r["rule"], r["severity"], r["category"], r["meaning"]] for r in rules],
                    headers=["RULE", "SEVERITY", "CATEGORY", "MEANING"],
                    maxcolwidths=[None, None, None, 72],
                ),
            )
            return 0
        snap = obj.snapshot()
        findings = audit_mod.audit(snap)
        if obj.kind in ("live", "qemu") and any(f.severity == audit_mod.ERROR for f in findings):
            findings = audit_mod.confirm(findings, audit_mod.audit(obj.snapshot()))
        obj.emit(*audit_view(snap, findings, errors_only))
        return audit_mod.exit_code(findings, fail_on)

    _run(run)


# -- map --------------------------------------------------------------------------------------------


@main.command(name="map")
@click.option("--html", "html_file", metavar="FILE", help="Also write the map as a standalone HTML/SVG page.")
@click.pass_obj
def map_command(obj: Context, html_file: str | None) -> None:
    """Sections x subsections, one cell each, coloured by state; runs of identical sections collapsed."""

    def run() -> None:
        obj.emit(*map_view(obj.snapshot(), html_file, obj.colour))

    _run(run)


def map_view(snap: Snapshot, html_file: str | None, colour: bool) -> View:
    """`map`: the snapshot's sections x subsections as JSON data and as a terminal drawing (coloured with
    ``colour``); with ``html_file``, also written there as an HTML page."""
    from . import memorymap

    drawing = memorymap.build(snap)
    if html_file:
        try:
            Path(html_file).write_text(memorymap.render_html(drawing))
        except OSError as error:
            raise UsageError(f"cannot write {html_file}: {error.strerror}; choose a writable path") from None
    return drawing.to_json(), lambda: memorymap.render_terminal(drawing, colour)


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
        results = checks(Path(obj.vmlinux) if obj.vmlinux else None)
        data = {"checks": [dataclasses.asdict(c) for c in results]}

        def table() -> str:
            rows = [[("ok" if c.ok else "MISSING"), c.name, c.detail, c.needed_for, c.fix or ""] for c in results]
            return tabulate(rows, headers=["", "CHECK", "FOUND", "NEEDED FOR", "FIX"])

        obj.emit(data, table)

    _run(run)


# -- completion -------------------------------------------------------------------------------------

# here rather than at the top: this block is the whole of the completion command
from click import shell_completion  # noqa: E402

COMPLETION_SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_KMEMINSPECT_COMPLETE"  # what click derives from the program name "kmeminspect"

_FISH_SOURCE = """\
function %(complete_func)s;
    set -l response (env %(complete_var)s=fish_complete COMP_WORDS=(commandline -cp) \\
COMP_CWORD=(commandline -t) %(prog_name)s);

    for completion in $response;
        set -l metadata (string split -m 1 "," $completion);

        if test $metadata[1] = "dir";
            __fish_complete_directories $metadata[2];
        else if test $metadata[1] = "file";
            __fish_complete_path $metadata[2];
        else if test $metadata[1] = "plain";
            echo $metadata[2];
        end;
    end;
end;

complete --no-files --command %(prog_name)s --arguments "(%(complete_func)s)";
"""


class _FishComplete(shell_completion.FishComplete):
    """click's fish completion with a script that works: click 8.4.0 and 8.4.1 print a fish script that
    splits its own command over two lines (pallets/click#3502). One ``type,value<TAB>help`` line per
    completion, as fish's ``complete --arguments`` expects, like click 8.4.2."""

    source_template = _FISH_SOURCE

    def format_completion(self, item: shell_completion.CompletionItem) -> str:
        if item.help:
            return f"{item.type},{item.value}\t{' '.join(item.help.split())}"
        return f"{item.type},{item.value}"


shell_completion.add_completion_class(_FishComplete, "fish")


def _complete_shells(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [shell for shell in COMPLETION_SHELLS if shell.startswith(incomplete)]


@main.command()
@click.argument("shell", required=False, metavar="bash|zsh|fish", shell_complete=_complete_shells)
def completion(shell: str | None) -> None:
    """Print the shell completion script for bash, zsh or fish.

    \b
        kmeminspect completion bash > /etc/bash_completion.d/kmeminspect
        kmeminspect completion zsh > ~/.kmeminspect.zsh   # and in ~/.zshrc, after compinit: . ~/.kmeminspect.zsh
        kmeminspect completion fish > ~/.config/fish/completions/kmeminspect.fish
    """

    def run() -> None:
        if shell is None:
            raise UsageError("completion needs a shell: bash, zsh or fish")
        complete = shell_completion.get_completion_class(shell) if shell in COMPLETION_SHELLS else None
        if complete is None:
            raise UsageError(f"completion {shell}: not a shell kmeminspect completes; choose bash, zsh or fish")
        click.echo(complete(main, {}, "kmeminspect", COMPLETE_VAR).source(), nl=False)

    _run(run)


# -- stress -----------------------------------------------------------------------------------------


def _number(option: str, text: str | None, kind: type[int] | type[float], minimum: float) -> Any:
    """A numeric option parsed here, so a bad value ends in one line (not click's usage block)."""
    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"{option} {text}: not a{'n integer' if kind is int else ' number'}") from None
    if value < minimum:
        raise UsageError(f"{option} {text}: must be at least {minimum:g}")
    return value


def _stress_plan_text(plan: Any, sysfs: Any, walkers: dict[str, str | None], lines: list[str]) -> str:
    """What a live run will touch, printed before it changes anything."""
    out = [
        f"kmeminspect stress: cycling {len(plan.blocks)} memory blocks (writes: {', '.join(plan.writes)}); "
        "nothing else is changed"
    ]
    for block, state in plan.blocks.items():
        start, end = sysfs.phys_range(block)
        out.append(f"  block {block:<5} {start:#x}-{end:#x}  {state.describe()}")
    for block, why in plan.skipped.items():
        out.append(f"  skipped block {block}: {why}")
    if walkers:
        out.append(
            "  walkers: " + ", ".join(k if why is None else f"{k} (not run: {why})" for k, why in walkers.items())
        )
    return "\n".join(out + [f"  {line}" for line in lines])


def _restoration_line(r: dict[str, Any]) -> str:
    what = f"block {r['block']}" if "block" in r else r["what"]
    reason = r.get("errno") or r.get("reason") or r["result"]
    return f"NOT RESTORED {what} ({reason}): {r['advice']}"


def stress_report_text(data: dict[str, Any]) -> str:
    """A stress report (``--json``'s object) for a terminal."""
    t = data["transitions"]
    rate = f" ({t['per_second']}/s)" if t["per_second"] else ""
    out = [
        f"stopped by: {data['stopped_by']} after {data['seconds']} s" + (f": {data['error']}" if data["error"] else ""),
        f"transitions: {t['attempted']} attempted, {t['done']} done{rate}",
    ]
    for action, c in t["by_action"].items():
        refused = {k: v for k, v in c.items() if k not in ("attempted", "done", "seconds")}
        average = c["seconds"] / c["attempted"] if c["attempted"] else 0
        out.append(
            f"  {action:<15} {c['attempted']:>6} attempted {c['done']:>6} done  {average:.2f} s each"
            + "".join(f"  {k} {v}" for k, v in refused.items())
        )
    for name, r in t["refusals"].items():
        out.append(f"refused {r['count']}x {name}" + (f": {r['meaning']}" if r["meaning"] else ""))
    for a in t["anomalies"]:
        out.append(f"anomaly: {a}")
    for w in data["walkers"]:
        if "note" in w and "passes" not in w:
            out.append(f"walker {w['kind']}: {w['note']}")
        else:
            errors = ", ".join(f"{k} {v}" for k, v in w.get("errors", {}).items())
            work = f"{w.get('pfns', 0)} pfns read in {w.get('passes', 0)} passes" if w.get("pfns") else ""
            out.append(
                f"walker {w['kind']}: {work or str(w.get('passes', 0)) + ' runs'}"
                + (f", errors: {errors}" if errors else "")
                + (f" ({w['note']})" if "note" in w else "")
            )
    audit = data["audit"]
    if audit:
        base = ", ".join(f"{n} {s}" for s, n in audit["baseline"].items())
        new = audit["new_errors"]
        out.append(
            f"audit: {audit['samples']} samples (every {audit['every']} transitions); baseline {base}; "
            f"new errors confirmed: {len(new)}, unconfirmed (torn reads): {audit['unconfirmed']}"
        )
        for f in new:
            out.append(
                f"  after {f['after_transitions']}: {f['rule']} {f['pfn_start']:#x}-{f['pfn_end']:#x} {f['message']}"
            )
        final = audit["final_new_errors"]
        if final is None:
            out.append("  after restoring: not audited (interrupted, failed or not restored)")
        else:
            out.append(f"  after restoring: {len(final)} new errors" + ("" if final else " (back to the baseline)"))
    results = [r["result"] for r in data["restoration"]]
    if data["restored"]:
        out.append(
            f"restored: everything is back in its original state ({results.count('restored')} put back, "
            f"{results.count('unchanged')} unchanged)"
        )
    else:
        out += [_restoration_line(r) for r in data["restoration"] if r["result"] not in ("restored", "unchanged")]
    if data.get("journal_error"):
        out.append(f"journal: {data['journal_error']}")
    traced = (data.get("hooks") or {}).get("trace")
    if traced:
        out.append(
            f"trace: {traced['error']}"
            if "error" in traced
            else f"trace: {traced['races']} races ({traced['race_windows']} windows), "
            f"{traced['handouts_inactive']} inactive hand-outs, {traced['events_lost']} events lost"
        )
    out.append(f"journal: {data['journal']}")
    return "\n".join(out)


def _stress_restore_text(data: dict[str, Any]) -> str:
    if data["note"]:
        return f"{data['journal']}: {data['note']}"
    results = [r["result"] for r in data["blocks"]]
    if data["complete"]:
        done, unchanged = results.count("restored"), results.count("unchanged")
        return f"{data['journal']}: everything back ({done} put back, {unchanged} unchanged)"
    return "\n".join(_restoration_line(r) for r in data["blocks"] if r["result"] not in ("restored", "unchanged"))


@main.command()
@click.option("--blocks", "block_list", metavar="LIST", help="Blocks to cycle: numbers and ranges, e.g. 32-35,40.")
@click.option("--all-hotpluggable", is_flag=True, help="Every block of unpluggable memory (ACPI DIMMs, dax kmem).")
@click.option("--allow-kernel-zone", is_flag=True, help="Also online into kernel zones (may never offline again).")
@click.option("--transitions", metavar="N", help="Stop after N transitions (default 100 without --duration).")
@click.option("--duration", metavar="SECONDS", help="Stop after this long.")
@click.option("--walkers", metavar="KINDS", help="Concurrent pfn walkers: kpageflags,compact,idle or all.")
@click.option("--dimm-rounds", metavar="N", help="--qemu: DIMM add/remove rounds.")
@click.option("--dimm-size", metavar="SIZE", default="128M", show_default=True, help="--qemu: size of each DIMM.")
@click.option("--virtio-mem", metavar="ID", help="--qemu: the virtio-mem device to resize.")
@click.option("--resizes", metavar="N", help="--qemu: virtio-mem resizes.")
@click.option(
    "--audit-every", metavar="N", default="50", show_default=True, help="Audit every N transitions; 0: never."
)
@click.option("--journal", metavar="PATH", help="Journal file (default /var/lib/kmeminspect/..., else /tmp/...).")
@click.option("--restore", "restore_file", metavar="JOURNAL", help="Put back what a killed run changed.")
@click.option("--timeout", metavar="SECONDS", default="60", show_default=True, help="Per-transition time limit.")
@click.option("--seed", metavar="N", help="Seed of the random choices (default: random, printed).")
@click.option("--json", "stress_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--trace", "with_trace", is_flag=True, help="Live: run the tracer's pfn_active and races (bcc).")
@click.option("--sysfs-root", default="/sys", hidden=True, help="Tests: a fake sysfs tree.")
@click.option("--procfs-root", default="/proc", hidden=True, help="Tests: a fake procfs tree.")
@click.pass_obj
def stress(
    obj: Context,
    block_list: str | None,
    all_hotpluggable: bool,
    allow_kernel_zone: bool,
    transitions: str | None,
    duration: str | None,
    walkers: str | None,
    dimm_rounds: str | None,
    dimm_size: str,
    virtio_mem: str | None,
    resizes: str | None,
    audit_every: str,
    journal: str | None,
    restore_file: str | None,
    timeout: str,
    seed: str | None,
    stress_json: bool,
    with_trace: bool,
    sysfs_root: str,
    procfs_root: str,
) -> None:
    """Hotplug churn that puts everything back: live (root), cycle memory blocks offline/online_movable;
    --qemu, add and remove DIMMs and resize virtio-mem. --restore JOURNAL after a kill.

    Exit 0, 1 when the audit confirmed a new error, 2 when it could not run or something was not put back.
    """
    from . import stress as stress_mod

    as_json = obj.as_json or stress_json
    live_options = block_list or all_hotpluggable or allow_kernel_zone or transitions or duration or walkers
    qemu_options = dimm_rounds or virtio_mem or resizes

    def say(line: str) -> None:
        click.echo(line, err=True)

    def emit_report(data: dict[str, Any], error: str | None, code: int) -> int:
        click.echo(json.dumps(data, indent=1) if as_json else stress_report_text(data))
        if error:
            say(f"kmeminspect: {error}")
        return code

    def restore(limit: float) -> int:
        if live_options or qemu_options or journal:
            raise UsageError("--restore JOURNAL takes no other stress option: the journal says what to restore")
        assert restore_file is not None
        if obj.kind == "qemu":
            from .stress_qemu import restore_qemu_journal

            assert obj.location is not None
            data = restore_qemu_journal(Path(restore_file), obj.location, say, limit).to_json()
        else:
            data = stress_mod.restore_journal(Path(restore_file), say, limit, Path(procfs_root)).to_json()
        click.echo(json.dumps(data, indent=1) if as_json else _stress_restore_text(data))
        return 0 if data["complete"] else 2

    def journal_path() -> Path:
        """Chosen once the input is known good: the default may create /var/lib/kmeminspect."""
        return Path(journal) if journal else stress_mod.default_journal_path()

    def qemu(limit: float, every: int, run_seed: int) -> int:
        from .stress_qemu import QemuAudit, QemuLimits, QemuStress, parse_size

        if live_options or with_trace:
            raise UsageError(
                "--qemu drives DIMMs and virtio-mem: --blocks, --walkers, --transitions, --trace... are live only"
            )
        limits = QemuLimits(
            _number("--dimm-rounds", dimm_rounds or "0", int, 0),
            parse_size(dimm_size),
            _number("--resizes", resizes or "0", int, 0),
            limit,
        )
        if not limits.dimm_rounds and not limits.resizes:
            raise UsageError("--qemu stress needs --dimm-rounds N and/or --virtio-mem ID --resizes N")
        assert obj.location is not None
        source = QemuAudit(obj.location, obj.vmlinux) if every else None
        runner = QemuStress(obj.location, limits, virtio_mem, Path(), run_seed, every, source, say=say)
        vmem = runner.prepare()
        runner.journal_path = path = journal_path()
        plan = [f"kmeminspect stress: the QEMU guest behind {obj.location}; nothing else is changed"]
        if limits.dimm_rounds:
            plan.append(
                f"  {limits.dimm_rounds} DIMM rounds: add a {limits.dimm_size >> 20} MiB pc-dimm "
                f"({runner.prefix}-dimmN), let the guest take it, device_del it"
            )
        if vmem and limits.resizes:
            plan.append(
                f"  {limits.resizes} resizes of virtio-mem {vmem.id}: 0-{vmem.max_size >> 20} MiB in "
                f"{vmem.block_size >> 20} MiB steps, back to {vmem.requested_size >> 20} MiB at the end"
            )
        plan += [
            f"  audit: every {every} operations (drgn over QMP)" if every else "  audit: off",
            f"  seed {run_seed}; per-operation timeout {limit:g} s",
            f"  journal: {path} (after a crash: kmeminspect --qemu {obj.location} stress --restore {path})",
        ]
        say("\n".join(plan))
        report = runner.run()
        return emit_report(report.to_json(), report.error, report.exit_code())

    def run() -> int:
        limit = _number("--timeout", timeout, float, 0.001)
        if restore_file:
            return restore(limit)
        if obj.kind not in ("live", "qemu"):
            raise UsageError("stress works on a running kernel: drop --vmcore/--snapshot")
        every = _number("--audit-every", audit_every, int, 0)
        run_seed = _number("--seed", seed, int, 0) if seed is not None else stress_mod.new_seed()
        if obj.kind == "qemu":
            return qemu(limit, every, run_seed)
        if qemu_options:
            raise UsageError("--dimm-rounds, --virtio-mem and --resizes drive a QEMU guest: add --qemu QMP_SOCKET")
        chosen = stress_mod.parse_block_list(block_list) if block_list else None
        kinds = stress_mod.parse_walkers(walkers or "")
        limits = stress_mod.Limits(
            _number("--transitions", transitions, int, 1),
            _number("--duration", duration, float, 0.001),
            limit,
        )
        if limits.transitions is None and limits.duration is None:
            limits = dataclasses.replace(limits, transitions=stress_mod.DEFAULT_TRANSITIONS)
        sysfs = stress_mod.MemoryBlocks(Path(sysfs_root), Path(procfs_root))
        plan = stress_mod.plan_blocks(sysfs, chosen, all_hotpluggable, allow_kernel_zone)
        source = stress_mod.LiveAudit(obj.vmlinux) if every else None
        path = journal_path()
        stops = [f"{limits.transitions} transitions" if limits.transitions else "", f"{duration} s" if duration else ""]
        lines = [
            f"audit: every {every} transitions (baseline first; a new error is confirmed by a second read)"
            if every
            else "audit: off",
            f"stop after {' or '.join(s for s in stops if s)}; seed {run_seed}; per-transition timeout {limit:g} s",
            f"journal: {path} (after a crash: kmeminspect stress --restore {path})",
        ]
        say(_stress_plan_text(plan, sysfs, stress_mod.available_walkers(kinds), lines))
        hooks = None
        if with_trace:
            from . import trace as trace_mod
            from .kernel import read_snapshot
            from .target import open_live

            # the audit's Program when there is one: loading the debug info twice costs seconds and ~250 MB
            prog = source.prog if source is not None else open_live(Path(obj.vmlinux) if obj.vmlinux else None)
            seed_state = read_snapshot(prog, {"kind": "live"}, device_memmap_only=True)
            options = trace_mod.TraceOptions(events=False, callers=False, active=True, races=True)
            hooks = trace_mod.StressTracer(prog, seed_state, options)
        runner = stress_mod.LiveStress(sysfs, plan, limits, path, run_seed, kinds, every, source, hooks=hooks, say=say)
        report = runner.run()
        return emit_report(report.to_json(), report.error, report.exit_code())

    _run(run)


# -- trace ------------------------------------------------------------------------------------------


def _trace_text(summary: dict[str, Any], top: int) -> str:
    """The end-of-trace summary for a terminal."""
    from .trace import events as trace_events

    lines = []
    if "callers" in summary:
        rows = [trace_events.CallerRow.from_json(r) for r in summary["callers"]]
        lines.append(trace_events.format_callers(rows, top, summary))
    counts = ", ".join(f"{k} {v}" for k, v in summary.get("events", {}).items()) or "none"
    lines.append(f"events: {counts}")
    lines.append(
        f"inactive hand-outs: {summary.get('handouts_inactive', 0)}, races: {summary.get('races', 0)} "
        f"(and {summary.get('race_windows', 0)} windows), "
        f"events lost: {summary.get('events_lost', 0)}, stack captures failed: {summary.get('stack_failures', 0)}"
    )
    for function, why in sorted(summary.get("unavailable", {}).items()):
        lines.append(f"not traced: {function}(): {why}")
    if "stopped_by" in summary:
        lines.append(f"stopped by {summary['stopped_by']} after {summary['duration_s']} s")
    return "\n".join(lines)


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--duration", type=float, metavar="SECONDS", help="Stop after this long (default: Ctrl-C).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write events and summary as JSON lines.")
@click.option("--events/--no-events", default=True, show_default=True, help="Print the lifecycle timeline.")
@click.option("--callers/--no-callers", default=True, show_default=True, help="Count pfn_to_online_page() callers.")
@click.option("--split", is_flag=True, help="Count callers by result too (NULL or a page; a return probe).")
@click.option("--exact-stacks", is_flag=True, help="Unwind every call's stack instead of reusing stack ids.")
@click.option("--active/--no-active", default=True, show_default=True, help="Report pages handed out inactive.")
@click.option("--races", is_flag=True, help="Report invalidations of pages a task still holds (every syscall exit).")
@click.option("--verify-every", type=int, default=256, show_default=True, help="Unwind every N-th reused stack.")
@click.option("--hold-window-ms", type=float, default=10.0, show_default=True, help="How long a kthread holds.")
@click.option("--top", type=int, default=10, show_default=True, help="Callers shown.")
@click.option("--folded", type=click.Path(dir_okay=False), help="Write caller stacks folded, for flame graphs.")
@click.option("--report", "report_file", type=click.Path(dir_okay=False), help="Summarise a trace saved by -o.")
@click.option("--inject-inactive", hidden=True, metavar="START-END", help="Self-test: mark pfns inactive at start.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def trace(
    obj: Context,
    duration: float | None,
    output: str | None,
    events: bool,
    callers: bool,
    split: bool,
    exact_stacks: bool,
    active: bool,
    races: bool,
    verify_every: int,
    hold_window_ms: float,
    top: int,
    folded: str | None,
    report_file: str | None,
    inject_inactive: str | None,
    command: tuple[str, ...],
) -> None:
    """Watch memory hotplug live (bcc; root): lifecycle, pfn_to_online_page() callers, a live pfn_active.

    Runs until Ctrl-C, SIGTERM, --duration, or the end of COMMAND (started once the probes are attached).
    Exit 0, 1 when pages were handed out inactive or races seen, 2 when it could not run.
    """
    from . import trace as trace_mod
    from .trace import events as trace_events

    def run() -> int:
        if report_file:
            header, recorded, summary = trace_mod.read_trace(Path(report_file))
            if summary is None:
                raise UsageError(f"{report_file}: the trace has no summary (cut short): its events follow")
            if obj.as_json:
                click.echo(json.dumps({"header": header, "summary": summary}, indent=1))
            else:
                for event in recorded:
                    click.echo(trace_events.format_event(event))
                click.echo(_trace_text(summary, top))
            return 1 if summary.get("handouts_inactive") or summary.get("races") else 0
        if obj.kind != "live":
            raise UsageError("trace watches the running kernel: drop --vmcore/--qemu/--snapshot")
        options = trace_mod.TraceOptions(
            events=events,
            callers=callers,
            split=split,
            exact_stacks=exact_stacks,
            active=active,
            races=races,
            verify_every=verify_every,
            hold_window_ms=hold_window_ms,
        )
        injected = None
        if inject_inactive:
            start, end, _ = parse_pfns(inject_inactive)
            injected = (start, end)
        snap = obj.snapshot(device_memmap_only=True)  # the seed needs page content of device ranges only

        def on_event(event: dict[str, Any]) -> None:
            if obj.as_json:
                return
            if event["phase"] in ("handout-inactive", "race", "race-window", "state-overflow") or events:
                click.echo(trace_events.format_event(event))
                sys.stdout.flush()

        def on_ready() -> None:
            click.echo("kmeminspect: tracing; Ctrl-C to stop", err=True)

        out = open(output, "w") if output else None  # noqa: SIM115 - closed below
        try:
            summary = trace_mod.run(
                obj.prog, snap, options, on_event, out, duration, list(command) or None, injected, on_ready
            )
        finally:
            if out:
                out.close()
        if folded and "callers" in summary:
            rows = [trace_events.CallerRow.from_json(r) for r in summary["callers"]]
            Path(folded).write_text("\n".join(trace_events.folded(rows, "pfn_to_online_page")) + "\n")
        obj.emit(summary, lambda: _trace_text(summary, top))
        return 1 if summary["handouts_inactive"] or summary["races"] else 0

    _run(run)
