"""Snapshot files: versioned, gzip-compressed JSON; page state as runs. Load without drgn.

Format (``format`` = 2)::

    {"format": 2, "kind": "kmeminspect-snapshot", "source": {...}, "layout": {...},
     "sections": [...], "blocks": [...], "pagemaps": [...], "zones": [...], "nodes": [...],
     "resources": [...], "claims": [...], "online_page_callback": "...", "pgmap_pointers": [...],
     "runs": {"<field>": [values...], ...}}

Format 2 added ``pagemaps[].live``, ``nodes[].deferred_init_running``, ``claims``,
``online_page_callback`` and ``pgmap_pointers``; format 1 files still load (those read as: live, not
running, none, unknown, none).

``runs`` is stored by column (see state.RUN_FIELDS), so a terabyte machine's thousands of runs take
kilobytes. Never pickle.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import schema
from .errors import UsageError
from .files import atomic_writer
from .state import (
    RUN_DTYPE,
    RUN_FIELDS,
    STATE_FIELDS,
    Altmap,
    Block,
    Claim,
    Layout,
    Node,
    Pagemap,
    Resource,
    Section,
    Snapshot,
    Zone,
)

FORMAT = 2
#: the formats this version loads
READABLE_FORMATS = (1, 2)
KIND = "kmeminspect-snapshot"


def to_json(snapshot: Snapshot) -> dict[str, Any]:
    """A snapshot as the JSON object ``kmeminspect snapshot`` writes (format ``FORMAT``)."""
    return {
        "format": FORMAT,
        "kind": KIND,
        "written_by": schema.written_by(),
        "source": snapshot.source,
        "layout": dataclasses.asdict(snapshot.layout),
        "sections": [dataclasses.asdict(s) for s in snapshot.sections],
        "blocks": [dataclasses.asdict(b) for b in snapshot.blocks],
        "pagemaps": [dataclasses.asdict(p) for p in snapshot.pagemaps],
        "zones": [dataclasses.asdict(z) for z in snapshot.zones],
        "nodes": [dataclasses.asdict(n) for n in snapshot.nodes],
        "resources": [dataclasses.asdict(r) for r in snapshot.resources],
        "claims": [dataclasses.asdict(c) for c in snapshot.claims],
        "online_page_callback": snapshot.online_page_callback,
        "pgmap_pointers": [{"address": a, "points_to": w} for a, w in sorted(snapshot.pgmap_pointers.items())],
        "unreadable": list(snapshot.unreadable),
        "runs": {name: snapshot.runs[name].tolist() for name, _ in RUN_FIELDS},
    }


def from_json(data: dict[str, Any], origin: str = "snapshot") -> Snapshot:
    """A snapshot from its JSON object, checked first against the format's schema (:mod:`.schema`);
    ``origin`` names it in errors (anything that does not fit is a UsageError)."""
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise UsageError(f"{origin}: not a kmeminspect snapshot")
    if data.get("format") not in READABLE_FORMATS:
        raise schema.newer(origin, "snapshot format", data.get("format"), READABLE_FORMATS, data)
    schema.check_snapshot(data, origin)
    layout = dict(data["layout"])
    layout["zone_names"] = tuple(layout["zone_names"])
    n = len(data["runs"]["pfn_start"])
    runs = np.zeros(n, dtype=RUN_DTYPE)
    for name, _ in RUN_FIELDS:
        runs[name] = data["runs"][name]
    pagemaps = []
    for p in data["pagemaps"]:
        pagemaps.append(
            Pagemap(
                address=p["address"],
                type=p["type"],
                ranges=tuple((int(r[0]), int(r[1])) for r in p["ranges"]),
                altmap=Altmap(**p["altmap"]) if p["altmap"] else None,
                vmemmap_shift=p["vmemmap_shift"],
                live=bool(p.get("live", True)),
            )
        )
    return Snapshot(
        source=data["source"],
        layout=Layout(**layout),
        sections=[Section(**{**s, "flags": tuple(s["flags"])}) for s in data["sections"]],
        blocks=[Block(**b) for b in data["blocks"]],
        pagemaps=pagemaps,
        zones=[Zone(**z) for z in data["zones"]],
        nodes=[Node(**x) for x in data["nodes"]],
        resources=[Resource(**r) for r in data["resources"]],
        runs=runs,
        claims=[Claim(**c) for c in data.get("claims", [])],
        online_page_callback=data.get("online_page_callback"),
        pgmap_pointers={int(p["address"]): str(p["points_to"]) for p in data.get("pgmap_pointers", [])},
        unreadable=list(data.get("unreadable") or []),
    )


def save(snapshot: Snapshot, path: Path) -> None:
    """Write a snapshot to ``path`` (gzip'd JSON), whole or not at all (:mod:`.files`): a run killed while
    writing leaves the old file, or none."""
    text = json.dumps(to_json(snapshot), separators=(",", ":"))
    with atomic_writer(path) as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:
        z.write(text.encode())


def load(path: Path) -> Snapshot:
    """Read a snapshot saved by :func:`save` (no drgn needed)."""
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: a directory, not a snapshot file") from None
    except (OSError, EOFError, ValueError, RecursionError, zlib.error) as error:  # gzip, UTF-8 and JSON errors
        raise UsageError(f"{path}: not a kmeminspect snapshot ({one_line(error)})") from None
    return from_json(data, str(path))


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:120]


def _keyed_changes(
    key: str, before: dict[int, Any], after: dict[int, Any], fields: dict[str, Callable[[Any], Any]]
) -> list[dict[str, Any]]:
    """Entries added, removed, or changed in any of ``fields`` (name -> how to show the value)."""
    changes: list[dict[str, Any]] = []
    for k in sorted(set(before) | set(after)):
        x, y = before.get(k), after.get(k)
        if x is None or y is None:
            changes.append({key: k, "change": "added" if x is None else "removed"})
            continue
        shown = {name: [show(getattr(x, name)), show(getattr(y, name))] for name, show in fields.items()}
        if any(old != new for old, new in shown.values()):
            changes.append({key: k, "change": "changed", **shown})
    return changes


def diff(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """What changed from a to b: sections, blocks, pagemaps, and pfn ranges whose page state differs."""
    sections = _keyed_changes(
        "nr",
        {s.nr: s for s in a.sections},
        {s.nr: s for s in b.sections},
        {"flags": list, "subsection_map": hex},
    )
    blocks = _keyed_changes(
        "id",
        {blk.id: blk for blk in a.blocks},
        {blk.id: blk for blk in b.blocks},
        {"state": str, "zone": lambda zone: zone},
    )
    pagemaps = _keyed_changes(
        "address",
        {p.address: p for p in a.pagemaps},
        {p.address: p for p in b.pagemaps},
        {"ranges": list, "type": str},
    )
    for p in pagemaps:
        p["address"] = hex(p["address"])
    return {"sections": sections, "blocks": blocks, "pagemaps": pagemaps, "runs": _run_diff(a.runs, b.runs)}


def _run_diff(a: np.ndarray, b: np.ndarray) -> list[dict[str, Any]]:
    cuts = np.unique(np.concatenate([a["pfn_start"], a["pfn_end"], b["pfn_start"], b["pfn_end"]]))
    out: list[dict[str, Any]] = []
    for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        ia = np.searchsorted(a["pfn_start"], lo, side="right") - 1
        ib = np.searchsorted(b["pfn_start"], lo, side="right") - 1
        ra = a[ia] if ia >= 0 and lo < a["pfn_end"][ia] else None
        rb = b[ib] if ib >= 0 and lo < b["pfn_end"][ib] else None
        before = {f: int(ra[f]) for f in STATE_FIELDS} if ra is not None else None
        after = {f: int(rb[f]) for f in STATE_FIELDS} if rb is not None else None
        if before == after:
            continue
        changed = sorted(k for k in STATE_FIELDS if (before or {}).get(k) != (after or {}).get(k))
        if out and out[-1]["pfn_end"] == lo and out[-1]["before"] == before and out[-1]["after"] == after:
            out[-1]["pfn_end"] = hi
        else:
            out.append({"pfn_start": lo, "pfn_end": hi, "fields": changed, "before": before, "after": after})
    return out
