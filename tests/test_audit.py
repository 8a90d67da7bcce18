"""The audit on real kernels: clean fixtures give only the documented kernel oddity, and copies of
fixture vmcores with one injected inconsistency each give the right rule over the right range."""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import drgn
import numpy as np
import pytest
from conftest import GENERATIONS, IN_GUEST_SCENARIOS, get_kernel
from drgn import offsetof
from drgn.helpers.linux.mm import follow_phys
from drgn.helpers.linux.xarray import xa_load
from vmfixtures import scenarios, truth

from kmeminspect import audit, model
from kmeminspect.kernel import read_snapshot
from kmeminspect.kernel.layout import page_format
from kmeminspect.state import Pagemap, Snapshot
from kmeminspect.target import elf_program_headers, open_vmcore

pytestmark = pytest.mark.vm


def read(path: Path, vmlinux: Path) -> tuple[drgn.Program, Snapshot]:
    prog = open_vmcore(path, vmlinux)
    return prog, read_snapshot(prog, {"kind": "vmcore", "path": str(path)})


#: the warnings a healthy stock kernel gets (docs/audit-rules.md, "What a clean stock kernel reports")
STOCK_WARNINGS = {"reserved-page-past-last-zone", "online-page-outside-zone"}


@pytest.mark.parametrize("case", [pytest.param((g, s), id=f"{g}-{s}") for g in GENERATIONS for s in IN_GUEST_SCENARIOS])
def test_clean_fixture_passes(case: tuple[str, str], captured: Callable[[str, str], truth.Capture]) -> None:
    """A healthy stock kernel passes: no error finding, so exit 0. The reserved pfns past the last boot zone
    with zone id MAX_NR_ZONES (init_reserved_page() with deferred struct page init; docs/semantics.md)
    are a warning of their own rule, exactly over the pfns the kernel hands out with that signature."""
    generation, scenario = case
    capture = captured(generation, scenario)
    _, snap = read(capture.kdump, get_kernel(generation).vmlinux)
    findings = audit.audit(snap)
    assert not [f for f in findings if f.severity == audit.ERROR], findings
    assert audit.exit_code(findings) == 0
    max_zones = len(snap.layout.zone_names)
    boot_zone_end = max(
        z.start_pfn + z.spanned
        for z in snap.zones
        if z.spanned and z.name != "Device" and z.name != "Movable" and z.name != "Normal"
    )
    oddity = [f for f in findings if f.rule == "reserved-page-past-last-zone"]
    # the oddity needs reserved pfns past the last boot zone's end in its last section. Where DMA32 ends
    # at 4 GiB because more boot memory follows (big-blocks), memmap_init() gives that e820 hole the zone
    # of the next memory range instead (Normal: a reserved page outside its zone's span, a warning)
    if boot_zone_end % snap.layout.pages_per_section:
        assert oddity, "the zone-id oddity of stock kernels must be reported"
    online = capture.online()
    assert online is not None
    last_section_end = -(-boot_zone_end // snap.layout.pages_per_section) * snap.layout.pages_per_section
    for f in oddity:
        assert f.severity == audit.WARNING and f.category == audit.KERNEL, f
        assert f.evidence["zone_id"] == max_zones, f
        assert boot_zone_end <= f.pfn_start < f.pfn_end <= last_section_end, f
        assert f.pfn_end - f.pfn_start <= 16, f
        # the same pfns are what the kernel itself hands out (its own answer, kpageflags or bcc)
        assert online[f.pfn_start : f.pfn_end].all()
    warnings = [f for f in findings if f.severity == audit.WARNING]
    assert {f.rule for f in warnings} <= STOCK_WARNINGS, warnings
    assert all(f.evidence["reserved"] for f in warnings if f.rule == "online-page-outside-zone"), warnings
    assert audit.exit_code(findings, fail_on=audit.WARNING) == (1 if warnings else 0)


# -- injected corruption ------------------------------------------------------------------------


class Injector:
    """Writes into a sparse copy of an ELF vmcore at kernel virtual addresses."""

    def __init__(self, source: Path, dest: Path, prog: drgn.Program) -> None:
        subprocess.run(["cp", "--sparse=always", str(source), str(dest)], check=True)
        self.path = dest
        self.prog = prog
        self.init_mm = prog["init_mm"].address_of_()
        with open(dest, "rb") as f:
            _, headers = elf_program_headers(f)
        self.loads = [(h.paddr, h.filesz, h.offset) for h in headers if h.type == 1]  # PT_LOAD

    def offset(self, address: int) -> int:
        return self.phys_offset(follow_phys(self.init_mm, address).value_())

    def phys_offset(self, phys: int) -> int:
        for paddr, size, offset in self.loads:
            if paddr <= phys < paddr + size:
                return offset + phys - paddr
        raise AssertionError(f"phys {phys:#x} not in the dump")

    def write_u32(self, address: int, value: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.offset(address))
            f.write((value & 0xFFFFFFFF).to_bytes(4, "little"))

    def drop_from_dump(self, address: int, size: int) -> None:
        """Make the dump lack the physical pages behind [address, address + size) of kernel virtual memory,
        as a filtered or truncated dump would: the PT_LOAD holding them is split around them in a new
        program header table appended to the file (the page tables still map them)."""
        phys = follow_phys(self.init_mm, address).value_()
        with open(self.path, "r+b") as f:
            f.seek(0)
            head = bytearray(f.read(64))
            phoff = struct.unpack_from("<Q", head, 32)[0]
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            entries = []
            for i in range(phnum):
                entry = bytearray(table[i * phentsize : (i + 1) * phentsize])
                p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", entry)
                if p_type == 1 and p_paddr <= phys < p_paddr + p_filesz:
                    cut, end = phys - p_paddr, min(phys - p_paddr + size, p_filesz)
                    before, after = bytearray(entry), bytearray(entry)
                    struct.pack_into("<QQ", before, 32, cut, cut)  # p_filesz, p_memsz
                    struct.pack_into("<QQQQQ", after, 8, p_offset + end, p_vaddr + end, p_paddr + end,
                                     p_filesz - end, p_memsz - end)  # fmt: skip
                    entries += [before, after]
                else:
                    entries.append(entry)
            f.seek(0, 2)
            new_phoff = (f.tell() + 7) & ~7
            f.seek(new_phoff)
            f.write(b"".join(entries))
            struct.pack_into("<Q", head, 32, new_phoff)
            struct.pack_into("<H", head, 56, len(entries))
            f.seek(0)
            f.write(head)

    def clear_pmd_entry(self, address: int) -> None:
        """Unmap the 2 MiB of kernel virtual memory around ``address`` by zeroing its PMD entry (x86_64
        four-level paging, the test bed's guests): a vmemmap hole of 32768 struct pages."""
        assert not self.prog["__pgtable_l5_enabled"].value_()
        table = follow_phys(self.init_mm, self.prog["init_mm"].pgd.value_()).value_()
        frame = 0x000FFFFFFFFFF000
        for shift in (39, 30, 21):  # PGD, PUD, PMD
            entry_phys = table + ((address >> shift) & 0x1FF) * 8
            with open(self.path, "r+b") as f:
                f.seek(self.phys_offset(entry_phys))
                entry = int.from_bytes(f.read(8), "little")
                assert entry & 1, f"{address:#x} not mapped at level {shift}"
                if shift == 21:
                    f.seek(self.phys_offset(entry_phys))
                    f.write(bytes(8))
                    return
            table = entry & frame

    def read_u64(self, address: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset(address))
            return int.from_bytes(f.read(8), "little")

    def write_u64(self, address: int, value: int) -> None:
        with open(self.path, "r+b") as f:
            f.seek(self.offset(address))
            f.write((value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little"))


@pytest.fixture(params=GENERATIONS)
def corrupt(
    request: pytest.FixtureRequest, captured: Callable[[str, str], truth.Capture], tmp_path: Path
) -> Callable[[str, Callable[[Injector, Snapshot, drgn.Program], None]], tuple[Snapshot, list[audit.Finding]]]:
    """corrupt(scenario, change) -> (clean snapshot, findings on the corrupted copy)."""
    generation = request.param

    def make(
        scenario: str, change: Callable[[Injector, Snapshot, drgn.Program], None]
    ) -> tuple[Snapshot, list[audit.Finding]]:
        capture = captured(generation, scenario)
        vmlinux = get_kernel(generation).vmlinux
        prog, clean = read(capture.elf, vmlinux)
        injector = Injector(capture.elf, tmp_path / "vmcore.elf", prog)
        change(injector, clean, prog)
        _, broken = read(injector.path, vmlinux)
        return clean, audit.audit(broken)

    yield make  # type: ignore[misc]
    shutil.rmtree(tmp_path, ignore_errors=True)


def new_findings(clean: Snapshot, findings: list[audit.Finding]) -> list[audit.Finding]:
    before = {(f.rule, f.pfn_start, f.pfn_end) for f in audit.audit(clean)}
    return [f for f in findings if (f.rule, f.pfn_start, f.pfn_end) not in before and f.severity == audit.ERROR]


def dimm_block(snap: Snapshot, index: int) -> int:
    """Start pfn of the index-th block of the hotplugged DIMM (at 4 GiB)."""
    blocks = [b for b in snap.blocks if b.start_pfn << snap.layout.page_shift >= 1 << 32]
    return blocks[index].start_pfn


def page_address(snap: Snapshot, pfn: int) -> int:
    return snap.layout.vmemmap_base + pfn * snap.layout.struct_page_size


def test_flipped_section_flag(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        pfn = dimm_block(snap, 1)
        section = next(s for s in snap.sections if s.start_pfn == pfn)
        online = snap.layout.section_flags["SECTION_IS_ONLINE"]
        inj.write_u64(section.address, inj.read_u64(section.address) & ~online)
        target["pfn"] = pfn

    clean, findings = corrupt("dimm-online", change)
    found = new_findings(clean, findings)
    assert [(f.rule, f.pfn_start, f.pfn_end) for f in found if f.rule == "block-section-mismatch"] == [
        ("block-section-mismatch", target["pfn"], target["pfn"] + 32768)
    ]


def test_cleared_subsection_bit(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        pfn = dimm_block(snap, 2)
        section = next(s for s in snap.sections if s.start_pfn == pfn)
        address = section.usage + offsetof(prog.type("struct mem_section_usage"), "subsection_map")
        inj.write_u64(address, section.subsection_map & ~(1 << 5))
        target["pfn"] = pfn + 5 * 512

    clean, findings = corrupt("dimm-online", change)
    found = new_findings(clean, findings)
    assert ("block-section-mismatch", target["pfn"], target["pfn"] + 512) in [
        (f.rule, f.pfn_start, f.pfn_end) for f in found
    ]


def test_zeroed_page_flags(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        pfn = dimm_block(snap, 1) + 4096
        for i in range(64):
            inj.write_u64(page_address(snap, pfn + i), 0)
        target["pfn"] = pfn

    clean, findings = corrupt("dimm-online", change)
    found = [(f.rule, f.pfn_start, f.pfn_end) for f in new_findings(clean, findings)]
    assert ("online-page-outside-zone", target["pfn"], target["pfn"] + 64) in found


def test_wrong_zone_id(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        fmt = page_format(prog, len(snap.layout.zone_names))
        pfn = dimm_block(snap, 2) + 1000
        mask = fmt.zones_mask << fmt.zones_pgoff
        for i in range(10):
            address = page_address(snap, pfn + i)
            inj.write_u64(
                address,
                (inj.read_u64(address) & ~mask) | (len(snap.layout.zone_names) + 1) << fmt.zones_pgoff,
            )
        target["pfn"] = pfn

    clean, findings = corrupt("dimm-online", change)
    found = new_findings(clean, findings)
    hits = [f for f in found if (f.pfn_start, f.pfn_end) == (target["pfn"], target["pfn"] + 10)]
    assert [f.rule for f in hits] == ["online-memmap-not-sane"]
    assert hits[0].evidence["zone_id"] == len(clean.layout.zone_names) + 1


def test_reserved_bit_on_free_pages(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        reserved = 1 << snap.layout.pageflags["PG_reserved"]
        pfn = dimm_block(snap, 3) + 2048
        for i in range(32):
            address = page_address(snap, pfn + i)
            inj.write_u64(address, inj.read_u64(address) | reserved)
        target["pfn"] = pfn

    clean, findings = corrupt("dimm-online", change)
    found = [(f.rule, f.pfn_start, f.pfn_end) for f in new_findings(clean, findings)]
    assert ("hotplugged-page-withheld", target["pfn"], target["pfn"] + 32) in found


def test_device_zone_inside_ram(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        fmt = page_format(prog, len(snap.layout.zone_names))
        assert snap.layout.zone_device is not None
        pfn = 0x20000
        mask = fmt.zones_mask << fmt.zones_pgoff
        for i in range(16):
            address = page_address(snap, pfn + i)
            inj.write_u64(address, (inj.read_u64(address) & ~mask) | snap.layout.zone_device << fmt.zones_pgoff)
        target["pfn"] = pfn

    clean, findings = corrupt("boot", change)
    found = [(f.rule, f.pfn_start, f.pfn_end) for f in new_findings(clean, findings)]
    assert ("online-device-page", target["pfn"], target["pfn"] + 16) in found


def test_model_over_findings_is_per_pfn_consistent(captured: Callable[[str, str], truth.Capture]) -> None:
    """Per-segment evaluation equals per-pfn evaluation on a real snapshot (sampled pfns)."""
    capture = captured("6.1", "pmem-collision")
    _, snap = read(capture.kdump, get_kernel("6.1").vmlinux)
    whole = model.segments(snap)
    rng = np.random.default_rng(7)
    pfns = rng.integers(0, snap.end_pfn(), 200).tolist() + [0x40000 - 1, 0x40000, 0x401FF, 0x40200]
    for pfn in pfns:
        single = model.segments(snap, pfn, pfn + 1)
        i = int(np.searchsorted(whole["pfn_start"], pfn, side="right")) - 1
        for name in (
            "pfn_valid",
            "pfn_to_online_page",
            "pfn_active",
            "pfn_to_device_page",
            "inactive",
            "zone_id",
        ):
            assert single[name][0] == whole[name][i], (pfn, name)


def new_by_rule(clean: Snapshot, findings: list[audit.Finding], rule: str) -> list[tuple[int, int]]:
    """(start, end) of the findings of ``rule`` that the clean snapshot does not have, any severity."""
    before = {(f.rule, f.pfn_start, f.pfn_end) for f in audit.audit(clean)}
    return [
        (f.pfn_start, f.pfn_end) for f in findings if f.rule == rule and (f.rule, f.pfn_start, f.pfn_end) not in before
    ]


def collision_pgmap(snap: Snapshot) -> tuple[Pagemap, int, int]:
    """The pgmap sharing a section with RAM, and that section's pfn range."""
    per = snap.layout.pages_per_section
    pgmap = next(p for p in snap.pagemaps if p.ranges[0][0] % per)
    first = pgmap.ranges[0][0] // per * per
    return pgmap, first, first + per


def test_dying_pgmap_hands_out_device_pages(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    """A pgmap whose ref memunmap_pages() killed (__PERCPU_REF_DEAD) is no longer found by
    get_dev_pagemap(): pfn_to_online_page() hands out its pfns in the online tainted section."""
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        pgmap, _, section_end = collision_pgmap(snap)
        ref = drgn.Object(prog, "struct dev_pagemap", address=pgmap.address).ref
        dead = prog["__PERCPU_REF_DEAD"].value_() | prog["__PERCPU_REF_ATOMIC"].value_()
        inj.write_u64(ref.percpu_count_ptr.address_, ref.percpu_count_ptr.value_() | dead)
        target["start"], target["end"] = pgmap.ranges[0][0], section_end

    clean, findings = corrupt("pmem-collision", change)
    assert new_by_rule(clean, findings, "online-device-page") == [(target["start"], target["end"])]
    hit = next(f for f in findings if f.rule == "online-device-page")
    assert hit.severity == audit.ERROR and hit.evidence["pgmap_ref_live"] is False


def test_missing_device_taint(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        _, start, end = collision_pgmap(snap)
        section = next(s for s in snap.sections if s.start_pfn == start)
        taint = snap.layout.section_flags["SECTION_TAINT_ZONE_DEVICE"]
        inj.write_u64(section.address, inj.read_u64(section.address) & ~taint)
        target["start"], target["end"] = start, end

    clean, findings = corrupt("pmem-collision", change)
    assert new_by_rule(clean, findings, "section-taint-missing") == [(target["start"], target["end"])]


def test_stale_device_taint(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        section = next(s for s in snap.sections if s.nr == 2)
        taint = snap.layout.section_flags["SECTION_TAINT_ZONE_DEVICE"]
        inj.write_u64(section.address, inj.read_u64(section.address) | taint)
        target["start"], target["end"] = section.start_pfn, section.start_pfn + section.nr_pages

    clean, findings = corrupt("boot", change)
    assert new_by_rule(clean, findings, "section-taint-stale") == [(target["start"], target["end"])]
    assert not new_findings(clean, findings)  # a warning: the kernel only takes a slow path for nothing


def test_vmemmap_hole_under_offline_pfns(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    """pfn_valid() pfns (here an offline DIMM section) whose struct pages are not mapped."""
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        pfn = dimm_block(snap, 1)
        inj.clear_pmd_entry(page_address(snap, pfn))
        target["pfn"] = pfn

    clean, findings = corrupt("dimm-offline", change)
    per_pmd = (1 << 21) // clean.layout.struct_page_size
    assert new_by_rule(clean, findings, "memmap-unmapped") == [(target["pfn"], target["pfn"] + per_pmd)]
    assert [f.evidence["kind"] for f in findings if f.rule == "memmap-unmapped"] == ["offline"]


def test_page_of_no_node(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        fmt = page_format(prog, len(snap.layout.zone_names))
        pfn = dimm_block(snap, 2) + 300
        mask = fmt.nodes_mask << fmt.nodes_pgoff
        for i in range(24):
            address = page_address(snap, pfn + i)
            inj.write_u64(address, (inj.read_u64(address) & ~mask) | 3 << fmt.nodes_pgoff)
        target["pfn"] = pfn

    clean, findings = corrupt("dimm-online", change)
    assert new_by_rule(clean, findings, "page-node-invalid") == [(target["pfn"], target["pfn"] + 24)]


def test_block_of_another_node(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        pfn = dimm_block(snap, 3)
        block = next(b for b in snap.blocks if b.start_pfn == pfn)
        mem = drgn.cast("struct memory_block *", xa_load(prog["memory_blocks"].address_of_(), block.id))
        inj.write_u32(mem.nid.address_, 1)
        target["start"], target["end"] = block.start_pfn, block.start_pfn + block.nr_pages

    clean, findings = corrupt("dimm-online", change)
    assert new_by_rule(clean, findings, "page-node-block-mismatch") == [(target["start"], target["end"])]


def test_pages_missing_from_the_dump_are_not_kernel_errors(
    corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]],
) -> None:
    """A dump that lacks the pages holding some struct pages (as a filtered or truncated dump does): those
    pfns are reported in the dump category, with what could not be checked, and no kernel finding more."""
    target: dict[str, int] = {}

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        pfn = dimm_block(snap, 2) + 4096  # an online, movable part of the DIMM
        per_page = (1 << snap.layout.page_shift) // snap.layout.struct_page_size
        inj.drop_from_dump(page_address(snap, pfn), 1 << snap.layout.page_shift)
        target["start"], target["end"] = pfn, pfn + per_page

    clean, findings = corrupt("dimm-online", change)
    missing = [f for f in findings if f.rule == "dump-pages-missing"]
    assert [(f.pfn_start, f.pfn_end, f.category) for f in missing] == [(target["start"], target["end"], audit.DUMP)]
    assert "not checked" in missing[0].message
    before = {(f.rule, f.pfn_start, f.pfn_end) for f in audit.audit(clean)}
    new = [f for f in findings if (f.rule, f.pfn_start, f.pfn_end) not in before and f.rule != "dump-pages-missing"]
    assert not [f for f in new if f.severity != audit.INFO], new
    assert audit.exit_code(findings) == 0


@pytest.mark.parametrize("generation", GENERATIONS)
def test_balloon_pages_in_hotplugged_memory_are_explained(
    generation: str, captured: Callable[[str, str], truth.Capture]
) -> None:
    """virtio-balloon inflated over a DIMM onlined to ZONE_NORMAL: its pages are PageOffline (the kernel's
    own kpageflags says so) inside the hotplugged blocks, and that is no withheld-page error."""
    capture = captured(generation, "balloon-over-dimm")
    _, snap = read(capture.kdump, get_kernel(generation).vmlinux)
    dimm_start = min(b.start_pfn for b in snap.blocks if b.start_pfn << snap.layout.page_shift >= 1 << 32)
    inflated = sum(b - a for a, b in capture.truth["offline_page_ranges"] if a >= dimm_start)
    assert inflated >= scenarios.BALLOON_INFLATE >> snap.layout.page_shift
    runs = snap.runs[(snap.runs["offline"] == 1) & (snap.runs["pfn_start"] >= dimm_start)]
    assert int((runs["pfn_end"] - runs["pfn_start"]).sum()) == inflated
    findings = audit.audit(snap)
    assert not [f for f in findings if f.severity == audit.ERROR], findings


@pytest.mark.parametrize("generation", GENERATIONS)
def test_kexec_image_pages_in_hotplugged_memory_are_explained(
    generation: str, captured: Callable[[str, str], truth.Capture]
) -> None:
    """A kexec kernel loaded after onlining a DIMM to ZONE_NORMAL: kimage_alloc_pages() took its pages
    there and marked them PG_reserved. kmeminspect reads them from the loaded image, and they are no
    withheld-page error; without that explanation the same pages would be one."""
    capture = captured(generation, "kexec-loaded")
    _, snap = read(capture.kdump, get_kernel(generation).vmlinux)
    dimm_start = min(b.start_pfn for b in snap.blocks if b.start_pfn << snap.layout.page_shift >= 1 << 32)
    in_dimm = [c for c in snap.claims if c.start_pfn >= dimm_start]
    assert in_dimm and all(c.owner.startswith("kexec_image") for c in in_dimm)
    findings = audit.audit(snap)
    assert not [f for f in findings if f.severity == audit.ERROR], findings
    unexplained = dataclasses.replace(snap, claims=[])
    withheld = [f for f in audit.audit(unexplained) if f.rule == "hotplugged-page-withheld"]

    def claimed(start: int, end: int) -> int:
        return sum(max(0, min(end, c.end_pfn) - max(start, c.start_pfn)) for c in snap.claims)

    assert withheld and all(claimed(f.pfn_start, f.pfn_end) == f.pfn_end - f.pfn_start for f in withheld)


def test_device_page_with_a_garbage_pgmap(corrupt: Callable[..., tuple[Snapshot, list[audit.Finding]]]) -> None:
    """One 2 MiB compound device page whose head points to no pgmap: found over exactly its 512 pfns, saying
    what the pointer is and that the range has compound pages (its tails read the pgmap through it)."""
    target: dict[str, int] = {}
    garbage = 0xFFFFFFFFDEAD0000

    def change(inj: Injector, snap: Snapshot, prog: drgn.Program) -> None:
        (pgmap,) = snap.pagemaps
        compound = 1 << pgmap.vmemmap_shift
        head = -(-pgmap.ranges[0][0] // compound) * compound + 4 * compound
        # page->pgmap in 6.1 and 6.12; the folio's (the head page's) since v7.1
        holder = "struct page" if prog.type("struct page").has_member("pgmap") else "struct folio"
        inj.write_u64(page_address(snap, head) + offsetof(prog.type(holder), "pgmap"), garbage)
        target["start"], target["end"], target["shift"] = head, head + compound, pgmap.vmemmap_shift

    clean, findings = corrupt("pmem-devdax", change)
    hits = [f for f in findings if f.rule == "device-pgmap-mismatch"]
    assert [(f.pfn_start, f.pfn_end) for f in hits] == [(target["start"], target["end"])]
    assert hits[0].evidence["page_pgmap"] == hex(garbage) and "garbage" in hits[0].evidence["page_pgmap_points_to"]
    assert hits[0].evidence["compound_order"] == target["shift"] > 0
