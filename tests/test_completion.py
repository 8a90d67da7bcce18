"""``kmeminspect completion SHELL``: the script click generates, and completions it really offers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_errors import assert_one_line_error, kmem

CHECKOUT = Path(__file__).resolve().parent.parent
SHELLS = ("bash", "zsh", "fish")
IN_CI = os.environ.get("CI") == "true"


def shell_program(name: str) -> str:
    """The shell's path; a missing shell fails under CI (.ci/setup installs zsh and fish), else skips."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (apt-get install {name}): its completion cannot run for real"
        if IN_CI:
            pytest.fail(f"missing test prerequisite in CI: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture
def entry_point(tmp_path: Path) -> Path:
    """A ``kmeminspect`` command like the one pip installs (its name gives click the program name and
    so the variable ``_KMEMINSPECT_COMPLETE``), running this checkout's code."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "kmeminspect"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom kmeminspect.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


def complete(entry_point: Path, shell: str, words: str, cword: str) -> list[str]:
    """What the program answers a shell asking for completions (click's ``{shell}_complete`` protocol)."""
    env = dict(
        os.environ,
        PYTHONPATH=str(CHECKOUT),
        _KMEMINSPECT_COMPLETE=f"{shell}_complete",
        COMP_WORDS=words,
        COMP_CWORD=cword,
    )
    result = subprocess.run([str(entry_point)], capture_output=True, text=True, timeout=60, env=env, cwd="/")
    assert result.returncode == 0, result
    assert result.stderr == ""
    return result.stdout.splitlines()


@pytest.mark.parametrize("shell", SHELLS)
def test_script(shell: str) -> None:
    result = kmem("completion", shell)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    script = result.stdout
    assert "_KMEMINSPECT_COMPLETE" in script
    assert f"{shell}_complete" in script  # the protocol the script asks for is this shell's
    assert "_kmeminspect_completion" in script
    assert "kmeminspect" in script.replace("_kmeminspect_completion", "")  # registered for the command itself


def test_bash_script_parses() -> None:
    bash = shell_program("bash")
    result = subprocess.run([bash, "-n"], input=kmem("completion", "bash").stdout, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_bash_completes_for_real(entry_point: Path) -> None:
    """Source the generated script in bash and call the completion function as readline would."""
    bash = shell_program("bash")
    script = kmem("completion", "bash").stdout
    program = f"""{script}
COMP_WORDS=(kmeminspect au); COMP_CWORD=1; COMPREPLY=()
_kmeminspect_completion kmeminspect
printf 'reply %s\\n' "${{COMPREPLY[@]}}"
COMP_WORDS=(kmeminspect --json completion ""); COMP_CWORD=3; COMPREPLY=()
_kmeminspect_completion kmeminspect
printf 'reply %s\\n' "${{COMPREPLY[@]}}"
complete -p kmeminspect
"""
    env = dict(os.environ, PYTHONPATH=str(CHECKOUT), PATH=f"{entry_point.parent}:{os.environ['PATH']}")
    result = subprocess.run([bash, "--norc", "-c", program], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    replies = [line.removeprefix("reply ") for line in lines if line.startswith("reply ")]
    assert replies == ["audit", "bash", "zsh", "fish"], result.stdout
    assert lines[-1].endswith("-F _kmeminspect_completion kmeminspect"), lines[-1]


def test_zsh_completes_for_real(entry_point: Path, tmp_path: Path) -> None:
    """Install the script as getting-started.md says (a file sourced after compinit) and run the function
    it registered, twice, with zsh's completion builtins replaced by stubs that print what they are given
    (completion widgets need an interactive zsh)."""
    zsh = shell_program("zsh")
    script = tmp_path / "kmeminspect.zsh"
    script.write_text(kmem("completion", "zsh").stdout)
    program = f"""
autoload -Uz compinit; compinit -u -d {tmp_path}/zcompdump
. {script}
print -r -- "registered $_comps[kmeminspect]"
_describe() {{ local x; for x in "${{(@P)3}}"; do print -r -- "described $x"; done }}
compadd() {{ local name=$@[-1] x; for x in "${{(@P)name}}"; do print -r -- "added $x"; done }}
words=(kmeminspect au); CURRENT=2; $_comps[kmeminspect]
words=(kmeminspect completion ""); CURRENT=3; $_comps[kmeminspect]
"""
    env = dict(os.environ, PYTHONPATH=str(CHECKOUT), PATH=f"{entry_point.parent}:{os.environ['PATH']}")
    result = subprocess.run([zsh, "-f", "-c", program], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "registered _kmeminspect_completion",
        "described audit:Findings; exit 0 clean, 1 when any error...",
        "added bash",
        "added zsh",
        "added fish",
    ], result.stdout + result.stderr


def test_fish_completes_for_real(entry_point: Path, tmp_path: Path) -> None:
    """Install the script where getting-started.md says and let fish complete (``complete -C``).
    click 8.4.0 and 8.4.1's own fish script fails here (pallets/click#3502)."""
    fish = shell_program("fish")
    config = tmp_path / "config"
    (config / "fish" / "completions").mkdir(parents=True)
    (config / "fish" / "completions" / "kmeminspect.fish").write_text(kmem("completion", "fish").stdout)
    program = 'complete -C "kmeminspect au"; complete -C "kmeminspect completion "; complete -C "kmeminspect --vm"'
    env = dict(
        os.environ,
        PYTHONPATH=str(CHECKOUT),
        PATH=f"{entry_point.parent}:{os.environ['PATH']}",
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(config),
        XDG_DATA_HOME=str(tmp_path / "data"),
    )
    result = subprocess.run([fish, "-c", program], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "audit\tFindings; exit 0 clean, 1 when any error...",
        "bash",
        "fish",
        "zsh",
        "--vmcore\tA vmcore: ELF or kdump-compressed (also flattened).",
        "--vmcoreinfo\tVMCOREINFO data for a vmcore without it (dumped during early boot).",
        "--vmlinux\tThe kernel's vmlinux with DWARF (default: what drgn finds, else the kernel's own BTF).",
    ]


def test_bash_protocol(entry_point: Path) -> None:
    assert complete(entry_point, "bash", "kmeminspect au", "1") == ["plain,audit"]
    assert complete(entry_point, "bash", "kmeminspect s", "1") == ["plain,sections", "plain,snapshot", "plain,stress"]
    assert complete(entry_point, "bash", "kmeminspect --vm", "1") == [
        "plain,--vmcore",
        "plain,--vmlinux",
        "plain,--vmcoreinfo",
    ]
    assert complete(entry_point, "bash", "kmeminspect audit --", "2") == [
        "plain,--rules",
        "plain,--errors-only",
        "plain,--fail-on",
        "plain,--json",  # the shared options every command takes (issue 14: before or after the command)
        "plain,--color",
        "plain,--no-color",
        "plain,--debug",
        "plain,--help",
    ]


def test_zsh_protocol(entry_point: Path) -> None:
    """zsh gets type, value and help, one per line."""
    out = complete(entry_point, "zsh", "kmeminspect au", "1")
    assert out[:2] == ["plain", "audit"] and len(out) == 3
    assert out[2].startswith("Findings")  # the command's short help, shown by zsh beside it
    assert complete(entry_point, "zsh", "kmeminspect completion z", "2") == ["plain", "zsh", "_"]


def test_fish_protocol(entry_point: Path) -> None:
    """fish passes the whole command line and the current word, and gets ``type,value<TAB>help`` lines."""
    assert complete(entry_point, "fish", "kmeminspect au", "au") == [
        "plain,audit\tFindings; exit 0 clean, 1 when any error..."
    ]
    assert complete(entry_point, "fish", "kmeminspect completion f", "f") == ["plain,fish"]


def test_unknown_shell() -> None:
    assert_one_line_error(kmem("completion", "tcsh"), "tcsh", "bash, zsh or fish")


def test_no_shell() -> None:
    assert_one_line_error(kmem("completion"), "needs a shell")
