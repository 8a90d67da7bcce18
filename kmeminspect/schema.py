"""One schema per file format kmeminspect reads: the snapshot, the stress journal, the trace file.

Every file is checked against its schema before anything uses it: types, ranges (pfns below 2^52, bits
in range), versions, and what a type cannot say (arrays of equal length, runs sorted and not
overlapping). A file that fails is a :class:`~kmeminspect.errors.UsageError` naming the first place that
is wrong (``s.json.gz: sections[3].nr: expected an integer, got "5"``). A file of a newer format says
which kmeminspect wrote it: the version it needs. Why a small vocabulary of our own rather than
jsonschema or pydantic: docs/decisions.md.

A spec is a function ``(value, where) -> None`` that raises :class:`Invalid`; the builders below make them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from .errors import UsageError

Spec = Callable[[Any, str], None]

#: pfns in every file are below 2^52: x86_64's widest physical address (5-level paging) over 4 KiB pages
PFN_LIMIT = 1 << 52
U64 = 1 << 64


class Invalid(Exception):
    """A value that does not fit its spec: where it is and what is wrong."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}" if where else what)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def integer(lo: int | None = None, hi: int | None = None) -> Spec:
    """An integer (not a bool) in [lo, hi)."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(where, f"expected an integer, got {_shown(value)}")
        if (lo is not None and value < lo) or (hi is not None and value >= hi):
            bounds = f"[{lo if lo is not None else '-inf'}, {hex(hi) if hi and hi > 4096 else hi})"
            raise Invalid(where, f"{value} is out of range {bounds}")

    return check


def number(lo: float = 0.0) -> Spec:
    """A finite number (integer or float) of at least ``lo``."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise Invalid(where, f"expected a number, got {_shown(value)}")
        if value < lo:
            raise Invalid(where, f"{value} is below {lo:g}")

    return check


def string(choices: Iterable[str] | None = None) -> Spec:
    allowed = tuple(choices) if choices is not None else None

    def check(value: Any, where: str) -> None:
        if not isinstance(value, str):
            raise Invalid(where, f"expected a string, got {_shown(value)}")
        if allowed is not None and value not in allowed:
            raise Invalid(where, f"{_shown(value)} is not one of {', '.join(allowed)}")

    return check


def boolean(value: Any, where: str) -> None:
    if not isinstance(value, bool):
        raise Invalid(where, f"expected true or false, got {_shown(value)}")


def anything(value: Any, where: str) -> None:
    """Any JSON value (kept as it is, never interpreted)."""


def optional(spec: Spec) -> Spec:
    """``spec`` or null."""

    def check(value: Any, where: str) -> None:
        if value is not None:
            spec(value, where)

    return check


def array(item: Spec, length: int | None = None) -> Spec:
    """A list of ``item``s (of exactly ``length`` when given)."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, list | tuple):  # a tuple: to_json's object before it is JSON text
            raise Invalid(where, f"expected a list, got {_shown(value)}")
        if length is not None and len(value) != length:
            raise Invalid(where, f"expected {length} items, got {len(value)}")
        for i, x in enumerate(value):
            item(x, f"{where}[{i}]")

    return check


def mapping(value_spec: Spec) -> Spec:
    """An object with string keys and ``value_spec`` values."""

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, f"expected an object, got {_shown(value)}")
        for k, v in value.items():
            value_spec(v, f"{where}.{k}")

    return check


def obj(required: dict[str, Spec], optional_fields: dict[str, Spec] | None = None) -> Spec:
    """An object with every ``required`` field and any of ``optional_fields`` (null allowed there); other
    fields are ignored (a newer kmeminspect of the same format may add some)."""
    extra = optional_fields or {}

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, f"expected an object, got {_shown(value)}")
        for name, spec in required.items():
            if name not in value:
                raise Invalid(where, f"'{name}' is missing")
            spec(value[name], f"{where}.{name}" if where else name)
        for name, spec in extra.items():
            if value.get(name) is not None:
                spec(value[name], f"{where}.{name}" if where else name)

    return check


def validate(data: Any, spec: Spec, origin: str) -> None:
    """Check ``data`` against ``spec``; a mismatch is a UsageError naming ``origin`` and the place."""
    try:
        spec(data, "")
    except Invalid as error:
        raise UsageError(f"{origin}: {error}; this file is damaged or not what it claims to be") from None


def newer(origin: str, what: str, found: Any, readable: Iterable[int], data: dict[str, Any]) -> UsageError:
    """The error for a file of a version this kmeminspect does not read, naming the kmeminspect it needs."""
    from . import __version__

    writer = data.get("written_by")
    needs = f"it was written by {writer}: upgrade to that or newer" if isinstance(writer, str) else "upgrade"
    formats = ", ".join(map(str, readable))
    return UsageError(
        f"{origin}: {what} {_shown(found)} is not supported (this kmeminspect {__version__} reads {formats}); {needs}"
    )


def written_by() -> str:
    """What a file kmeminspect writes records as its writer (``written_by``)."""
    from . import __version__

    return f"kmeminspect {__version__}"


# -- the snapshot ------------------------------------------------------------------------------------

PFN = integer(0, PFN_LIMIT)
ADDRESS = integer(0, U64)
COUNT = integer(0, PFN_LIMIT + 1)
NID = integer(-1, 1 << 15)

LAYOUT = obj(
    {
        "release": string(),
        "page_shift": integer(12, 17),
        "section_size_bits": integer(13, 53),
        "subsection_shift": integer(12, 53),
        "zone_names": array(string()),
        "zone_device": optional(integer(0, 16)),
        "section_flags": mapping(ADDRESS),
        "pageflags": mapping(integer(0, 64)),
        "struct_page_size": integer(1, 4097),
        "vmemmap_base": ADDRESS,
        "max_pfn": integer(0, PFN_LIMIT + 1),
        "pfn_to_online_page": string(("taint-pgmap", "online-section", "pfn_valid")),
    },
    {"max_physmem_bits": integer(13, 65)},
)
SECTION = obj(
    {
        "nr": integer(0, PFN_LIMIT),
        "address": ADDRESS,
        "start_pfn": PFN,
        "nr_pages": COUNT,
        "section_mem_map": ADDRESS,
        "flags": array(string()),
        "subsection_map": ADDRESS,
        "usage": ADDRESS,
        "memmap": ADDRESS,
    }
)
BLOCK = obj(
    {
        "id": integer(0, PFN_LIMIT),
        "start_pfn": PFN,
        "nr_pages": COUNT,
        "state": string(),
        "online_type": optional(string()),
        "nid": NID,
        "zone": optional(string()),
        "nr_vmemmap_pages": COUNT,
    }
)
ALTMAP = obj({name: COUNT for name in ("base_pfn", "end_pfn", "reserve", "free", "align", "alloc")})
PAGEMAP = obj(
    {
        "address": ADDRESS,
        "type": string(),
        "ranges": array(array(integer(0, PFN_LIMIT + 1), length=2)),
        "altmap": optional(ALTMAP),
        "vmemmap_shift": integer(0, 64),
    },
    {"live": boolean},
)
ZONE = obj(
    {
        "nid": NID,
        "zone_id": integer(0, 16),
        "name": string(),
        "start_pfn": PFN,
        "spanned": COUNT,
        "present": COUNT,
    }
)
NODE = obj(
    {"nid": NID, "start_pfn": PFN, "spanned": COUNT, "first_deferred_pfn": optional(ADDRESS)},
    {"deferred_init_running": boolean},
)
RESOURCE = obj({"start": ADDRESS, "end": integer(0, U64 + 1), "name": string(), "depth": integer(0, 1 << 16)})
CLAIM = obj({"start_pfn": PFN, "end_pfn": integer(0, PFN_LIMIT + 1), "owner": string()})
#: the range of each run column (state.RUN_FIELDS)
RUN_COLUMNS: dict[str, tuple[int, int]] = {
    "pfn_start": (0, PFN_LIMIT),
    "pfn_end": (1, PFN_LIMIT + 1),
    "memmap": (0, 4),
    "zone_id": (-1, 16),
    "nid": (-1, 1 << 15),
    "reserved": (0, 2),
    "offline": (0, 2),
    "self_hosted": (0, 2),
    "hwpoison": (0, 2),
    "zeroed": (0, 2),
    "poisoned": (0, 2),
    "pgmap": (0, U64),
}


def _run_columns(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise Invalid(where, f"expected an object of columns, got {_shown(value)}")
    length = None
    for name, (lo, hi) in RUN_COLUMNS.items():
        column = value.get(name)
        if not isinstance(column, list | tuple):
            raise Invalid(f"{where}.{name}", "missing, or not a list")
        bad = next((i for i, x in enumerate(column) if type(x) is not int or not lo <= x < hi), None)
        if bad is not None:
            raise Invalid(f"{where}.{name}[{bad}]", f"expected an integer in [{lo}, {hi}), got {_shown(column[bad])}")
        if length is None:
            length = len(column)
        elif len(column) != length:
            raise Invalid(f"{where}.{name}", f"{len(column)} values, but pfn_start has {length}: columns differ")
    starts, ends = value["pfn_start"], value["pfn_end"]
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        if a >= b:
            raise Invalid(f"{where}[{i}]", f"run {a:#x}-{b:#x} is empty")
        if i and a < ends[i - 1]:
            raise Invalid(f"{where}[{i}]", f"run at {a:#x} overlaps or precedes the one before (runs are sorted)")


SNAPSHOT = obj(
    {
        "source": obj({}),
        "layout": LAYOUT,
        "sections": array(SECTION),
        "blocks": array(BLOCK),
        "pagemaps": array(PAGEMAP),
        "zones": array(ZONE),
        "nodes": array(NODE),
        "resources": array(RESOURCE),
        "runs": _run_columns,
    },
    {
        "claims": array(CLAIM),
        "online_page_callback": string(),
        "written_by": string(),
        "unreadable": array(string()),
        "pgmap_pointers": array(obj({"address": ADDRESS, "points_to": string()})),
    },
)


#: the section flags the model reads by name (the others are optional: kernels differ)
REQUIRED_SECTION_FLAGS = {"SECTION_MARKED_PRESENT", "SECTION_HAS_MEM_MAP", "SECTION_MAP_MASK"}


def check_snapshot(data: dict[str, Any], origin: str) -> None:
    """The snapshot schema, then what spans fields: the layout's bits, sections inside it, ranges."""
    validate(data, SNAPSHOT, origin)
    layout = data["layout"]
    page, sub, section = layout["page_shift"], layout["subsection_shift"], layout["section_size_bits"]
    problems = []
    if not page <= sub <= section <= page + 40:
        problems.append(f"layout: page_shift {page} <= subsection_shift {sub} <= section_size_bits {section} fails")
    elif section - sub > 6:
        problems.append(f"layout: {1 << (section - sub)} subsections per section (a 64-bit map holds 64)")
    bits = layout.get("max_physmem_bits")
    if bits is not None and bits < section:
        problems.append(f"layout.max_physmem_bits: {bits} is below section_size_bits {section}")
    missing = sorted(REQUIRED_SECTION_FLAGS - set(layout["section_flags"]))
    if missing:
        problems.append(f"layout.section_flags: {', '.join(missing)} missing")
    device = layout["zone_device"]
    if device is not None and device >= len(layout["zone_names"]):
        problems.append(f"layout.zone_device: {device} but {len(layout['zone_names'])} zones")
    if not problems:
        per_section = 1 << (section - page)
        for i, s in enumerate(data["sections"]):
            if s["start_pfn"] != s["nr"] * per_section or s["nr_pages"] != per_section:
                problems.append(f"sections[{i}]: pfns {s['start_pfn']:#x}+{s['nr_pages']} are not section {s['nr']}")
                break
            if s["subsection_map"] >> (1 << (section - sub)):
                problems.append(f"sections[{i}].subsection_map: bits beyond the section's subsections")
                break
        names = [s["nr"] for s in data["sections"]]
        if len(set(names)) != len(names):
            problems.append("sections: a section number appears twice")
    for i, p in enumerate(data["pagemaps"]):
        if any(a > b for a, b in p["ranges"]):
            problems.append(f"pagemaps[{i}].ranges: a range ends before it starts")
    for name, key in (("claims", "start_pfn"), ("resources", "start")):
        for i, c in enumerate(data.get(name) or []):
            if c[key] > c["end_pfn" if name == "claims" else "end"]:
                problems.append(f"{name}[{i}]: ends before it starts")
    if problems:
        raise UsageError(f"{origin}: {problems[0]}; this file is damaged or not what it claims to be")


# -- the stress journal ---------------------------------------------------------------------------------

JOURNAL_HEADER = obj(
    {"format": string(), "version": integer(), "mode": string(("live", "qemu"))},
    {"pid": integer(0), "boot_id": string(), "written_by": string()},
)
JOURNAL_LIVE = obj(
    {"sysfs": string(), "blocks": mapping(obj({"state": string()}, {"zone": string()}))},
)
#: the QEMU driver's header: its virtio-mem device as it was before the run, to put back
JOURNAL_QEMU = obj(
    {"qmp": string(), "prefix": string()},
    {"virtio_mem": obj({"id": string(), "requested_size": integer(0)})},
)


def _block_or_device(value: Any, where: str) -> None:
    """What a restoration failed to put back: a block number (live) or a device id (QEMU)."""
    if not isinstance(value, str):
        integer(0)(value, where)


JOURNAL_EVENT = obj({"event": string()}, {"failed": array(_block_or_device), "restored": boolean})


def check_journal(header: dict[str, Any], events: list[dict[str, Any]], origin: str) -> None:
    validate(header, JOURNAL_HEADER, f"{origin}: header")
    validate(header, JOURNAL_LIVE if header["mode"] == "live" else JOURNAL_QEMU, f"{origin}: header")
    if header["mode"] == "live":
        for block in header["blocks"]:
            if not block.isdigit():
                raise UsageError(f"{origin}: header.blocks: '{block}' is not a block number; the journal is damaged")
    for number, event in enumerate(events, 2):
        validate(event, JOURNAL_EVENT, f"{origin}: line {number}")


# -- the trace file ----------------------------------------------------------------------------------

TRACE_HEADER = obj({"type": string(), "format": integer(), "release": string()}, {"options": obj({})})
TRACE_EVENT = obj(
    {"t": number(), "comm": string(), "tid": integer(), "function": string(), "phase": string()},
    {
        "block": integer(0),
        "pfn_start": PFN,
        "pfn_end": integer(0, PFN_LIMIT + 1),
        "pfn": PFN,
        "zone": string(),
        "pgmap_type": string(),
        "nr_range": integer(0),
        "active_from": PFN,
        "active_pages": integer(0),
        "initialized_from": PFN,
        "duration_ms": number(),
        "held_ms": number(),
        "invalidated_by": obj({"comm": string(), "tid": integer(), "at": string()}),
        "context": string(),
        "stack": array(string()),
    },
)
CALLER = obj({"count": integer(0), "context": string(), "result": string(), "stack": array(string())})
TRACE_SUMMARY = obj(
    {},
    {
        "duration_s": number(),
        "stopped_by": string(),
        "events": mapping(integer(0)),
        "unavailable": obj({}),
        "callers": array(CALLER),
        **{name: integer(0) for name in ("events_lost", "handouts_inactive", "races", "race_windows")},
        "stack_failures": integer(0),
    },
)


def check_trace_record(record: dict[str, Any], origin: str) -> None:
    """One line of a trace file, by its type (other types are ignored, as by the reader)."""
    kind = record.get("type")
    spec = {"trace": TRACE_HEADER, "event": TRACE_EVENT, "summary": TRACE_SUMMARY}.get(
        kind if isinstance(kind, str) else ""
    )
    if spec is not None:
        validate(record, spec, origin)
    if kind == "event" and record["phase"] in ("race", "race-window") and record.get("invalidated_by") is None:
        raise UsageError(f"{origin}: a {record['phase']} event without 'invalidated_by'; this file is damaged")
    for field, needs in TOGETHER.get(str(kind), ()):
        if record.get(field) is not None and record.get(needs) is None:
            raise UsageError(f"{origin}: '{field}' without '{needs}'; this file is damaged")


#: fields the trace's printing reads together: the first needs the second
TOGETHER = {
    "event": (
        ("pfn_start", "pfn_end"),
        ("pgmap_type", "nr_range"),
        ("active_from", "active_pages"),
        ("invalidated_by", "held_ms"),
        ("held_ms", "invalidated_by"),
    ),
    "summary": (("stopped_by", "duration_s"),),
}
