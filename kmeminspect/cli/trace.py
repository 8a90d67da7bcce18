"""``kmeminspect trace``: watch memory hotplug live (bcc), or summarise a saved trace (``--report``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .group import Context, main, run
from .types import Integer, Number, PfnRange


@main.command(context_settings={"allow_interspersed_args": False})
@click.option("--duration", type=Number(0.001), metavar="SECONDS", help="Stop after this long (default: Ctrl-C).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Also write events and summary as JSON lines.")
@click.option("--events/--no-events", default=True, show_default=True, help="Print the lifecycle timeline.")
@click.option("--callers/--no-callers", default=True, show_default=True, help="Count pfn_to_online_page() callers.")
@click.option("--split", is_flag=True, help="Count callers by result too (NULL or a page; a return probe).")
@click.option("--exact-stacks", is_flag=True, help="Unwind every call's stack instead of reusing stack ids.")
@click.option("--active/--no-active", default=True, show_default=True, help="Report pages handed out inactive.")
@click.option("--races", is_flag=True, help="Report invalidations of pages a task still holds (every syscall exit).")
@click.option("--verify-every", type=Integer(1), default=256, show_default=True, help="Unwind every N-th reused stack.")
@click.option("--hold-window-ms", type=Number(0), default=10.0, show_default=True, help="How long a kthread holds.")
@click.option("--top", type=Integer(0), default=10, show_default=True, help="Callers shown.")
@click.option("--folded", type=click.Path(dir_okay=False), help="Write caller stacks folded, for flame graphs.")
@click.option("--report", "report_file", type=click.Path(dir_okay=False), help="Summarise a trace saved by -o.")
@click.option(
    "--inject-inactive",
    type=PfnRange(),
    hidden=True,
    metavar="START-END",
    help="Self-test: mark pfns inactive at start.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def trace(
    obj: Context,
    duration: float | None,
    output: str | None,
    events: bool,
    callers: bool,
    split: bool,
    exact_stacks: bool,
    active: bool,
    races: bool,
    verify_every: int,
    hold_window_ms: float,
    top: int,
    folded: str | None,
    report_file: str | None,
    inject_inactive: tuple[int, int, bool] | None,
    command: tuple[str, ...],
) -> None:
    """Watch memory hotplug live (bcc; root): lifecycle, pfn_to_online_page() callers, a live pfn_active.

    Runs until Ctrl-C, SIGTERM, --duration, or the end of COMMAND (started once the probes are attached).
    Exit 0, 1 when pages were handed out inactive or races seen, 2 when it could not run.
    """
    from .. import trace as trace_mod
    from ..trace import events as trace_events

    def body() -> int:
        if report_file:
            header, recorded, summary = trace_mod.read_trace(Path(report_file))
            if summary is None:
                raise UsageError(f"{report_file}: the trace has no summary (cut short): its events follow")
            if obj.as_json:
                click.echo(json.dumps({"header": header, "summary": summary}, indent=1))
            else:
                for event in recorded:
                    click.echo(trace_events.format_event(event))
                click.echo(trace_events.summary_text(summary, top))
            return 1 if summary.get("handouts_inactive") or summary.get("races") else 0
        if obj.kind != "live":
            raise UsageError("trace watches the running kernel: drop --vmcore/--qemu/--snapshot")
        options = trace_mod.TraceOptions(
            events=events,
            callers=callers,
            split=split,
            exact_stacks=exact_stacks,
            active=active,
            races=races,
            verify_every=verify_every,
            hold_window_ms=hold_window_ms,
        )
        injected = inject_inactive[:2] if inject_inactive else None
        snap = obj.snapshot(device_memmap_only=True)  # the seed needs page content of device ranges only

        def on_event(event: dict[str, Any]) -> None:
            if obj.as_json:
                return
            if event["phase"] in ("handout-inactive", "race", "race-window", "state-overflow") or events:
                click.echo(trace_events.format_event(event))
                sys.stdout.flush()

        def on_ready() -> None:
            click.echo("kmeminspect: tracing; Ctrl-C to stop", err=True)

        out = open(output, "w") if output else None  # noqa: SIM115 - closed below
        try:
            summary = trace_mod.run(
                obj.prog, snap, options, on_event, out, duration, list(command) or None, injected, on_ready
            )
        finally:
            if out:
                out.close()
        if folded and "callers" in summary:
            rows = [trace_events.CallerRow.from_json(r) for r in summary["callers"]]
            Path(folded).write_text("\n".join(trace_events.folded(rows, "pfn_to_online_page")) + "\n")
        obj.emit(summary, lambda: trace_events.summary_text(summary, top))
        return 1 if summary["handouts_inactive"] or summary["races"] else 0

    run(body)
