"""``kmeminspect stress``: parse the options, print the plan, run the live or the QEMU driver, print the
report. The runs, their journal and their texts are in the kmeminspect.stress package."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .group import Context, main, run
from .types import Integer, Number


@main.command()
@click.option("--blocks", "block_list", metavar="LIST", help="Blocks to cycle: numbers and ranges, e.g. 32-35,40.")
@click.option("--all-hotpluggable", is_flag=True, help="Every block of unpluggable memory (ACPI DIMMs, dax kmem).")
@click.option("--allow-kernel-zone", is_flag=True, help="Also online into kernel zones (may never offline again).")
@click.option(
    "--transitions", type=Integer(1), metavar="N", help="Stop after N transitions (default 100 without --duration)."
)
@click.option("--duration", type=Number(0.001), metavar="SECONDS", help="Stop after this long.")
@click.option("--walkers", metavar="KINDS", help="Concurrent pfn walkers: kpageflags,compact,idle or all.")
@click.option("--dimm-rounds", type=Integer(0), default=0, metavar="N", help="--qemu: DIMM add/remove rounds.")
@click.option("--dimm-size", metavar="SIZE", default="128M", show_default=True, help="--qemu: size of each DIMM.")
@click.option("--virtio-mem", metavar="ID", help="--qemu: the virtio-mem device to resize.")
@click.option("--resizes", type=Integer(0), default=0, metavar="N", help="--qemu: virtio-mem resizes.")
@click.option(
    "--audit-every",
    type=Integer(0),
    metavar="N",
    default=50,
    show_default=True,
    help="Audit every N transitions; 0: never.",
)
@click.option("--journal", metavar="PATH", help="Journal file (default /var/lib/kmeminspect/..., else /tmp/...).")
@click.option("--restore", "restore_file", metavar="JOURNAL", help="Put back what a killed run changed.")
@click.option(
    "--timeout",
    type=Number(0.001),
    metavar="SECONDS",
    default=60.0,
    show_default=True,
    help="Per-transition time limit.",
)
@click.option("--seed", type=Integer(0), metavar="N", help="Seed of the random choices (default: random, printed).")
@click.option("--trace", "with_trace", is_flag=True, help="Live: run the tracer's pfn_active and races (bcc).")
@click.option("--sysfs-root", default="/sys", hidden=True, help="Tests: a fake sysfs tree.")
@click.option("--procfs-root", default="/proc", hidden=True, help="Tests: a fake procfs tree.")
@click.pass_obj
def stress(
    obj: Context,
    block_list: str | None,
    all_hotpluggable: bool,
    allow_kernel_zone: bool,
    transitions: int | None,
    duration: float | None,
    walkers: str | None,
    dimm_rounds: int,
    dimm_size: str,
    virtio_mem: str | None,
    resizes: int,
    audit_every: int,
    journal: str | None,
    restore_file: str | None,
    timeout: float,
    seed: int | None,
    with_trace: bool,
    sysfs_root: str,
    procfs_root: str,
) -> None:
    """Hotplug churn that puts everything back: live (root), cycle memory blocks offline/online_movable;
    --qemu, add and remove DIMMs and resize virtio-mem. --restore JOURNAL after a kill.

    Exit 0, 1 when the audit confirmed a new error, 2 when it could not run or something was not put back.
    """
    from .. import stress as stress_mod

    as_json = obj.as_json
    live_options = block_list or all_hotpluggable or allow_kernel_zone or transitions or duration or walkers
    qemu_options = dimm_rounds or virtio_mem or resizes

    def say(line: str) -> None:
        click.echo(line, err=True)

    def emit_report(data: dict[str, Any], error: str | None, code: int) -> int:
        click.echo(json.dumps(data, indent=1) if as_json else stress_mod.report_text(data))
        if error:
            say(f"kmeminspect: {error}")
        return code

    def restore(limit: float) -> int:
        if live_options or qemu_options or journal:
            raise UsageError("--restore JOURNAL takes no other stress option: the journal says what to restore")
        assert restore_file is not None
        if obj.kind == "qemu":
            from ..stress.qemu import restore_qemu_journal

            assert obj.location is not None
            data = restore_qemu_journal(Path(restore_file), obj.location, say, limit).to_json()
        else:
            data = stress_mod.restore_journal(Path(restore_file), say, limit, Path(procfs_root)).to_json()
        click.echo(json.dumps(data, indent=1) if as_json else stress_mod.restore_text(data))
        return 0 if data["complete"] else 2

    def journal_path() -> Path:
        """Chosen once the input is known good: the default may create /var/lib/kmeminspect."""
        return Path(journal) if journal else stress_mod.default_journal_path()

    def qemu(limit: float, every: int, run_seed: int) -> int:
        from ..stress.qemu import QemuAudit, QemuLimits, QemuStress, parse_size, plan_text

        if live_options or with_trace:
            raise UsageError(
                "--qemu drives DIMMs and virtio-mem: --blocks, --walkers, --transitions, --trace... are live only"
            )
        limits = QemuLimits(
            dimm_rounds,
            parse_size(dimm_size),
            resizes,
            limit,
        )
        if not limits.dimm_rounds and not limits.resizes:
            raise UsageError("--qemu stress needs --dimm-rounds N and/or --virtio-mem ID --resizes N")
        assert obj.location is not None
        source = QemuAudit(obj.location, obj.vmlinux, obj.btf) if every else None
        runner = QemuStress(obj.location, limits, virtio_mem, Path(), run_seed, every, source, say=say)
        vmem = runner.prepare()
        runner.journal_path = journal_path()
        say(plan_text(runner, vmem, every, run_seed))
        report = runner.run()
        return emit_report(report.to_json(), report.error, report.exit_code())

    def body() -> int:
        limit = timeout
        if restore_file:
            return restore(limit)
        if obj.kind not in ("live", "qemu"):
            raise UsageError("stress works on a running kernel: drop --vmcore/--snapshot")
        every = audit_every
        run_seed = seed if seed is not None else stress_mod.new_seed()
        if obj.kind == "qemu":
            return qemu(limit, every, run_seed)
        if qemu_options:
            raise UsageError("--dimm-rounds, --virtio-mem and --resizes drive a QEMU guest: add --qemu QMP_SOCKET")
        chosen = stress_mod.parse_block_list(block_list) if block_list else None
        kinds = stress_mod.parse_walkers(walkers or "")
        limits = stress_mod.Limits(
            transitions,
            duration,
            limit,
        )
        if limits.transitions is None and limits.duration is None:
            limits = dataclasses.replace(limits, transitions=stress_mod.DEFAULT_TRANSITIONS)
        sysfs = stress_mod.MemoryBlocks(Path(sysfs_root), Path(procfs_root))
        plan = stress_mod.plan_blocks(sysfs, chosen, all_hotpluggable, allow_kernel_zone)
        source = stress_mod.LiveAudit(obj.vmlinux, obj.btf) if every else None
        path = journal_path()
        stops = [
            f"{limits.transitions} transitions" if limits.transitions else "",
            f"{duration:g} s" if duration else "",
        ]
        lines = [
            f"audit: every {every} transitions (baseline first; a new error is confirmed by a second read)"
            if every
            else "audit: off",
            f"stop after {' or '.join(s for s in stops if s)}; seed {run_seed}; per-transition timeout {limit:g} s",
            f"journal: {path} (after a crash: kmeminspect stress --restore {path})",
        ]
        say(stress_mod.plan_text(plan, sysfs, stress_mod.available_walkers(kinds), lines))
        hooks = None
        if with_trace:
            from .. import trace as trace_mod
            from ..kernel import read_snapshot
            from ..target import open_live

            # the audit's Program when there is one: loading the debug info twice costs seconds and ~250 MB
            prog = (
                source.prog
                if source is not None
                else open_live(Path(obj.vmlinux) if obj.vmlinux else None, Path(obj.btf) if obj.btf else None)
            )
            seed_state = read_snapshot(prog, {"kind": "live"}, device_memmap_only=True)
            options = trace_mod.TraceOptions(events=False, callers=False, active=True, races=True)
            hooks = trace_mod.StressTracer(prog, seed_state, options)
        runner = stress_mod.LiveStress(sysfs, plan, limits, path, run_seed, kinds, every, source, hooks=hooks, say=say)
        report = runner.run()
        return emit_report(report.to_json(), report.error, report.exit_code())

    run(body)
