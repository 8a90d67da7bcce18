"""``pip install .`` gives a working ``kmeminspect``: the command, its BPF sources, the drgn plugin.

Installed (not editable) into a fresh virtual environment that sees this machine's site packages for the
dependencies (drgn, numpy, click, tabulate); pip fetches only the build backend, as for any user.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pip_install_gives_the_command_bpf_sources_and_plugin(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "site", "*.egg-info", "__pycache__", "build"))
    env_dir = tmp_path / "venv"
    # no pip of its own: this machine's pip installs into it (building as a user's `pip install .` does)
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", source],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    shutil.rmtree(source)  # nothing may come from the checkout any more
    command = env_dir / "bin" / "kmeminspect"
    version = subprocess.run([command, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and "version" in version.stdout, version
    probe = (
        "import importlib.metadata as m, kmeminspect, kmeminspect.trace.plan as p;"
        "print(kmeminspect.__file__); print(p.bpf_dir());"
        "print([e.value for e in m.entry_points(group='drgn.plugins') if e.name == 'kmeminspect'])"
    )
    # isolated (-I): no PYTHONPATH, user site or working directory of whoever runs the tests may
    # shadow what pip installed into the environment
    out = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    package, bpf, plugins = out.splitlines()
    assert Path(package).is_relative_to(env_dir), package
    assert Path(bpf) == env_dir / "share" / "kmeminspect" / "bpf"
    assert sorted(p.name for p in Path(bpf).iterdir()) == sorted(p.name for p in (REPO / "bpf").iterdir())
    assert plugins == "['kmeminspect.drgn_commands']"
    assert sys.version_info >= (3, 11)
