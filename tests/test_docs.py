"""The documentation site builds without a warning (links and anchors included), and its CLI reference,
generated from the click commands, documents every command: a new command without docs fails here.

Under ``CI=true`` a missing MkDocs fails the test instead of skipping it (``.ci/setup`` installs the
``docs`` extra)."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from kmeminspect import cli

CHECKOUT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"


def commands(group: click.Group, prefix: str = "") -> Iterator[str]:
    """Every visible command path under group ("audit", "trace", ...; "a b" for a nested group's b)."""
    context = click.Context(group, info_name="kmeminspect")
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        if command.hidden:
            continue
        yield prefix + name
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("mkdocs", "mkdocs_click"):
        if importlib.util.find_spec(module) is None:
            reason = f"{module} is not installed: python3 -m pip install -e '.[docs]'"
            if IN_CI:
                pytest.fail(f"missing docs prerequisite in CI: {reason}")
            pytest.skip(reason)
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=CHECKOUT,
        env=dict(os.environ, PYTHONPATH=str(CHECKOUT)),  # mkdocs-click documents this checkout's commands
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert [line for line in output.splitlines() if "WARNING" in line] == []
    return out


def page_text(path: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", path.read_text()))


def test_builds_every_page(site: Path) -> None:
    for source in (CHECKOUT / "docs").glob("*.md"):
        assert (site / f"{source.stem}.html").is_file(), source.name


def test_cli_reference_documents_every_command(site: Path) -> None:
    names = list(commands(cli.main))
    assert {"audit", "sections", "stress", "trace", "completion"} <= set(names)
    page = (site / "cli.html").read_text()
    text = page_text(site / "cli.html")
    for name in names:
        anchor = "kmeminspect-" + name.replace(" ", "-")
        assert f'id="{anchor}"' in page, f"kmeminspect {name} has no section in the CLI reference"
        assert f"kmeminspect {name} [OPTIONS]" in text, f"kmeminspect {name}: no usage line in the CLI reference"
        command = cli.main.get_command(click.Context(cli.main), name.split()[0])
        for part in name.split()[1:]:
            assert isinstance(command, click.Group)
            command = command.get_command(click.Context(command), part)
        assert command is not None
        summary = command.get_short_help_str(limit=10_000)
        assert summary, f"kmeminspect {name} has no help text: give the command a docstring"
        assert " ".join(summary.split()) in " ".join(text.split()), f"kmeminspect {name}: its help is not shown"


def test_cli_reference_shows_options(site: Path) -> None:
    """The options come from the code too: the top-level targets and a subcommand's own options."""
    text = page_text(site / "cli.html")
    for option in ("--vmcore PATH", "--qemu QMP_SOCKET", "--snapshot FILE", "--vmlinux PATH", "--json"):
        assert option in text
    assert "--errors-only" in text and "--restore JOURNAL" in text and "--hold-window-ms" in text
    assert "--sysfs-root" not in text  # hidden options stay hidden


def test_getting_started_installs_completion_for_each_shell(site: Path) -> None:
    text = page_text(site / "getting-started.html")
    for shell in cli.COMPLETION_SHELLS:
        assert f"kmeminspect completion {shell} >" in text, shell
    for heading in ("On the bundled QEMU guest", "On a test machine", "On a crash dump"):
        assert heading in text
