"""kmeminspect's views as a drgn command, for the program a drgn session has open.

drgn imports this module as a plugin (entry point ``kmeminspect`` in the group ``drgn.plugins``) when it
opens a program; importing it registers one command, ``kmeminspect``, whose subcommands are the read-only
views of the ``kmeminspect`` CLI, with the same output::

    %kmeminspect sections [--json]
    %kmeminspect blocks [--json]
    %kmeminspect pfn PFN|START-END [--json]
    %kmeminspect audit [--errors-only] [--json]
    %kmeminspect map [--html FILE] [--color] [--json]

Every drgn session loads its plugins, so this module imports drgn.commands only: the readers, the model,
numpy and tabulate load at the first ``%kmeminspect``. See docs/drgn.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from drgn import Program, ProgramFlags
from drgn.commands import (
    CommandArgumentError,
    CommandError,
    CommandNamespace,
    CommandNotFoundError,
    argument,
    command,
    raw_command,
)

if TYPE_CHECKING:
    from .state import Snapshot
    from .views import View

#: the subcommands of ``%kmeminspect``, found only through it (they stay out of drgn's own namespace)
SUBCOMMANDS = CommandNamespace(func_name_prefix="_subcommand_")

JSON = argument("--json", action="store_true", help="print one JSON object, as kmeminspect --json does")


def _show(subcommand: str, as_json: bool, make_view: Callable[[], View]) -> None:
    """Print a view (its JSON object with ``as_json``, else its table). kmeminspect's errors become drgn's:
    one line, no traceback, and a bad argument is an argument error."""
    from .errors import KmemError, UsageError

    try:
        data, table = make_view()
    except UsageError as error:
        raise CommandArgumentError(f"kmeminspect {subcommand}: {error}") from None
    except KmemError as error:
        raise CommandError(f"kmeminspect {subcommand}: {error}") from None
    print(json.dumps(data, indent=1) if as_json else table())


def _read(prog: Program, pfn_range: tuple[int, int] | None = None) -> Snapshot:
    """Read the program's bookkeeping now (a live kernel changes between commands, so nothing is kept).

    A session without the kernel's debug info gets the kernel's own BTF and kallsyms added to its finders,
    once (docs/btf.md): what it could already find stays as it was."""
    from .kernel import read_snapshot
    from .target import attach_kernel_btf, types_mode

    try:
        missing = prog.main_module().wants_debug_file()
    except LookupError:  # drgn made no module for the kernel (--no-default-symbols): no debug info either
        missing = True
    if missing and types_mode(prog) != "btf":
        attach_kernel_btf(prog)
    return read_snapshot(prog, pfn_range=pfn_range)


@command(description="one row per present section, like crash's kmem -n", arguments=(JSON,), namespace=SUBCOMMANDS)
def _subcommand_sections(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    from .views import sections_view

    _show(name, args.json, lambda: sections_view(_read(prog)))


@command(
    description="memory blocks: range, state, zone, node, memmap_on_memory pages",
    arguments=(JSON,),
    namespace=SUBCOMMANDS,
)
def _subcommand_blocks(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    from .views import blocks_view

    _show(name, args.json, lambda: blocks_view(_read(prog)))


@command(
    description="explain a pfn, or START-END (END exclusive) as runs of identical state",
    arguments=(argument("pfns", metavar="PFN|START-END", help="decimal, or hex with 0x"), JSON),
    namespace=SUBCOMMANDS,
)
def _subcommand_pfn(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    from .views import parse_pfns, pfn_view

    def explain() -> View:
        start, end, is_range = parse_pfns(args.pfns)
        return pfn_view(_read(prog, (start, end)), start, end, is_range, prog)

    _show(name, args.json, explain)


@command(
    description="findings of the audit rules (kmeminspect audit --rules lists them)",
    arguments=(argument("--errors-only", action="store_true", help="show error findings only"), JSON),
    namespace=SUBCOMMANDS,
)
def _subcommand_audit(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    from . import audit
    from .views import audit_view

    def findings() -> View:
        snap = _read(prog)
        return audit_view(snap, audit.audit(snap), args.errors_only)

    _show(name, args.json, findings)


@command(
    description="sections x subsections, one cell each, coloured by state (docs/map.md)",
    arguments=(
        argument("--html", metavar="FILE", help="also write the map as a standalone HTML page"),
        argument("--color", action="store_true", help="colour the cells (default: when stdout is a terminal)"),
        JSON,
    ),
    namespace=SUBCOMMANDS,
)
def _subcommand_map(prog: Program, name: str, args: argparse.Namespace, **kwargs: Any) -> None:
    from .memorymap import colour_by_default
    from .views import map_view

    colour = args.color or colour_by_default()
    _show(name, args.json, lambda: map_view(_read(prog), args.html, colour))


def usage(prog: Program) -> str:
    """The subcommands, one line each: their usage and what they show."""
    lines = ["usage: kmeminspect SUBCOMMAND [ARGUMENT...]"]
    for _, subcommand in SUBCOMMANDS.enabled(prog):
        lines.append(f"  kmeminspect {subcommand.format_usage():32} {subcommand.description()}")
    return "\n".join(lines)


def _is_linux_kernel(prog: Program) -> bool:
    """The command's condition (drgn.commands.linux.linux_kernel_raw_command's, which is untyped)."""
    return bool(prog.flags & ProgramFlags.IS_LINUX_KERNEL)


@raw_command(
    description="memory-hotplug bookkeeping: sections, blocks, pfn explanations, audit",
    usage="**kmeminspect** *subcommand* [*argument*...]",
    long_description="""
    kmeminspect's views of the kernel drgn has open: ``sections``, ``blocks``,
    ``pfn PFN|START-END``, ``audit`` and ``map``, each with ``--json``, printing what the
    kmeminspect command line prints. Without a subcommand, or with ``help``,
    list the subcommands.
    """,
    enabled=_is_linux_kernel,
)
def _cmd_kmeminspect(prog: Program, name: str, args: str, *, globals: dict[str, Any], **kwargs: Any) -> Any:
    words = args.split()
    if not words or words[0] in ("help", "-h", "--help"):
        print(usage(prog))
        return None
    try:
        return SUBCOMMANDS.run(prog, args, globals=globals)
    except CommandNotFoundError as error:
        choices = ", ".join(name for name, _ in SUBCOMMANDS.enabled(prog))
        raise CommandArgumentError(f"kmeminspect: no subcommand {error.name!r} (one of {choices})") from None
    except CommandArgumentError as error:
        message = str(error)
        if message.startswith("kmeminspect "):
            raise
        # argparse names the subcommand alone ("pfn: error: ..."): name the command the user typed
        raise CommandArgumentError(f"kmeminspect {message}") from None
