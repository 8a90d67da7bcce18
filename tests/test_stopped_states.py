"""States that last a moment: the guest stopped by a breakpoint (QEMU's gdbstub) inside the kernel
function that passes through them, dumped there, and read by kmeminspect like any dump. The truth is the
kernel's bookkeeping read through the gdbstub at the stop (truth.json): where the stopped kernel sat,
its deferred_pages key, every pgmap's ref word and every memory block's state. Where user space runs
(the trigger scenarios), it is also the kernel's own pfn_to_online_page() for every pfn, asked on the
second vCPU while the first stays stopped in the moment (KPF_NOPAGE, or the bcc fexit oracle on 7.x)."""

from __future__ import annotations

from collections.abc import Callable

import drgn
import numpy as np
import pytest
from conftest import GENERATIONS, get_kernel
from vmfixtures import scenarios, truth

from kmeminspect import audit, model
from kmeminspect.kernel import read_snapshot
from kmeminspect.state import Snapshot
from kmeminspect.target import open_vmcore

pytestmark = pytest.mark.vm

#: deferred init initializes and frees one MAX_ORDER block at a time: 1024 pfns (4 MiB) on x86_64 in
#: 6.1 (MAX_ORDER 11), 6.12 and 7.3 (MAX_PAGE_ORDER 10)
DEFERRED_BLOCK_PAGES = 1024


def model_equals_the_kernel(capture: truth.Capture, snap: Snapshot) -> np.ndarray:
    """The kernel's own answers for every pfn it walked, after checking the model gives the same."""
    online = capture.online()
    assert online is not None, "a trigger stop records pfn_to_online_page() for every pfn"
    modelled = np.zeros(online.size, dtype=bool)
    seg = model.segments(snap, 0, online.size)
    for start, end in zip(seg["pfn_start"][seg["pfn_to_online_page"] == 1].tolist(),
                          seg["pfn_end"][seg["pfn_to_online_page"] == 1].tolist(), strict=True):  # fmt: skip
        modelled[start:end] = True
    wrong = np.flatnonzero(modelled != online)
    assert not wrong.size, f"{wrong.size} pfns differ, first {wrong[0]:#x}"
    return online


def read(capture: truth.Capture, generation: str) -> tuple[drgn.Program, Snapshot]:
    vmcoreinfo = capture.directory / "vmcoreinfo" if capture.vmcoreinfo() is not None else None
    prog = open_vmcore(capture.elf, get_kernel(generation).vmlinux, vmcoreinfo)
    return prog, read_snapshot(prog, {"kind": "vmcore", "path": str(capture.elf)})


@pytest.mark.parametrize("generation", GENERATIONS)
def test_onlining_window_is_active(generation: str, captured: Callable[[str, str], truth.Capture]) -> None:
    """Stopped at online_mem_sections(): the block's memmap is initialized (move_pfn_range_to_zone()), its
    sections not online yet. The kernel answers NULL (section offline); the proposal says active."""
    capture = captured(generation, "onlining")
    t = capture.truth
    assert t["stop"]["function"] == scenarios.ONLINING_STOP[0] and t["stop"]["pc"] == t["stop"]["address"]
    onlining = [b for b in t["memory_blocks"] if b["online_type"] != 0]
    assert len(onlining) == 1, t["memory_blocks"]
    _, snap = read(capture, generation)
    block = next(b for b in snap.blocks if b.id == onlining[0]["id"])
    assert block.state == "offline" and block.online_type is not None
    start, end = block.start_pfn, block.start_pfn + block.nr_pages
    assert t["stop"]["first_argument"] == start  # online_mem_sections(start_pfn, end_pfn)
    assert not any(s.has("SECTION_IS_ONLINE") for s in snap.sections if start <= s.start_pfn < end)
    online = model_equals_the_kernel(capture, snap)
    assert not online[start:end].any()  # the kernel's own answer: NULL, the section is not online
    seg = model.segments(snap, start, end)
    assert (seg["pfn_to_online_page"] == 0).all()
    assert (seg["pfn_active"] == 1).all() and (seg["proposed_online"] == 1).all()
    findings = audit.audit(snap)
    assert not [f for f in findings if f.severity == audit.ERROR], findings
    disagree = [f for f in findings if f.rule == "proposal-disagrees" and f.pfn_start < end and f.pfn_end > start]
    assert [(f.pfn_start, f.pfn_end) for f in disagree] == [(start, end)]
    assert "being onlined" in disagree[0].message


@pytest.mark.parametrize("generation", GENERATIONS)
def test_pgmap_teardown_hands_out_device_pages(generation: str, captured: Callable[[str, str], truth.Capture]) -> None:
    """Stopped in memunmap_pages() at remove_pfn_range_from_zone(): the pgmap's ref is dead, so
    get_dev_pagemap() fails and pfn_to_online_page() returns the device pfns of the online, tainted section
    that the namespace shares with RAM. The registry entry and the memmap are still there."""
    capture = captured(generation, "pgmap-teardown")
    t = capture.truth
    assert t["stop"]["function"] == "remove_pfn_range_from_zone"
    prog, snap = read(capture, generation)
    dead = prog["__PERCPU_REF_DEAD"].value_()
    assert t["pgmaps"] and all(p["percpu_count_ptr"] & dead for p in t["pgmaps"]), t["pgmaps"]
    assert [p.live for p in snap.pagemaps] == [False]
    ((device_start, device_end),) = snap.pagemaps[0].ranges
    per = snap.layout.pages_per_section
    section = next(s for s in snap.sections if s.start_pfn == device_start // per * per)
    assert section.has("SECTION_IS_ONLINE") and section.has("SECTION_TAINT_ZONE_DEVICE")
    handed_out = (device_start, section.start_pfn + per)
    online = model_equals_the_kernel(capture, snap)
    assert online[handed_out[0] : handed_out[1]].all()  # the kernel's own answer: the device pages
    seg = model.segments(snap, *handed_out)
    assert (seg["pfn_to_online_page"] == 1).all() and (seg["pfn_to_device_page"] == 1).all()
    # past the shared section the device's sections are not online: NULL as before
    rest = model.segments(snap, handed_out[1], device_end)
    assert (rest["pfn_to_online_page"] == 0).all()
    findings = audit.audit(snap)
    errors = [f for f in findings if f.severity == audit.ERROR]
    assert [(f.rule, f.pfn_start, f.pfn_end) for f in errors] == [("online-device-page", *handed_out)]
    assert errors[0].evidence["pgmap_ref_live"] is False and "torn down" in errors[0].message


@pytest.mark.parametrize("generation", GENERATIONS)
def test_deferred_init_in_flight(generation: str, captured: Callable[[str, str], truth.Capture]) -> None:
    """Stopped mid-way through deferred init: first_deferred_pfn already reads ULONG_MAX, the deferred_pages
    key is still on. kmeminspect calls exactly the pfns past the block being freed deferred, and nothing
    an error."""
    capture = captured(generation, "deferred-init-running")
    t = capture.truth
    assert t["stop"]["function"] == scenarios.DEFERRED_INIT_STOP[0]
    assert t["first_deferred_pfn"] == (1 << 64) - 1 and t["deferred_pages_enabled"] == 1
    _, snap = read(capture, generation)
    assert [(n.first_deferred_pfn, n.deferred_init_running) for n in snap.nodes] == [(None, True)]
    # __free_pages_core(page, order): the block deferred init has just initialized and now frees
    current = (t["stop"]["first_argument"] - snap.layout.vmemmap_base) // snap.layout.struct_page_size
    node_end = t["node_start_pfn"] + t["node_spanned_pages"]
    assert t["node_start_pfn"] < current < node_end
    seg = model.segments(snap)
    deferred = seg[seg["deferred"] == 1]
    assert deferred.size and int(deferred["pfn_start"].min()) == current + DEFERRED_BLOCK_PAGES
    below = seg[seg["pfn_start"] < current + DEFERRED_BLOCK_PAGES]
    assert (below["deferred"] == 0).all()
    # what is past the block is not initialized: mostly zeroed, the rest memblock-reserved pages that
    # reserve_bootmem_region() initialized early (not deferred)
    past = seg[(seg["pfn_start"] >= current + DEFERRED_BLOCK_PAGES) & (seg["pfn_end"] <= node_end)]
    lengths = (past["pfn_end"] - past["pfn_start"]).astype(np.int64)
    assert lengths[past["deferred"] == 1].sum() > lengths.sum() // 2
    findings = audit.audit(snap)
    assert not [f for f in findings if f.severity == audit.ERROR], findings
    assert all(f.pfn_end <= node_end for f in findings if f.rule == "deferred-init")


def test_stopped_scenarios_are_not_in_guest_scenarios() -> None:
    """Tests that compare with kpageflags or sysfs never meet a stopped guest (it has no user space)."""
    from conftest import IN_GUEST_SCENARIOS

    stopped = {name for name, s in scenarios.SCENARIOS.items() if s.stopped}
    assert {"early-boot", "deferred-init-running", "onlining", "pgmap-teardown"} <= stopped
    assert not stopped & set(IN_GUEST_SCENARIOS)
