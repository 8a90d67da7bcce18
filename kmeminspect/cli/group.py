"""The ``kmeminspect`` click group: the global options (the target, ``--json``, colour, ``--debug``) and
what every command shares: the :class:`Context` that opens the target, printing, and the error boundary
(:class:`~.boundary.Boundary`) every command runs inside."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from .. import snapshot as snapshot_mod
from ..errors import KmemError, UsageError
from ..state import Snapshot
from .boundary import COLOUR_HELP, DEBUG_HELP, JSON_HELP, Boundary


class Context:
    """The target the global options chose, opened on demand, and how to print (``--json``, colour)."""

    def __init__(
        self,
        kind: str,
        location: str | None,
        vmlinux: str | None,
        vmcoreinfo: str | None,
        as_json: bool,
        btf: str | None = None,
    ) -> None:
        self.kind = kind
        self.location = location
        self.vmlinux = vmlinux
        self.btf = btf
        self.vmcoreinfo = vmcoreinfo
        self.as_json = as_json
        self.prog: Any = None  # the drgn Program once opened (None for --snapshot)
        self.colour = False

    def snapshot(self, pfn_range: tuple[int, int] | None = None, device_memmap_only: bool = False) -> Snapshot:
        """Read the target (or load the ``--snapshot`` file); the Program stays in ``self.prog``."""
        if self.kind == "snapshot":
            assert self.location is not None
            return snapshot_mod.load(Path(self.location))
        from ..kernel import read_snapshot, terminal_progress
        from ..target import open_target

        self.prog, source = open_target(self.kind, self.location, self.vmlinux, self.vmcoreinfo, self.btf)
        snap = read_snapshot(self.prog, source, terminal_progress("reading memmap"), pfn_range, device_memmap_only)
        for note in snap.unreadable:  # the answer follows, from everything else; the audit has it as a finding
            click.echo(f"kmeminspect: warning: {note}", err=True)
        return snap

    def emit(self, data: dict[str, Any], table: Callable[[], str]) -> None:
        """Print a view: its JSON object with ``--json``, else its table."""
        if self.as_json:
            click.echo(json.dumps(data, indent=1))
        else:
            click.echo(table(), color=self.colour)  # click strips colour off a terminal unless told


def fail(message: str) -> NoReturn:
    """One line on stderr, exit 2 (the boundary's way out for a command that has no exception to raise)."""
    click.echo(f"kmeminspect: {message}", err=True)
    sys.exit(2)


def run(function: Callable[[], int | None]) -> None:
    """Run a command's body: its return value is the exit status. Its errors go to the boundary
    (:class:`Boundary`); an interruption is one of them."""
    try:
        code = function()
    except KeyboardInterrupt:
        raise KmemError("interrupted") from None
    sys.exit(code or 0)


@click.group(cls=Boundary, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--live", "kind", flag_value="live", default=True, help="The running kernel (/proc/kcore; root).")
@click.option("--vmcore", "vmcore", metavar="PATH", help="A vmcore: ELF or kdump-compressed (also flattened).")
@click.option("--qemu", "qemu", metavar="QMP_SOCKET", help="A live QEMU guest through its QMP socket.")
@click.option("--snapshot", "snapshot_file", metavar="FILE", help="A snapshot saved by 'kmeminspect snapshot'.")
@click.option(
    "--vmlinux",
    metavar="PATH",
    help="The kernel's vmlinux with DWARF (default: what drgn finds, else the kernel's own BTF).",
)
@click.option("--btf", metavar="FILE", help="The kernel's BTF in a file (raw, or an ELF with .BTF) instead of DWARF.")
@click.option(
    "--vmcoreinfo", metavar="FILE", help="VMCOREINFO data for a vmcore without it (dumped during early boot)."
)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--color/--no-color", "colour", default=None, help=COLOUR_HELP)
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@click.version_option(package_name="kmeminspect")
@click.pass_context
def main(
    ctx: click.Context,
    kind: str,
    vmcore: str | None,
    qemu: str | None,
    snapshot_file: str | None,
    vmlinux: str | None,
    btf: str | None,
    vmcoreinfo: str | None,
    as_json: bool,
    colour: bool | None,
    debug: bool,
) -> None:
    """The truth about a Linux kernel's physical-memory bookkeeping during memory hotplug."""
    # drgn's own warnings (e.g. its hint on flattened kdump files) would break "one line on stderr"
    logging.getLogger("drgn").setLevel(logging.ERROR)
    chosen = [(k, v) for k, v in (("vmcore", vmcore), ("qemu", qemu), ("snapshot", snapshot_file)) if v]
    if len(chosen) > 1:
        raise UsageError("choose one target: --live, --vmcore, --qemu or --snapshot")
    kind, location = chosen[0] if chosen else ("live", None)
    ctx.obj = Context(kind, location, vmlinux, vmcoreinfo, as_json, btf)
    if colour is None:
        from ..memorymap import colour_by_default

        colour = colour_by_default()
    ctx.obj.colour = colour
    if debug and isinstance(ctx.command, Boundary):
        ctx.command.debug = True
