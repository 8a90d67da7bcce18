"""The test bed brings every scenario up on every kernel generation, and its truth says what it should.

Each assertion compares two of the kernel's own views captured at the same moment (sysfs memory
blocks, /proc/iomem, /proc/zoneinfo, /proc/kpageflags), so a scenario that did not reach its state, or
a capture that mixes moments, fails here. early-boot has no user space at its moment: its truth is what
QEMU's gdbstub read at the stop (test_early_boot).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import drgn
import numpy as np
import pytest
from conftest import GENERATIONS, IN_GUEST_SCENARIOS
from vmfixtures import download, scenarios, truth

from kmeminspect import audit, model
from kmeminspect.errors import TargetError
from kmeminspect.kernel import read_snapshot
from kmeminspect.target import open_vmcore

pytestmark = pytest.mark.vm

PAGE_SHIFT = 12
SECTION_PAGES = 1 << (27 - PAGE_SHIFT)  # x86_64: SECTION_SIZE_BITS 27
KPF_RESERVED = 32  # include/linux/kernel-page-flags.h (kernel-hacking flags, reported since 2.6.32)

CASES = [pytest.param((g, s), id=f"{g}-{s}") for g in GENERATIONS for s in IN_GUEST_SCENARIOS]


class View:
    """One capture's truth, with pfn-level helpers."""

    def __init__(self, capture: truth.Capture) -> None:
        self.capture = capture
        self.t: dict[str, Any] = capture.truth
        self.flags = np.frombuffer(gzip.decompress((capture.directory / "kpageflags.gz").read_bytes()), "<u8")
        self.block_pages = self.t["block_size"] >> PAGE_SHIFT
        oracle = capture.online()
        assert oracle is not None, "every capture records pfn_to_online_page() (KPF_NOPAGE, or bcc from 7.2)"
        self.kernel_online = oracle

    def online(self, start: int, end: int) -> np.ndarray:
        """pfn_to_online_page() != NULL for pfns [start, end), as the kernel answered."""
        return self.kernel_online[start : min(end, self.kernel_online.size)]

    def blocks(self, predicate: Callable[[dict[str, Any]], bool] = lambda b: True) -> list[dict[str, Any]]:
        return [b for b in self.t["blocks"] if predicate(b)]

    def block_range(self, block: dict[str, Any]) -> tuple[int, int]:
        start = block["id"] * self.block_pages
        return start, start + self.block_pages

    def iomem(self, name: str, depth: int | None = None) -> list[dict[str, Any]]:
        return [e for e in self.t["iomem"] if e["name"] == name and (depth is None or e["depth"] == depth)]

    def zone(self, name: str) -> dict[str, Any]:
        return next(z for z in self.t["zoneinfo"] if z["zone"] == name)

    def ram_sections(self) -> np.ndarray:
        """Per pfn walked: its section holds System RAM (/proc/iomem), i.e. it is a present section.
        Blocks of 16 sections (big-blocks) also span absent ones: holes whose pfns are always NULL."""
        mask = np.zeros(self.flags.size, dtype=bool)
        for e in self.t["iomem"]:
            if e["name"].startswith("System RAM"):
                start, end = pfns(e["start"], e["end"])
                mask[start // SECTION_PAGES * SECTION_PAGES : -(-end // SECTION_PAGES) * SECTION_PAGES] = True
        return mask

    def hotplugged_blocks(self) -> list[dict[str, Any]]:
        """Blocks at or above 4 GiB: where QEMU's pc machine puts device memory (DIMM, virtio-mem)."""
        return self.blocks(lambda b: b["id"] * self.t["block_size"] >= 1 << 32)


@pytest.fixture
def view(request: pytest.FixtureRequest, captured: Callable[[str, str], truth.Capture]) -> View:
    generation, scenario = request.param
    return View(captured(generation, scenario))


def pfns(byte_start: int, byte_end: int) -> tuple[int, int]:
    return byte_start >> PAGE_SHIFT, byte_end >> PAGE_SHIFT


@pytest.mark.parametrize("view", CASES, indirect=True)
def test_capture_is_consistent(view: View) -> None:
    """Release, command line, dumps, and (where kpageflags can say) blocks agree with NOPAGE."""
    t = view.t
    assert t["release"] == view.capture.directory.parent.name
    assert "memhp_default_state=" in t["cmdline"]
    assert view.flags.size == t["kpageflags_pfns"] and view.flags.size % SECTION_PAGES == 0
    with open(view.capture.elf, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    with open(view.capture.kdump, "rb") as f:
        assert f.read(16).startswith(b"makedumpfile")  # QEMU writes the flattened format
    for block in t["blocks"]:
        # phys_index is the block id (start_section_nr / sections_per_block), not its first section
        assert block["phys_index"] == block["id"]
    # pfns of ZONE_DEVICE memory are never online, even inside an online block (pmem-collision),
    # unless the kmem driver turned them into System RAM (dax-kmem)
    device = np.zeros(view.flags.size, dtype=bool)
    for region in view.iomem("Persistent Memory (legacy)", depth=0):
        start, end = pfns(region["start"], region["end"])
        device[start:end] = True
    for ram in view.iomem("System RAM (kmem)"):
        start, end = pfns(ram["start"], ram["end"])
        device[start:end] = False
    ram = view.ram_sections()
    for block in t["blocks"]:
        start, end = view.block_range(block)
        online = view.online(start, end)
        if block["state"] == "online":
            expected = ram[start:end] & ~device[start:end]
            assert (online == expected[: online.size]).all(), block
        else:
            assert not online.any(), block


def _case(scenario: str) -> list[Any]:
    return [pytest.param((g, scenario), id=g) for g in GENERATIONS]


@pytest.mark.parametrize("view", _case("boot"), indirect=True)
def test_boot(view: View) -> None:
    assert view.blocks() and all(b["state"] == "online" for b in view.blocks())
    assert view.zone("Movable").get("spanned", 0) == 0
    assert view.zone("Device").get("spanned", 0) == 0
    assert not view.hotplugged_blocks()


@pytest.mark.parametrize("view", _case("dimm-offline"), indirect=True)
def test_dimm_offline(view: View) -> None:
    dimm = view.hotplugged_blocks()
    assert len(dimm) == scenarios.DIMM_SIZE // view.t["block_size"]
    assert all(b["state"] == "offline" for b in dimm)
    start, end = pfns(1 << 32, (1 << 32) + scenarios.DIMM_SIZE)
    assert end <= view.flags.size and not view.online(start, end).any()


@pytest.mark.parametrize("view", _case("dimm-online"), indirect=True)
def test_dimm_online(view: View) -> None:
    dimm = view.hotplugged_blocks()
    assert len(dimm) == scenarios.DIMM_SIZE // view.t["block_size"]
    assert all(b["state"] == "online" for b in dimm)
    # an online block's valid_zones names the zone it is in
    assert dimm[0]["valid_zones"] == ["Normal"]
    assert all(b["valid_zones"] == ["Movable"] for b in dimm[1:])
    assert view.zone("Normal")["start_pfn"] == view.block_range(dimm[0])[0]
    assert view.zone("Movable")["start_pfn"] == view.block_range(dimm[1])[0]
    start, end = pfns(1 << 32, (1 << 32) + scenarios.DIMM_SIZE)
    assert view.online(start, end).all()


@pytest.mark.parametrize("view", _case("dimm-removed"), indirect=True)
def test_dimm_removed(view: View) -> None:
    assert not view.hotplugged_blocks()
    assert not [e for e in view.t["iomem"] if e["start"] >= 1 << 32 and e["name"] == "System RAM"]
    # x86 never lowers max_pfn after a remove: the removed range is still walked, and NOPAGE
    start, end = pfns(1 << 32, (1 << 32) + scenarios.DIMM_SIZE)
    assert not view.online(start, min(end, view.flags.size)).any()


@pytest.mark.parametrize("view", _case("memmap-on-memory"), indirect=True)
def test_memmap_on_memory(view: View) -> None:
    assert "memory_hotplug.memmap_on_memory=1" in view.t["cmdline"]
    dimm = view.hotplugged_blocks()
    assert len(dimm) == 1 and dimm[0]["state"] == "online"
    start, end = view.block_range(dimm[0])
    assert view.online(start, end).all()
    # the block's own memmap (64 bytes per page) sits at its start: those pages are never free
    vmemmap_pages = view.block_pages * 64 >> PAGE_SHIFT
    buddy = (view.flags[start:end] >> truth.KPF_BUDDY) & 1
    assert not buddy[:vmemmap_pages].any()
    assert buddy[vmemmap_pages:].any()


@pytest.mark.parametrize("view", _case("virtio-mem-partial"), indirect=True)
def test_virtio_mem_partial(view: View) -> None:
    ram = view.iomem("System RAM (virtio_mem)")
    assert ram, "no virtio-mem System RAM in /proc/iomem"
    added = sum(e["end"] - e["start"] for e in ram)
    assert added % view.t["block_size"] == 0 and added > scenarios.VIRTIO_MEM_SHRUNK
    # what virtio-mem added but does not plug is PageOffline (KPF_OFFLINE), exactly
    offline = 0
    for e in ram:
        start, end = pfns(e["start"], e["end"])
        offline += int(((view.flags[start:end] >> truth.KPF_OFFLINE) & 1).sum())
    assert offline == (added - scenarios.VIRTIO_MEM_SHRUNK) >> PAGE_SHIFT
    assert all(b["state"] == "online" for b in view.hotplugged_blocks())


def _pmem(view: View) -> dict[str, Any]:
    regions = view.iomem("Persistent Memory (legacy)", depth=0)
    assert len(regions) == 1, view.t["iomem"]
    return regions[0]


def _assert_device_pfns_not_online(view: View, region: dict[str, Any]) -> None:
    assert view.zone("Device")["spanned"] > 0
    start, end = pfns(region["start"], region["end"])
    assert not view.online(start, end).any()


@pytest.mark.parametrize("view", _case("pmem-fsdax"), indirect=True)
def test_pmem_fsdax(view: View) -> None:
    region = _pmem(view)
    assert (region["start"], region["end"] - region["start"]) == (scenarios.PMEM_START, scenarios.PMEM_SIZE)
    assert view.iomem("namespace0.0")
    _assert_device_pfns_not_online(view, region)


@pytest.mark.parametrize("view", _case("pmem-devdax"), indirect=True)
def test_pmem_devdax(view: View) -> None:
    region = _pmem(view)
    assert view.iomem("dax0.0")
    _assert_device_pfns_not_online(view, region)


@pytest.mark.parametrize("view", _case("pmem-collision"), indirect=True)
def test_pmem_collision(view: View) -> None:
    region = _pmem(view)
    assert region["start"] % (2 << 20) == 0 and region["start"] % (128 << 20) != 0
    section_start = region["start"] // (128 << 20) * (128 << 20)
    ram_below = [
        e for e in view.iomem("System RAM", depth=0) if e["start"] <= section_start < e["end"] <= region["start"]
    ]
    assert ram_below, "no System RAM in the pmem range's first section"
    _assert_device_pfns_not_online(view, region)
    # the same section: its RAM pfns are online, its pmem pfns are not
    ram_start, ram_end = pfns(section_start, region["start"])
    assert view.online(ram_start, ram_end).all()


@pytest.mark.parametrize("view", _case("dax-kmem"), indirect=True)
def test_dax_kmem(view: View) -> None:
    kmem = view.iomem("System RAM (kmem)")
    assert len(kmem) == 1
    start, end = pfns(kmem[0]["start"], kmem[0]["end"])
    blocks = view.blocks(lambda b: start <= view.block_range(b)[0] < end)
    assert len(blocks) == (end - start) // view.block_pages
    assert all(b["state"] == "online" and b["valid_zones"] == ["Movable"] for b in blocks)
    assert view.online(start, end).all()


@pytest.mark.parametrize("view", _case("hugetlb-hvo"), indirect=True)
def test_hugetlb_hvo(view: View) -> None:
    assert "hugetlb_free_vmemmap=on" in view.t["cmdline"]
    assert int(view.t["meminfo"]["HugePages_Total"]) == scenarios.HUGETLB_PAGES
    assert view.t["huge_pfns"] == scenarios.HUGETLB_PAGES * 512


@pytest.mark.parametrize("view", _case("big-blocks"), indirect=True)
def test_big_blocks(view: View) -> None:
    """Boot memory ending at 66 GiB: 2 GiB blocks of 16 sections, each half RAM, half hole."""
    t = view.t
    assert t["block_size"] == scenarios.BIG_BLOCK_SIZE
    assert view.block_pages == 16 * SECTION_PAGES
    high = scenarios.BIG_HIGH_START // scenarios.BIG_BLOCK_SIZE
    # sysfs numbers blocks and their phys_index in block units: block 32 starts at section 32 * 16
    assert [(b["id"], b["phys_index"], b["state"]) for b in view.blocks()] == [(0, 0, "online"), (high, high, "online")]
    assert [b["valid_zones"] for b in view.blocks()] == [["none"], ["Normal"]]  # block 0 spans DMA and DMA32
    # kpageflags walks to max_pfn, the end of boot memory; only 2 GiB of it are RAM
    assert view.flags.size == scenarios.BIG_END >> PAGE_SHIFT
    assert view.zone("Normal")["present"] == scenarios.BIG_HIGH_SIZE >> PAGE_SHIFT
    low_gib = pfns(0, 1 << 30)
    (start, end), (high_start, high_end) = (view.block_range(b) for b in view.blocks())
    assert view.online(*low_gib).all() and not view.online(low_gib[1], end).any()
    ram_start = scenarios.BIG_HIGH_START >> PAGE_SHIFT
    assert not view.online(high_start, ram_start).any() and view.online(ram_start, high_end).all()
    # QEMU holds 2 GiB, so do the dumps (the ELF before punching holes), not 66
    assert os.path.getsize(view.capture.elf) < 3 << 30


def _open_early_dump(capture: truth.Capture, path: Path, vmlinux: Path) -> drgn.Program:
    """A dump taken before the guest published its VMCOREINFO, read with the one it published later
    (what ``kmeminspect --vmcore D --vmcoreinfo FILE`` does)."""
    with pytest.raises(TargetError, match="pass --vmcoreinfo"):
        open_vmcore(path, vmlinux)
    return open_vmcore(path, vmlinux, capture.directory / "vmcoreinfo")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_early_boot(
    generation: str,
    captured: Callable[[str, str], truth.Capture],
    kernel_of: Callable[[str], download.Kernel],
) -> None:
    """Dumped at deferred_init_memmap()'s entry: what was deferred is recorded, nothing of it initialized.
    kmeminspect reads it, and the audit calls it deferred, not corrupt."""
    capture = captured(generation, "early-boot")
    t = capture.truth
    assert t["stop"]["function"] == scenarios.EARLY_BOOT_STOP and t["stop"]["pc"] == t["stop"]["address"]
    assert "nokaslr" in t["cmdline"].split() and "memhp_default_state=" in t["cmdline"]
    first = t["first_deferred_pfn"]
    node_end = t["node_start_pfn"] + t["node_spanned_pages"]
    assert t["node_start_pfn"] < first < node_end, "deferred init had begun (first_deferred_pfn reset)"
    assert "deferred pages initialised" in t["after_boot"]["deferred_init"]
    # before user space: the dumps lack VMCOREINFO, the boot's own is kept beside them
    vmcoreinfo = capture.vmcoreinfo()
    assert vmcoreinfo is not None and f"OSRELEASE={t['release']}\n".encode() in vmcoreinfo
    assert b"VMCOREINFO" not in [name for name, _, _ in truth.elf_notes(capture.elf)]
    vmlinux = kernel_of(generation).vmlinux
    elf, snap = (
        read_snapshot(_open_early_dump(capture, p, vmlinux), {"kind": "vmcore"}) for p in (capture.elf, capture.kdump)
    )
    # both formats read alike, except where a deferred (uninitialized) struct page holds leftovers that
    # look like a device tail whose head is a low address: QEMU's ELF maps it (p_vaddr = p_paddr), kdump not
    assert elf.sections == snap.sections and elf.nodes == snap.nodes and elf.zones == snap.zones
    assert np.array_equal(elf.runs[elf.runs["pfn_end"] <= first], snap.runs[snap.runs["pfn_end"] <= first])
    # the dump shows what the gdbstub read at the stop
    assert [(n.nid, n.first_deferred_pfn) for n in snap.nodes] == [(0, first)]
    assert snap.layout.max_pfn == t["max_pfn"]
    zones = [(z["zone"], z["start_pfn"], z["spanned"], z["present"]) for z in t["zones"]]
    assert [(z.name, z.start_pfn, z.spanned, z.present) for z in snap.zones] == zones
    assert not snap.blocks  # memory block devices come later (memory_dev_init() in driver_init())
    # the kernel hands the deferred pfns out (online sections) though their memmaps are not initialized
    seg = model.segments(snap, first, node_end)
    assert (seg["deferred"] == 1).all() and (seg["pfn_to_online_page"] == 1).all()
    zeroed = seg["pfn_end"][seg["zeroed"] == 1] - seg["pfn_start"][seg["zeroed"] == 1]
    assert zeroed.sum() > (node_end - first) // 2
    findings = audit.audit(snap)
    assert [(f.pfn_start, f.pfn_end, f.severity) for f in findings if f.rule == "deferred-init"] == [
        (first, node_end, audit.INFO)
    ]
    inside = [f for f in findings if f.severity != audit.INFO and f.pfn_start < node_end and f.pfn_end > first]
    assert not inside, inside
