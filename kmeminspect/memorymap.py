"""A picture of the physical address space: present sections × their subsections, one cell each.

Pure data (no drgn, no click): :func:`build` classifies every subsection of every present section from the
model's segments, marks the cells that audit findings touch, and collapses runs of identical sections;
:func:`render_terminal` and :func:`render_html` draw it. A cell's class is the state that covers most of its
pfns, except that a subsection holding both ZONE_DEVICE pages and other pages with a memmap is a
``collision`` (the kernel's SECTION_TAINT_ZONE_DEVICE case, at subsection granularity).
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import model
from .audit import ERROR, WARNING, Finding
from .state import MEMMAP_READ, Snapshot

#: short names of the dev_pagemap types (enum memory_type)
PGMAP_TYPES = {
    "MEMORY_DEVICE_PRIVATE": "private",
    "MEMORY_DEVICE_COHERENT": "coherent",
    "MEMORY_DEVICE_FS_DAX": "fsdax",
    "MEMORY_DEVICE_GENERIC": "devdax",
    "MEMORY_DEVICE_PCI_P2PDMA": "p2pdma",
}
#: the colours of the zones' online RAM, by zone name (other zones get ZONE_FALLBACK_COLOUR)
ZONE_COLOURS = {"DMA": "#8c564b", "DMA32": "#1f77b4", "Normal": "#2ca02c", "Movable": "#17becf"}
ZONE_FALLBACK_COLOUR = "#98df8a"
DEVICE_COLOURS = {
    "fsdax": "#9467bd",
    "devdax": "#e377c2",
    "private": "#bcbd22",
    "coherent": "#8c6d31",
    "p2pdma": "#7f7f7f",
}
DEVICE_GLYPHS = {"private": "p", "coherent": "c", "fsdax": "f", "devdax": "d", "p2pdma": "q"}
FINDING_COLOURS = {ERROR: "#d62728", WARNING: "#ff7f0e"}
#: xterm-256 approximations of the colours above, for the terminal
ANSI_256 = {
    "#8c564b": 95,
    "#1f77b4": 32,
    "#2ca02c": 34,
    "#17becf": 44,
    "#98df8a": 114,
    "#9467bd": 97,
    "#e377c2": 176,
    "#bcbd22": 142,
    "#8c6d31": 94,
    "#7f7f7f": 244,
    "#c7c7c7": 251,
    "#ffffff": 255,
    "#000000": 16,
    "#ff0000": 196,
    "#ffbf00": 214,
    "#d62728": 160,
    "#ff7f0e": 208,
}


@dataclasses.dataclass(frozen=True)
class CellClass:
    """One state a subsection can be drawn in."""

    key: str  # stable name, e.g. "online-Normal", "device-fsdax", "offline"
    label: str
    glyph: str  # its character on a terminal without colour
    colour: str  # #rrggbb


def cell_classes(snapshot: Snapshot) -> list[CellClass]:
    """The classes this kernel's map can use, in legend order."""
    classes = [
        CellClass(
            f"online-{name}",
            f"online RAM, zone {name}",
            _zone_glyph(name),
            ZONE_COLOURS.get(name, ZONE_FALLBACK_COLOUR),
        )
        for i, name in enumerate(snapshot.layout.zone_names)
        if i != snapshot.layout.zone_device
    ]
    classes.append(CellClass("offline", "offline RAM (memmap present, section offline)", "o", "#c7c7c7"))
    classes += [
        CellClass(f"device-{short}", f"ZONE_DEVICE, {short} pagemap", glyph, DEVICE_COLOURS[short])
        for short, glyph in DEVICE_GLYPHS.items()
    ]
    classes += [
        CellClass("collision", "ZONE_DEVICE and other memmap in one subsection", "*", "#ffbf00"),
        CellClass("inactive", "memmap present, not initialized or not sane (pfn_active false)", "!", "#ff0000"),
        CellClass("unmapped", "memmap unreadable (vmemmap unmapped, or not in the dump)", "u", "#000000"),
        CellClass("hole", "no memmap (subsection not valid: pfn_valid false)", ".", "#ffffff"),
    ]
    return classes


def _zone_glyph(name: str) -> str:
    return {"DMA": "A", "DMA32": "3", "Normal": "N", "Movable": "M"}.get(name, name[:1].upper())


@dataclasses.dataclass(frozen=True)
class Row:
    """Present sections first_nr..last_nr (consecutive, identical in every cell), or a gap between them."""

    first_nr: int
    last_nr: int
    present: bool
    cells: tuple[str, ...]  # a CellClass key per subsection (empty for a gap)
    details: tuple[str, ...]  # per subsection: pfn counts by state, causes, findings (of first_nr)
    findings: tuple[str, ...]  # per subsection: "" or the worst severity of the findings touching it
    collision: bool  # the section holds ZONE_DEVICE pages and other pages with a memmap
    flags: tuple[str, ...]  # the section's flags (of first_nr)

    @property
    def count(self) -> int:
        return self.last_nr - self.first_nr + 1


@dataclasses.dataclass(frozen=True)
class MemoryMap:
    """The map of a snapshot: one row per run of identical sections, one cell class per subsection state."""

    release: str
    pages_per_section: int
    pages_per_subsection: int
    classes: list[CellClass]
    rows: list[Row]
    findings: list[Finding]

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.release,
            "pages_per_section": self.pages_per_section,
            "pages_per_subsection": self.pages_per_subsection,
            "classes": [dataclasses.asdict(c) for c in self.classes],
            "rows": [
                {
                    "sections": [r.first_nr, r.last_nr],
                    "present": r.present,
                    "cells": list(r.cells),
                    "findings": list(r.findings),
                    "collision": r.collision,
                }
                for r in self.rows
            ],
        }


def classify_segments(snapshot: Snapshot, seg: np.ndarray, classes: list[CellClass]) -> np.ndarray:
    """The index into classes of each model segment's state."""
    index = {c.key: i for i, c in enumerate(classes)}
    out = np.full(seg.size, index["inactive"], dtype=np.int16)
    zone_names = snapshot.layout.zone_names
    valid = seg["pfn_valid"] == 1
    active = seg["pfn_active"] == 1
    device = seg["registry_pgmap"] != 0
    offline = (seg["inactive"] & model.CAUSE_BITS["section-offline"]) != 0
    for zone_id, name in enumerate(zone_names):
        key = f"online-{name}"
        if key in index:
            out[active & ~device & (seg["zone_id"] == zone_id)] = index[key]
    out[valid & ~device & offline] = index["offline"]
    types = {p.address: PGMAP_TYPES.get(p.type) for p in snapshot.pagemaps}
    for address, short in types.items():
        if short is not None:
            out[active & (seg["registry_pgmap"] == address)] = index[f"device-{short}"]
    out[valid & (seg["memmap"] != MEMMAP_READ)] = index["unmapped"]
    out[~valid] = index["hole"]
    return out


def _pieces(seg: np.ndarray, cell_starts: np.ndarray, per: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut the segments at subsection boundaries: (segment index, cell index, pages) of every piece."""
    if seg.size == 0:
        none = np.zeros(0, dtype=np.int64)
        return none, none, none
    # four sorted arrays: a stable sort (timsort) merges them in linear time, where np.unique would hash
    cuts = np.sort(
        np.concatenate((seg["pfn_start"], seg["pfn_end"], cell_starts, cell_starts + np.uint64(per))), kind="stable"
    )
    cuts = cuts[np.concatenate(([True], cuts[1:] != cuts[:-1]))]
    starts, lengths = cuts[:-1], (cuts[1:] - cuts[:-1]).astype(np.int64)
    which_seg = np.searchsorted(seg["pfn_start"], starts, side="right") - 1
    which_cell = np.searchsorted(cell_starts, starts, side="right") - 1
    inside = (which_seg >= 0) & (which_cell >= 0)
    inside &= starts < seg["pfn_end"][np.maximum(which_seg, 0)]
    inside &= starts < cell_starts[np.maximum(which_cell, 0)] + np.uint64(per)
    return which_seg[inside], which_cell[inside], lengths[inside]


#: sections classified at a time: bounds the (cells x classes) count array however large the machine
SECTIONS_PER_CHUNK = 1024


class _CellKinds:
    """Distinct cell contents (pfn counts by class, inactive causes), each with its class and detail text.

    A large machine has millions of cells but few distinct contents: each is described once.
    """

    def __init__(self, classes: list[CellClass]) -> None:
        self.classes = classes
        self.ids: dict[bytes, int] = {}
        self.keys: list[str] = []
        self.details: list[str] = []

    def identify(self, counts: np.ndarray, causes: np.ndarray) -> np.ndarray:
        """The kind id of every cell, given its counts row and its causes."""
        table = np.ascontiguousarray(np.concatenate((counts, causes.astype(np.int64)[:, None]), axis=1))
        rows = table.view(np.dtype((np.void, table.dtype.itemsize * table.shape[1]))).ravel()
        unique, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        local = np.empty(unique.size, dtype=np.int64)
        for i, (row, index) in enumerate(zip(unique.tolist(), first.tolist(), strict=True)):
            if row not in self.ids:
                self.ids[row] = len(self.keys)
                self._describe(counts[index], int(causes[index]))
            local[i] = self.ids[row]
        result: np.ndarray = local[inverse.ravel()]
        return result

    def _describe(self, cell_counts: np.ndarray, cell_causes: int) -> None:
        collided = bool(_collided(cell_counts[None, :], self.classes)[0])
        self.keys.append("collision" if collided else self.classes[int(cell_counts.argmax())].key)
        parts = [f"{n} {self.classes[k].key}" for k, n in enumerate(cell_counts.tolist()) if n]
        why = model.causes(cell_causes)
        self.details.append(", ".join(parts) + (f" (inactive: {', '.join(why)})" if why else ""))


def build(snapshot: Snapshot, seg: np.ndarray | None = None, findings: list[Finding] | None = None) -> MemoryMap:
    """The map of a snapshot (its model segments and audit findings computed when not given)."""
    from .audit import audit

    layout = snapshot.layout
    seg = model.segments(snapshot) if seg is None else seg
    findings = audit(snapshot, seg) if findings is None else findings
    classes = cell_classes(snapshot)
    per, nsub = layout.pages_per_subsection, layout.subsections_per_section
    sections = sorted(snapshot.sections, key=lambda s: s.nr)
    rows: list[Row] = []
    if not sections or seg.size == 0:
        return MemoryMap(layout.release, layout.pages_per_section, per, classes, rows, findings)
    offsets = np.arange(nsub, dtype=np.uint64) * np.uint64(per)
    cell_starts = (np.array([s.start_pfn for s in sections], dtype=np.uint64)[:, None] + offsets).ravel()
    seg_class = classify_segments(snapshot, seg, classes)
    kinds = _CellKinds(classes)
    cell_kind = np.empty(cell_starts.size, dtype=np.int64)
    section_collision = np.empty(len(sections), dtype=bool)
    for first in range(0, len(sections), SECTIONS_PER_CHUNK):
        chunk = slice(first * nsub, min(first + SECTIONS_PER_CHUNK, len(sections)) * nsub)
        starts = cell_starts[chunk]
        lo = max(int(np.searchsorted(seg["pfn_end"], starts[0], side="right")), 0)
        hi = int(np.searchsorted(seg["pfn_start"], starts[-1] + np.uint64(per), side="left"))
        which_seg, which_cell, pages = _pieces(seg[lo:hi], starts, per)
        which_seg += lo
        counts = np.zeros((starts.size, len(classes)), dtype=np.int64)
        np.add.at(counts, (which_cell, seg_class[which_seg]), pages)
        causes = np.zeros(starts.size, dtype=np.uint32)
        np.bitwise_or.at(causes, which_cell, seg["inactive"][which_seg])
        cell_kind[chunk] = kinds.identify(counts, causes)
        per_section = counts.reshape(-1, nsub, len(classes)).sum(axis=1)
        section_collision[first : first + per_section.shape[0]] = _collided(per_section, classes)
    severity = _finding_marks(findings, cell_starts, per)
    by_section = cell_kind.reshape(len(sections), nsub)
    marks = severity.reshape(len(sections), nsub)
    nrs = np.array([s.nr for s in sections], dtype=np.int64)
    flag_ids = {flags: i for i, flags in enumerate(dict.fromkeys(s.flags for s in sections))}
    section_flags = np.array([flag_ids[s.flags] for s in sections], dtype=np.int64)
    # a section joins the row before it when it follows it and is identical in every cell
    joins = np.zeros(len(sections), dtype=bool)
    joins[1:] = (
        (nrs[1:] == nrs[:-1] + 1)
        & (by_section[1:] == by_section[:-1]).all(axis=1)
        & (marks[1:] == marks[:-1]).all(axis=1)
        & (section_collision[1:] == section_collision[:-1])
        & (section_flags[1:] == section_flags[:-1])
    )
    names = np.array(["", WARNING, ERROR], dtype=object)
    firsts = np.flatnonzero(~joins).tolist()
    lasts = [*(i - 1 for i in firsts[1:]), len(sections) - 1]
    for i, last in zip(firsts, lasts, strict=True):
        s = sections[i]
        if rows and rows[-1].last_nr + 1 < s.nr:
            rows.append(Row(rows[-1].last_nr + 1, s.nr - 1, False, (), (), (), False, ()))
        kind = by_section[i].tolist()
        rows.append(
            Row(
                s.nr,
                sections[last].nr,
                True,
                tuple(kinds.keys[k] for k in kind),
                tuple(kinds.details[k] for k in kind),
                tuple(names[marks[i]].tolist()),
                bool(section_collision[i]),
                s.flags,
            )
        )
    return MemoryMap(layout.release, layout.pages_per_section, per, classes, rows, findings)


def _collided(counts: np.ndarray, classes: list[CellClass]) -> np.ndarray:
    """Per row of counts: ZONE_DEVICE pages and RAM pages (online or offline) both counted.

    An inactive device pfn (altmap reserve, memmap not yet initialized) is still a device pfn, but its
    class says only "inactive": collisions are judged on the classes that say what a pfn is."""
    device = np.array([c.key.startswith("device-") for c in classes])
    ram = np.array([c.key.startswith("online-") or c.key == "offline" for c in classes])
    both: np.ndarray = (counts[:, device].sum(axis=1) > 0) & (counts[:, ram].sum(axis=1) > 0)
    return both


def _finding_marks(findings: list[Finding], cell_starts: np.ndarray, per: int) -> np.ndarray:
    """Per cell: the worst severity of the findings whose pfns it holds (2 error, 1 warning, 0 none)."""
    marks = np.zeros(cell_starts.size, dtype=np.int8)
    cell_ends = cell_starts + np.uint64(per)
    for f in findings:
        if f.severity not in (ERROR, WARNING):
            continue
        lo = int(np.searchsorted(cell_ends, np.uint64(f.pfn_start), side="right"))
        hi = int(np.searchsorted(cell_starts, np.uint64(f.pfn_end), side="left"))
        np.maximum(marks[lo:hi], 2 if f.severity == ERROR else 1, out=marks[lo:hi])
    return marks


# -- drawing ----------------------------------------------------------------------------------------


def colour_by_default() -> bool:
    """Colour unless told: when stdout is a terminal and NO_COLOR is not set (https://no-color.org: any
    non-empty value)."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def _row_label(row: Row) -> str:
    if row.count == 1:
        return str(row.first_nr)
    return f"{row.first_nr}-{row.last_nr}"


def render_terminal(memory_map: MemoryMap, colour: bool) -> str:
    """One line per row: the section number(s), a cell per subsection, the findings; then a legend."""
    by_key = {c.key: c for c in memory_map.classes}
    lines = [f"{memory_map.release}: one cell = {memory_map.pages_per_subsection} pages; * after NR: collision"]
    for row in memory_map.rows:
        label = _row_label(row) + ("*" if row.collision else "")
        if not row.present:
            lines.append(f"{label:>12}  (not present)")
            continue
        cells = "".join(
            _terminal_cells(by_key[k], mark, len(list(same)), colour)
            for (k, mark), same in itertools.groupby(zip(row.cells, row.findings, strict=True))
        )
        marks = sorted({m for m in row.findings if m})
        suffix = f"  x{row.count}" if row.count > 1 else ""
        suffix += f"  {'/'.join(marks)}" if marks else ""
        lines.append(f"{label:>12}  {cells}{suffix}")
    used = {k for row in memory_map.rows for k in row.cells}
    legend = [f"{_terminal_cells(c, '', 1, colour)} {c.label}" for c in memory_map.classes if c.key in used]
    if any(m for row in memory_map.rows for m in row.findings):
        legend.append(
            "error/warning after a row: findings touch its cells" + (" (red/orange background)" if colour else "")
        )
    return "\n".join(lines + ["", "legend:"] + [f"  {entry}" for entry in legend])


def _terminal_cells(cell: CellClass, mark: str, count: int, colour: bool) -> str:
    """count cells of one class and finding mark: glyphs, on the class's colour (the finding's, if any)."""
    if not colour:
        return cell.glyph * count
    background = ANSI_256[FINDING_COLOURS[mark]] if mark else ANSI_256[cell.colour]
    foreground = ANSI_256[cell.colour] if mark else 16 if cell.key != "unmapped" else 255
    return f"\x1b[38;5;{foreground};48;5;{background}m{cell.glyph * count}\x1b[0m"


CELL, GAP, LABEL_WIDTH, LEGEND_TOP, LEGEND_ROW = 12, 1, 110, 50, 18


def svg_geometry(memory_map: MemoryMap) -> tuple[int, int, int]:
    """(width, height, y of the first map row) of the drawing, in pixels."""
    nsub = memory_map.pages_per_section // memory_map.pages_per_subsection
    legend_height = LEGEND_TOP + (len(memory_map.classes) + len(FINDING_COLOURS)) * LEGEND_ROW + 10
    width = LABEL_WIDTH + nsub * (CELL + GAP) + 140
    return width, legend_height + len(memory_map.rows) * (CELL + GAP) + 20, legend_height


def render_html(memory_map: MemoryMap) -> str:
    """A standalone HTML page: one SVG (legend, then a row per section or collapsed run), hover details in
    SVG <title>s; every section row a <g data-section="NR"> (data-last-section for collapsed runs), every
    cell a <rect data-subsection="I" data-state="KEY">."""
    width, height, top = svg_geometry(memory_map)
    body = "\n".join(_svg_parts(memory_map, top))
    title = html.escape(f"kmeminspect map: {memory_map.release}")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ margin: 0; background: #fff; font-family: monospace; }}
svg text {{ font-family: monospace; font-size: 12px; }}
g.row:hover text {{ font-weight: bold; }}
rect.cell:hover {{ stroke: #000; stroke-width: 2; }}
</style></head>
<body>
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">
<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>
{body}
</svg>
</body></html>
"""


def _svg_parts(memory_map: MemoryMap, top: int) -> Iterator[str]:
    esc = html.escape
    per = memory_map.pages_per_section
    yield f'<text x="8" y="20">{esc(memory_map.release)}: a row per section, a cell per subsection </text>'
    yield f'<text x="8" y="38">({memory_map.pages_per_subsection} pages); hover for details</text>'
    for i, c in enumerate(memory_map.classes):
        y = LEGEND_TOP + i * LEGEND_ROW
        yield (
            f'<g data-legend="{c.key}"><rect x="8" y="{y}" width="{CELL}" height="{CELL}" fill="{c.colour}" '
            f'stroke="#888"/><text x="{8 + CELL + 8}" y="{y + CELL - 2}">{esc(c.label)}</text></g>'
        )
    y = LEGEND_TOP + len(memory_map.classes) * LEGEND_ROW
    for severity, colour in FINDING_COLOURS.items():
        yield (
            f'<g data-legend="finding-{severity}"><rect x="8" y="{y}" width="{CELL}" height="{CELL}" fill="none" '
            f'stroke="{colour}" stroke-width="2"/><text x="{8 + CELL + 8}" y="{y + CELL - 2}">'
            f"outline: an audit {severity} touches the subsection</text></g>"
        )
        y += LEGEND_ROW
    for n, row in enumerate(memory_map.rows):
        y = top + n * (CELL + GAP)
        label = _row_label(row) + (" *" if row.collision else "")
        first_pfn = row.first_nr * per
        end_pfn = (row.last_nr + 1) * per
        span = f"sections {_row_label(row)}, pfns {first_pfn:#x}-{end_pfn:#x}"
        if not row.present:
            yield (
                f'<g class="gap" data-gap="{row.first_nr}-{row.last_nr}"><title>{esc(span)}: not present</title>'
                f'<text x="8" y="{y + CELL - 2}" fill="#888">{esc(label)} not present</text></g>'
            )
            continue
        last = f' data-last-section="{row.last_nr}"' if row.count > 1 else ""
        collision = ' data-collision="1"' if row.collision else ""
        summary = f"{span}; {' '.join(row.flags)}" + (f" (x{row.count} identical)" if row.count > 1 else "")
        yield f'<g class="row" data-section="{row.first_nr}"{last}{collision}><title>{esc(summary)}</title>'
        yield f'<text x="8" y="{y + CELL - 2}">{esc(label)}</text>'
        for i, (key, detail, mark) in enumerate(zip(row.cells, row.details, row.findings, strict=True)):
            c = next(cls for cls in memory_map.classes if cls.key == key)
            x = LABEL_WIDTH + i * (CELL + GAP)
            sub = first_pfn + i * memory_map.pages_per_subsection
            tip = f"section {row.first_nr} subsection {i}, pfns {sub:#x}-{sub + memory_map.pages_per_subsection:#x}: "
            tip += detail + (f"; {mark} finding" if mark else "")
            outline = (
                f'stroke="{FINDING_COLOURS[mark]}" stroke-width="2"' if mark else 'stroke="#ddd" stroke-width="0.5"'
            )
            finding = f' data-finding="{mark}"' if mark else ""
            yield (
                f'<rect class="cell" data-subsection="{i}" data-state="{key}"{finding} x="{x}" y="{y}" '
                f'width="{CELL}" height="{CELL}" fill="{c.colour}" {outline}><title>{esc(tip)}</title></rect>'
            )
        if row.count > 1:
            yield f'<text x="{LABEL_WIDTH + len(row.cells) * (CELL + GAP) + 6}" y="{y + CELL - 2}">x{row.count}</text>'
        yield "</g>"
