"""The second kind of test guest: a read-only Debian bookworm root disk with bcc, per kernel.

The busybox initramfs (``initramfs.py``) can read the kernel's state but cannot trace it. This guest boots
the same kernels from an ext4 image holding python3 and bcc (``python3-bpfcc``), so BPF programs can
watch the kernel's own decisions (``oracle.py``). Boot: a small busybox initramfs loads virtio_pci,
virtio_blk and ext4 (modules in Debian kernels), mounts ``/dev/vda`` read-only and switch_roots into
``guest-rootfs/init``, a shell script standing in for systemd that mounts tmpfs, debugfs, tracefs and
bpffs and serves the same control channel (``guest/agent``) as the busybox guest.

Built in two cached steps (``$KMEMINSPECT_CACHE/rootfs/``):

``base-<fp>/``
    debootstrap ``--variant=minbase`` of bookworm plus ``PACKAGES`` (bookworm packages only), keyed by
    suite, package list and mirror. About a minute; built once.
``wheels-<fp>/``
    kmeminspect's Python dependencies (``pyproject.toml``, pinned to the versions installed on the host)
    as wheels for the guest's python3 (``pip download --only-binary``), fetched once.
``<release>-<fp>.ext4``, ``<release>-<fp>.initrd``
    the base plus the kernel's modules tree (``depmod`` run in a chroot), its ``linux-headers``
    packages unpacked with ``dpkg-deb -x`` (not installed: they depend on packages of newer suites) and
    the wheels installed with ``pip install --target /usr/local/lib/python3.X/dist-packages``,
    assembled from hard links (the base and the kernel cache are only read) and written with
    ``mke2fs -d``; plus the stage-1 initramfs. Keyed by the base, the kernel version, the wheels and
    the guest scripts; images of older inputs are deleted.

kmeminspect's own code and the kernel's vmlinux are not in the image: ``RootfsGuest(shares=...)`` exports
host directories read-only over virtio-9p, mounted at ``/mnt/<tag>``; the image's ``kmeminspect``
command runs the code of the share tagged ``kmeminspect`` (``KMEMINSPECT_SHARE``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from .cache import cache_dir, locked, log
from .download import Kernel, headers_debs, machine_mirror
from .initramfs import GUEST_DIR, GUEST_KERNEL_IMAGE, ModuleTree, copy_module, pack
from .vm import Guest, GuestError, Memory

SUITE = "bookworm"
PACKAGES = [
    "python3",
    "python3-bpfcc",
    "bpfcc-tools",
    "bpftool",
    "kmod",
    "util-linux",
    "ndctl",
    "daxctl",
    "busybox-static",
    "kexec-tools",
]
ROOTFS_GUEST_DIR = Path(__file__).parent / "guest-rootfs"
#: the guest's PID 1 (``init=``), its agent and the ``loadmod`` the scenarios call
INIT = "/usr/local/sbin/kmi-init"
IMAGE_FILES = {
    "usr/local/sbin/kmi-init": ROOTFS_GUEST_DIR / "init",
    "usr/local/sbin/kmi-agent": GUEST_DIR / "agent",
    "usr/local/bin/loadmod": ROOTFS_GUEST_DIR / "loadmod",
    "usr/local/bin/kmeminspect": ROOTFS_GUEST_DIR / "kmeminspect",
}
#: the 9p share whose tree holds ``kmeminspect/`` (the source checkout): the image's ``kmeminspect`` runs it
KMEMINSPECT_SHARE = "kmeminspect"
#: where kmeminspect's dependencies come from: its own project file
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
#: glibc of bookworm (2.36): wheels of any manylinux up to it run in the guest
GUEST_GLIBC_MINOR = 36
#: numpy 2.4's wheels need x86-64-v2 (SSE4.2, POPCNT): QEMU's default TCG CPU (qemu64) lacks it, so a guest
#: sharing kmeminspect gets qemu64 plus the v2 features (``-cpu`` in qemu_args takes precedence)
KMEMINSPECT_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"
#: loaded by the stage-1 initramfs so the kernel can mount its root disk; 6.1 and 6.12 ext4 ask the crypto API
#: for "crc32c" at every mount (7.x ext4 calls the crc32c library, built in, and has no crc32c_generic)
STAGE1_MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]
STAGE1_OPTIONAL = {"crc32c_generic"}
#: bump when the way images are assembled changes
IMAGE_FORMAT = 3


@dataclasses.dataclass(frozen=True)
class Rootfs:
    """A kernel's bootable rootfs: the ext4 image (attach read-only) and the initramfs that mounts it."""

    release: str
    image: Path
    initrd: Path

    def build_info(self) -> dict[str, float]:
        """Seconds spent building: ``debootstrap`` (0 when the base was cached) and ``image``."""
        info: dict[str, float] = json.loads(self.image.with_suffix(".json").read_text())
        return info


def _run(command: list[str], **kwargs: object) -> None:
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def _base_fingerprint() -> str:
    h = hashlib.sha256(json.dumps([SUITE, sorted(PACKAGES), machine_mirror(), "minbase"]).encode())
    return h.hexdigest()[:16]


def build_base() -> tuple[Path, float]:
    """Return the cached debootstrap tree and the seconds it took to build now (0.0 if cached)."""
    with locked("rootfs-base"):
        return _build_base()


def _build_base() -> tuple[Path, float]:
    out = cache_dir() / "rootfs" / f"base-{_base_fingerprint()}"
    if (out / ".kmi-complete").is_file():
        return out, 0.0
    if not shutil.which("debootstrap"):
        log("rootfs: installing debootstrap")
        _run(["apt-get", "-q", "install", "-y", "debootstrap"], stdout=subprocess.DEVNULL)
    tmp = out.with_name(out.name + ".partial")
    _remove_tree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"rootfs: debootstrap {SUITE} ({len(PACKAGES)} packages and their dependencies)")
    start = time.monotonic()
    try:
        _run(
            [
                "debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
                "--components=main", "--merged-usr", SUITE, str(tmp), machine_mirror(),
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.CalledProcessError:
        log(f"rootfs: debootstrap failed, see {tmp}/debootstrap/debootstrap.log")
        raise
    # no apt inside a read-only guest: its package cache and lists are dead weight
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (tmp / junk).glob("*"):
            if path.is_file():
                path.unlink()
    seconds = time.monotonic() - start
    (tmp / ".kmi-complete").write_text(json.dumps({"debootstrap_seconds": seconds}))
    _remove_tree(out)  # a tree without the completion mark (an interrupted build) is not a base
    tmp.rename(out)
    log(f"rootfs: base built in {seconds:.0f}s")
    for stale in out.parent.glob("base-*"):
        if stale != out and (stale / ".kmi-complete").is_file():
            shutil.rmtree(stale)
    return out, seconds


def _remove_tree(path: Path) -> None:
    """Remove a (partial) tree, first unmounting whatever debootstrap left mounted in it."""
    if not path.exists():
        return
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(path) + "/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(path)


def guest_requirements() -> list[str]:
    """kmeminspect's runtime dependencies, each pinned to the version installed here when it is.

    The guest then reads with the same drgn as the host, and the wheel set (and so the image) only
    changes when the host's does.
    """
    dependencies: list[str] = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    requirements = []
    for dependency in dependencies:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", dependency)
        if not match:
            raise RuntimeError(f"{PYPROJECT}: cannot parse dependency {dependency!r}")
        try:
            requirements.append(f"{match.group()}=={importlib.metadata.version(match.group())}")
        except importlib.metadata.PackageNotFoundError:
            requirements.append(dependency)
    return sorted(requirements)


def guest_python(base: Path) -> str:
    """The base's python3 version, e.g. ``3.11``."""
    versions = sorted(
        p.name[len("python") :] for p in (base / "usr/bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name)
    )
    if len(versions) != 1:
        raise RuntimeError(f"{base}: expected one python3.X, found {versions}")
    return versions[0]


def _pip_target_options(python: str) -> list[str]:
    """pip options selecting binary wheels for the guest's CPython on x86_64 glibc."""
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(GUEST_GLIBC_MINOR, 16, -1)]
    platforms += ["manylinux2014_x86_64"]
    abi = "cp" + python.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi]
    for platform in platforms:
        options += ["--platform", platform]
    return options


def guest_wheels(python: str) -> list[Path]:
    """The wheels of ``guest_requirements()`` for the guest's python, downloaded once into the cache."""
    requirements = guest_requirements()
    key = hashlib.sha256(json.dumps([python, requirements, GUEST_GLIBC_MINOR]).encode()).hexdigest()[:16]
    out = cache_dir() / "rootfs" / f"wheels-{key}"
    with locked("rootfs-wheels"):
        if not (out / ".kmi-complete").is_file():
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"rootfs: pip download {' '.join(requirements)} (python {python})")
            _run(
                [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d", str(tmp)]
                + _pip_target_options(python)
                + requirements
            )
            (tmp / ".kmi-complete").write_text(json.dumps(requirements))
            tmp.rename(out)
            for stale in out.parent.glob("wheels-*"):
                if stale != out and (stale / ".kmi-complete").is_file():
                    shutil.rmtree(stale)
    return sorted(out.glob("*.whl"))


def _install_wheels(root: Path, python: str, wheels: list[Path]) -> None:
    """Install wheels into the image's ``/usr/local/lib/python3.X/dist-packages`` (on python3's path)."""
    target = root / f"usr/local/lib/python{python}/dist-packages"
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps"]
        + ["--target", str(target)]
        + _pip_target_options(python)
        + [str(wheel) for wheel in wheels]
    )
    # console scripts would name the host's python; the test suites are dead weight
    shutil.rmtree(target / "bin", ignore_errors=True)
    for tests in sorted(target.glob("numpy/**/tests"), reverse=True):
        shutil.rmtree(tests, ignore_errors=True)


def _image_fingerprint(kernel: Kernel, base: Path) -> str:
    h = hashlib.sha256(f"{base.name} {kernel.release} {kernel.version} {IMAGE_FORMAT}".encode())
    for wheel in guest_wheels(guest_python(base)):
        h.update(f"{wheel.name} {wheel.stat().st_size}".encode())
    for path in [*IMAGE_FILES.values(), ROOTFS_GUEST_DIR / "stage1", GUEST_DIR / "loadmod"]:
        h.update(path.read_bytes())
    h.update(" ".join(STAGE1_MODULES).encode())
    for deb in headers_debs(kernel):
        h.update(deb.name.encode())
    return h.hexdigest()[:16]


def build_rootfs(kernel: Kernel) -> Rootfs:
    """Return kernel's cached rootfs image and initramfs, building them (and the base) first if needed."""
    with locked(f"rootfs-{kernel.release}"):
        base, debootstrap_seconds = build_base()
        name = f"{kernel.release}-{_image_fingerprint(kernel, base)}"
        rootfs = Rootfs(
            kernel.release, cache_dir() / "rootfs" / f"{name}.ext4", cache_dir() / "rootfs" / f"{name}.initrd"
        )
        if rootfs.image.is_file() and rootfs.initrd.is_file():
            return rootfs
        start = time.monotonic()
        _build_image(kernel, base, rootfs.image)
        _build_stage1(kernel, rootfs.initrd)
        seconds = time.monotonic() - start
        info = {"debootstrap": debootstrap_seconds, "image": seconds}
        rootfs.image.with_suffix(".json").write_text(json.dumps(info))
        log(f"rootfs: {rootfs.image.name} built in {seconds:.0f}s")
        for stale in rootfs.image.parent.glob(f"{kernel.release}-*"):
            if stale.is_file() and stale.stem != name and re.fullmatch(r"[0-9a-f]{16}", stale.stem[-16:]):
                stale.unlink()  # an image of older inputs; a guest still running keeps its open file
        return rootfs


def _put(root: Path, rel: str, source: Path) -> None:
    """Copy a file into the staging tree, replacing (not writing through) a hard link into the base."""
    dest = root / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)
    shutil.copy2(source, dest)
    dest.chmod(0o755)


def _unpack_deb(deb: Path, root: Path) -> None:
    """``dpkg-deb -x`` a package beside root, then merge it in, folding ``/lib`` into ``/usr/lib``.

    Unpacking straight into the merged-/usr tree could replace its ``lib -> usr/lib`` link by a directory.
    """
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        unpacked = Path(tmp)
        _run(["dpkg-deb", "-x", str(deb), str(unpacked)])
        for top in ("lib", "bin", "sbin"):
            if (unpacked / top).is_dir() and not (unpacked / top).is_symlink():
                _run(["cp", "-al", f"{unpacked / top}/.", str(unpacked / "usr" / top)])
                shutil.rmtree(unpacked / top)
        _run(["cp", "-al", f"{unpacked}/.", str(root)])  # links, not copies: the unpacked tree goes away


def _build_image(kernel: Kernel, base: Path, image: Path) -> None:
    log(f"rootfs: assembling the image of {kernel.release}")
    with tempfile.TemporaryDirectory(prefix="rootfs.", dir=image.parent) as tmp:
        root = Path(tmp) / "root"
        _run(["cp", "-al", str(base), str(root)])
        (root / ".kmi-complete").unlink()
        for rel, source in IMAGE_FILES.items():
            _put(root, rel, source)
        _put(root, GUEST_KERNEL_IMAGE.lstrip("/"), kernel.vmlinuz)  # what kexec-loaded loads
        modules = root / "usr/lib/modules" / kernel.release
        modules.parent.mkdir(parents=True, exist_ok=True)
        # hard links into the kernel cache: depmod only adds files (written aside, then renamed)
        _run(["cp", "-al", str(kernel.modules), str(modules)])
        debs = headers_debs(kernel)
        if len(debs) < 2:
            raise RuntimeError(f"{kernel.release}: expected linux-headers and -common in the cache, have {debs}")
        for deb in debs:
            _unpack_deb(deb, root)
        python = guest_python(base)
        _install_wheels(root, python, guest_wheels(python))
        build = os.readlink(modules / "build")  # 6.1: absolute; 6.12, 7.x: relative
        if not (root / build.lstrip("/") if build.startswith("/") else modules / build).is_dir():
            raise RuntimeError(f"{kernel.release}: headers missing in the image, build -> {build}")
        _run(["chroot", str(root), "depmod", kernel.release])
        used_kib = int(
            subprocess.run(["du", "-sk", str(root)], capture_output=True, text=True, check=True).stdout.split()[0]
        )
        inodes = int(
            subprocess.run(f"find {root} | wc -l", shell=True, capture_output=True, text=True, check=True).stdout
        )
        size_mib = used_kib * 5 // 4 // 1024 + 256
        partial = image.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        partial.touch()  # else mke2fs says "Creating regular file"
        _run(
            [
                "mke2fs", "-q", "-t", "ext4", "-b", "4096", "-N", str(inodes * 5 // 4 + 8192),
                # no journal: the disk is read-only
                "-O", "^has_journal", "-L", "kmi-root", "-d", str(root),
                str(partial), f"{size_mib}M",
            ]
        )  # fmt: skip
        partial.rename(image)


def _build_stage1(kernel: Kernel, out: Path) -> None:
    """Write the initramfs that loads ``STAGE1_MODULES`` and switch_roots into the image."""
    with tempfile.TemporaryDirectory(prefix="stage1.") as tmp:
        root = Path(tmp)
        for d in ("bin", "etc", "proc", "sys", "dev", "newroot", "lib/modules/order"):
            (root / d).mkdir(parents=True, exist_ok=True)
        busybox = shutil.which("busybox")
        if not busybox:
            raise RuntimeError("busybox not found: apt-get install busybox-static")
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if not (root / "bin" / applet).exists():
                (root / "bin" / applet).symlink_to("busybox")
        shutil.copy2(GUEST_DIR / "loadmod", root / "bin" / "loadmod")
        shutil.copy2(ROOTFS_GUEST_DIR / "stage1", root / "init")
        tree = ModuleTree(kernel)
        boot = []
        for name in STAGE1_MODULES:
            if name in tree.builtin:
                continue
            if name not in tree.files and name in STAGE1_OPTIONAL:
                continue
            if name not in tree.files:
                raise RuntimeError(f"{kernel.release}: module {name} neither built in nor shipped")
            copy_module(tree, name, root)
            boot.append(name)
        (root / "etc/modules-boot").write_text("\n".join(boot) + "\n")
        pack(root, out)


class RootfsGuest(Guest):
    """A guest booting ``kernel`` from its read-only rootfs image; otherwise exactly a ``Guest``.

    Same QMP socket, control channel, memory and QEMU options, so scenario setups run unchanged
    (``loadmod`` is ``modprobe`` here). The disk is attached ``readonly=on``: guests may share it.

    ``shares`` maps a 9p mount tag to a host directory: each is exported read-only (``-virtfs local,
    security_model=none,readonly=on``) and mounted at ``/mnt/<tag>`` once the guest is up, e.g.
    ``{"kmeminspect": checkout, "vmlinux": kernel.directory}`` for the image's ``kmeminspect`` command
    (such a guest runs on an x86-64-v2 CPU, ``KMEMINSPECT_CPU``, for the numpy wheels).
    """

    def __init__(
        self,
        kernel: Kernel,
        cmdline: list[str] | None = None,
        qemu_args: list[str] | None = None,
        memory: Memory | None = None,
        workdir: Path | None = None,
        smp: int = 1,
        shares: dict[str, Path] | None = None,
        gdb: bool = False,
    ) -> None:
        root = ["root=/dev/vda", "ro", f"init={INIT}"]
        super().__init__(kernel, root + (cmdline or []), qemu_args, memory or Memory(), workdir, smp, gdb)
        self.rootfs: Rootfs | None = None
        self.boot_seconds = 0.0
        self.shares = dict(shares or {})
        for tag, path in self.shares.items():
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,31}", tag):
                raise ValueError(f"9p mount tag {tag!r}: use 1 to 31 letters, digits, '-' or '_'")
            if not Path(path).is_dir():
                raise ValueError(f"share {tag}: {path} is not a directory")

    def initrd(self) -> Path:
        return self._rootfs().initrd

    def _rootfs(self) -> Rootfs:
        if self.rootfs is None:
            self.rootfs = build_rootfs(self.kernel)
        return self.rootfs

    def qemu_command(self) -> list[str]:
        drive = f"file={self._rootfs().image},if=none,id=kmiroot,format=raw,readonly=on"
        command = super().qemu_command() + ["-drive", drive, "-device", "virtio-blk-pci,drive=kmiroot"]
        for tag, path in self.shares.items():
            escaped = str(Path(path).resolve()).replace(",", ",,")  # QEMU option syntax
            command += ["-virtfs", f"local,path={escaped},mount_tag={tag},security_model=none,readonly=on"]
        if KMEMINSPECT_SHARE in self.shares and "-cpu" not in self.qemu_args:
            command += ["-cpu", KMEMINSPECT_CPU]
        return command

    def mount_shares(self) -> None:
        """Mount every share at ``/mnt/<tag>`` (read-only; /mnt becomes a tmpfs: the root disk is read-only)."""
        if not self.shares:
            return
        lines = ["set -e", "modprobe -a 9pnet_virtio 9p", "mountpoint -q /mnt || mount -t tmpfs -o mode=755 kmi /mnt"]
        for tag in self.shares:
            # cache=loose: the host side does not change while the guest runs; reading a vmlinux through the
            # page cache is far faster than a 9p round trip per read
            lines += [
                f"mkdir -p /mnt/{tag}",
                f"mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=524288,cache=loose {tag} /mnt/{tag}",
            ]
        self.run("\n".join(lines), timeout=60)

    def start(self, timeout: float = 180.0) -> RootfsGuest:
        self._rootfs()  # build outside the boot timing
        start = time.monotonic()
        try:
            super().start(timeout)
            self.mount_shares()
        except (OSError, GuestError) as error:
            console = self.console()  # before kill() removes the workdir
            self.kill()
            raise GuestError(f"rootfs guest {self.kernel.release} did not come up: {error}\n{console}") from error
        self.boot_seconds = time.monotonic() - start
        return self

    def __enter__(self) -> RootfsGuest:
        return self.start()


def rootfs_guest(
    scenario_name: str,
    kernel: Kernel,
    workdir: Path | None = None,
    smp: int = 1,
    shares: dict[str, Path] | None = None,
) -> RootfsGuest:
    """A not yet started rootfs guest set up like scenario ``scenario_name`` (start it, then run its setup)."""
    from .scenarios import SCENARIOS, ScenarioUnsupported

    scenario = SCENARIOS[scenario_name]
    reason = scenario.unsupported(kernel)
    if reason:
        raise ScenarioUnsupported(f"{scenario.name} on {kernel.release}: {reason}")
    return RootfsGuest(
        kernel,
        list(scenario.cmdline),
        list(scenario.qemu_args),
        scenario.memory,
        workdir,
        smp=max(smp, scenario.smp),
        shares=shares,
        gdb=scenario.stopped,
    )
