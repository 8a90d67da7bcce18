"""The audit during a stress run: a baseline before the first change, samples every N operations, each new
error confirmed by a second read, and a final read once everything is put back."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from ..audit import ERROR, Finding


class AuditSource(Protocol):
    """One read of the kernel's state, audited: (kernel release, findings)."""

    def read(self) -> tuple[str, list[Finding]]: ...


def finding_key(finding: Finding) -> tuple[str, int, int]:
    """What makes two findings the same one across reads: rule and pfn range."""
    return finding.rule, finding.pfn_start, finding.pfn_end


@dataclasses.dataclass
class AuditLog:
    """Samples of the audit during a run, against the baseline read before the first change.

    A new error is an error finding absent from the baseline. It is reported only when a second read,
    right after the first and with no transition in between, finds it again: a live memmap read while the
    kernel changes it can read torn.
    """

    every: int
    baseline: list[Finding] = dataclasses.field(default_factory=list)
    samples: int = 0
    confirmed: list[tuple[int, Finding]] = dataclasses.field(default_factory=list)  # (after transitions, finding)
    unconfirmed: int = 0
    final: list[Finding] | None = None  # new errors after restoration (confirmed), None when not read

    def new_errors(self, findings: list[Finding]) -> list[Finding]:
        known = {finding_key(f) for f in self.baseline}
        return [f for f in findings if f.severity == ERROR and finding_key(f) not in known]

    def sample(self, source: AuditSource) -> list[Finding]:
        """New errors seen by two reads in a row."""
        self.samples += 1
        first = self.new_errors(source.read()[1])
        if not first:
            return []
        again = {finding_key(f) for f in self.new_errors(source.read()[1])}
        confirmed = [f for f in first if finding_key(f) in again]
        self.unconfirmed += len(first) - len(confirmed)
        return confirmed

    def to_json(self) -> dict[str, Any]:
        from ..audit import summary

        return {
            "every": self.every,
            "samples": self.samples,
            "baseline": summary(self.baseline)["by_severity"],
            "baseline_errors": [f.to_json() for f in self.baseline if f.severity == ERROR],
            "new_errors": [dict(f.to_json(), after_transitions=n) for n, f in self.confirmed],
            "unconfirmed": self.unconfirmed,
            "final_new_errors": None if self.final is None else [f.to_json() for f in self.final],
        }
