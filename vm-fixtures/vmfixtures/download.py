"""Fetch Debian kernels for the test bed through a private apt configuration.

Each kernel generation is pinned to a Debian suite; the ABI is resolved at build time from that suite's
``linux-image-amd64`` metapackage (Debian retires old ABIs, so a hard pin would break). The machine's own
apt sources are only read, for the mirror URI; a private sources list, lists and archives directory under
the cache are used for everything else, and nothing is installed.

Cache layout (``$KMEMINSPECT_CACHE``, default ``/var/cache/kmeminspect``)::

    apt/                      private apt state (sources.list, lists/, archives/)
    kernels/<release>/        vmlinuz, vmlinux (DWARF), config, System.map, modules/, resolved.json
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .cache import cache_dir, locked, log

#: generation -> Debian suite it is pinned to (recorded in docs/testing.md)
GENERATIONS: dict[str, str] = {
    "6.1": "bookworm",
    "6.12": "trixie",
    "7.x": "trixie-backports",
}

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel extracted into the cache: everything a guest and a reader need."""

    generation: str
    suite: str
    release: str  # uname -r, e.g. 6.1.0-50-amd64
    version: str  # Debian package version, e.g. 6.1.176-1
    directory: Path

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def modules(self) -> Path:
        """The ``lib/modules/<release>`` tree of the image package."""
        return self.directory / "modules" / self.release

    @property
    def config(self) -> Path:
        return self.directory / "config"

    def to_json(self) -> dict[str, str]:
        return {
            "generation": self.generation,
            "suite": self.suite,
            "release": self.release,
            "version": self.version,
        }


def machine_mirror() -> str:
    """Return the Debian mirror URI the machine's own apt sources use (read, never changed)."""
    candidates: list[str] = []
    sources_d = Path("/etc/apt/sources.list.d")
    files = [Path("/etc/apt/sources.list")] + sorted(sources_d.glob("*.sources")) + sorted(sources_d.glob("*.list"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in stanza.splitlines() if not line.startswith("#"))
                    if v
                )
                if "uris" in fields and "security" not in fields.get("suites", ""):
                    candidates.extend(fields["uris"].split())
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and "security" not in m.group(2):
                    candidates.append(m.group(1))
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    if candidates:
        return candidates[0].rstrip("/")
    raise RuntimeError("no Debian mirror found in /etc/apt/sources.list{,.d}: cannot fetch kernels")


class PrivateApt:
    """apt-get/apt-cache over a private sources list and state under the cache."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_dir() / "apt"
        for sub in ("lists/partial", "archives/partial", "cache", "etc"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def options(self) -> list[str]:
        r = self.root
        return [
            f"-o=Dir::Etc::SourceList={r}/etc/sources.list",
            "-o=Dir::Etc::SourceParts=/dev/null",
            f"-o=Dir::State::Lists={r}/lists",
            f"-o=Dir::Cache::Archives={r}/archives",
            f"-o=Dir::Cache={r}/cache",
            "-o=Dir::State::Status=/dev/null",
            "-o=APT::Get::List-Cleanup=0",
            "-o=Debug::NoLocking=1",
            "-o=APT::Sandbox::User=root",
        ]

    def write_sources(self, suites: list[str]) -> None:
        mirror = machine_mirror()
        lines = [f"deb [signed-by={KEYRING}] {mirror} {suite} main" for suite in suites]
        (self.root / "etc" / "sources.list").write_text("\n".join(lines) + "\n")

    def update(self) -> None:
        log("apt: updating private package lists")
        subprocess.run(["apt-get", *self.options(), "-q", "update"], check=True, stdout=subprocess.DEVNULL)

    def show(self, package: str) -> dict[str, str]:
        out = subprocess.run(
            ["apt-cache", *self.options(), "show", "--no-all-versions", package],
            check=True,
            stderr=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        fields: dict[str, str] = {}
        for line in out.splitlines():
            if line and not line.startswith(" ") and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        return fields

    def has(self, package: str) -> bool:
        try:
            return bool(self.show(package))
        except subprocess.CalledProcessError:
            return False

    def download(self, package: str, dest: Path) -> Path:
        """Download a .deb (name or name=version) into dest and return its path."""
        dest.mkdir(parents=True, exist_ok=True)
        name = re.split(r"[=/]", package)[0]
        existing = sorted(dest.glob(f"{name}_*.deb"))
        if existing:
            return existing[0]
        log(f"apt: downloading {package}")
        subprocess.run(
            ["apt-get", *self.options(), "-q", "download", package],
            check=True,
            cwd=dest,
            stdout=subprocess.DEVNULL,
        )
        found = sorted(dest.glob(f"{name}_*.deb"))
        if not found:
            raise RuntimeError(f"apt-get download {package} produced no file")
        return found[0]


def resolve(apt: PrivateApt, suite: str) -> tuple[str, str]:
    """Return (release, version) of the current amd64 kernel ABI in suite."""
    fields = apt.show(f"linux-image-amd64/{suite}")
    m = re.search(r"linux-image-(\S+-amd64)(?:-unsigned)?\b", fields.get("Depends", ""))
    if not m:
        raise RuntimeError(f"cannot resolve the kernel ABI of {suite}: Depends={fields.get('Depends')}")
    return m.group(1), fields["Version"]


def _open_data_tar(deb: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """Stream the data tarball of a .deb (uncompressed) from ``dpkg-deb --fsys-tarfile``."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, proc.stdout


def extract_members(
    deb: Path, dest: Path, wanted: Callable[[str], str | None], stop_after: int = 0, files_only: bool = False
) -> int:
    """Extract the members for which ``wanted(name)`` returns a destination path (relative to dest).

    With ``stop_after`` > 0, stop streaming once that many members were extracted: the dbg package
    holds gigabytes of module debug info after ``vmlinux``, which need not be decompressed.
    """
    proc, stream = _open_data_tar(deb)
    count = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                target = wanted(member.name)
                if target is None or (files_only and not member.isfile()):
                    continue
                out = dest / target
                out.parent.mkdir(parents=True, exist_ok=True)
                if member.issym():
                    if out.is_symlink() or out.exists():
                        out.unlink()
                    out.symlink_to(member.linkname)
                elif member.isfile():
                    src = tar.extractfile(member)
                    assert src is not None
                    with open(out, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)
                    os.chmod(out, 0o644)
                else:
                    continue
                count += 1
                if stop_after and count >= stop_after:
                    break
    finally:
        proc.kill()
        proc.wait()
    return count


def fetch_kernel(generation: str, apt: PrivateApt | None = None, update: bool = True) -> Kernel:
    """Resolve, download and extract one generation's kernel into the cache."""
    with locked("apt"):
        return _fetch_kernel(generation, apt, update)


def _fetch_kernel(generation: str, apt: PrivateApt | None, update: bool) -> Kernel:
    suite = GENERATIONS[generation]
    apt = apt or prepare_apt(update)
    release, version = resolve(apt, suite)
    directory = cache_dir() / "kernels" / release
    stamp = directory / "resolved.json"
    kernel = Kernel(generation, suite, release, version, directory)
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == version:
        return kernel
    debs = cache_dir() / "debs"
    # Backports ship only the signed image (same kernel, a signed vmlinuz): take it when -unsigned is absent.
    image_package = f"linux-image-{release}-unsigned"
    if not apt.has(f"{image_package}/{suite}"):
        image_package = f"linux-image-{release}"
    images = [apt.download(f"{image_package}/{suite}", debs)]
    # Debian 7.x splits the image into linux-binary-, linux-modules- and linux-base-<release>.
    depends = apt.show(f"{image_package}/{suite}").get("Depends", "")
    for part in sorted(set(re.findall(rf"(linux-(?:binary|modules|base)-{re.escape(release)})\b", depends))):
        images.append(apt.download(f"{part}/{suite}", debs))
    dbg = apt.download(f"linux-image-{release}-dbg/{suite}", debs)
    apt.download(f"linux-headers-{release}/{suite}", debs)  # for the rootfs guest (bcc)
    common = apt.show(f"linux-headers-{release}/{suite}").get("Depends", "")
    m = re.search(r"(linux-headers-\S+-common)", common)
    if m:
        apt.download(f"{m.group(1)}/{suite}", debs)
    (cache_dir() / "kernels").mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{release}.", dir=cache_dir() / "kernels"))

    def image_member(name: str) -> str | None:
        name = name.removeprefix("./")
        if name == f"boot/vmlinuz-{release}":
            return "vmlinuz"
        if name == f"boot/config-{release}":
            return "config"
        if name == f"boot/System.map-{release}":
            return "System.map"
        for prefix in ("lib/modules/", "usr/lib/modules/"):
            if name.startswith(prefix + release + "/"):
                inside = name[len(prefix) + len(release) + 1 :]
                # 7.x keeps vmlinuz, config and System.map beside the modules
                if inside in ("vmlinuz", "config", "System.map"):
                    return inside
                return "modules/" + name[len(prefix) :]
        return None

    for image in images:
        log(f"extracting {image.name}")
        extract_members(image, tmp, image_member)
    log(f"extracting vmlinux from {dbg.name}")
    # 7.x keeps the file in lib/modules/<release>/ (after every module's debug info) and links it from boot/
    vmlinux_names = {
        f"usr/lib/debug/boot/vmlinux-{release}",
        f"usr/lib/debug/lib/modules/{release}/vmlinux",
        f"usr/lib/debug/usr/lib/modules/{release}/vmlinux",
    }
    n = extract_members(
        dbg,
        tmp,
        lambda name: "vmlinux" if name.removeprefix("./") in vmlinux_names else None,
        stop_after=1,
        files_only=True,
    )
    if n != 1:
        raise RuntimeError(f"{dbg.name} holds no vmlinux")
    for needed in ("vmlinuz", "vmlinux", "config"):
        if not (tmp / needed).is_file():
            raise RuntimeError(f"{release}: {needed} missing after extracting {[i.name for i in images]}")
    (tmp / "resolved.json").write_text(json.dumps(Kernel(generation, suite, release, version, tmp).to_json()))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    log(f"kernel {generation}: {release} ({version}) from {suite}")
    return kernel


def prepare_apt(update: bool = True) -> PrivateApt:
    apt = PrivateApt()
    apt.write_sources(sorted(set(GENERATIONS.values())))
    if update or not any((apt.root / "lists").glob("*Packages*")):
        apt.update()
    return apt


def headers_debs(kernel: Kernel) -> list[Path]:
    """The linux-headers packages downloaded for kernel (for the rootfs guest)."""
    debs = cache_dir() / "debs"
    return sorted(debs.glob(f"linux-headers-{kernel.release}_*.deb")) + sorted(
        p for p in debs.glob("linux-headers-*-common_*.deb") if kernel.release.rsplit("-", 1)[0] in p.name
    )


def load_kernel(generation: str) -> Kernel | None:
    """The cached kernel of a generation, without touching the network, or None."""
    stamps = sorted((cache_dir() / "kernels").glob("*/resolved.json"), key=lambda p: p.stat().st_mtime)
    for stamp in reversed(stamps):
        data = json.loads(stamp.read_text())
        if data.get("generation") == generation:
            return Kernel(generation, data["suite"], data["release"], data["version"], stamp.parent)
    return None
