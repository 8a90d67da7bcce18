"""Build the busybox initramfs of the reading guest, per kernel.

The image holds static busybox, the guest agent (``guest/``), ndctl and daxctl with their libraries
(from the host, which runs the same Debian release), and the kernel modules the scenarios need, with
their dependencies resolved on the host (``modinfo``) and decompressed, so busybox ``insmod`` can load
them. It is cached per kernel release and per content of ``guest/`` and this file.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .cache import cache_dir, locked, log
from .download import Kernel

GUEST_DIR = Path(__file__).parent / "guest"

#: loaded by /init before the agent starts (the control channel and vmcoreinfo need them)
BOOT_MODULES = ["virtio_pci", "virtio_console", "qemu_fw_cfg"]
#: loaded by scenarios on demand with ``loadmod NAME``
SCENARIO_MODULES = [
    "virtio_mem", "nd_e820", "nd_pmem", "dax_pmem", "device_dax", "kmem", "virtio_pmem", "virtio_balloon",
]  # fmt: skip
#: host programs copied in with their shared libraries (kexec: kexec-tools, for the kexec-loaded scenario)
HOST_PROGRAMS = ["/usr/bin/ndctl", "/usr/bin/daxctl", "/usr/sbin/kexec"]
#: where the guest finds its own kernel image (what kexec-loaded loads)
GUEST_KERNEL_IMAGE = "/boot/vmlinuz"


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    base = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base)
    return base.replace("-", "_")


class ModuleTree:
    """The modules of one kernel: where each lives and what it depends on."""

    def __init__(self, kernel: Kernel) -> None:
        self.root = kernel.modules
        self.files: dict[str, Path] = {}
        for path in self.root.rglob("*.ko*"):
            self.files[_module_name(str(path))] = path
        builtin = self.root / "modules.builtin"
        self.builtin = {_module_name(line) for line in builtin.read_text().split()} if builtin.exists() else set()

    def depends(self, name: str) -> list[str]:
        """The module's ``depends=`` entry of its ``.modinfo`` section."""
        m = re.search(rb"\0depends=([^\0]*)\0", b"\0" + _read_module(self.files[name]))
        return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []

    def load_order(self, name: str) -> list[str]:
        """Name and its dependencies, dependencies first; built-in modules are left out."""
        order: list[str] = []

        def visit(n: str) -> None:
            if n in order or n in self.builtin or n not in self.files:
                return
            for dep in self.depends(n):
                visit(dep)
            order.append(n)

        visit(name)
        return order


def _read_module(path: Path) -> bytes:
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-qdc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def _fingerprint(kernel: Kernel) -> str:
    h = hashlib.sha256()
    for path in sorted(GUEST_DIR.iterdir()) + [Path(__file__)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(kernel.version.encode())
    h.update(" ".join(BOOT_MODULES + SCENARIO_MODULES + HOST_PROGRAMS).encode())
    return h.hexdigest()[:16]


def _copy_program(program: str, root: Path) -> None:
    """Copy a dynamically linked host program and every library ldd lists into root."""
    paths = [program]
    out = subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.search(r"(/\S+)", line.split("=>")[-1])
        if m:
            paths.append(m.group(1))
    for p in paths:
        real = Path(p).resolve()
        for target in {Path(p), Path(os.path.normpath(p))}:
            dest = root / str(target).lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                shutil.copy2(real, dest)


def build_initramfs(kernel: Kernel) -> Path:
    """Return the cached initramfs of kernel, building it first if needed."""
    with locked(f"initramfs-{kernel.release}"):
        return _build_initramfs(kernel)


def _build_initramfs(kernel: Kernel) -> Path:
    out = cache_dir() / "initramfs" / f"{kernel.release}-{_fingerprint(kernel)}.cpio.gz"
    if out.is_file():
        return out
    log(f"building initramfs for {kernel.release}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="initramfs.") as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "lib/modules/order", "usr/bin", "boot"):
            (root / d).mkdir(parents=True, exist_ok=True)
        busybox = shutil.which("busybox")
        if not busybox:
            raise RuntimeError("busybox not found: apt-get install busybox-static")
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            link = root / "bin" / applet
            if not link.exists():
                link.symlink_to("busybox")
        for name in ("agent", "loadmod"):
            shutil.copy2(GUEST_DIR / name, root / "bin" / name)
        shutil.copy2(GUEST_DIR / "init", root / "init")
        for program in HOST_PROGRAMS:
            _copy_program(program, root)
        shutil.copy2(kernel.vmlinuz, root / GUEST_KERNEL_IMAGE.lstrip("/"))
        tree = ModuleTree(kernel)
        boot = []
        for name in BOOT_MODULES + SCENARIO_MODULES:
            if name in tree.builtin:
                continue
            if name not in tree.files:
                log(f"  module {name} not in {kernel.release}: scenarios needing it will say so")
                continue
            copy_module(tree, name, root)
            if name in BOOT_MODULES:
                boot.append(name)
        (root / "etc" / "modules-boot").write_text("\n".join(boot) + "\n")
        pack(root, out)
    return out


def copy_module(tree: ModuleTree, name: str, root: Path) -> None:
    """Copy module ``name`` and what it depends on, decompressed, under ``root/lib/modules``, and write their
    load order to ``root/lib/modules/order/<name>`` (what ``guest/loadmod`` reads)."""
    rels = []
    for dep in tree.load_order(name):
        rel = re.sub(r"\.ko\.(xz|zst|gz)$", ".ko", tree.files[dep].relative_to(tree.root).as_posix())
        dest = root / "lib" / "modules" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(_read_module(tree.files[dep]))
        rels.append(rel)
    (root / "lib" / "modules" / "order").mkdir(parents=True, exist_ok=True)
    (root / "lib" / "modules" / "order" / name).write_text("\n".join(rels) + "\n")


def pack(root: Path, out: Path) -> None:
    """Write the tree ``root`` as a gzip-compressed newc cpio archive (an initramfs) to ``out``, atomically."""
    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as f:
        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True).stdout
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
        assert cpio.stdin is not None and cpio.stdout is not None
        cpio.stdout.close()
        cpio.stdin.write(files)
        cpio.stdin.close()
        if cpio.wait() != 0 or gz.wait() != 0:
            raise RuntimeError(f"cpio/gzip failed while writing {out}")
    partial.rename(out)
