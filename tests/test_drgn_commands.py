"""kmeminspect inside drgn: the ``%kmeminspect`` command and the ``kmeminspect`` helpers, in drgn sessions on
real dumps of every kernel generation.

What they print is checked against the ``kmeminspect`` command line on the same dump, against drgn's own
section helpers, and against the kernel's ``pfn_to_online_page()`` recorded in the guest at the moment of
the dump. One test per generation drives drgn's own interactive CLI, which finds the plugin through the
``drgn.plugins`` entry point that pyproject.toml declares.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pty
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import drgn
import numpy as np
import pytest
from conftest import GENERATIONS, get_kernel
from drgn.commands import CommandArgumentError, CommandError, run_command
from drgn.helpers.linux.mmzone import decode_section_flags, for_each_present_section
from vmfixtures import truth

import kmeminspect.drgn_commands  # noqa: F401 - registers %kmeminspect, as drgn's plugin loading does
from kmeminspect import audit_snapshot, explain_pfns, read_snapshot
from kmeminspect.target import open_vmcore

REPO = Path(__file__).resolve().parent.parent
#: pmem sharing a section with RAM, and a DIMM half online, half offline: every section state but V
SCENARIO = "mixed"


class Session:
    """A drgn Program on a capture's dump, with ``%kmeminspect`` registered, and the CLI on the same dump."""

    def __init__(self, capture: truth.Capture, vmlinux: Path) -> None:
        self.capture = capture
        self.vmlinux = vmlinux

    @functools.cached_property
    def prog(self) -> drgn.Program:
        return open_vmcore(self.capture.kdump, self.vmlinux)

    def command(self, line: str) -> str:
        """What ``%line`` prints in the drgn session."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            run_command(self.prog, line)
        return out.getvalue()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "kmeminspect", "--vmcore", str(self.capture.kdump), "--vmlinux", str(self.vmlinux)]
            + list(args),
            capture_output=True,
            text=True,
            timeout=300,
            cwd="/",
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert result.returncode in (0, 1), result.stderr  # audit: 1 when it found an error
        return result.stdout


_sessions: dict[str, Session] = {}


@pytest.fixture(params=GENERATIONS)
def session(request: pytest.FixtureRequest, captured: Callable[[str, str], truth.Capture]) -> Session:
    generation = request.param
    if generation not in _sessions:
        _sessions[generation] = Session(captured(generation, SCENARIO), get_kernel(generation).vmlinux)
    return _sessions[generation]


@pytest.mark.vm
def test_sections_match_the_cli_and_drgns_helpers(session: Session) -> None:
    shown = json.loads(session.command("kmeminspect sections --json"))
    assert shown == json.loads(session.cli("--json", "sections"))
    assert session.command("kmeminspect sections") == session.cli("sections")
    drgn_view = [
        (nr, decode_section_flags(section).split("|")) for nr, section in for_each_present_section(session.prog)
    ]
    assert [(row["nr"], row["flags"]) for row in shown["sections"]] == drgn_view
    # the scenario's point: a section shared by pmem and RAM, partly online
    assert any("SECTION_TAINT_ZONE_DEVICE" in row["flags"] for row in shown["sections"])


@pytest.mark.vm
def test_pfn_explanations_agree_with_the_kernel(session: Session) -> None:
    """pfn_to_online_page() as explained in drgn, over every pfn the guest walked, against what the guest's
    kernel returned: from the command (a range, and single pfns at each edge) and from explain_pfns()."""
    oracle = session.capture.online()
    assert oracle is not None
    end = oracle.size
    shown = json.loads(session.command(f"kmeminspect pfn 0-{end:#x} --json"))
    assert shown == json.loads(session.cli("--json", "pfn", f"0-{end:#x}"))
    explained = np.zeros(end, dtype=bool)
    for run in shown["runs"]:
        explained[run["pfn_start"] : run["pfn_end"]] = run["pfn_to_online_page"]
    assert np.array_equal(explained, oracle)
    assert explain_pfns(read_snapshot(session.prog), 0, end) == shown["runs"]
    edges = {pfn for pair in session.capture.truth["online_pfn_ranges"] for edge in pair for pfn in (edge - 1, edge)}
    for pfn in sorted(p for p in edges if 0 <= p < end):
        (single,) = json.loads(session.command(f"kmeminspect pfn {pfn:#x} --json"))["pfns"]
        assert (single["pfn"], single["pfn_to_online_page"]) == (pfn, bool(oracle[pfn]))


@pytest.mark.vm
def test_audit_matches_the_cli(session: Session) -> None:
    shown = json.loads(session.command("kmeminspect audit --json"))
    assert shown == json.loads(session.cli("--json", "audit"))
    assert [f.to_json() for f in audit_snapshot(read_snapshot(session.prog))] == shown["findings"]
    errors = json.loads(session.command("kmeminspect audit --errors-only --json"))["findings"]
    assert errors == [f for f in shown["findings"] if f["severity"] == "error"]


@pytest.mark.vm
def test_blocks_match_the_cli(session: Session) -> None:
    shown = json.loads(session.command("kmeminspect blocks --json"))
    assert shown == json.loads(session.cli("--json", "blocks"))
    assert {b["state"] for b in shown["blocks"]} >= {"online", "offline"}


@pytest.mark.vm
def test_map_matches_the_cli(session: Session, tmp_path: Path) -> None:
    """The subsection view in drgn: the CLI's map, as JSON, as text and as the same HTML page."""
    shown = json.loads(session.command(f"kmeminspect map --json --html {tmp_path / 'drgn.html'}"))
    assert shown == json.loads(session.cli("--json", "map", "--html", str(tmp_path / "cli.html")))
    assert (tmp_path / "drgn.html").read_text() == (tmp_path / "cli.html").read_text()
    assert session.command("kmeminspect map") == session.cli("map")
    assert "\x1b[" in session.command("kmeminspect map --color")
    assert any(row["collision"] for row in shown["rows"])  # the scenario's shared section


@pytest.mark.vm
@pytest.mark.parametrize(
    ("line", "error", "words"),
    [
        ("kmeminspect pfn zz", CommandArgumentError, "'zz' is not a pfn"),
        ("kmeminspect pfn 0x10-0x8", CommandArgumentError, "empty range"),
        # issue 14: beyond the highest present section is answered; beyond MAX_PHYSMEM_BITS is bad input
        ("kmeminspect pfn 0x7fffffffffff", CommandArgumentError, "beyond what the architecture can address"),
        ("kmeminspect nosuch", CommandArgumentError, "no subcommand 'nosuch'"),
    ],
)
def test_bad_arguments_are_command_errors(session: Session, line: str, error: type[CommandError], words: str) -> None:
    with pytest.raises(error) as raised:
        session.command(line)
    assert words in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.vm
def test_without_debug_info_the_kernel_btf_serves(session: Session, capsys: pytest.CaptureFixture[str]) -> None:
    """drgn opened the dump without the kernel's debug info (``--no-default-symbols``, or another build's
    vmlinux): the command reads with the kernel's own BTF and kallsyms (docs/btf.md), the same rows as with
    the debug info; a session whose finder names are taken gets one line saying what to do."""
    prog = drgn.Program()
    prog.set_core_dump(str(session.capture.elf))
    run_command(prog, "kmeminspect sections --json")
    with_btf = json.loads(capsys.readouterr().out)
    run_command(session.prog, "kmeminspect sections --json")
    assert with_btf == json.loads(capsys.readouterr().out)
    taken = drgn.Program()
    taken.set_core_dump(str(session.capture.elf))
    taken.register_type_finder("btf", lambda *args: None)
    with pytest.raises(CommandError, match=r"^kmeminspect sections: no debug info for the kernel, and its"):
        run_command(taken, "kmeminspect sections")


def _entry_point_on_path(directory: Path) -> None:
    """An installation's metadata for kmeminspect with pyproject.toml's drgn.plugins entry points, so the
    test needs no ``pip install`` of this checkout."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    plugins = project["entry-points"]["drgn.plugins"]
    info = directory / f"kmeminspect-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kmeminspect\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text(
        "[drgn.plugins]\n" + "".join(f"{name} = {value}\n" for name, value in plugins.items())
    )


def _drgn_interactive(session: Session, lines: list[str], path: Path) -> subprocess.CompletedProcess[str]:
    """Type ``lines`` into drgn's interactive prompt (stdin a terminal) on the capture's ELF dump."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "drgn",
                "--main-symbols",
                "-s",
                str(session.vmlinux),
                "-c",
                str(session.capture.elf),
            ],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
            env=dict(os.environ, PYTHONPATH=f"{path}:{REPO}"),
        )
        os.close(terminal)
        os.write(controller, "".join(f"{line}\n" for line in lines).encode() + b"\x04")  # ^D ends the session
        out, err = process.communicate(timeout=300)
    finally:
        os.close(controller)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.vm
def test_drgn_cli_finds_the_plugin(session: Session, tmp_path: Path) -> None:
    _entry_point_on_path(tmp_path)
    result = _drgn_interactive(
        session,
        ["%kmeminspect", "%kmeminspect sections", "%kmeminspect pfn 0x40000 --json", "%kmeminspect pfn zz"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "failed to load" not in result.stderr
    printed = result.stdout.split(">>> ")
    assert printed[1].startswith("usage: kmeminspect SUBCOMMAND")
    assert printed[2] == session.cli("sections")
    (single,) = json.loads(printed[3])["pfns"]
    assert single == json.loads(session.cli("--json", "pfn", "0x40000"))["pfns"][0]
    errors = [line for line in result.stderr.splitlines() if line.startswith("drgn: ")]
    assert errors == ["drgn: kmeminspect pfn: 'zz' is not a pfn (decimal, or hex with 0x)"]


def test_plugin_and_package_import_cheaply() -> None:
    """drgn imports every plugin whenever it opens a program: the plugin module, like ``import kmeminspect``,
    must not load the readers, the model, numpy or tabulate."""
    heavy = ["numpy", "tabulate", "click", "kmeminspect.kernel", "kmeminspect.model", "kmeminspect.cli"]
    code = f"import kmeminspect, kmeminspect.drgn_commands, sys; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd="/",
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pyproject_declares_the_plugin() -> None:
    project: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["drgn.plugins"] == {"kmeminspect": "kmeminspect.drgn_commands"}
