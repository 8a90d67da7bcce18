"""What the tracer's BPF programs report, as plain dicts: lifecycle events, hand-outs, races, callers.

Pure Python. The session (``session.py``) turns each ring-buffer record into ``event_fields()`` and each
stack id into symbol names; everything here is then formatting and arithmetic, so ``trace --report`` on
a saved trace and the live tracer print the same thing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Any

#: enum event_kind of bpf/common.h, in order from 1: (kernel function, phase)
KINDS: tuple[tuple[str, str], ...] = (
    ("sparse_add_section", "done"),
    ("sparse_remove_section", "enter"),
    ("online_pages", "begin"),
    ("online_pages", "end"),
    ("offline_pages", "begin"),
    ("offline_pages", "end"),
    ("move_pfn_range_to_zone", "done"),
    ("remove_pfn_range_from_zone", "enter"),
    ("online_mem_sections", "enter"),
    ("offline_mem_sections", "enter"),
    ("memremap_pages", "begin"),
    ("memremap_pages", "end"),
    ("memunmap_pages", "begin"),
    ("memunmap_pages", "end"),
    ("memmap_init_zone_device", "begin"),
    ("memmap_init_zone_device", "end"),
    ("memory_subsys_online", "begin"),
    ("memory_subsys_online", "end"),
    ("memory_subsys_offline", "begin"),
    ("memory_subsys_offline", "end"),
    ("pfn_to_online_page", "handout-inactive"),
    ("pfn_to_online_page", "race"),  # or "race-window", by the holder's state
    ("tracker", "state-overflow"),
)
#: the C names of KINDS, for the test that keeps both in step
C_NAMES = (
    "EV_SECTION_ADD EV_SECTION_REMOVE EV_ONLINE_PAGES_BEGIN EV_ONLINE_PAGES_END EV_OFFLINE_PAGES_BEGIN "
    "EV_OFFLINE_PAGES_END EV_MOVE_TO_ZONE EV_REMOVE_FROM_ZONE EV_SECTIONS_ONLINE EV_SECTIONS_OFFLINE "
    "EV_MEMREMAP_BEGIN EV_MEMREMAP_END EV_MEMUNMAP_BEGIN EV_MEMUNMAP_END EV_DEVICE_INIT_BEGIN "
    "EV_DEVICE_INIT_END EV_BLOCK_ONLINE_BEGIN EV_BLOCK_ONLINE_END EV_BLOCK_OFFLINE_BEGIN EV_BLOCK_OFFLINE_END "
    "EV_HANDOUT_INACTIVE EV_RACE EV_STATE_OVERFLOW"
).split()
CONTEXTS = ("other", "hotplug")
RESULTS = ("null", "page", "unknown")
#: kinds whose ``context`` field is a zone index
ZONE_KINDS = {"online_pages", "offline_pages", "move_pfn_range_to_zone", "remove_pfn_range_from_zone"}
BLOCK_KINDS = {"memory_subsys_online", "memory_subsys_offline"}
PGMAP_KINDS = {"memremap_pages", "memunmap_pages"}
#: frames of the probe machinery above the probed function in a captured stack
PROBE_FRAME = re.compile(r"^(bpf_|__bpf|kprobe|__kprobe|kretprobe|__kretprobe|arch_rethook|rethook|ftrace|\[unknown\])")


@dataclasses.dataclass(frozen=True)
class Context:
    """What turns raw numbers into names: the kernel's zone names and memory types, and the trace's t0."""

    zone_names: tuple[str, ...]
    memory_types: dict[int, str]
    start_ns: int


def event_fields(raw: dict[str, Any], ctx: Context, stack: list[str] | None) -> dict[str, Any]:
    """One ring-buffer record (the fields of struct event) as a JSON-ready dict."""
    function, phase = KINDS[raw["kind"] - 1]
    pid_tgid = raw["pid_tgid"]
    out: dict[str, Any] = {
        "type": "event",
        "function": function,
        "phase": phase,
        "t": round((raw["ts"] - ctx.start_ns) / 1e9, 6),
        "pid": pid_tgid >> 32,
        "tid": pid_tgid & 0xFFFFFFFF,
        "comm": raw["comm"],
    }
    if function in BLOCK_KINDS:
        out["block"] = raw["aux"]
    else:
        out["pfn_start"] = raw["pfn"]
        out["pfn_end"] = raw["pfn"] + raw["nr_pages"]
    if function in ZONE_KINDS:
        zone = raw["context"]
        out["zone"] = ctx.zone_names[zone] if 0 <= zone < len(ctx.zone_names) else None
    if function in PGMAP_KINDS and phase == "end":
        out["pgmap"] = f"{raw['aux2']:#x}"
    if function in PGMAP_KINDS and phase == "begin":
        out["pgmap_type"] = ctx.memory_types.get(raw["aux"] >> 32, str(raw["aux"] >> 32))
        out["nr_range"] = raw["aux"] & 0xFFFFFFFF
    if phase in ("end", "done"):
        out["ret"] = raw["ret"]
        if phase == "end":
            out["duration_ms"] = round(raw["duration_ns"] / 1e6, 3)
    if function == "memmap_init_zone_device" and phase == "end":
        out["initialized_from"] = raw["aux2"]  # pfns before it: the altmap's reserve and free part
    if function == "move_pfn_range_to_zone":
        out["active_pages"] = raw["ret"]  # of [pfn_start, pfn_end), from active_from
        out["active_from"] = raw["aux2"]
        del out["ret"]
    if phase in ("handout-inactive", "race"):  # race-window too: decided below
        out["pfn"] = raw["pfn"]
        del out["pfn_start"], out["pfn_end"]
        out["context"] = CONTEXTS[raw["context"]] if 0 <= raw["context"] < len(CONTEXTS) else str(raw["context"])
        out["stack"] = stack if stack is not None else stack_failure(raw["stackid"])
    if phase == "race" and not raw.get("holder_asleep"):
        # the holder is running (or runnable) between the hand-out and its next call: the window every
        # walker is in; a race only if it touches the page after the invalidation, which cannot be seen
        out["phase"] = phase = "race-window"
    if phase in ("race", "race-window"):
        # the holder is the task that got the page; the event's own task is the one invalidating it
        out["invalidated_by"] = {
            "pid": out.pop("pid"),
            "tid": out.pop("tid"),
            "comm": out.pop("comm"),
            "at": KINDS[raw["ret"] - 1][0] if 0 < raw["ret"] <= len(KINDS) else str(raw["ret"]),
        }
        out["pid"], out["tid"], out["comm"] = raw["aux"] >> 32, raw["aux"] & 0xFFFFFFFF, raw["comm2"]
        out["held_ms"] = round((raw["ts"] - raw["aux2"]) / 1e6, 3)
        out["holder_asleep"] = bool(raw.get("holder_asleep"))
    if phase == "state-overflow":
        out["op"] = raw["ret"]
    return out


def stack_failure(stackid: int) -> list[str]:
    """What stands for a stack that could not be captured: never an empty stack."""
    return [f"[stack not captured: {'no entry probe' if stackid == -1 else f'errno {-stackid}'}]"]


def strip_probe_frames(frames: list[str], target: str) -> list[str]:
    """Frames of a captured stack (innermost first) from the target's caller on: the probe machinery
    and the target's own frame go."""
    i = 0
    while i < len(frames) and (PROBE_FRAME.match(frames[i]) or frames[i] == target):
        i += 1
    return frames[i:]


def format_range(start: int, end: int) -> str:
    """``0x1000-0x2000``: a pfn range as events print it."""
    return f"{start:#x}-{end:#x}"


def format_event(e: dict[str, Any]) -> str:
    """One line of the live timeline."""
    who = f"{e['comm']}[{e['tid']}]"
    head = f"{e['t']:11.6f} {who:<20} {e['function']:<27} {e['phase']:<7}"
    parts = []
    if "block" in e:
        parts.append(f"block {e['block']}")
    if "pfn_start" in e:
        parts.append(f"pfn {format_range(e['pfn_start'], e['pfn_end'])}")
    if "pfn" in e:
        parts.append(f"pfn {e['pfn']:#x}")
    if e.get("zone"):
        parts.append(f"zone {e['zone']}")
    if "pgmap_type" in e:
        parts.append(f"{e['pgmap_type']} ({e['nr_range']} range{'s' if e['nr_range'] != 1 else ''})")
    if "active_from" in e:
        parts.append(f"active {e['active_pages']} pages from {e['active_from']:#x}")
    if "initialized_from" in e:
        parts.append(f"initialized from {e['initialized_from']:#x}")
    if "ret" in e:
        parts.append(f"ret {e['ret']}")
    if "duration_ms" in e:
        parts.append(f"{e['duration_ms']:.3f} ms")
    if e["phase"] in ("race", "race-window"):
        by = e["invalidated_by"]
        parts.append(f"held {e['held_ms']:.3f} ms, invalidated by {by['comm']}[{by['tid']}] in {by['at']}")
    if "context" in e:
        parts.append(f"context {e['context']}")
    line = f"{head} {', '.join(parts)}"
    if "stack" in e:
        line += "".join(f"\n{'':14}{frame}" for frame in e["stack"])
    return line


@dataclasses.dataclass(frozen=True)
class CallerRow:
    """One caller stack of ``pfn_to_online_page()`` and how often it was seen, in one context and with one result."""

    count: int
    context: str
    result: str
    stack: tuple[str, ...]  # innermost (pfn_to_online_page's caller) first; a failure marker if not captured

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "context": self.context, "result": self.result, "stack": list(self.stack)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallerRow:
        """A row of a summary's ``callers`` (a saved trace, or ``--json``)."""
        return cls(data["count"], data["context"], data["result"], tuple(data["stack"]))


def caller_rows(counts: Iterable[tuple[int, int, int, int]], stacks: dict[int, list[str]]) -> list[CallerRow]:
    """(stackid, context, result, count) entries of the callers map, ranked by count. Stack ids whose
    frames name the same functions (call sites at other offsets) are one row."""
    merged: dict[tuple[tuple[str, ...], str, str], int] = {}
    for stackid, context, result, count in counts:
        stack = stacks.get(stackid) if stackid >= 0 else None
        key = (
            tuple(stack) if stack is not None else tuple(stack_failure(stackid)),
            CONTEXTS[context] if context < len(CONTEXTS) else str(context),
            RESULTS[result] if result < len(RESULTS) else str(result),
        )
        merged[key] = merged.get(key, 0) + count
    rows = [CallerRow(count, context, result, stack) for (stack, context, result), count in merged.items()]
    return sorted(rows, key=lambda r: (-r.count, r.stack, r.context, r.result))


def folded(rows: list[CallerRow], target: str) -> list[str]:
    """Folded stacks (outermost frame first, ``;``-separated, then the count), as flame graph tools read."""
    merged: dict[str, int] = {}
    for row in rows:
        key = ";".join([*reversed(row.stack), target])
        merged[key] = merged.get(key, 0) + row.count
    return [f"{stack} {count}" for stack, count in sorted(merged.items(), key=lambda kv: -kv[1])]


def format_callers(rows: list[CallerRow], top: int, summary: dict[str, Any]) -> str:
    """The ranked table of callers, stackcount-style: count, share, context, result, then the stack."""
    total = sum(r.count for r in rows)
    lines = [
        f"pfn_to_online_page() callers: {total} calls from {len(rows)} (stack, context, result) keys; "
        f"stack captures failed: {summary.get('stack_failures', 0)}; events lost: {summary.get('events_lost', 0)}"
    ]
    cache = summary.get("stack_cache")
    if cache:
        lines.append(
            f"stack ids reused: {cache['reused']}, verified by unwinding: {cache['verified']}, "
            f"disagreed: {cache['disagreed']}"
        )
    for row in rows[:top]:
        share = 100.0 * row.count / total if total else 0.0
        caller = row.stack[0] if row.stack else "?"
        lines.append(f"{row.count:>12} {share:5.1f}%  {row.context:<8} {row.result:<7} {caller}")
        lines.extend(f"{'':22}{frame}" for frame in row.stack)
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more keys (--top)")
    return "\n".join(lines)


def summary_text(summary: dict[str, Any], top: int) -> str:
    """The end-of-trace summary (``trace``'s JSON object, live or from ``--report``) for a terminal."""
    lines = []
    if "callers" in summary:
        rows = [CallerRow.from_json(r) for r in summary["callers"]]
        lines.append(format_callers(rows, top, summary))
    counts = ", ".join(f"{k} {v}" for k, v in summary.get("events", {}).items()) or "none"
    lines.append(f"events: {counts}")
    lines.append(
        f"inactive hand-outs: {summary.get('handouts_inactive', 0)}, races: {summary.get('races', 0)} "
        f"(and {summary.get('race_windows', 0)} windows), "
        f"events lost: {summary.get('events_lost', 0)}, stack captures failed: {summary.get('stack_failures', 0)}"
    )
    for function, why in sorted(summary.get("unavailable", {}).items()):
        lines.append(f"not traced: {function}(): {why}")
    if "stopped_by" in summary:
        lines.append(f"stopped by {summary['stopped_by']} after {summary['duration_s']} s")
    return "\n".join(lines)
