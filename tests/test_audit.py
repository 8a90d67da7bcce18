"""The audit on real kernels: clean fixtures give only the documented kernel oddity, and copies of
fixture vmcores with one injected inconsistency each give the right rule over the right range."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import drgn
import numpy as np
import pytest
from conftest import GENERATIONS, IN_GUEST_SCENARIOS, get_kernel
from drgn import offsetof
from drgn.helpers.linux.mm import follow_phys
from vmfixtures import truth

from kmeminspect import audit, model
from kmeminspect.kernel import read_snapshot
from kmeminspect.kernel.layout import page_format
from kmeminspect.state import Snapshot
from kmeminspect.target import elf_program_headers, open_vmcore

pytestmark = pytest.mark.vm


def read(path: Path, vmlinux: Path) -> tuple[drgn.Program, Snapshot]:
    prog = open_vmcore(path, vmlinux)
    return prog, read_snapshot(prog, {"kind": "vmcore", "path": str(path)})


@pytest.mark.parametrize("case", [pytest.param((g, s), id=f"{g}-{s}") for g in GENERATIONS for s in IN_GUEST_SCENARIOS])
def test_clean_fixture_has_only_the_known_oddity(
    case: tuple[str, str], captured: Callable[[str, str], truth.Capture]
) -> None:
    """Errors on a clean state: exactly the reserved pfns past the last boot zone with zone id
    MAX_NR_ZONES (init_reserved_page() with deferred struct page init; see docs/semantics.md)."""
    generation, scenario = case
    capture = captured(generation, scenario)
    _, snap = read(capture.kdump, get_kernel(generation).vmlinux)
    findings = audit.audit(snap)
    errors = [f for f in findings if f.severity == audit.ERROR]
    max_zones = len(snap.layout.zone_names)
    boot_zone_end = max(
        z.start_pfn + z.spanned
        for z in snap.zones
        if z.spanned and z.name != "Device" and z.name != "Movable" and z.name != "Normal"
    )
    # the oddity needs reserved pfns past the last boot zone's end in its last section. Where DMA32 ends
    # at 4 GiB because more boot memory follows (big-blocks), memmap_init() gives that e820 hole the zone
    # of the next memory range instead (Normal: a reserved page outside its zone's span, a warning)
    if boot_zone_end % snap.layout.pages_per_section:
        assert errors, "the zone-id oddity of stock kernels must be reported"
    for f in errors:
        assert f.rule == "online-memmap-not-sane", f
        assert f.evidence["zone_id"] == max_zones, f
        # reserved pfns past the last boot zone, in that zone's last section (where exactly depends on
        # the firmware's e820 map: 0x3ffe0 in the busybox guest, 0x3ffe0 after a 3-pfn hole with virtio-blk)
        last_section_end = -(-boot_zone_end // snap.layout.pages_per_section) * snap.layout.pages_per_section
        assert boot_zone_end <= f.pfn_start < f.pfn_end <= last_section_end, f
        assert f.pfn_end - f.pfn_start <= 16, f
    # the same pfns are what the kernel itself hands out (its kpageflags answer, where it has one)
    online = capture.online()
    assert online is not None
    for f in errors:
        assert online[f.pfn_start : f.pfn_end].all()
    warnings = [f for f in findings if f.severity == audit.WARNING]
    assert all(f.rule == "online-page-outside-zone" and f.evidence["reserved"] for f in warnings), warnings


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
        phys = follow_phys(self.init_mm, address).value_()
        for paddr, size, offset in self.loads:
            if paddr <= phys < paddr + size:
                return offset + phys - paddr
        raise AssertionError(f"{address:#x} (phys {phys:#x}) not in the dump")

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
