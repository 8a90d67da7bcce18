"""The click types of every number on the command line: a bad value is a click usage error, which the
boundary prints as one line (``invalid value for '--transitions': 'many': not an integer; see ...``).

Pfns and physical addresses are decimal, or hex with ``0x``; a range is ``START-END``, END exclusive. Their
upper bound (``MAX_PHYSMEM_BITS``) is the kernel's: the ``pfn`` command checks it once the target is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ..errors import UsageError
from ..views import parse_pfns

if TYPE_CHECKING:  # click 8.4 made ParamType generic; older clicks (>= 8.1 is supported) cannot subscript it
    IntType = click.ParamType[int]
    FloatType = click.ParamType[float]
    RangeType = click.ParamType[tuple[int, int, bool]]
else:
    IntType = FloatType = RangeType = click.ParamType


class Integer(IntType):
    """A decimal integer of at least ``minimum``."""

    name = "integer"

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value), 10)
            except ValueError:
                self.fail(f"'{value}': not an integer", param, ctx)
        if number < self.minimum:
            self.fail(f"{number}: must be at least {self.minimum}", param, ctx)
        return number


class Number(FloatType):
    """A decimal number (seconds, ...) of at least ``minimum``."""

    name = "number"

    def __init__(self, minimum: float = 0.0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}': not a number", param, ctx)
        if not number >= self.minimum or number == float("inf"):  # NaN and inf too
            self.fail(f"{value}: must be at least {self.minimum:g} (and finite)", param, ctx)
        return number


class PfnRange(RangeType):
    """A number or a range ``START-END`` (END exclusive) -> ``(start, end, is_range)``, as
    :func:`kmeminspect.views.parse_pfns` reads it (the drgn command and the library read the same)."""

    name = "pfns"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int, bool]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_pfns(str(value))
        except UsageError as error:
            self.fail(str(error), param, ctx)
