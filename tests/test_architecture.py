"""The layers hold (docs/architecture.md): the import rules between kmeminspect's modules, read from their
source (ast, nothing imported), and every file small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kmeminspect"
#: no file under kmeminspect/ is longer than this (issue 15: "about 500 lines")
MAX_LINES = 500
#: the modules that may import drgn: the readers, the target opener and the drgn plugin
DRGN_ALLOWED = ("kernel/", "target.py", "drgn_commands.py")
#: the only modules that may import click: the command line
CLICK_ALLOWED = ("cli/",)


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def imported(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` of ``path`` names, made absolute, anywhere in the
    file (at the top, inside functions, under TYPE_CHECKING): ``from . import x`` names ``pkg.x`` too."""
    parts = ["kmeminspect", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1]  # a module's package; for __init__, the package itself
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def imports_module(path: Path, module: str) -> bool:
    return any(name == module or name.startswith(module + ".") for name in imported(path))


def allowed(path: Path, prefixes: tuple[str, ...]) -> bool:
    return relative(path).startswith(prefixes)


def test_the_rules_see_imports() -> None:
    """The checks below would pass vacuously if ``imported`` saw nothing."""
    assert imports_module(PACKAGE / "kernel/__init__.py", "drgn")
    assert imports_module(PACKAGE / "cli/group.py", "click")
    assert imports_module(PACKAGE / "drgn_commands.py", "kmeminspect.views")


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_only_the_cli_imports_click(path: Path) -> None:
    if not allowed(path, CLICK_ALLOWED):
        assert not imports_module(path, "click"), f"{relative(path)} imports click: only kmeminspect/cli/ may"


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_only_the_readers_target_and_plugin_import_drgn(path: Path) -> None:
    if not allowed(path, DRGN_ALLOWED):
        assert not imports_module(path, "drgn"), f"{relative(path)} imports drgn: go through kernel/ or target.py"


@pytest.mark.parametrize("name", ["__init__.py", "drgn_commands.py"])
def test_library_and_plugin_do_not_import_the_cli(name: str) -> None:
    assert not imports_module(PACKAGE / name, "kmeminspect.cli")


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_no_module_outside_the_cli_imports_it(path: Path) -> None:
    if not allowed(path, CLICK_ALLOWED) and relative(path) != "__main__.py":
        assert not imports_module(path, "kmeminspect.cli"), f"{relative(path)} imports the CLI"


@pytest.mark.parametrize("path", modules(), ids=relative)
def test_files_are_readable_in_one_sitting(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{relative(path)}: {lines} lines (at most {MAX_LINES}): split it"


def test_the_architecture_page_names_every_module() -> None:
    """docs/architecture.md is the map of the tree: a module it does not name is a module it forgot. A module
    of a package counts as named when the page names the package (``stress/``) and the file (``live.py``)."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for path in modules():
        name = relative(path)
        package, _, base = name.rpartition("/")
        named = f"`{name}`" in page or bool(package) and f"`{package}/`" in page and f"`{base}`" in page
        assert named, f"docs/architecture.md does not name {name}"
