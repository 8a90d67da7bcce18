"""The readers against the kernel's own answers, on every scenario of every kernel generation.

Truth comes from inside the guest at the moment of the dump (kpageflags, sysfs, zoneinfo) and from
crash's ``kmem -n`` on the same dump.
"""

from __future__ import annotations

import functools
import gzip
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import drgn
import numpy as np
import pytest
from conftest import GENERATIONS, IN_GUEST_SCENARIOS, get_kernel, missing_prerequisite
from drgn.helpers.linux.mmzone import decode_section_flags, for_each_present_section
from vmfixtures import truth

from kmeminspect import model
from kmeminspect.kernel import read_snapshot
from kmeminspect.state import MEMMAP_READ, Snapshot
from kmeminspect.target import open_vmcore

pytestmark = pytest.mark.vm

CASES = [pytest.param((g, s), id=f"{g}-{s}") for g in GENERATIONS for s in IN_GUEST_SCENARIOS]


class Read:
    """A capture and what kmeminspect reads from its dumps."""

    def __init__(self, capture: truth.Capture, vmlinux: Path) -> None:
        self.capture = capture
        self.truth: dict[str, Any] = capture.truth
        self.vmlinux = vmlinux

    @functools.cached_property
    def prog(self) -> drgn.Program:
        return open_vmcore(self.capture.kdump, self.vmlinux)

    @functools.cached_property
    def snapshot(self) -> Snapshot:
        return read_snapshot(self.prog, {"kind": "vmcore", "path": str(self.capture.kdump)})

    @functools.cached_property
    def segments(self) -> np.ndarray:
        return model.segments(self.snapshot)

    @functools.cached_property
    def kpageflags(self) -> np.ndarray:
        return np.frombuffer(gzip.decompress((self.capture.directory / "kpageflags.gz").read_bytes()), "<u8")


_reads: dict[tuple[str, str], Read] = {}


@pytest.fixture
def read(request: pytest.FixtureRequest, captured: Callable[[str, str], truth.Capture]) -> Read:
    generation, scenario = request.param
    key = (generation, scenario)
    if key not in _reads:
        _reads[key] = Read(captured(generation, scenario), get_kernel(generation).vmlinux)
    return _reads[key]


def expand(seg: np.ndarray, field: str, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    for row in seg[seg[field] == 1]:
        a, b = int(row["pfn_start"]), min(int(row["pfn_end"]), n)
        if a < n:
            out[a:b] = True
    return out


@pytest.mark.parametrize("read", CASES, indirect=True)
def test_pfn_to_online_page_matches_the_kernel(read: Read) -> None:
    """For every pfn /proc/kpageflags walked, the model's pfn_to_online_page() is the kernel's
    (KPF_NOPAGE on 6.1 and 6.12; a bcc fexit on pfn_to_online_page during the same walk from 7.2 on)."""
    kernel_online = read.capture.online()
    assert kernel_online is not None
    flags = read.kpageflags
    ours = expand(read.segments, "pfn_to_online_page", flags.size)
    wrong = np.flatnonzero(ours != kernel_online)
    assert wrong.size == 0, f"{wrong.size} pfns differ, first {wrong[:5].tolist()}"
    # kpageflags walks to max_pfn rounded to a section; everything beyond is NULL for the kernel too
    assert not read.segments["pfn_to_online_page"][read.segments["pfn_start"] >= flags.size].any()


@pytest.mark.parametrize("read", CASES, indirect=True)
def test_sections_match_drgn(read: Read) -> None:
    """Section numbers and flags equal drgn's own helpers on the same dump."""
    theirs = [(nr, decode_section_flags(s)) for nr, s in for_each_present_section(read.prog)]
    ours = [(s.nr, "|".join(s.flags)) for s in read.snapshot.sections]
    assert ours == theirs


@pytest.mark.parametrize("read", CASES, indirect=True)
def test_blocks_match_sysfs(read: Read) -> None:
    ours = {b.id: b for b in read.snapshot.blocks}
    sysfs = {b["id"]: b for b in read.truth["blocks"]}
    assert set(ours) == set(sysfs)
    for block_id, expected in sysfs.items():
        block = ours[block_id]
        assert block.state == expected["state"], block_id
        # phys_index is the block id (start_section_nr / sections_per_block), not a section number
        assert block.start_pfn == expected["phys_index"] * (read.truth["block_size"] >> read.snapshot.layout.page_shift)
        if expected["node"] is not None:
            assert block.nid == expected["node"]
        if block.state == "online":
            # an online block's valid_zones names its zone; a block spanning several zones has none
            if block.zone is not None:
                assert expected["valid_zones"] == [block.zone], block_id
            else:
                assert expected["valid_zones"] == ["none"], block_id


@pytest.mark.parametrize("read", CASES, indirect=True)
def test_zones_match_zoneinfo(read: Read) -> None:
    """Initialized pages' zones lie in that zone's /proc/zoneinfo span (holes excepted, see audit)."""
    spans = {
        (z["node"], z["zone"]): (z["start_pfn"], z["start_pfn"] + z["spanned"])
        for z in read.truth["zoneinfo"]
        if z.get("spanned") and "start_pfn" in z  # unpopulated zones (ZONE_DEVICE) print no start_pfn
    }
    names = read.snapshot.layout.zone_names
    assert list(names[: len({z["zone"] for z in read.truth["zoneinfo"]})]) == list(
        dict.fromkeys(z["zone"] for z in read.truth["zoneinfo"])
    )
    seg = read.segments
    checked = 0
    for row in seg[(seg["pfn_active"] == 1) & (seg["reserved"] == 0)]:
        key = (int(row["nid"]), names[int(row["zone_id"])])
        assert key in spans, (key, int(row["pfn_start"]))
        start, end = spans[key]
        assert start <= row["pfn_start"] and row["pfn_end"] <= end, (key, int(row["pfn_start"]))
        checked += int(row["pfn_end"] - row["pfn_start"])
    assert checked > 0


@pytest.mark.parametrize("read", CASES, indirect=True)
def test_elf_and_kdump_read_the_same(read: Read) -> None:
    elf = read_snapshot(open_vmcore(read.capture.elf, read.vmlinux), {"kind": "vmcore"})
    kdump = read.snapshot
    assert elf.sections == kdump.sections
    assert elf.blocks == kdump.blocks
    assert elf.pagemaps == kdump.pagemaps
    assert np.array_equal(elf.runs, kdump.runs)


def _crash_sections(read: Read) -> list[tuple[int, str, str, str, str, int]] | str:
    if not shutil.which("crash"):
        missing_prerequisite("crash not installed (apt-get install crash)")
    script = read.capture.directory / "kmem-n.crash"
    script.write_text("kmem -n\nquit\n")
    result = subprocess.run(
        ["crash", "-s", "-i", str(script), str(read.vmlinux), str(read.capture.elf)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    rows = re.findall(
        r"^\s*(\d+)\s+([0-9a-f]{16})\s+([0-9a-f]{16})\s+([0-9a-f]{16})\s+([PMOEDV]+)\s+(\d+)",
        result.stdout,
        re.M,
    )
    if not rows:
        output = (result.stdout + result.stderr).strip()
        return output.splitlines()[-1] if output else ""
    return [(int(a), b, c, d, e, int(f)) for a, b, c, d, e, f in rows]


#: generations whose dumps bookworm's crash 8.0.2 opens (measured; docs/testing.md)
CRASH_OPENS = ["6.1"]


@pytest.mark.parametrize(
    "read", [pytest.param((g, "boot"), id=g) for g in GENERATIONS if g not in CRASH_OPENS], indirect=True
)
def test_crash_still_cannot_open_newer_dumps(read: Read) -> None:
    """bookworm's crash 8.0.2 (gdb 10.2) exits silently on 6.12 and cannot read 7.x dumps, so kmem -n is
    compared on 6.1 only. When a crash that can is installed, this fails: add the generation to
    CRASH_OPENS."""
    assert isinstance(_crash_sections(read), str)


LETTERS = {
    "SECTION_MARKED_PRESENT": "P",
    "SECTION_HAS_MEM_MAP": "M",
    "SECTION_IS_ONLINE": "O",
    "SECTION_IS_EARLY": "E",
    "SECTION_TAINT_ZONE_DEVICE": "D",
}


@pytest.mark.parametrize(
    "read", [pytest.param((g, s), id=f"{g}-{s}") for g in CRASH_OPENS for s in IN_GUEST_SCENARIOS], indirect=True
)
def test_sections_match_crash_kmem_n(read: Read) -> None:
    """The section table equals crash's kmem -n (numbers, addresses, state letters, memmap, pfn)."""
    theirs = _crash_sections(read)
    assert not isinstance(theirs, str), f"crash could not read the section table: {theirs}"
    mask = read.snapshot.layout.section_flags["SECTION_MAP_MASK"]
    ours = [
        (
            s.nr,
            f"{s.address:016x}",
            f"{s.section_mem_map & mask:016x}",
            f"{s.memmap:016x}",
            "".join(letter for name, letter in LETTERS.items() if name in s.flags),
            s.start_pfn,
        )
        for s in read.snapshot.sections
    ]
    assert ours == theirs


@pytest.mark.parametrize("read", CASES, indirect=True)
def test_memmap_read_everywhere_valid(read: Read) -> None:
    """Every valid pfn's struct page is read from these unfiltered dumps (none 'unmapped'/'missing')."""
    seg = read.segments
    valid = seg["pfn_valid"] == 1
    assert (seg["memmap"][valid] == MEMMAP_READ).all()


KPF_RESERVED = 32  # include/linux/kernel-page-flags.h: reported by /proc/kpageflags since 2.6.32


#: kpageflags bits of the page types it reports: KPF_SLAB, KPF_BUDDY, KPF_HUGE, KPF_OFFLINE, KPF_PGTABLE
TYPED = sum(1 << bit for bit in (7, truth.KPF_BUDDY, truth.KPF_HUGE, truth.KPF_OFFLINE, 26))


@pytest.mark.parametrize("read", [pytest.param((g, "virtio-mem-partial"), id=g) for g in GENERATIONS], indirect=True)
def test_single_page_decode_matches_kpageflags(read: Read) -> None:
    """The full decode of single pages (``pfn PFN``) agrees with the kernel's own kpageflags bits
    (the stable ones: buddy state changes between the kpageflags read and the dump)."""
    from kmeminspect.kernel.layout import page_format
    from kmeminspect.kernel.pages import describe_page

    fmt = page_format(read.prog, len(read.snapshot.layout.zone_names))
    flags = read.kpageflags
    online = read.capture.online()
    assert online is not None
    rng = np.random.default_rng(3)
    offline = [a for a, _ in read.truth["offline_page_ranges"]]
    pfns = offline + rng.choice(np.flatnonzero(online), 300, replace=False).tolist()
    for pfn in pfns:
        page = describe_page(read.prog, read.snapshot.layout, fmt, pfn)
        assert page is not None
        kernel = int(flags[pfn])
        assert ("PG_reserved" in page["flags"]) == bool(kernel >> KPF_RESERVED & 1), pfn
        assert (page["page_type"] == "offline") == bool(kernel >> truth.KPF_OFFLINE & 1), pfn
        if not kernel & TYPED:  # no type for kpageflags (a page freed since is in the buddy at the dump)
            assert page["page_type"] in (None, "buddy"), (pfn, page)
    assert offline, "virtio-mem-partial has PageOffline pages"


def test_mismatched_vmlinux_names_the_build_id(captured: Callable[[str, str], truth.Capture]) -> None:
    """A real dump with another kernel's vmlinux: one line naming the build id it needed, exit 2."""
    capture = captured("6.1", "boot")
    wrong = get_kernel("6.12").vmlinux
    result = subprocess.run(
        [sys.executable, "-m", "kmeminspect", "--vmcore", str(capture.kdump), "--vmlinux", str(wrong), "sections"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "does not match" in lines[0] and "build id" in lines[0], lines[0]
    expected = open_vmcore(capture.kdump, get_kernel("6.1").vmlinux).main_module().build_id
    assert expected is not None and expected.hex() in lines[0]


def test_truncated_real_vmcore(captured: Callable[[str, str], truth.Capture], tmp_path: Path) -> None:
    capture = captured("6.1", "boot")
    cut = tmp_path / "vmcore.elf"
    with open(capture.elf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(64 << 20))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kmeminspect",
            "--vmcore",
            str(cut),
            "--vmlinux",
            str(get_kernel("6.1").vmlinux),
            "audit",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "truncated" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("read", [pytest.param((g, "hugetlb-hvo"), id=g) for g in GENERATIONS], indirect=True)
def test_aliased_tails_of_hvo_pages_decode_as_tails(read: Read) -> None:
    """With hugetlb_free_vmemmap=on, page-aligned tail struct pages alias the head's vmemmap page (before
    v7.1 they read as fake heads): the single-page decode still names the real head, as the kernel does."""
    from kmeminspect.kernel.layout import page_format
    from kmeminspect.kernel.pages import describe_page

    fmt = page_format(read.prog, len(read.snapshot.layout.zone_names))
    flags = read.kpageflags
    heads = np.flatnonzero((flags >> 15 & 1 == 1) & (flags >> 17 & 1 == 1))  # KPF_COMPOUND_HEAD, KPF_HUGE
    assert heads.size == 64
    for head in heads[:8].tolist():
        for tail in (head + 1, head + 64, head + 128, head + 511):
            page = describe_page(read.prog, read.snapshot.layout, fmt, tail)
            assert page is not None and page["compound_head_pfn"] == head, (head, tail, page)
            assert "PG_head" not in page["flags"]
        page = describe_page(read.prog, read.snapshot.layout, fmt, head)
        assert page is not None and page["compound_head_pfn"] is None and "PG_head" in page["flags"]


@pytest.mark.parametrize("read", [pytest.param((g, "pmem-collision"), id=g) for g in GENERATIONS], indirect=True)
def test_raw_kdump_reads_like_flattened(read: Read, tmp_path: Path) -> None:
    """QEMU writes the flattened kdump format; ``makedumpfile -R`` reassembles the usual (raw) one."""
    if not shutil.which("makedumpfile"):
        missing_prerequisite("makedumpfile not installed (apt-get install makedumpfile)")
    raw = tmp_path / "vmcore.raw"
    with open(read.capture.kdump, "rb") as flattened:
        subprocess.run(["makedumpfile", "-R", str(raw)], stdin=flattened, check=True, capture_output=True)
    with open(raw, "rb") as f:
        assert f.read(8) == b"KDUMP   "
    snap = read_snapshot(open_vmcore(raw, read.vmlinux), {"kind": "vmcore"})
    assert snap.sections == read.snapshot.sections and snap.blocks == read.snapshot.blocks
    assert np.array_equal(snap.runs, read.snapshot.runs)
