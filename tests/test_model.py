"""Properties of the pure model on synthetic snapshots in states the kernel can reach."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import KINDS, PAGES_PER_SECTION, PAGES_PER_SUBSECTION, build

from kmeminspect import audit, model
from kmeminspect.state import STATE_FIELDS, Altmap, Snapshot

snapshots = st.builds(
    build,
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=6),
    device_subsections=st.integers(min_value=1, max_value=63),
    altmap_reserve=st.sampled_from([0, 2, 64, 511]),
)


def at(seg: np.ndarray, pfn: int) -> np.void:
    i = int(np.searchsorted(seg["pfn_start"], pfn, side="right")) - 1
    assert seg["pfn_start"][i] <= pfn < seg["pfn_end"][i]
    return seg[i]


@settings(max_examples=150, deadline=None)
@given(snapshots)
def test_online_page_implies_valid(snapshot: Snapshot) -> None:
    seg = model.segments(snapshot)
    assert not ((seg["pfn_to_online_page"] == 1) & (seg["pfn_valid"] == 0)).any()


@settings(max_examples=150, deadline=None)
@given(snapshots)
def test_device_and_online_exclusive(snapshot: Snapshot) -> None:
    seg = model.segments(snapshot)
    assert not ((seg["pfn_to_device_page"] == 1) & (seg["proposed_online"] == 1)).any()
    assert ((seg["pfn_to_device_page"] | seg["proposed_online"]) == seg["pfn_active"]).all()


@settings(max_examples=150, deadline=None)
@given(snapshots)
def test_kernel_never_hands_out_registered_device_pfns(snapshot: Snapshot) -> None:
    """On reachable states (sections with device pfns are tainted or offline) p2op never returns them."""
    seg = model.segments(snapshot)
    assert not ((seg["pfn_to_online_page"] == 1) & (seg["registry_pgmap"] != 0)).any()
    # and the audit finds no error on a reachable state
    assert not [f for f in audit.audit(snapshot, seg) if f.severity == audit.ERROR]


@settings(max_examples=60, deadline=None)
@given(snapshots, st.data())
def test_per_run_equals_per_pfn(snapshot: Snapshot, data: st.DataObject) -> None:
    """Evaluating whole runs gives the same answer as evaluating each pfn on its own."""
    whole = model.segments(snapshot)
    end = snapshot.end_pfn()
    if end == 0:  # every section absent
        assert whole.size == 0
        return
    pfns = data.draw(st.lists(st.integers(min_value=0, max_value=end - 1), min_size=1, max_size=20))
    fields = [name for name, _ in model.SEGMENT_FIELDS if name not in ("pfn_start", "pfn_end")]
    for pfn in pfns:
        single = model.segments(snapshot, pfn, pfn + 1)
        if single.size == 0:  # an absent section: no run covers it, and no segment either
            assert not ((whole["pfn_start"] <= pfn) & (pfn < whole["pfn_end"])).any()
            continue
        assert single.size == 1 and single["pfn_end"][0] - single["pfn_start"][0] == 1
        row = at(whole, pfn)
        for name in fields:
            assert single[name][0] == row[name], (pfn, name)


def test_collision_section_splits_at_the_pagemap() -> None:
    snap = build(["boot", "collision"], device_subsections=4)
    seg = model.segments(snap)
    dev_start = 2 * PAGES_PER_SECTION - 4 * PAGES_PER_SUBSECTION
    assert at(seg, dev_start - 1)["pfn_to_online_page"] == 1
    assert at(seg, dev_start)["pfn_to_online_page"] == 0
    assert at(seg, dev_start)["pfn_to_device_page"] == 1


def test_missing_taint_is_found() -> None:
    """A collision section without TAINT_ZONE_DEVICE: the kernel would hand out device pages."""
    snap = build(["boot", "collision"], device_subsections=4)
    section = snap.sections[1]
    flags = tuple(f for f in section.flags if f != "SECTION_TAINT_ZONE_DEVICE")
    word = section.section_mem_map & ~0x10
    snap.sections[1] = dataclasses.replace(section, flags=flags, section_mem_map=word)
    findings = audit.audit(snap)
    device = [f for f in findings if f.rule == "online-device-page"]
    assert len(device) == 1
    assert (device[0].pfn_start, device[0].pfn_end) == (
        2 * PAGES_PER_SECTION - 4 * PAGES_PER_SUBSECTION,
        2 * PAGES_PER_SECTION,
    )
    assert audit.exit_code(findings) == 1


def test_altmap_reserve_is_valid_but_not_active() -> None:
    snap = build(["device"], device_subsections=2, altmap_reserve=64)
    seg = model.segments(snap)
    reserve = at(seg, 10)
    assert reserve["pfn_valid"] == 1 and reserve["pfn_active"] == 0
    assert model.causes(int(reserve["inactive"])) == ["zeroed", "altmap-reserve"]
    assert at(seg, 64)["pfn_to_device_page"] == 1


def test_offline_hotplugged_memory_is_valid_not_online() -> None:
    seg = model.segments(build(["boot", "hot-offline"]))
    row = at(seg, PAGES_PER_SECTION + 5)
    assert row["pfn_valid"] == 1 and row["pfn_to_online_page"] == 0 and row["pfn_active"] == 0


def test_runs_are_maximal() -> None:
    snap = build(["boot", "boot", "hot-online"])
    runs = snap.runs
    same = np.ones(runs.size - 1, dtype=bool)
    for name in STATE_FIELDS:
        same &= runs[name][1:] == runs[name][:-1]
    assert not (same & (runs["pfn_start"][1:] == runs["pfn_end"][:-1])).any()
    assert runs.size == 2


def test_dying_pgmap_is_not_found() -> None:
    """get_dev_pagemap() fails on a pgmap whose ref memunmap_pages() killed: the taint slow path no
    longer refuses the device pfns of an online section, and the audit says why."""
    snap = build(["boot", "collision"], device_subsections=4)
    snap.pagemaps[0] = dataclasses.replace(snap.pagemaps[0], live=False)
    dev_start = 2 * PAGES_PER_SECTION - 4 * PAGES_PER_SUBSECTION
    seg = model.segments(snap)
    assert at(seg, dev_start)["pfn_to_online_page"] == 1 and at(seg, dev_start)["pfn_to_device_page"] == 1
    device = [f for f in audit.audit(snap) if f.rule == "online-device-page"]
    assert [(f.pfn_start, f.pfn_end) for f in device] == [(dev_start, 2 * PAGES_PER_SECTION)]
    assert device[0].evidence["pgmap_ref_live"] is False and "torn down" in device[0].message


def test_block_being_onlined_is_active() -> None:
    """move_pfn_range_to_zone() has run (zone spans the pfns, pages name it), online_mem_sections() not."""
    snap = build(["boot", "hot-online"])
    section = snap.sections[1]
    flags = tuple(f for f in section.flags if f != "SECTION_IS_ONLINE")
    snap.sections[1] = dataclasses.replace(section, flags=flags, section_mem_map=section.section_mem_map & ~0x4)
    snap.blocks[1] = dataclasses.replace(snap.blocks[1], state="offline", online_type="MMOP_ONLINE_MOVABLE", zone=None)
    row = at(model.segments(snap), PAGES_PER_SECTION + 7)
    assert row["pfn_to_online_page"] == 0 and row["pfn_active"] == 1 and row["block_onlining"] == 1
    findings = audit.audit(snap)
    assert not [f for f in findings if f.severity == audit.ERROR], findings
    assert any(f.rule == "proposal-disagrees" and "being onlined" in f.message for f in findings)
    # the same state without the onlining mark is offline memory: not active
    snap.blocks[1] = dataclasses.replace(snap.blocks[1], online_type=None)
    assert at(model.segments(snap), PAGES_PER_SECTION + 7)["pfn_active"] == 0


def test_deferred_init_in_flight_is_judged_by_content() -> None:
    """first_deferred_pfn reset, the deferred_pages key still on: uninitialized pages are deferred."""
    snap = build(["boot", "hot-offline"])  # the second section's memmap is zeroed: make it boot memory
    section = snap.sections[1]
    snap.sections[1] = dataclasses.replace(
        section,
        flags=(*section.flags, "SECTION_IS_ONLINE", "SECTION_IS_EARLY"),
        section_mem_map=section.section_mem_map | 0x4 | 0x8,
    )
    snap.blocks[1] = dataclasses.replace(snap.blocks[1], state="online")
    snap.nodes[0] = dataclasses.replace(snap.nodes[0], first_deferred_pfn=None, deferred_init_running=True)
    seg = model.segments(snap)
    assert at(seg, 5)["deferred"] == 0 and at(seg, PAGES_PER_SECTION + 5)["deferred"] == 1
    assert not [f for f in audit.audit(snap) if f.severity == audit.ERROR]
    snap.nodes[0] = dataclasses.replace(snap.nodes[0], deferred_init_running=False)
    assert [f.rule for f in audit.audit(snap) if f.severity == audit.ERROR] == ["online-memmap-not-sane"]


def test_altmap_memmap_pages_are_not_device_pages() -> None:
    snap = build(["device"], device_subsections=2)
    altmap = Altmap(0, 1024, 0, 128, 0, 100)
    snap.pagemaps[0] = dataclasses.replace(snap.pagemaps[0], altmap=altmap)
    seg = model.segments(snap)
    assert model.causes(int(at(seg, 5)["inactive"])) == ["altmap-memmap"]
    assert at(seg, 5)["pfn_to_device_page"] == 0 and at(seg, 128)["pfn_to_device_page"] == 1


def test_verdict_fails_on_the_chosen_severity() -> None:
    snap = build(["boot"])
    warning = audit.Finding("section-taint-stale", audit.WARNING, 0, 1, "w", {})
    info = audit.Finding("proposal-disagrees", audit.INFO, 0, 1, "i", {})
    assert audit.exit_code([warning, info]) == 0
    assert audit.exit_code([warning, info], fail_on=audit.WARNING) == 1
    assert audit.exit_code([info], fail_on=audit.WARNING) == 0
    assert audit.exit_code([info], fail_on=audit.INFO) == 1
    assert audit.exit_code(audit.audit(snap), fail_on=audit.INFO) == 0


def test_an_error_the_second_read_does_not_show_is_a_live_race() -> None:
    first = [
        audit.Finding("block-section-mismatch", audit.ERROR, 0, 512, "b", {}),
        audit.Finding("online-device-page", audit.ERROR, 512, 1024, "d", {}),
        audit.Finding("proposal-disagrees", audit.INFO, 0, 1, "i", {}),
    ]
    second = [audit.Finding("online-device-page", audit.ERROR, 512, 1024, "d", {})]
    confirmed = audit.confirm(first, second)
    race, kept, info = confirmed
    assert (race.severity, race.category, race.evidence["confirmed"]) == (audit.WARNING, audit.LIVE_RACE, False)
    assert "second read" in race.message
    assert (kept.severity, kept.category, kept.evidence["confirmed"]) == (audit.ERROR, audit.KERNEL, True)
    assert info.severity == audit.INFO and audit.exit_code(confirmed) == 1
