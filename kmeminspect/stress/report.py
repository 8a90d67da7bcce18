"""What a stress run reports, live or QEMU: counts by action and refusal, the walkers, the audit, what was
put back; as the ``--json`` object and as text for a terminal (:func:`report_text`, :func:`restore_text`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from .sampling import AuditLog
from .walkers import WalkerRun


class PutBack(Protocol):
    """What became of one thing a run changed when it was put back (a block, a DIMM, a virtio-mem size)."""

    result: str  # unchanged, restored, failed, gone

    @property
    def key(self) -> Any:
        """How the journal's ``closed`` record names it among the ``failed``."""

    def to_json(self) -> dict[str, Any]: ...


def put_back(restorations: list[PutBack]) -> bool:
    """Everything is in its original state again."""
    return all(r.result in ("unchanged", "restored") for r in restorations)


@dataclasses.dataclass
class ActionCounts:
    """The transitions of one action (offline, online_movable, dimm-add, ...): tried, done, time, refusals."""

    attempted: int = 0
    done: int = 0
    seconds: float = 0.0
    refusals: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"attempted": self.attempted, "done": self.done, "seconds": round(self.seconds, 2), **self.refusals}


@dataclasses.dataclass
class Counters:
    """Every transition of a run: totals, by action, refusals by reason, and the anomalies."""

    attempted: int = 0
    done: int = 0
    by_action: dict[str, ActionCounts] = dataclasses.field(default_factory=dict)
    refusals: dict[str, int] = dataclasses.field(default_factory=dict)
    anomalies: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def count(self, action: str, result: str, reason: str | None, seconds: float, anomaly: dict[str, Any]) -> None:
        """One transition: ``anomaly`` describes it in the report if its result is "anomaly"."""
        self.attempted += 1
        entry = self.by_action.setdefault(action, ActionCounts())
        entry.attempted += 1
        entry.seconds += seconds
        if result == "done":
            self.done += 1
            entry.done += 1
        elif result == "refused" and reason:
            self.refusals[reason] = self.refusals.get(reason, 0) + 1
            entry.refusals[reason] = entry.refusals.get(reason, 0) + 1
        elif result == "anomaly":
            self.anomalies.append(anomaly)


@dataclasses.dataclass
class Report:
    """One run's report. ``details`` are the mode's own keys (live: the blocks and their original state;
    QEMU: the prefix of the devices it adds), ``meanings`` explain its refusal reasons."""

    mode: str
    kernel: str
    seed: int
    journal: str
    details: dict[str, Any]
    meanings: dict[str, str]
    stopped_by: str = ""  # transitions, duration, operations, a signal's name, or error
    error: str | None = None
    seconds: float = 0.0
    counters: Counters = dataclasses.field(default_factory=Counters)
    walkers: list[WalkerRun] = dataclasses.field(default_factory=list)
    audit: AuditLog | None = None
    restorations: list[PutBack] = dataclasses.field(default_factory=list)
    hooks: dict[str, Any] = dataclasses.field(default_factory=dict)
    journal_error: str | None = None  # a journal write that failed while restoring

    @property
    def restored(self) -> bool:
        return put_back(self.restorations)

    def exit_code(self) -> int:
        """2: something was not put back, or the run failed; 1: the audit confirmed a new error; else 0."""
        if self.error or not self.restored:
            return 2
        if self.audit and (self.audit.confirmed or self.audit.final):
            return 1
        return 0

    def to_json(self) -> dict[str, Any]:
        c = self.counters
        refusals = {
            name: {"count": n, "meaning": self.meanings.get(name, "")} for name, n in sorted(c.refusals.items())
        }
        return {
            "mode": self.mode,
            "kernel": self.kernel,
            "seed": self.seed,
            "journal": self.journal,
            **self.details,
            "stopped_by": self.stopped_by,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "transitions": {
                "attempted": c.attempted,
                "done": c.done,
                "per_second": round(c.attempted / self.seconds, 2) if self.seconds else None,
                "by_action": {action: entry.to_json() for action, entry in c.by_action.items()},
                "refusals": refusals,
                "anomalies": c.anomalies,
            },
            "walkers": [
                {"kind": w.kind, **(w.result or {}), **({"note": w.note} if w.note else {})} for w in self.walkers
            ],
            "audit": self.audit.to_json() if self.audit else None,
            "restored": self.restored,
            "restoration": [r.to_json() for r in self.restorations],
            "journal_error": self.journal_error,
            "hooks": self.hooks,
        }


@dataclasses.dataclass
class RestoreReport:
    """What ``stress --restore JOURNAL`` put back (``note``: why nothing was done)."""

    journal: str
    restorations: list[PutBack]
    note: str | None = None

    @property
    def complete(self) -> bool:
        return put_back(self.restorations)

    def to_json(self) -> dict[str, Any]:
        return {
            "journal": self.journal,
            "complete": self.complete,
            "note": self.note,
            "blocks": [r.to_json() for r in self.restorations],
        }


# -- texts -------------------------------------------------------------------------------------------


def _restoration_line(r: dict[str, Any]) -> str:
    what = f"block {r['block']}" if "block" in r else r["what"]
    reason = r.get("errno") or r.get("reason") or r["result"]
    return f"NOT RESTORED {what} ({reason}): {r['advice']}"


def report_text(data: dict[str, Any]) -> str:
    """A stress report (``--json``'s object) for a terminal."""
    t = data["transitions"]
    rate = f" ({t['per_second']}/s)" if t["per_second"] else ""
    out = [
        f"stopped by: {data['stopped_by']} after {data['seconds']} s" + (f": {data['error']}" if data["error"] else ""),
        f"transitions: {t['attempted']} attempted, {t['done']} done{rate}",
    ]
    for action, c in t["by_action"].items():
        refused = {k: v for k, v in c.items() if k not in ("attempted", "done", "seconds")}
        average = c["seconds"] / c["attempted"] if c["attempted"] else 0
        out.append(
            f"  {action:<15} {c['attempted']:>6} attempted {c['done']:>6} done  {average:.2f} s each"
            + "".join(f"  {k} {v}" for k, v in refused.items())
        )
    for name, r in t["refusals"].items():
        out.append(f"refused {r['count']}x {name}" + (f": {r['meaning']}" if r["meaning"] else ""))
    for a in t["anomalies"]:
        out.append(f"anomaly: {a}")
    for w in data["walkers"]:
        if "note" in w and "passes" not in w:
            out.append(f"walker {w['kind']}: {w['note']}")
        else:
            errors = ", ".join(f"{k} {v}" for k, v in w.get("errors", {}).items())
            work = f"{w.get('pfns', 0)} pfns read in {w.get('passes', 0)} passes" if w.get("pfns") else ""
            out.append(
                f"walker {w['kind']}: {work or str(w.get('passes', 0)) + ' runs'}"
                + (f", errors: {errors}" if errors else "")
                + (f" ({w['note']})" if "note" in w else "")
            )
    audit = data["audit"]
    if audit:
        base = ", ".join(f"{n} {s}" for s, n in audit["baseline"].items())
        new = audit["new_errors"]
        out.append(
            f"audit: {audit['samples']} samples (every {audit['every']} transitions); baseline {base}; "
            f"new errors confirmed: {len(new)}, unconfirmed (torn reads): {audit['unconfirmed']}"
        )
        for f in new:
            out.append(
                f"  after {f['after_transitions']}: {f['rule']} {f['pfn_start']:#x}-{f['pfn_end']:#x} {f['message']}"
            )
        final = audit["final_new_errors"]
        if final is None:
            out.append("  after restoring: not audited (interrupted, failed or not restored)")
        else:
            out.append(f"  after restoring: {len(final)} new errors" + ("" if final else " (back to the baseline)"))
    results = [r["result"] for r in data["restoration"]]
    if data["restored"]:
        out.append(
            f"restored: everything is back in its original state ({results.count('restored')} put back, "
            f"{results.count('unchanged')} unchanged)"
        )
    else:
        out += [_restoration_line(r) for r in data["restoration"] if r["result"] not in ("restored", "unchanged")]
    if data.get("journal_error"):
        out.append(f"journal: {data['journal_error']}")
    traced = (data.get("hooks") or {}).get("trace")
    if traced:
        out.append(
            f"trace: {traced['error']}"
            if "error" in traced
            else f"trace: {traced['races']} races ({traced['race_windows']} windows), "
            f"{traced['handouts_inactive']} inactive hand-outs, {traced['events_lost']} events lost"
        )
    out.append(f"journal: {data['journal']}")
    return "\n".join(out)


def restore_text(data: dict[str, Any]) -> str:
    """What ``stress --restore`` put back (``--json``'s object) for a terminal."""
    if data["note"]:
        return f"{data['journal']}: {data['note']}"
    results = [r["result"] for r in data["blocks"]]
    if data["complete"]:
        done, unchanged = results.count("restored"), results.count("unchanged")
        return f"{data['journal']}: everything back ({done} put back, {unchanged} unchanged)"
    return "\n".join(_restoration_line(r) for r in data["blocks"] if r["result"] not in ("restored", "unchanged"))
