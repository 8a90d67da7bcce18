"""``kmeminspect map`` on real dumps: what the cells say agrees with the kernel's own answers (captured in
the guest: pfn_to_online_page() for every pfn, /sys/devices/system/memory, /proc/zoneinfo, /proc/iomem),
and the HTML page, rendered by a real headless browser (Debian's chromium), shows exactly those states in
the legend's colours."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import get_kernel, missing_prerequisite
from vmfixtures import truth

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
CASES = [
    pytest.param((g, s), id=f"{g}-{s}")
    for g, s in (("6.1", "mixed"), ("6.12", "mixed"), ("7.x", "mixed"), ("6.12", "dimm-offline"))
]
SVG = "{http://www.w3.org/2000/svg}"


def kmem_map(capture: truth.Capture, vmlinux: Path, *args: str, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", "kmeminspect", "--vmcore", str(capture.kdump), "--vmlinux", str(vmlinux)]
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {}))
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def truth_labels(t: dict[str, Any], online: np.ndarray, n: int) -> np.ndarray:
    """What the kernel says each pfn below n is: online-ZONE, offline, device, or "" (anything else)."""
    labels = np.full(n, "", dtype=object)
    for start, end in ((r["start"] // 4096, r["end"] // 4096) for r in t["iomem"] if "Persistent Memory" in r["name"]):
        labels[start:end] = "device"
    per_block = t["block_size"] // 4096
    for b in t["blocks"]:
        if b["state"] == "offline":
            labels[b["phys_index"] * per_block : (b["phys_index"] + 1) * per_block] = "offline"
    for z in t["zoneinfo"]:
        if z["spanned"] and z["zone"] != "Device":
            span = np.zeros(n, dtype=bool)
            span[z["start_pfn"] : z["start_pfn"] + z["spanned"]] = True
            labels[span & online[:n]] = f"online-{z['zone']}"
    return labels


def majority(labels: np.ndarray) -> str:
    values, counts = np.unique(labels, return_counts=True)
    return str(values[counts.argmax()]) if counts.max() * 2 > labels.size else ""


@pytest.mark.parametrize("case", CASES)
def test_map_cells_agree_with_the_kernel(case: tuple[str, str], captured: Callable[[str, str], truth.Capture]) -> None:
    """Every cell whose pfns the kernel mostly calls online (zone Z), offline, or device memory shows that
    state; a section is marked a collision exactly when the kernel has device and RAM pfns in it."""
    generation, scenario = case
    capture = captured(generation, scenario)
    drawing = json.loads(kmem_map(capture, get_kernel(generation).vmlinux, "--json", "map"))
    online = capture.online()
    assert online is not None
    n = online.size
    labels = truth_labels(capture.truth, online, n)
    per_sub, per_sec = drawing["pages_per_subsection"], drawing["pages_per_section"]
    checked: dict[str, int] = {}
    for row in drawing["rows"]:
        first, last = row["sections"]
        if not row["present"]:
            continue
        for nr in range(first, last + 1):
            base = nr * per_sec
            if base >= n:
                continue
            section = labels[base : base + per_sec]
            assert row["collision"] == (
                "device" in section and any(str(x).startswith(("online", "offline")) for x in section)
            ), nr
            for i, shown in enumerate(row["cells"]):
                expected = majority(labels[base + i * per_sub : base + (i + 1) * per_sub])
                if expected == "device":  # its altmap reserve has no initialized memmap: inactive
                    assert shown.startswith("device-") or shown == "inactive", (nr, i, shown)
                elif expected:
                    assert shown == expected, (nr, i, shown, expected)
                checked[expected or "other"] = checked.get(expected or "other", 0) + 1
    # the scenario has what the test is about: online RAM, and device memory or offline blocks
    assert any(k.startswith("online-") for k in checked) and ("device" in checked or "offline" in checked), checked


@pytest.mark.parametrize("case", CASES[1:2] + CASES[3:])
def test_html_map_renders_what_the_snapshot_says(
    case: tuple[str, str], captured: Callable[[str, str], truth.Capture], tmp_path: Path
) -> None:
    """Rendered by headless chromium, each cell's pixels have its state's legend colour; each row is a
    <g data-section> whose cells are the JSON map's; every present section has its row."""
    from PIL import Image

    browser = shutil.which("chromium")
    if browser is None:
        missing_prerequisite("chromium not installed (apt-get install chromium)")
    assert browser is not None
    generation, scenario = case
    capture = captured(generation, scenario)
    vmlinux = get_kernel(generation).vmlinux
    page = tmp_path / "map.html"
    drawing = json.loads(kmem_map(capture, vmlinux, "--json", "map", "--html", str(page)))
    text = page.read_text()
    svg = ElementTree.fromstring(text[text.index("<svg") : text.index("</svg>") + len("</svg>")])
    width, height = int(svg.get("width", "0")), int(svg.get("height", "0"))
    shot = tmp_path / "map.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
         f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=True, cwd=tmp_path,
    )  # fmt: skip
    image = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    legend = {g.get("data-legend"): g.find(f"{SVG}rect") for g in svg.iter(f"{SVG}g") if g.get("data-legend")}
    colours = {key: rect.get("fill") for key, rect in legend.items() if rect is not None}

    def pixel(rect: ElementTree.Element) -> str:
        x = float(rect.get("x", 0)) + float(rect.get("width", 0)) / 2
        y = float(rect.get("y", 0)) + float(rect.get("height", 0)) / 2
        red, green, blue = image.getpixel((int(x), int(y)))  # type: ignore[misc]
        return f"#{red:02x}{green:02x}{blue:02x}"

    for key, rect in legend.items():
        if rect is not None and rect.get("fill") != "none":
            assert pixel(rect) == rect.get("fill"), key
    rows = [g for g in svg.iter(f"{SVG}g") if g.get("data-section")]
    present = [r for r in drawing["rows"] if r["present"]]
    assert [
        (int(g.get("data-section", -1)), int(g.get("data-last-section", g.get("data-section", -1)))) for g in rows
    ] == [tuple(r["sections"]) for r in present]
    for g, row in zip(rows, present, strict=True):
        cells = g.findall(f"{SVG}rect")
        assert [c.get("data-state") for c in cells] == row["cells"]
        for cell, state in zip(cells, row["cells"], strict=True):
            assert cell.get("fill") == colours[state]
            assert pixel(cell) == colours[state], (g.get("data-section"), cell.get("data-subsection"), state)
        assert [c.get("data-finding", "") for c in cells] == row["findings"]
    covered = {nr for r in present for nr in range(r["sections"][0], r["sections"][1] + 1)}
    sections = json.loads(kmem_map(capture, vmlinux, "--json", "sections"))["sections"]
    assert covered == {s["nr"] for s in sections}


def test_terminal_map_colour_follows_no_color(captured: Callable[[str, str], truth.Capture]) -> None:
    """The terminal map is plain text when NO_COLOR is set or --no-color is given, coloured with --color
    (which beats NO_COLOR); plain or coloured, it shows the same cells."""
    capture = captured("6.12", "mixed")
    vmlinux = get_kernel("6.12").vmlinux
    plain = kmem_map(capture, vmlinux, "map")
    assert "\x1b[" not in plain  # not a terminal
    assert "\x1b[" not in kmem_map(capture, vmlinux, "--no-color", "map")
    coloured = kmem_map(capture, vmlinux, "--color", "map", env={"NO_COLOR": "1"})
    assert "\x1b[" in coloured
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", coloured)
    rows = plain.split("\n\nlegend:")[0]  # the legend says how findings are marked, which differs
    assert stripped.split("\n\nlegend:")[0] == rows and rows.count("\n") > 5
