"""The map's pure logic on synthetic snapshots: classes per cell, collapsing, gaps, collisions, findings.

Synthetic state checks the drawing code only; tests/test_map.py checks the map against real kernels."""

from __future__ import annotations

import dataclasses

import synthetic

from kmeminspect import memorymap
from kmeminspect.audit import ERROR, Finding


def rows_of(kinds: list[str], **kwargs: int) -> list[memorymap.Row]:
    return memorymap.build(synthetic.build(kinds, **kwargs)).rows


def test_identical_sections_collapse_and_absent_ones_are_one_gap() -> None:
    rows = rows_of(["boot", "boot", "boot", "absent", "absent", "hot-online", "hot-offline"])
    assert [(r.first_nr, r.last_nr, r.present) for r in rows] == [
        (0, 2, True),
        (3, 4, False),
        (5, 5, True),
        (6, 6, True),
    ]
    assert set(rows[0].cells) == {"online-DMA32"} and rows[0].count == 3
    assert set(rows[2].cells) == {"online-Movable"}
    assert set(rows[3].cells) == {"offline"}
    assert "inactive: " in rows[3].details[0] and "zeroed" in rows[3].details[0]


def test_device_cells_holes_and_the_altmap_reserve() -> None:
    (row,) = rows_of(["device"], device_subsections=8, altmap_reserve=2 * 512)
    assert row.cells[:2] == ("inactive", "inactive")  # the reserve's memmap is never initialized
    assert row.cells[2:8] == ("device-fsdax",) * 6
    assert row.cells[8:] == ("hole",) * 56
    assert not row.collision  # device pfns only


def test_collision_cells_and_sections() -> None:
    (row,) = rows_of(["collision"], device_subsections=8)
    assert row.collision
    assert row.cells[:56] == ("online-DMA32",) * 56 and row.cells[56:] == ("device-fsdax",) * 8
    # device memory starting inside a subsection: that cell holds both
    snapshot = synthetic.build(["collision"], device_subsections=8)
    shifted = snapshot.runs.copy()
    boundary = shifted["pfn_end"] == 56 * 512
    shifted["pfn_end"][boundary] += 100
    shifted["pfn_start"][shifted["pfn_start"] == 56 * 512] += 100
    snapshot.runs = shifted
    snapshot.pagemaps = [dataclasses.replace(p, ranges=((56 * 512 + 100, 64 * 512),)) for p in snapshot.pagemaps]
    snapshot.zones = [
        dataclasses.replace(z, spanned=z.spanned + 100) if z.name == "DMA32" else z for z in snapshot.zones
    ]
    cells = memorymap.build(snapshot).rows[0].cells
    assert cells[56] == "collision" and cells[57] == "device-fsdax"


def test_findings_mark_the_cells_they_touch_errors_first() -> None:
    snapshot = synthetic.build(["boot", "boot"])
    findings = [
        Finding("online-page-outside-zone", "warning", 600, 700, "w", {}),
        Finding("online-memmap-not-sane", ERROR, 1023, 1025, "e", {}),
        Finding("online-page-outside-zone", "warning", 1600, 1700, "w", {}),
        Finding("some-info", "info", 0, 65536, "i", {}),
    ]
    drawing = memorymap.build(snapshot, findings=findings)
    first = drawing.rows[0]
    # cell 1 (pfns 512-1023) holds a warning and an error: the error shows; cell 3 only a warning
    assert first.findings[:5] == ("", "error", "error", "warning", "")
    assert set(first.findings[5:]) == {""}
    assert (drawing.rows[0].first_nr, drawing.rows[0].last_nr) == (0, 0)  # the findings keep section 1 apart
    assert drawing.rows[1].findings == ("",) * 64


def test_terminal_and_html_drawings() -> None:
    drawing = memorymap.build(synthetic.build(["boot", "boot", "absent", "collision"]))
    plain = memorymap.render_terminal(drawing, colour=False)
    assert "\x1b[" not in plain
    lines = plain.splitlines()
    assert lines[1].split() == ["0-1", "3" * 64, "x2"]
    assert lines[2].split() == ["2", "(not", "present)"]
    assert lines[3].split() == ["3*", "3" * 56 + "f" * 8]
    coloured = memorymap.render_terminal(drawing, colour=True)
    assert coloured.count("\x1b[0m") >= 4  # runs of equal cells share one escape
    page = memorymap.render_html(drawing)
    assert page.count('data-section="') == 2 and 'data-last-section="1"' in page and 'data-collision="1"' in page
    assert page.count('class="cell"') == 128
