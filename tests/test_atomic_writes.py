"""Files kmeminspect writes appear whole or not at all (issue 14): a writer killed by SIGKILL at any moment
leaves the old file or none, never a half-written one. Each test runs a child that writes in a loop, kills
it at several moments, and reads what is left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from synthetic import build

from kmeminspect import snapshot as snapshot_mod
from kmeminspect.stress.journal import read_journal

REPO = Path(__file__).resolve().parent.parent
KILLS = 6


def kill_while_writing(program: str, tmp_path: Path) -> None:
    """Run ``program`` (it prints a line once it starts writing, then writes forever) and SIGKILL it."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(program), str(tmp_path)], stdout=subprocess.PIPE, env=env, cwd=tmp_path
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline(), "the writer did not start"
        time.sleep(random.Random(len(list(tmp_path.iterdir()))).uniform(0.0, 0.3))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("kill", range(KILLS))
def test_snapshot_killed_mid_write(tmp_path: Path, kill: int) -> None:
    path = tmp_path / "s.json.gz"
    big = build(["boot", "hot-online", "device", "collision", "hot-offline"] * 8, device_subsections=3)
    snapshot_mod.save(big, path)  # the old file
    kill_while_writing(
        """
        import sys
        from pathlib import Path
        from synthetic import build
        from kmeminspect import snapshot
        big = build(["boot", "hot-online", "device", "collision", "hot-offline"] * 8, device_subsections=3)
        print("writing", flush=True)
        while True:
            snapshot.save(big, Path(sys.argv[1]) / "s.json.gz")
        """,
        tmp_path,
    )
    assert snapshot_mod.load(path).sections == big.sections  # whole: the old one or a new one


@pytest.mark.parametrize("kill", range(KILLS))
def test_first_snapshot_killed_mid_write(tmp_path: Path, kill: int) -> None:
    """With no old file: none, or a whole one."""
    kill_while_writing(
        """
        import sys
        from pathlib import Path
        from synthetic import build
        from kmeminspect import snapshot
        big = build(["boot", "hot-online", "device", "collision"] * 16, device_subsections=3)
        print("writing", flush=True)
        snapshot.save(big, Path(sys.argv[1]) / "s.json.gz")
        import time; time.sleep(60)
        """,
        tmp_path,
    )
    path = tmp_path / "s.json.gz"
    if path.exists():
        assert snapshot_mod.load(path).sections


@pytest.mark.parametrize("kill", range(KILLS))
def test_map_html_killed_mid_write(tmp_path: Path, kill: int) -> None:
    page = tmp_path / "map.html"
    page.write_text("<html>old</html>\n")
    kill_while_writing(
        """
        import sys
        from synthetic import build
        from kmeminspect import views
        snap = build(["boot", "hot-online", "device", "collision"] * 64, device_subsections=3)
        print("writing", flush=True)
        while True:
            views.map_view(snap, sys.argv[1] + "/map.html", False)
        """,
        tmp_path,
    )
    text = page.read_text()
    assert text == "<html>old</html>\n" or text.rstrip().endswith("</html>"), text[-200:]


@pytest.mark.parametrize("kill", range(KILLS))
def test_journal_killed_mid_create(tmp_path: Path, kill: int) -> None:
    """Every journal under its name holds its whole header (the temporary file is linked once written)."""
    kill_while_writing(
        """
        import sys
        from pathlib import Path
        from kmeminspect.stress.journal import Journal
        blocks = {str(b): {"state": "online", "zone": "Movable"} for b in range(4096)}
        header = {"mode": "live", "pid": 1, "boot_id": "x", "sysfs": "/nonexistent", "blocks": blocks}
        print("writing", flush=True)
        for i in range(100000):
            Journal.create(Path(sys.argv[1]) / f"j{i}", header).close()
        """,
        tmp_path,
    )
    journals = sorted(tmp_path.glob("j*"))
    for journal in journals:
        header, _ = read_journal(journal)
        assert len(header["blocks"]) == 4096
