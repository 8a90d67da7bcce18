"""The read-only commands: sections, blocks, pfn, audit, map, snapshot, diff, doctor. Each reads its target
through the group's :class:`~.group.Context` and prints a view of :mod:`kmeminspect.views`."""

from __future__ import annotations

from pathlib import Path

import click

from .. import audit as audit_mod
from .. import snapshot as snapshot_mod
from .. import views
from .group import Context, main, run
from .types import PfnRange


@main.command()
@click.pass_obj
def sections(obj: Context) -> None:
    """One row per present section (like crash's kmem -n)."""
    run(lambda: obj.emit(*views.sections_view(obj.snapshot())))


@main.command()
@click.pass_obj
def blocks(obj: Context) -> None:
    """Memory blocks: range, state, zone, node, memmap_on_memory pages."""
    run(lambda: obj.emit(*views.blocks_view(obj.snapshot())))


@main.command()
@click.argument("pfns", type=PfnRange(), metavar="PFN|START-END")
@click.option("--phys", is_flag=True, help="PFNS are physical addresses (like crash's kmem -p): their pages.")
@click.pass_obj
def pfn(obj: Context, pfns: tuple[int, int, bool], phys: bool) -> None:
    """Explain PFN, or START-END (END exclusive) as runs of identical state; decimal, or hex with 0x.

    Any pfn the architecture can address gets an answer, beyond the highest present section too (not
    present, no memmap). With --phys, ADDRESS or START-END are physical addresses: the pages holding them."""

    def body() -> None:
        start, end, is_range = pfns
        if phys:
            # x86_64 pages are at least 4 KiB: read enough, then convert with the kernel's own PAGE_SHIFT
            snap = obj.snapshot(pfn_range=(start >> 12, -(-end >> 12)))
            shift = snap.layout.page_shift
            start, end = start >> shift, -(-end >> shift)
        else:
            snap = obj.snapshot(pfn_range=(start, end))
        obj.emit(*views.pfn_view(snap, start, end, is_range, obj.prog))

    run(body)


@main.command()
@click.option("--rules", "list_rules", is_flag=True, help="List the rules and their meanings.")
@click.option("--errors-only", is_flag=True, help="Show error findings only.")
@click.option(
    "--fail-on",
    type=click.Choice(audit_mod.SEVERITIES),
    default=audit_mod.ERROR,
    show_default=True,
    help="Exit 1 when a finding is at least this serious.",
)
@click.pass_obj
def audit(obj: Context, list_rules: bool, errors_only: bool, fail_on: str) -> None:
    """Findings; exit 0 clean, 1 when any error (or --fail-on) finding, 2 when it could not run.

    On a running kernel (--live, --qemu) an error is confirmed by a second read; one that is gone by then
    is reported as a live-race warning."""

    def body() -> int:
        if list_rules:
            obj.emit(*views.rules_view())
            return 0
        snap = obj.snapshot()
        findings = audit_mod.audit(snap)
        if obj.kind in ("live", "qemu") and any(f.severity == audit_mod.ERROR for f in findings):
            findings = audit_mod.confirm(findings, audit_mod.audit(obj.snapshot()))
        obj.emit(*views.audit_view(snap, findings, errors_only))
        return audit_mod.exit_code(findings, fail_on)

    run(body)


@main.command(name="map")
@click.option("--html", "html_file", metavar="FILE", help="Also write the map as a standalone HTML/SVG page.")
@click.pass_obj
def map_command(obj: Context, html_file: str | None) -> None:
    """Sections x subsections, one cell each, coloured by state; runs of identical sections collapsed."""
    run(lambda: obj.emit(*views.map_view(obj.snapshot(), html_file, obj.colour)))


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Snapshot file to write.")
@click.pass_obj
def snapshot(obj: Context, output: str) -> None:
    """Save everything read to FILE (versioned, compressed JSON; loads without drgn)."""

    def body() -> None:
        snap = obj.snapshot()
        snapshot_mod.save(snap, Path(output))
        obj.emit(
            {"snapshot": output, "sections": len(snap.sections), "runs": int(snap.runs.size)},
            lambda: f"{output}: {len(snap.sections)} sections, {len(snap.blocks)} blocks, {snap.runs.size} runs",
        )

    run(body)


@main.command()
@click.argument("before", type=click.Path(dir_okay=False))
@click.argument("after", type=click.Path(dir_okay=False))
@click.pass_obj
def diff(obj: Context, before: str, after: str) -> None:
    """What changed between two snapshots."""
    run(
        lambda: obj.emit(
            *views.diff_view(snapshot_mod.diff(snapshot_mod.load(Path(before)), snapshot_mod.load(Path(after))))
        )
    )


@main.command()
@click.pass_obj
def doctor(obj: Context) -> None:
    """What each command needs on this machine, and the command that fixes what is missing."""
    from ..doctor import checks

    run(
        lambda: obj.emit(
            *views.doctor_view(checks(Path(obj.vmlinux) if obj.vmlinux else None, Path(obj.btf) if obj.btf else None))
        )
    )
