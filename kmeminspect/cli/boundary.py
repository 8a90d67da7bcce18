"""The one error boundary every command runs inside, and the options every command takes.

What can go wrong is one line on stderr, ``kmeminspect: <what is wrong>; <what to do>``:

- anticipated failures (:class:`~kmeminspect.errors.KmemError`, an ``OSError`` on a user's file, kernel
  memory that could not be read (``drgn.FaultError``), a click usage error) exit 2;
- anything else is a bug in kmeminspect: one line saying so and how to report it, exit 3.

Exit status 1 stays the verdict (``audit`` found a finding at or above ``--fail-on``, ``trace`` saw an
inactive hand-out). With ``--debug`` a bug prints its traceback before the line.

``--json``, ``--color/--no-color`` and ``--debug`` are accepted before the command and after it
(``kmeminspect --json audit`` and ``kmeminspect audit --json``): :class:`Boundary` adds them to every
command it registers, and they set the values of the group's context.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from typing import Any

import click

from ..errors import KmemError

JSON_HELP = "Print one JSON object."
COLOUR_HELP = "Colour the map (default: when stdout is a terminal and NO_COLOR is not set)."
DEBUG_HELP = "On an internal error (a bug), print its traceback too."
#: where a bug goes: the project names no tracker, so the traceback is what to report
REPORT = "run again with --debug and report the traceback"
#: the exit status of an anticipated failure, and of a bug
EXIT_ERROR = 2
EXIT_BUG = 3


def one_line(text: str) -> str:
    """Every message is one line: whitespace (newlines included) collapsed."""
    return " ".join(text.split())


def _root_obj(ctx: click.Context) -> Any:
    return ctx.find_root().obj


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and _root_obj(ctx) is not None:
        _root_obj(ctx).as_json = True


def _set_colour(ctx: click.Context, param: click.Parameter, value: bool | None) -> None:
    if value is not None and _root_obj(ctx) is not None:
        _root_obj(ctx).colour = value


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        command = ctx.find_root().command
        if isinstance(command, Boundary):
            command.debug = True


def shared_options() -> list[click.Option]:
    """``--json``, ``--color/--no-color`` and ``--debug`` as a command's own options (not passed to it)."""
    return [
        click.Option(["--json"], is_flag=True, expose_value=False, callback=_set_json, help=JSON_HELP),
        click.Option(["--color/--no-color"], default=None, expose_value=False, callback=_set_colour, help=COLOUR_HELP),
        click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_debug, help=DEBUG_HELP),
    ]


def message(error: BaseException) -> tuple[str, int]:
    """The line (without ``kmeminspect: ``) and exit status for an error reaching the boundary."""
    if isinstance(error, click.UsageError):
        where = error.ctx.command_path if error.ctx is not None else "kmeminspect"
        text = error.format_message().rstrip(".")
        return f"{text[:1].lower()}{text[1:]}; see {where} --help", EXIT_ERROR
    if isinstance(error, click.ClickException):
        return error.format_message(), EXIT_ERROR
    if isinstance(error, click.Abort):
        return "interrupted", EXIT_ERROR
    if isinstance(error, KmemError):
        return str(error), EXIT_ERROR
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {error.strerror or error}; check the path and its permissions", EXIT_ERROR
    drgn = sys.modules.get("drgn")  # a FaultError can only come from drgn once it was imported
    if drgn is not None and isinstance(error, drgn.FaultError):
        return (
            f"kernel memory at {error.address:#x} could not be read ({error.message}): the dump lacks that page "
            "or the running kernel changed it during the read; read again, or take a complete dump",
            EXIT_ERROR,
        )
    if isinstance(error, OSError):
        return f"{error.strerror or error}; check the target and try again", EXIT_ERROR
    return f"internal error ({type(error).__name__}: {error}): this is a bug in kmeminspect; {REPORT}", EXIT_BUG


class Boundary(click.Group):
    """The ``kmeminspect`` group: runs its command inside the error boundary (see the module docstring),
    and gives every command the shared options."""

    debug = False

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        have = {opt for param in cmd.params for opt in param.opts}
        cmd.params.extend(o for o in shared_options() if not have.intersection(o.opts))
        super().add_command(cmd, name)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        arguments = list(sys.argv[1:] if args is None else args)
        before_dashes = arguments[: arguments.index("--")] if "--" in arguments else arguments
        self.debug = "--debug" in before_dashes  # also set by the option, once parsed
        try:
            code = super().main(arguments, prog_name or "kmeminspect", complete_var, False, **extra)
        except SystemExit:
            raise
        except BaseException as error:  # noqa: BLE001 - the boundary: everything ends here, as one line
            if isinstance(error, KeyboardInterrupt):
                error = click.Abort()
            text, status = message(error)
            if self.debug and status == EXIT_BUG:
                traceback.print_exception(error)
            click.echo(f"kmeminspect: {one_line(text)}", err=True)
            sys.exit(status)
        sys.exit(code if isinstance(code, int) else 0)
