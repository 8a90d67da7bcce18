"""The error boundary (issue 14): one line and exit 2 for what the user can fix, one line and exit 3 for a
bug, the traceback only with --debug; usage errors in one line; --json and --color before or after the
command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from synthetic import build

from kmeminspect import snapshot as snapshot_mod
from kmeminspect import views
from kmeminspect.cli import main

REPO = Path(__file__).resolve().parent.parent


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg] # click < 8.2 mixes them by default
    except TypeError:
        return CliRunner()


def invoke(*args: str) -> Result:
    return runner().invoke(main, list(args), prog_name="kmeminspect")


def one_line(result: Result, status: int, *words: str) -> str:
    assert result.exit_code == status, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kmeminspect: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    path = tmp_path / "s.json.gz"
    snapshot_mod.save(build(["boot", "hot-online"]), path)
    return path


@pytest.fixture
def broken_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(views, "sections_view", boom)


def test_internal_error_is_a_bug_exit_3(snap: Path, broken_sections: None) -> None:
    line = one_line(invoke("--snapshot", str(snap), "sections"), 3, "bug", "ZeroDivisionError", "--debug")
    assert "report" in line


def test_debug_shows_the_traceback_of_a_bug(snap: Path, broken_sections: None) -> None:
    for args in (("--debug", "--snapshot", str(snap), "sections"), ("--snapshot", str(snap), "sections", "--debug")):
        result = invoke(*args)
        assert result.exit_code == 3
        assert "Traceback" in result.stderr and "ZeroDivisionError: a bug" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("kmeminspect: internal error")


def test_debug_adds_nothing_to_an_anticipated_error(tmp_path: Path) -> None:
    one_line(invoke("--debug", "--snapshot", str(tmp_path / "nope"), "sections"), 2, "no such file")


def test_usage_error_is_one_line_with_a_hint(snap: Path) -> None:
    one_line(invoke("--snapshot", str(snap), "sections", "--bogus"), 2, "no such option", "kmeminspect sections --help")
    one_line(invoke("nosuchcommand"), 2, "no such command", "kmeminspect --help")
    one_line(invoke("--snapshot", str(snap), "pfn"), 2, "missing argument", "kmeminspect pfn --help")
    one_line(invoke("stress", "--transitions", "many"), 2, "not an integer", "kmeminspect stress --help")
    one_line(invoke("stress", "--timeout", "nan"), 2, "at least")
    one_line(invoke("audit", "--fail-on", "loud"), 2, "'loud' is not one of")


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_before_or_after_the_command(snap: Path, where: str) -> None:
    args = ["--snapshot", str(snap), "audit"]
    args = ["--json", *args] if where == "before" else [*args, "--json"]
    result = invoke(*args)
    assert result.exit_code in (0, 1), result.stderr
    assert json.loads(result.output)["kernel"] == "synthetic"


def test_color_before_or_after_the_command(snap: Path) -> None:
    plain = invoke("--snapshot", str(snap), "map", "--no-color").output
    coloured = invoke("--snapshot", str(snap), "map", "--color").output
    assert "\x1b[" in coloured and "\x1b[" not in plain
    assert invoke("--color", "--snapshot", str(snap), "map").output == coloured


def test_verdict_stays_exit_1(tmp_path: Path) -> None:
    """Exit 1 is still only the audit's verdict (an error finding)."""
    path = tmp_path / "bad.json.gz"
    snapshot_mod.save(build(["boot", "collision"]), path)
    result = invoke("--snapshot", str(path), "--json", "audit")
    findings = json.loads(result.output)["findings"]
    assert result.exit_code == (1 if any(f["severity"] == "error" for f in findings) else 0)


def test_keyboard_interrupt_is_one_line(snap: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(views, "sections_view", interrupted)
    one_line(invoke("--snapshot", str(snap), "sections"), 2, "interrupted")


def test_click_standalone_mode_off_is_untouched(snap: Path) -> None:
    """A caller embedding the group (standalone_mode=False) gets click's exceptions, as from any group."""
    with pytest.raises(click.UsageError):
        main.main(["--snapshot", str(snap), "sections", "--bogus"], standalone_mode=False)


def test_real_process_exit_status_and_stderr(snap: Path) -> None:
    """The console entry point: exit status and stderr as a shell sees them."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    bad = subprocess.run(
        [sys.executable, "-m", "kmeminspect", "--snapshot", str(snap), "pfn", "--json", "0x10-zz"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "not a pfn" in bad.stderr and "kmeminspect pfn --help" in bad.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "kmeminspect", "--snapshot", str(snap), "sections", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert ok.returncode == 0 and json.loads(ok.stdout)["sections"] and ok.stderr == ""
