"""The only code that touches drgn: readers that turn a kernel's state into plain data (state.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
from drgn import FaultError, Program, ProgramFlags

from ..errors import ReadError
from ..state import MEMMAP_NONE, MEMMAP_READ, Claim, Node, Pagemap, Resource, Snapshot, Zone, merge_runs, uniform_run
from ..target import types_mode
from .blocks import read_blocks
from .claims import read_claims, read_online_page_callback
from .layout import read_layout
from .memmap import MemmapReader
from .pgmaps import describe_pgmap_pointers, read_pagemaps
from .resources import read_resources
from .sections import read_sections
from .zones import read_nodes_and_zones

Progress = Callable[[int, int], None]
T = TypeVar("T")


def check_flags_layout(snapshot: Snapshot) -> None:
    """The node and zone fields of page->flags are macros: check the derived shifts against the zones.

    Every populated zone must hold initialized pages whose decoded (node, zone) is its own.
    """
    runs = snapshot.runs
    good = (runs["memmap"] == MEMMAP_READ) & (runs["zeroed"] == 0)
    for zone in snapshot.zones:
        if zone.present == 0 or zone.zone_id == snapshot.layout.zone_device:
            continue
        inside = good & (runs["pfn_end"] > zone.start_pfn) & (runs["pfn_start"] < zone.start_pfn + zone.spanned)
        match = inside & (runs["zone_id"] == zone.zone_id) & (runs["nid"] == zone.nid)
        if inside.any() and not match.any():
            raise ReadError(
                f"cannot decode node/zone from page->flags: no page of node {zone.nid} zone {zone.name} "
                "decodes as such (unexpected page->flags layout)"
            )


def program_source(prog: Program) -> dict[str, object]:
    """What a snapshot's ``source`` says of the kernel open in ``prog``: a vmcore (its path), the running
    kernel (``/proc/kcore``), or else a live kernel without a file: a QEMU guest over QMP; and where its
    types came from (``dwarf`` or ``btf``)."""
    path = prog.core_dump_path
    types = types_mode(prog)
    if not prog.flags & ProgramFlags.IS_LIVE:
        return {"kind": "vmcore", "path": path, "types": types}
    return {"kind": "live" if path == "/proc/kcore" else "qemu", "path": path, "types": types}


def _or_note(what: str, read: Callable[[], T], otherwise: T, unreadable: list[str]) -> T:
    """``read()``, or ``otherwise`` with a line in ``unreadable`` when kernel memory faults: a filtered dump
    lacks the page, or a live kernel freed it during the read."""
    try:
        return read()
    except FaultError as error:
        unreadable.append(f"{what}: not readable ({error.message} at {error.address:#x})")
        return otherwise


def read_snapshot(
    prog: Program,
    source: dict[str, object] | None = None,
    progress: Progress | None = None,
    pfn_range: tuple[int, int] | None = None,
    device_memmap_only: bool = False,
) -> Snapshot:
    """Read everything: sections, blocks, page maps, zones and every struct page (as runs).

    With ``pfn_range``, only the memmap of sections overlapping [start, end) is read; with
    ``device_memmap_only``, only that of sections holding ZONE_DEVICE ranges (what the tracer's seed needs
    of page content). The others get one "not read" run each (MEMMAP_NONE) and the layout cross-check is
    skipped. ``source`` describes the target in the snapshot; by default :func:`program_source`.

    The layout and the sections are needed for anything; a fault reading them is raised. A fault in any
    other registry (a page a filtered dump excluded, a structure freed during a live read) costs only
    what it holds: the snapshot's ``unreadable`` says what was not read, and the rest is answered.
    """
    layout, fmt = read_layout(prog)
    sections = read_sections(prog, layout)
    unreadable: list[str] = []
    pagemaps: list[Pagemap] = _or_note("device page maps", lambda: read_pagemaps(prog, layout), [], unreadable)
    no_nodes: tuple[list[Node], list[Zone]] = ([], [])
    nodes, zones = _or_note("nodes and zones", lambda: read_nodes_and_zones(prog), no_nodes, unreadable)
    blocks = read_blocks(prog, layout, unreadable)
    reader = MemmapReader(prog, layout, fmt)
    parts = []
    wanted = [pfn_range] if pfn_range else []
    if device_memmap_only:
        wanted += [r for p in pagemaps for r in p.ranges] or [(0, 0)]
    for i, section in enumerate(sections):
        end = section.start_pfn + section.nr_pages
        if wanted and not any(a < end and section.start_pfn < b for a, b in wanted):
            parts.append(uniform_run(section.start_pfn, end, MEMMAP_NONE))
        else:
            parts.append(reader.section_runs(section))
        if progress:
            progress(i + 1, len(sections))
    snapshot = Snapshot(
        source=dict(source or program_source(prog), time=time.time()),
        layout=layout,
        sections=sections,
        blocks=blocks,
        pagemaps=pagemaps,
        zones=zones,
        nodes=nodes,
        resources=_or_note("iomem resources", lambda: read_resources(prog), list[Resource](), unreadable),
        runs=merge_runs(parts),
        claims=_or_note("kexec image pages", lambda: read_claims(prog), list[Claim](), unreadable),
        online_page_callback=_or_note(
            "online_page_callback", lambda: read_online_page_callback(prog), None, unreadable
        ),
        unreadable=unreadable,
    )
    if not wanted and not unreadable:
        check_flags_layout(snapshot)
    snapshot.pgmap_pointers = describe_pgmap_pointers(
        prog, _unexplained_pgmaps(snapshot), {p.address for p in pagemaps}
    )
    return snapshot


#: distinct unexplained page->pgmap values described at most (each costs a slab lookup)
MAX_PGMAP_POINTERS = 64


def _unexplained_pgmaps(snapshot: Snapshot) -> list[int]:
    """Distinct page->pgmap values of read pages inside a registered device range that are not that
    range's pgmap (what ``device-pgmap-mismatch`` reports), at most MAX_PGMAP_POINTERS of them."""
    runs = snapshot.runs
    read = runs[(runs["memmap"] == MEMMAP_READ) & (runs["pgmap"] != 0)]
    unexplained: set[int] = set()
    for p in snapshot.pagemaps:
        for a, b in p.ranges:
            inside = read[(read["pfn_end"] > a) & (read["pfn_start"] < b) & (read["pgmap"] != p.address)]
            unexplained.update(int(v) for v in np.unique(inside["pgmap"]).tolist())
    return sorted(unexplained)[:MAX_PGMAP_POINTERS]


def terminal_progress(label: str) -> Progress | None:
    """A progress callback on stderr when it is a terminal and the walk takes over a second."""
    if not sys.stderr.isatty():
        return None
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        if time.monotonic() - start > 1.0:
            end = "\n" if done == total else ""
            print(f"\r{label}: {done}/{total} sections", end=end, file=sys.stderr, flush=True)

    return show


__all__ = ["program_source", "read_snapshot", "check_flags_layout", "terminal_progress"]
