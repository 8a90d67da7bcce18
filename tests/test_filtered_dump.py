"""A dump that lacks some pages still gives every answer it can and says what it could not read (issue 14).

``makedumpfile -d 31`` of a 7.x guest excludes pages holding ``struct memory_block``s (makedumpfile 1.7.2
does not know 7.x's page flags); every command used to die in the blocks reader on "Excluded page".
Read without the vmlinux (the dump's own BTF), it answers the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from vmfixtures import download, truth

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.vm
def test_makedumpfile_d31_dump_answers_what_it_can(
    tmp_path: Path,
    captured: Callable[[str, str], truth.Capture],
    kernel_of: Callable[[str], download.Kernel],
) -> None:
    if not shutil.which("makedumpfile"):
        pytest.skip("makedumpfile not installed (apt-get install makedumpfile)")
    from run import fixed_for_makedumpfile  # benchmarks/run.py: program headers where makedumpfile reads them

    capture = captured("7.x", "dimm-online")
    kernel = kernel_of("7.x")
    elf = tmp_path / "vmcore.elf"  # a copy: the capture stays as it is
    subprocess.run(["cp", "--sparse=always", str(capture.elf), str(elf)], check=True)
    os.chmod(elf, 0o600)
    fixed = fixed_for_makedumpfile(elf)
    filtered = tmp_path / "filtered"
    subprocess.run(
        ["makedumpfile", "-d", "31", "-x", str(kernel.vmlinux), str(fixed), str(filtered)],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "kmeminspect", "--vmcore", str(filtered), "--vmlinux", str(kernel.vmlinux)]
    blocks = subprocess.run([*base, "--json", "blocks"], capture_output=True, text=True, timeout=600, env=env)
    assert blocks.returncode == 0, blocks.stderr
    assert "Traceback" not in blocks.stderr
    warnings = blocks.stderr.strip().splitlines()
    read = {b["id"]: b for b in json.loads(blocks.stdout)["blocks"]}
    sysfs = {b["id"]: b for b in capture.truth["blocks"]}
    assert set(read) <= set(sysfs)
    for block_id, block in read.items():
        assert block["state"] == sysfs[block_id]["state"], block_id
    # what it could not read, it says: one warning line per structure (which ones a filter drops depends
    # on where the guest's allocations landed)
    assert all(w.startswith("kmeminspect: warning: ") for w in warnings), warnings
    if set(read) != set(sysfs):
        assert any(w.startswith("kmeminspect: warning: memory blocks:") for w in warnings), warnings
    audit = subprocess.run([*base, "--json", "audit"], capture_output=True, text=True, timeout=600, env=env)
    assert audit.returncode in (0, 1), audit.stderr
    findings = json.loads(audit.stdout)["findings"]
    unreadable = [f for f in findings if f["rule"] == "kernel-data-unreadable"]
    assert len(unreadable) == len(warnings)
    assert all(f["category"] == "dump" for f in unreadable)
    sections = subprocess.run([*base, "sections"], capture_output=True, text=True, timeout=600, env=env)
    assert sections.returncode == 0 and sections.stdout.strip(), sections.stderr
    # without the vmlinux: the kernel's BTF and kallsyms are kernel image pages, which -d 31 keeps; the same
    # answers and the same warnings (docs/btf.md)
    btf_base = base[: base.index("--vmlinux")]
    for command, dwarf_run in (("blocks", blocks), ("audit", audit)):
        btf_run = subprocess.run([*btf_base, "--json", command], capture_output=True, text=True, timeout=600, env=env)
        assert (btf_run.returncode, btf_run.stdout, btf_run.stderr) == (
            dwarf_run.returncode,
            dwarf_run.stdout,
            dwarf_run.stderr,
        ), command
