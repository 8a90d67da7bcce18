"""The tracer's pure parts, without a kernel: the plan, the event decoding, the seed, saved traces.

What the tracer sees in a real kernel is tested in test_trace.py; here only the bookkeeping around it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import synthetic
from hypothesis import given
from hypothesis import strategies as st

from kmeminspect.trace import events as ev
from kmeminspect.trace.plan import (
    BPF_SOURCES,
    LIFECYCLE,
    PROBED_PARAMETERS,
    PlanError,
    TraceOptions,
    bpf_dir,
    make_plan,
    program_text,
)
from kmeminspect.trace.seed import seed_ranges, tracked_state
from kmeminspect.trace.session import TraceError, import_bcc

REPO = Path(__file__).resolve().parent.parent
ALL_POSITIONS = {f: {p: i + 1 for i, p in enumerate(params)} for f, params in PROBED_PARAMETERS.items()}


def test_event_kinds_match_the_c_enum() -> None:
    """events.KINDS is indexed by bpf/common.h's enum event_kind: both must list the same kinds in order."""
    text = (bpf_dir() / "common.h").read_text()
    body = re.search(r"enum event_kind \{(.*?)\};", text, re.S)
    assert body is not None
    names = re.findall(r"^\s*(EV_\w+)", body.group(1), re.M)
    assert names == ev.C_NAMES
    assert len(names) == len(ev.KINDS)
    assert re.search(r"EV_SECTION_ADD = 1,", text)


def test_every_lifecycle_program_is_defined() -> None:
    """Each program the plan attaches exists in bpf/lifecycle.c (bcc would only fail at attach time)."""
    text = (bpf_dir() / "lifecycle.c").read_text()
    defined = set(re.findall(r"^int (kmi_\w+)\(struct pt_regs \*ctx\)", text, re.M))
    for function in re.findall(r"^(?:TIMED_CALL|PGMAP_CALL)\((\w+),", text, re.M):
        defined |= {f"kmi_{function}", f"kmi_{function}_ret"}
    wanted = {name for pair in LIFECYCLE.values() for name in pair if name}
    assert wanted == defined


def test_program_text_is_one_file_without_local_includes() -> None:
    text = program_text()
    assert not re.search(r'#include\s+"', text)
    for name in BPF_SOURCES:
        assert f"---- {name} ----" in text
    assert text.count("BPF_RINGBUF_OUTPUT(events") == 1


def test_plan_fexit_and_fallbacks() -> None:
    options = TraceOptions(races=True)
    plan = make_plan(options, ALL_POSITIONS, {}, {"X": 1}, fexit=True)
    kinds = {(p.function, p.kind) for p in plan.probes}
    assert ("pfn_to_online_page", "fexit") in kinds and ("pfn_to_online_page", "kprobe") in kinds
    assert {"-DWITH_RACES", "-DWITH_ACTIVE", "-DRETURN_FEXIT", "-DWITH_ENTRY", "-DX=1"} <= set(plan.cflags)
    assert "-DARG_online_pages_zone=PT_REGS_PARM3(ctx)" in plan.cflags
    # no BTF trampolines: a kretprobe, and the entry probe that stashes the pfn for it
    plan = make_plan(TraceOptions(callers=False), ALL_POSITIONS, {}, {}, fexit=False)
    kinds = {(p.function, p.kind) for p in plan.probes}
    assert ("pfn_to_online_page", "kretprobe") in kinds and ("pfn_to_online_page", "kprobe") in kinds
    assert "-DRETURN_FEXIT" not in plan.cflags and "-DWITH_CALLERS" not in plan.cflags


def test_plan_uses_the_equivalent_of_a_notrace_function() -> None:
    positions = dict(ALL_POSITIONS, __add_pages={"nid": 1, "pfn": 2, "nr_pages": 3})
    plan = make_plan(TraceOptions(), positions, {"sparse_add_section": "notrace"}, {}, fexit=True)
    assert {p.function for p in plan.probes if p.program.startswith("kmi_sparse_add")} == {"__add_pages"}
    assert "-DARG_sparse_add_section_start_pfn=PT_REGS_PARM2(ctx)" in plan.cflags
    assert "traced at __add_pages() instead" in plan.unavailable["sparse_add_section"]


def test_plan_refusals() -> None:
    with pytest.raises(PlanError, match="pfn_to_online_page"):
        make_plan(TraceOptions(), ALL_POSITIONS, {"pfn_to_online_page": "inlined"}, {}, fexit=True)
    with pytest.raises(PlanError, match="--no-active"):
        make_plan(TraceOptions(), ALL_POSITIONS, {"remove_pfn_range_from_zone": "inlined"}, {}, fexit=True)
    with pytest.raises(PlanError, match="power of two"):
        make_plan(TraceOptions(verify_every=100), ALL_POSITIONS, {}, {}, fexit=True)
    # the lifecycle alone still works without pfn_to_online_page
    lifecycle_only = TraceOptions(callers=False, active=False)
    plan = make_plan(lifecycle_only, ALL_POSITIONS, {"pfn_to_online_page": "inlined"}, {}, fexit=True)
    assert all(p.function != "pfn_to_online_page" for p in plan.probes)


def raw_event(kind: str, **fields: int | str) -> dict[str, int | str]:
    base: dict[str, int | str] = {
        "ts": 2_000_000_000,
        "pid_tgid": (7 << 32) | 9,
        "comm": "sh",
        "kind": ev.C_NAMES.index(kind) + 1,
        "context": -1,
        "pfn": 0x100000,
        "nr_pages": 0x8000,
        "ret": 0,
        "duration_ns": 1_500_000,
        "aux": 0,
        "aux2": 0,
        "stackid": -1,
        "comm2": "",
    }
    return base | fields


CONTEXT = ev.Context(("DMA", "DMA32", "Normal", "Movable", "Device"), {3: "MEMORY_DEVICE_FS_DAX"}, 1_000_000_000)


def test_event_fields_of_lifecycle_events() -> None:
    e = ev.event_fields(raw_event("EV_ONLINE_PAGES_END", context=3, ret=-16), CONTEXT, None)
    assert (e["function"], e["phase"], e["zone"], e["ret"], e["duration_ms"]) == (
        "online_pages",
        "end",
        "Movable",
        -16,
        1.5,
    )
    assert (e["pid"], e["tid"], e["t"], e["pfn_start"], e["pfn_end"]) == (7, 9, 1.0, 0x100000, 0x108000)
    e = ev.event_fields(raw_event("EV_MEMREMAP_BEGIN", aux=(3 << 32) | 1), CONTEXT, None)
    assert (e["pgmap_type"], e["nr_range"]) == ("MEMORY_DEVICE_FS_DAX", 1)
    e = ev.event_fields(raw_event("EV_BLOCK_ONLINE_BEGIN", aux=33), CONTEXT, None)
    assert e["block"] == 33 and "pfn_start" not in e
    assert "block 33" in ev.format_event(e)


def test_event_fields_of_a_race() -> None:
    raw = raw_event(
        "EV_RACE",
        context=0,
        nr_pages=1,
        ret=ev.C_NAMES.index("EV_REMOVE_FROM_ZONE") + 1,
        aux=(40 << 32) | 41,
        aux2=1_500_000_000,
        stackid=5,
        comm2="python3",
    )
    e = ev.event_fields(raw | {"holder_asleep": 1}, CONTEXT, ["kpageflags_read", "vfs_read"])
    assert (e["phase"], e["pid"], e["tid"], e["comm"], e["pfn"]) == ("race", 40, 41, "python3", 0x100000)
    assert e["invalidated_by"] == {"pid": 7, "tid": 9, "comm": "sh", "at": "remove_pfn_range_from_zone"}
    assert e["held_ms"] == 500.0 and e["stack"] == ["kpageflags_read", "vfs_read"]
    assert "invalidated by sh[9]" in ev.format_event(e)
    # a holder running when its page is invalidated is in the race window, not (provably) racing; a stack
    # that was not captured is said so, never an empty stack
    e = ev.event_fields(raw | {"stackid": -17}, CONTEXT, None)
    assert e["phase"] == "race-window" and e["stack"] == ["[stack not captured: errno 17]"]


def test_probe_frames_are_stripped() -> None:
    frames = ["bpf_prog_abc_kmi", "bpf_trampoline_6442", "pfn_to_online_page", "kpageflags_read", "vfs_read"]
    assert ev.strip_probe_frames(frames, "pfn_to_online_page") == ["kpageflags_read", "vfs_read"]
    assert ev.strip_probe_frames(["kpage_read", "x"], "pfn_to_online_page") == ["kpage_read", "x"]


def test_caller_rows_merge_and_fold() -> None:
    stacks = {1: ["kpageflags_read", "vfs_read"], 2: ["kpageflags_read", "vfs_read"], 3: ["test_pages_isolated"]}
    rows = ev.caller_rows([(1, 0, 2, 10), (2, 0, 2, 5), (3, 1, 2, 20), (-17, 0, 2, 2)], stacks)
    assert [(r.count, r.stack[0]) for r in rows] == [
        (20, "test_pages_isolated"),
        (15, "kpageflags_read"),
        (2, rows[2].stack[0]),
    ]
    assert rows[2].stack[0].startswith("[stack not captured")
    assert ev.folded(rows, "pfn_to_online_page")[1] == "vfs_read;kpageflags_read;pfn_to_online_page 15"
    text = ev.format_callers(rows, 2, {"stack_failures": 2, "events_lost": 0})
    assert "37 calls" in text and "1 more keys" in text


@given(st.lists(st.sampled_from(synthetic.KINDS), min_size=1, max_size=6), st.integers(0, 2))
def test_tracked_state_holds_the_seed(kinds: list[str], reserve: int) -> None:
    """The BPF maps' content built from a snapshot gives back exactly its active pfn ranges."""
    snapshot = synthetic.build(kinds, altmap_reserve=reserve * 100)
    state = tracked_state(snapshot)
    assert state.active_ranges() == seed_ranges(snapshot)
    present = {s.nr for s in snapshot.sections}
    assert set(state.sections) == present


def test_import_bcc_says_how_to_install_it() -> None:
    try:
        import bcc  # type: ignore[import-not-found,import-untyped,unused-ignore]  # noqa: F401
    except ImportError:
        with pytest.raises(TraceError, match="apt-get install python3-bpfcc"):
            import_bcc()
    else:
        assert import_bcc().BPF is not None


def write_trace(path: Path, races: int) -> None:
    header = {"type": "trace", "format": 1, "release": "x", "options": {}, "probes": [], "unavailable": {}}
    event = ev.event_fields(raw_event("EV_ONLINE_PAGES_BEGIN", context=3), CONTEXT, None)
    summary = {"type": "summary", "events": {"online_pages:begin": 1}, "handouts_inactive": 0, "races": races}
    path.write_text("\n".join(json.dumps(r) for r in (header, event, summary)) + "\n")


def kmeminspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmeminspect", *args], capture_output=True, text=True, cwd=REPO)


def test_report_of_a_saved_trace(tmp_path: Path) -> None:
    write_trace(tmp_path / "clean.jsonl", races=0)
    result = kmeminspect("trace", "--report", str(tmp_path / "clean.jsonl"))
    assert result.returncode == 0, result.stderr
    assert "online_pages" in result.stdout and "races: 0" in result.stdout
    write_trace(tmp_path / "racy.jsonl", races=2)
    result = kmeminspect("--json", "trace", "--report", str(tmp_path / "racy.jsonl"))
    assert result.returncode == 1 and json.loads(result.stdout)["summary"]["races"] == 2


@pytest.mark.parametrize("content", ["not json\n", '{"type": "event"}\n', ""])
def test_report_of_a_bad_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "bad").write_text(content)
    result = kmeminspect("trace", "--report", str(tmp_path / "bad"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_trace_needs_the_running_kernel(tmp_path: Path) -> None:
    result = kmeminspect("--vmcore", str(tmp_path / "none"), "trace")
    assert result.returncode == 2 and "running kernel" in result.stderr
