"""``kmeminspect trace`` on real kernels, in the rootfs guest (bcc), checked against the kernel's own state.

One guest per generation (the ``mixed`` scenario's machine: legacy pmem sharing a section with RAM, DIMM
slots; nothing set up) serves every test of this module in order, on one test worker (xdist group). Each
test starts the tracer in the guest, makes the kernel do something, stops the tracer with a signal and
reads its JSON-lines output. What the tracer reports is compared with sysfs, /proc/kpageflags, a
snapshot read afterwards, and what the test itself did.

The guests hold no DWARF vmlinux: the tracer takes its offsets and argument positions from the guest
kernel's BTF and its symbols from /proc/kallsyms (docs/btf.md; tests/test_btf.py shows they equal
DWARF's).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import GENERATIONS, get_kernel
from vmfixtures import scenarios
from vmfixtures.rootfs import KMEMINSPECT_SHARE, RootfsGuest, rootfs_guest
from vmfixtures.tracing import (
    GuestTracer,
    attached_leftovers,
    trace_command,
    trace_overhead,
)

from kmeminspect import snapshot as snapshot_mod
from kmeminspect.trace.seed import seed_ranges

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parent.parent
GUEST_HELPERS = "/mnt/kmeminspect/tests/guest"


def fresh_active_ranges(guest: RootfsGuest, tmp_path: Path) -> list[tuple[int, int]]:
    """What the tracker would be seeded with now: the model's lifecycle pfn_active of a new snapshot (read,
    as the tracer runs, with the guest kernel's BTF: the guest has no vmlinux)."""
    guest.run("kmeminspect --live snapshot -o /tmp/now.snap", timeout=600)
    local = tmp_path / "now.snap"
    local.write_bytes(base64.b64decode(guest.run("base64 -w0 /tmp/now.snap").stdout))
    snapshot = snapshot_mod.load(local)
    assert snapshot.source["types"] == "btf"  # no DWARF vmlinux in the guest: what the tracer used as well
    return seed_ranges(snapshot)


def blocks_info(guest: RootfsGuest) -> dict[int, tuple[int, str]]:
    """Memory block -> (phys_index, state), from sysfs."""
    out = guest.run(
        "for d in /sys/devices/system/memory/memory*; do echo ${d##*memory} $(cat $d/phys_index) $(cat $d/state); done"
    ).text
    return {int(a): (int(b, 16), c) for a, b, c in (line.split() for line in out.splitlines())}


def of(events: list[dict[str, Any]], function: str, phase: str) -> list[dict[str, Any]]:
    return [e for e in events if e["function"] == function and e["phase"] == phase]


@pytest.fixture(
    scope="module",
    params=[pytest.param(g, marks=pytest.mark.xdist_group(f"trace-{g}")) for g in GENERATIONS],
)
def guest(request: pytest.FixtureRequest) -> Iterator[RootfsGuest]:
    kernel = get_kernel(request.param)
    shares = {KMEMINSPECT_SHARE: REPO}
    with rootfs_guest("mixed", kernel, smp=2, shares=shares) as g:
        yield g


@pytest.fixture(scope="module")
def dimm_blocks(guest: RootfsGuest) -> list[int]:
    """The blocks of the DIMM the first test hotplugs (the tests after it use them)."""
    return []


def test_dimm_online_events_follow_blocks(guest: RootfsGuest, dimm_blocks: list[int], tmp_path: Path) -> None:
    """Hotplugging a DIMM and onlining its blocks one by one gives one online_pages per block, in order,
    over exactly the block's pfns (sysfs phys_index), in the zone asked for; the tracked pfn_active
    then equals what a fresh snapshot says; and nothing stays attached."""
    tracer = GuestTracer(guest)
    tracer.start("--no-callers")
    blocks = scenarios.add_dimm(guest)
    for block in blocks:
        scenarios.set_block_state(guest, block, "online_movable")
    summary, events = tracer.stop("INT")
    dimm_blocks.extend(blocks)
    info = blocks_info(guest)
    per_section = 1 << 15  # x86_64: 128 MiB sections of 4 KiB pages; phys_index is a section number
    block_pages = int(guest.run("cat /sys/devices/system/memory/block_size_bytes").text, 16) >> 12
    expected = [(info[b][0] * per_section, info[b][0] * per_section + block_pages) for b in blocks]
    onlined = of(events, "online_pages", "end")
    assert [(e["pfn_start"], e["pfn_end"]) for e in onlined] == expected
    assert {e["zone"] for e in onlined} == {"Movable"} and {e["ret"] for e in onlined} == {0}
    assert [e["block"] for e in of(events, "memory_subsys_online", "end")] == blocks
    assert [(e["pfn_start"], e["active_pages"]) for e in of(events, "move_pfn_range_to_zone", "done")] == [
        (start, end - start) for start, end in expected
    ]
    added = of(events, "sparse_add_section", "done")
    assert added and min(e["pfn_start"] for e in added) == expected[0][0]
    assert max(e["pfn_end"] for e in added) == expected[-1][1]
    assert summary["stopped_by"] == "SIGINT" and summary["events_lost"] == 0
    assert [tuple(r) for r in summary["active_ranges"]] == fresh_active_ranges(guest, tmp_path)
    assert attached_leftovers(guest) == []


def test_kpageflags_is_the_top_caller(guest: RootfsGuest) -> None:
    """A full read of /proc/kpageflags is the top caller of pfn_to_online_page(), once per pfn walked."""
    tracer = GuestTracer(guest)
    tracer.start("--no-events", "--no-active")
    walked = int(guest.run("cat /proc/kpageflags | wc -c").text) // 8
    summary, _ = tracer.stop("TERM")
    top = summary["callers"][0]
    # 7.2 made kpageflags_read() a tail call of kpage_read(): the frame under pfn_to_online_page is kpage_read*
    assert top["stack"][0].startswith(("kpageflags_read", "kpage_read")), top
    assert top["count"] == walked
    assert summary["stopped_by"] == "SIGTERM" and summary["stack_failures"] == 0
    assert summary["stack_cache"]["disagreed"] == 0 and summary["stack_cache"]["verified"] > 0
    assert attached_leftovers(guest) == []


def test_walkers_during_offline_online_no_races(guest: RootfsGuest, dimm_blocks: list[int], tmp_path: Path) -> None:
    """Offlining and onlining blocks while pfn walkers run reports no race and no inactive hand-out; a
    refused offline (EBUSY) leaves everything active."""
    assert dimm_blocks, "runs after test_dimm_online_events_follow_blocks"
    tracer = GuestTracer(guest)
    tracer.start("--races", "--split", "--no-events")
    guest.run(
        "rm -f /tmp/walkers; for i in 1 2; do"
        " (while true; do cat /proc/kpageflags > /dev/null; done) > /dev/null 2>&1 & echo $! >> /tmp/walkers; done"
    )
    try:
        for _ in range(2):
            for block in dimm_blocks[1:]:
                scenarios.set_block_state(guest, block, "offline")
                scenarios.set_block_state(guest, block, "online_movable")
        # offline boot blocks from the top down until the kernel refuses one for an unmovable page (EBUSY;
        # it says "page dumped because: unmovable page"); a hole refuses with EINVAL, and a block that does
        # go offline comes back online
        unmovable = "dmesg | grep -c 'unmovable page'"
        for block in sorted((b for b in blocks_info(guest) if 0 < b < min(dimm_blocks)), reverse=True):
            before = guest.run(unmovable, check=False).text
            if guest.run(f"echo offline > /sys/devices/system/memory/memory{block}/state", check=False).returncode == 0:
                scenarios.set_block_state(guest, block, "online")
            elif guest.run(unmovable, check=False).text != before:
                break
    finally:
        guest.run("kill $(cat /tmp/walkers)", check=False)
    summary, events = tracer.stop("INT")
    reported = [e for e in events if e["phase"] in ("race", "handout-inactive")]
    assert summary["races"] == 0 and summary["handouts_inactive"] == 0, reported
    # race windows (a walker running between a hand-out and its next call when the invalidation comes)
    # depend on scheduling, here on the host's too: shown, never an error
    assert summary["race_windows"] == len(of(events, "pfn_to_online_page", "race-window"))
    refused = [e["ret"] for e in of(events, "offline_pages", "end") if e["ret"] != 0]
    assert -16 in refused, refused  # at least one EBUSY
    results = {r["result"] for r in summary["callers"]}
    assert results == {"null", "page"}
    assert [tuple(r) for r in summary["active_ranges"]] == fresh_active_ranges(guest, tmp_path)


def test_stalled_walker_is_a_race(guest: RootfsGuest, dimm_blocks: list[int]) -> None:
    """A /proc/kpageflags reader stalled right after pfn_to_online_page() handed it a page (userfaultfd on
    its buffer) while that page's block is offlined: the race the 2019 thread describes, reported with
    the pfn, the holder and its stack."""
    block = dimm_blocks[-1]
    pfn = blocks_info(guest)[block][0] * (1 << 15) + 0x100
    tracer = GuestTracer(guest)
    tracer.start("--races", "--no-callers")
    guest.run(f"rm -f /tmp/go; (python3 {GUEST_HELPERS}/uffd_stall.py {pfn} /tmp/go > /tmp/stall.out 2>&1 &)")
    scenarios.wait_for("the stalled reader", lambda: "stalled" in guest.run("cat /tmp/stall.out").text, 60)
    holder = int(guest.run("cat /tmp/stall.out").text.split()[1])
    scenarios.set_block_state(guest, block, "offline")
    guest.run("touch /tmp/go")
    scenarios.wait_for("the reader to resume", lambda: "resumed" in guest.run("cat /tmp/stall.out").text, 60)
    summary, events = tracer.stop("INT")
    scenarios.set_block_state(guest, block, "online_movable")
    races = of(events, "pfn_to_online_page", "race")
    assert [(e["pfn"], e["tid"], e["holder_asleep"]) for e in races] == [(pfn, holder, True)]
    assert races[0]["stack"][0].startswith(("kpageflags_read", "kpage_read"))
    assert races[0]["invalidated_by"]["at"] == "remove_pfn_range_from_zone"
    assert summary["races"] == 1


def test_injected_late_activation_is_reported(guest: RootfsGuest, dimm_blocks: list[int]) -> None:
    """A subsection marked not active (as if the kernel initialized it late) is reported as soon as
    pfn_to_online_page() hands out one of its pages, with pfn and the walker's stack; the count is one
    per hand-out. The trace ends with its command, and leaves nothing attached."""
    start = blocks_info(guest)[dimm_blocks[1]][0] * (1 << 15) + 512 * 3  # the block's fourth subsection
    summary, events = trace_command(
        guest,
        ["--no-callers", "--inject-inactive", f"{start:#x}-{start + 512:#x}"],
        f"dd if=/proc/kpageflags of=/dev/null bs=8 skip={start - 100} count=1000 2>/dev/null",
    )
    assert summary["stopped_by"] == "command exited with 0" and attached_leftovers(guest) == []
    handed = of(events, "pfn_to_online_page", "handout-inactive")
    assert [e["pfn"] for e in handed] == [start]
    assert handed[0]["stack"][0].startswith(("kpageflags_read", "kpage_read"))
    assert summary["handouts_inactive"] == 512
    assert summary["inactive_subsections"] == [start // 512]


def test_pmem_namespace_device_init(guest: RootfsGuest, tmp_path: Path) -> None:
    """Creating an fsdax namespace with its memmap on the device (altmap): memremap_pages over the pgmap's
    range; the altmap's free part initialized in move_pfn_range_to_zone (ZONE_DEVICE); the rest in
    memmap_init_zone_device; the altmap's reserve never."""
    tracer = GuestTracer(guest)
    tracer.start("--no-callers")
    scenarios._pmem_modules(guest)
    guest.run("echo 2097152 > /sys/bus/nd/devices/region0/align")
    guest.run("ndctl create-namespace -f -e namespace0.0 --mode=fsdax --map=dev --align=2M")
    summary, events = tracer.stop("INT")
    guest.run("kmeminspect --live snapshot -o /tmp/pmem.snap", timeout=600)
    local = tmp_path / "pmem.snap"
    local.write_bytes(base64.b64decode(guest.run("base64 -w0 /tmp/pmem.snap").stdout))
    snap = snapshot_mod.load(local)
    (pgmap,) = [p for p in snap.pagemaps if p.type == "MEMORY_DEVICE_FS_DAX"]
    altmap = pgmap.altmap
    assert altmap is not None and altmap.reserve > 0
    (start, end) = pgmap.ranges[0]
    # the namespace may be mapped more than once while ndctl reconfigures it (6.12: twice, into the same
    # struct dev_pagemap): the last call that made the registered pgmap, and what happened during it
    done = max(
        (e for e in of(events, "memremap_pages", "end") if int(e["pgmap"], 16) == pgmap.address), key=lambda e: e["t"]
    )
    assert (done["pfn_start"], done["pfn_end"]) == (start, end)
    began = max(
        (e for e in of(events, "memremap_pages", "begin") if e["tid"] == done["tid"] and e["t"] <= done["t"]),
        key=lambda e: e["t"],
    )
    assert began["pgmap_type"] == "MEMORY_DEVICE_FS_DAX"
    events = [e for e in events if began["t"] <= e["t"] <= done["t"]]
    device_moves = [e for e in of(events, "move_pfn_range_to_zone", "done") if e["zone"] == "Device"]
    free_start = altmap.base_pfn + altmap.reserve
    assert [(e["pfn_start"], e["active_from"], e["active_pages"]) for e in device_moves] == [
        (start, free_start, altmap.free)
    ]
    init = of(events, "memmap_init_zone_device", "end")
    assert [(e["pfn_start"], e["pfn_end"], e["initialized_from"]) for e in init] == [
        (start, end, free_start + altmap.free)
    ]
    active = [tuple(r) for r in summary["active_ranges"]]
    assert any(a <= free_start and end <= b for a, b in active), active  # free part and the rest
    reserve = (altmap.base_pfn, free_start)
    assert all(b <= reserve[0] or a >= reserve[1] for a, b in active), active  # never the reserve
    assert summary["handouts_inactive"] == 0


def test_trace_refuses_without_root(guest: RootfsGuest) -> None:
    """Not root: one line, exit 2, no traceback."""
    command = "kmeminspect --live trace"
    result = guest.run(f"setpriv --reuid=65534 --regid=65534 --clear-groups {command}", check=False)
    assert result.returncode == 2 and len(result.stderr.decode().strip().splitlines()) == 1, result
    assert "root" in result.stderr.decode()


def test_trace_overhead_benchmark(guest: RootfsGuest, record_property: pytest.RecordProperty) -> None:
    """The overhead benchmark of ``make bench-trace`` (one walk per mode here): it runs, every mode counts
    every call, and its ratios go to the test report (a benchmark, not a timed assertion)."""
    result = trace_overhead(guest, repeats=1, modes=["stackcount", "callers"])
    callers = result["modes"]["callers"]
    assert callers["calls_counted"] >= callers["pfns"] > 0
    record_property(
        "benchmark", f"trace overhead on {result['release']}: callers/stackcount {callers['vs_stackcount']}"
    )


@pytest.mark.parametrize(
    "generation", [pytest.param(g, marks=pytest.mark.xdist_group(f"trace-{g}")) for g in GENERATIONS]
)
def test_memmap_on_memory_online_after_vmemmap(generation: str, tmp_path: Path) -> None:
    """With memmap_on_memory, onlining a hotplugged block first initializes the block's own vmemmap pages
    (move_pfn_range_to_zone over them), then online_pages() covers the rest of the block."""
    kernel = get_kernel(generation)
    shares = {KMEMINSPECT_SHARE: REPO}
    with rootfs_guest("memmap-on-memory", kernel, smp=2, shares=shares) as guest:
        tracer = GuestTracer(guest)
        tracer.start("--no-callers")
        scenarios.SCENARIOS["memmap-on-memory"].setup(guest)
        summary, events = tracer.stop("INT")
        guest.run("kmeminspect --live snapshot -o /tmp/s.snap", timeout=600)
        local = tmp_path / "s.snap"
        local.write_bytes(base64.b64decode(guest.run("base64 -w0 /tmp/s.snap").stdout))
    snap = snapshot_mod.load(local)
    (block,) = [b for b in snap.blocks if b.nr_vmemmap_pages]
    start, end, vmemmap = block.start_pfn, block.start_pfn + block.nr_pages, block.nr_vmemmap_pages
    moves = of(events, "move_pfn_range_to_zone", "done")
    assert [(e["pfn_start"], e["pfn_end"], e["zone"]) for e in moves] == [
        (start, start + vmemmap, "Movable"),
        (start + vmemmap, end, "Movable"),
    ]
    assert [(e["pfn_start"], e["pfn_end"], e["ret"]) for e in of(events, "online_pages", "end")] == [
        (start + vmemmap, end, 0)
    ]
    assert [tuple(r) for r in summary["active_ranges"]] == seed_ranges(snap)
