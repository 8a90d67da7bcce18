"""Named, reproducible memory states of a test guest.

Each scenario says how to start the guest (memory layout, kernel command line, QEMU devices) and how to
bring it, once booted, into its state. Every scenario sets ``memhp_default_state=`` explicitly: 6.1
leaves hotplugged memory offline by default, Debian's 6.12 onlines it into ZONE_NORMAL by itself.
A scenario with ``stop_at`` is a state of the boot itself: the guest is stopped at that kernel function
(gdbstub.py) and captured there, before any user space runs (truth.py).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from .download import Kernel
from .initramfs import GUEST_KERNEL_IMAGE
from .vm import Guest, GuestError, Memory

MiB = 1 << 20
GiB = 1 << 30

#: the DIMM hotplugged by the DIMM scenarios: QEMU id and size
DIMM_ID = "dimm0"
DIMM_SIZE = 512 * MiB


class ScenarioUnsupported(Exception):
    """The kernel cannot reach this state; the message says why."""


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    setup: Callable[[Guest], None]
    cmdline: tuple[str, ...] = ("memhp_default_state=offline",)
    memory: Memory = Memory()
    qemu_args: tuple[str, ...] = ()
    #: return a reason when ``kernel`` cannot reach the state, else None
    unsupported: Callable[[Kernel], str | None] = lambda kernel: None
    #: a kernel function: the state is the boot stopped at its entry (needs ``nokaslr``); ``setup`` then
    #: runs once the guest has booted on
    stop_at: str | None = None
    #: a shell command run in the background once ``setup`` is done (it is given the guest to choose
    #: its target); the state is the guest stopped in what the command does, at ``stop_chain``
    trigger: Callable[[Guest], str] | None = None
    #: after ``stop_at`` or ``trigger``: (function, hits) breakpoints armed one after another; the state is
    #: the last one's ``hits``-th entry (gdbstub.py). Needs ``nokaslr``.
    stop_chain: tuple[tuple[str, int], ...] = ()
    #: vCPUs. A ``trigger`` stop needs two: the trigger runs pinned to CPU 0, which the breakpoint stops;
    #: the guest's agent, pinned to CPU 1, then asks the kernel for its answers while CPU 0 stays stopped
    smp: int = 1

    @property
    def stopped(self) -> bool:
        """The state is a guest stopped by a breakpoint: no user space runs at its moment."""
        return self.stop_at is not None or self.trigger is not None

    def guest(self, kernel: Kernel, workdir: Path | None = None) -> Guest:
        """A busybox guest, not yet started, set up to boot into this scenario. With ``stop_at`` it
        starts frozen, with a gdbstub: use ``launch()``, not ``start()`` (see truth.py)."""
        reason = self.unsupported(kernel)
        if reason:
            raise ScenarioUnsupported(f"{self.name} on {kernel.release}: {reason}")
        return Guest(
            kernel,
            cmdline=list(self.cmdline),
            qemu_args=list(self.qemu_args),
            memory=self.memory,
            workdir=workdir,
            smp=self.smp,
            gdb=self.stopped,
        )


# -- helpers run in the guest ----------------------------------------------------------------------

BLOCK_LIST = "for d in /sys/devices/system/memory/memory*; do echo ${d##*memory} $(cat $d/state); done | sort -n"


def memory_blocks(guest: Guest) -> dict[int, str]:
    """Block number -> state, as sysfs says."""
    blocks = {}
    for line in guest.run(BLOCK_LIST).text.splitlines():
        nr, state = line.split()
        blocks[int(nr)] = state
    return blocks


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def add_dimm(guest: Guest, size: int = DIMM_SIZE, dimm_id: str = DIMM_ID) -> list[int]:
    """Hotplug a pc-dimm over QMP; return the memory block numbers the guest created for it."""
    before = set(memory_blocks(guest))
    guest.execute("object-add", **{"qom-type": "memory-backend-ram", "id": f"{dimm_id}-mem", "size": size})
    guest.execute("device_add", driver="pc-dimm", id=dimm_id, memdev=f"{dimm_id}-mem")
    block_size = int(guest.run("cat /sys/devices/system/memory/block_size_bytes").text, 16)
    expected = size // block_size
    new: list[int] = []

    def arrived() -> bool:
        nonlocal new
        new = sorted(set(memory_blocks(guest)) - before)
        return len(new) == expected

    wait_for(f"{expected} memory blocks of {dimm_id}", arrived)
    return new


def set_block_state(guest: Guest, block: int, state: str) -> None:
    guest.run(f"echo {state} > /sys/devices/system/memory/memory{block}/state")


def remove_dimm(guest: Guest, blocks: list[int], dimm_id: str = DIMM_ID) -> None:
    assert guest.qmp is not None
    guest.execute("device_del", id=dimm_id)
    guest.qmp.wait_event("DEVICE_DELETED", timeout=60)

    def gone() -> bool:
        return not set(blocks) & set(memory_blocks(guest))

    wait_for(f"blocks {blocks} to disappear", gone)


# -- scenarios --------------------------------------------------------------------------------------


def _boot(guest: Guest) -> None:
    pass


def _dimm_offline(guest: Guest) -> None:
    blocks = add_dimm(guest)
    states = memory_blocks(guest)
    if any(states[b] != "offline" for b in blocks):
        raise GuestError(f"hotplugged blocks not offline: {[(b, states[b]) for b in blocks]}")


def _dimm_online(guest: Guest) -> None:
    blocks = add_dimm(guest)
    set_block_state(guest, blocks[0], "online_kernel")
    for block in blocks[1:]:
        set_block_state(guest, block, "online_movable")


def _dimm_removed(guest: Guest) -> None:
    blocks = add_dimm(guest)
    for block in blocks:
        set_block_state(guest, block, "online_movable")
    for block in blocks:
        set_block_state(guest, block, "offline")
    remove_dimm(guest, blocks)


def _memmap_on_memory(guest: Guest) -> None:
    block_size = int(guest.run("cat /sys/devices/system/memory/block_size_bytes").text, 16)
    # 6.1 places the memmap on the memory only when one hot-add is exactly one memory block
    blocks = add_dimm(guest, size=block_size)
    set_block_state(guest, blocks[0], "online_movable")


VIRTIO_MEM_ID = "vmem0"
VIRTIO_MEM_MAX = 1024 * MiB
VIRTIO_MEM_PLUGGED = 320 * MiB  # not a multiple of the 128 MiB memory block
VIRTIO_MEM_SHRUNK = 200 * MiB


def _virtio_mem_size(guest: Guest) -> int:
    return int(guest.execute("qom-get", path=f"/machine/peripheral/{VIRTIO_MEM_ID}", property="size"))


def _resize_virtio_mem(guest: Guest, size: int, timeout: float = 90.0) -> None:
    guest.execute("qom-set", path=f"/machine/peripheral/{VIRTIO_MEM_ID}", property="requested-size", value=size)
    wait_for(f"virtio-mem to reach {size >> 20} MiB", lambda: _virtio_mem_size(guest) == size, timeout)


def _virtio_mem_partial(guest: Guest) -> None:
    guest.run("loadmod virtio_mem")
    _resize_virtio_mem(guest, VIRTIO_MEM_PLUGGED)
    _resize_virtio_mem(guest, VIRTIO_MEM_SHRUNK)


#: the legacy (e820 type 12) pmem ranges of the pmem scenarios
PMEM_START = 1024 * MiB
PMEM_SIZE = 512 * MiB
COLLISION_START = 1026 * MiB  # 2 MiB aligned, not 128 MiB aligned: section 8 holds RAM and pmem
COLLISION_SIZE = 254 * MiB


def _pmem_modules(guest: Guest) -> None:
    guest.run("for m in nd_e820 nd_pmem dax_pmem device_dax; do loadmod $m; done")
    wait_for(
        "namespace0.0",
        lambda: guest.run("test -e /sys/bus/nd/devices/namespace0.0", check=False).returncode == 0,
    )


def _pmem_fsdax(guest: Guest) -> None:
    _pmem_modules(guest)
    guest.run("ndctl create-namespace -f -e namespace0.0 --mode=fsdax --map=dev")


def _pmem_devdax(guest: Guest) -> None:
    _pmem_modules(guest)
    guest.run("ndctl create-namespace -f -e namespace0.0 --mode=devdax --map=mem --align=2M")


def _pmem_collision(guest: Guest) -> None:
    _pmem_modules(guest)
    # the region's default alignment (16 MiB) refuses a range that is only 2 MiB aligned
    guest.run("echo 2097152 > /sys/bus/nd/devices/region0/align")
    guest.run("ndctl create-namespace -f -e namespace0.0 --mode=fsdax --map=mem --align=2M")


def _dax_kmem(guest: Guest) -> None:
    _pmem_modules(guest)
    guest.run("ndctl create-namespace -f -e namespace0.0 --mode=devdax --map=mem --align=2M")
    before = set(memory_blocks(guest))
    guest.run(
        "loadmod kmem\n"
        "echo dax0.0 > /sys/bus/dax/drivers/device_dax/unbind\n"
        "echo dax0.0 > /sys/bus/dax/drivers/kmem/new_id\n"
    )
    new: list[int] = []

    def arrived() -> bool:
        nonlocal new
        new = sorted(set(memory_blocks(guest)) - before)
        return bool(new)

    wait_for("kmem memory blocks", arrived)
    for block in new:
        set_block_state(guest, block, "online_movable")


def _dimm_online_kernel(guest: Guest) -> list[int]:
    """A DIMM onlined to ZONE_NORMAL: allocations of the kernel (GFP_KERNEL) and of balloons prefer it,
    the highest populated zone of a 1 GiB guest whose boot memory is all DMA32."""
    blocks = add_dimm(guest)
    for block in blocks:
        set_block_state(guest, block, "online_kernel")
    return blocks


#: balloon-over-dimm: the balloon inflates by this much, from the DIMM's ZONE_NORMAL
BALLOON_INFLATE = 128 * MiB


def _balloon_actual(guest: Guest) -> int:
    return int(guest.execute("query-balloon")["actual"])


def _balloon_over_dimm(guest: Guest) -> None:
    _dimm_online_kernel(guest)
    guest.run("loadmod virtio_balloon")
    wait_for("the balloon driver", lambda: _balloon_actual(guest) > 0)
    target = _balloon_actual(guest) - BALLOON_INFLATE
    guest.execute("balloon", value=target)
    wait_for(f"the balloon to reach {target >> 20} MiB", lambda: _balloon_actual(guest) <= target, 120)


def _kexec_loaded(guest: Guest) -> None:
    _dimm_online_kernel(guest)
    guest.run(f"kexec -l {GUEST_KERNEL_IMAGE} --append='console=ttyS0 quiet'")
    loaded = guest.run("cat /sys/kernel/kexec_loaded").text.strip()
    if loaded != "1":
        raise GuestError(f"kexec -l did not load an image (kexec_loaded {loaded!r})")


def _mixed(guest: Guest) -> None:
    _pmem_collision(guest)
    blocks = add_dimm(guest)
    for block in blocks[: len(blocks) // 2]:
        set_block_state(guest, block, "online_movable")


def _hugetlb_hvo(guest: Guest) -> None:
    total = guest.run("grep HugePages_Total /proc/meminfo").text.split()[1]
    if int(total) != HUGETLB_PAGES:
        raise GuestError(f"expected {HUGETLB_PAGES} huge pages, have {total}")


HUGETLB_PAGES = 64

#: big-blocks: boot memory ends at 66 GiB, but only 2 GiB of it exist. x86 picks 2 GiB memory blocks in a
#: guest whose boot memory ends at or above 64 GiB (probe_memory_block_size(): the largest block up to
#: 2 GiB that divides the end). QEMU's RAM stays at 1 GiB; the high part is a cold-plugged 1 GiB pc-dimm at
#: 65 GiB that ``memmap=1G@65G`` declares boot RAM (e820), as firmware does with DIMMs present at boot. So
#: the guest never touches 64 GiB, it inits struct pages for 2 GiB only, and dumps hold 2 GiB, not 66.
BIG_BLOCK_SIZE = 2 * GiB
BIG_HIGH_START = 65 * GiB
BIG_HIGH_SIZE = 1 * GiB
BIG_END = BIG_HIGH_START + BIG_HIGH_SIZE


def _big_blocks(guest: Guest) -> None:
    size = int(guest.run("cat /sys/devices/system/memory/block_size_bytes").text, 16)
    if size != BIG_BLOCK_SIZE:
        raise GuestError(f"expected {BIG_BLOCK_SIZE >> 20} MiB memory blocks, have {size >> 20} MiB")


#: early-boot: deferred struct page init defers the highest zone of each node past its first section's
#: worth of pages; deferred_init_memmap() (the pgdatinit kthread) takes the range and resets
#: NODE_DATA(nid)->first_deferred_pfn to ULONG_MAX *before* initializing anything (6.1, 6.12 and 7.3 alike,
#: seen in their disassembly). Its entry is the last moment at which the kernel records what is deferred.
EARLY_BOOT_STOP = "deferred_init_memmap"

#: deferred-init-running: the Nth __free_pages_core() after deferred_init_memmap() began. Deferred init
#: walks the node upward one MAX_ORDER block (1024 pfns) at a time: initializes it, then frees it there
#: (6.1, 6.12, 7.3 alike; one vCPU, so one chunk at a time). first_deferred_pfn is ULONG_MAX by then.
DEFERRED_INIT_STOP = ("__free_pages_core", 120)


def _online_first_dimm_block(guest: Guest) -> str:
    """Online the DIMM's first block (movable) after a delay, so the caller can arm its breakpoint."""
    block = min(b for b, state in memory_blocks(guest).items() if state == "offline")
    return f"sleep 3; echo online_movable > /sys/devices/system/memory/memory{block}/state"


#: onlining: online_pages() stopped at online_mem_sections(): the memmap is initialized and the pages are
#: in the buddy (isolated), but SECTION_IS_ONLINE is not set yet (mm/memory_hotplug.c, all three)
ONLINING_STOP = ("online_mem_sections", 1)


def _disable_pmem_namespace(guest: Guest) -> str:
    return "sleep 3; ndctl disable-namespace namespace0.0"


#: pgmap-teardown: memunmap_pages() stopped at remove_pfn_range_from_zone(): pgmap->ref killed (so
#: get_dev_pagemap() fails), the registry entry and the memmap still there. devm_memremap_pages_release()
#: arms it, since remove_pfn_range_from_zone() also serves memory block offlining.
PGMAP_TEARDOWN_STOPS = (("devm_memremap_pages_release", 1), ("remove_pfn_range_from_zone", 1))

_DIMM_MEMORY = Memory(boot_mb=1024, slots=4, maxmem_mb=4096)
_PMEM_MEMORY = Memory(boot_mb=2048, slots=2, maxmem_mb=4096)
#: QEMU's device-memory area starts at 4 GiB and spans maxmem - boot + 1 GiB per slot: up to 70 GiB here
_BIG_MEMORY = Memory(boot_mb=1024, slots=1, maxmem_mb=BIG_END >> 20)

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("boot", "a freshly booted guest, nothing hotplugged", _boot, memory=_DIMM_MEMORY),
        Scenario(
            "dimm-offline",
            "a 512 MiB DIMM hotplugged over QMP, its blocks left offline",
            _dimm_offline,
            memory=_DIMM_MEMORY,
        ),
        Scenario(
            "dimm-online",
            "a 512 MiB DIMM: first block online_kernel, the others online_movable",
            _dimm_online,
            memory=_DIMM_MEMORY,
        ),
        Scenario(
            "dimm-removed",
            "a 512 MiB DIMM onlined movable, offlined and device_del'd",
            _dimm_removed,
            memory=_DIMM_MEMORY,
        ),
        Scenario(
            "memmap-on-memory",
            "a one-block DIMM with memory_hotplug.memmap_on_memory=1, online_movable",
            _memmap_on_memory,
            cmdline=("memhp_default_state=offline", "memory_hotplug.memmap_on_memory=1"),
            memory=_DIMM_MEMORY,
        ),
        Scenario(
            "virtio-mem-partial",
            "virtio-mem plugged to 320 MiB (not a block multiple), then shrunk to 200 MiB",
            _virtio_mem_partial,
            cmdline=("memhp_default_state=online_movable",),
            memory=_DIMM_MEMORY,
            qemu_args=(
                "-object",
                f"memory-backend-ram,id={VIRTIO_MEM_ID}-mem,size={VIRTIO_MEM_MAX}",
                "-device",
                f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_ID}-mem,requested-size=0",
            ),
        ),  # fmt: skip
        Scenario(
            "pmem-fsdax",
            "legacy memmap= pmem as an fsdax namespace with its memmap on the device (altmap)",
            _pmem_fsdax,
            cmdline=("memhp_default_state=offline", f"memmap={PMEM_SIZE >> 20}M!{PMEM_START >> 20}M"),
            memory=_PMEM_MEMORY,
        ),
        Scenario(
            "pmem-devdax",
            "legacy memmap= pmem as a devdax namespace, memmap in RAM, 2 MiB compound pages",
            _pmem_devdax,
            cmdline=("memhp_default_state=offline", f"memmap={PMEM_SIZE >> 20}M!{PMEM_START >> 20}M"),
            memory=_PMEM_MEMORY,
        ),
        Scenario(
            "pmem-collision",
            "pmem 2 MiB- but not 128 MiB-aligned: one section holds System RAM and ZONE_DEVICE",
            _pmem_collision,
            cmdline=(
                "memhp_default_state=offline",
                f"memmap={COLLISION_SIZE >> 20}M!{COLLISION_START >> 20}M",
            ),
            memory=_PMEM_MEMORY,
        ),
        Scenario(
            "dax-kmem",
            "a devdax namespace handed to the kmem driver and onlined movable as System RAM",
            _dax_kmem,
            cmdline=("memhp_default_state=offline", f"memmap={PMEM_SIZE >> 20}M!{PMEM_START >> 20}M"),
            memory=_PMEM_MEMORY,
        ),
        Scenario(
            "mixed",
            "the demo: pmem colliding with RAM in one section, and a DIMM half online_movable, half offline",
            _mixed,
            cmdline=(
                "memhp_default_state=offline",
                f"memmap={COLLISION_SIZE >> 20}M!{COLLISION_START >> 20}M",
            ),
            memory=_PMEM_MEMORY,
        ),
        Scenario(
            "balloon-over-dimm",
            f"a 512 MiB DIMM online_kernel, then virtio-balloon inflated by {BALLOON_INFLATE >> 20} MiB from it",
            _balloon_over_dimm,
            memory=_DIMM_MEMORY,
            qemu_args=("-device", "virtio-balloon-pci,id=balloon0"),
        ),
        Scenario(
            "kexec-loaded",
            "a 512 MiB DIMM online_kernel, then a kexec kernel loaded (kexec -l): its pages PG_reserved",
            _kexec_loaded,
            memory=_DIMM_MEMORY,
        ),
        Scenario(
            "hugetlb-hvo",
            f"{HUGETLB_PAGES} 2 MiB hugetlb pages with hugetlb_free_vmemmap=on",
            _hugetlb_hvo,
            cmdline=(
                "memhp_default_state=offline",
                "hugetlb_free_vmemmap=on",
                "hugepagesz=2M",
                f"hugepages={HUGETLB_PAGES}",
            ),
            memory=_DIMM_MEMORY,
        ),
        Scenario(
            "big-blocks",
            "boot memory ends at 66 GiB with 2 GiB present (1 GiB low, 1 GiB at 65 GiB): 2 GiB memory blocks",
            _big_blocks,
            cmdline=(
                "memhp_default_state=offline",
                f"memmap={BIG_HIGH_SIZE >> 30}G@{BIG_HIGH_START >> 30}G",
            ),
            memory=_BIG_MEMORY,
            qemu_args=(
                "-object",
                f"memory-backend-ram,id=high-mem,size={BIG_HIGH_SIZE}",
                "-device",
                f"pc-dimm,id=high,memdev=high-mem,addr={BIG_HIGH_START}",
            ),
        ),  # fmt: skip
        Scenario(
            "early-boot",
            f"2 GiB guest stopped at {EARLY_BOOT_STOP}(): deferred struct page init not begun",
            _boot,
            cmdline=("memhp_default_state=offline", "nokaslr"),
            memory=Memory(boot_mb=2048, slots=1, maxmem_mb=4096),
            stop_at=EARLY_BOOT_STOP,
        ),
        Scenario(
            "deferred-init-running",
            f"2 GiB guest stopped at the {DEFERRED_INIT_STOP[1]}th {DEFERRED_INIT_STOP[0]}() of deferred init",
            _boot,
            cmdline=("memhp_default_state=offline", "nokaslr"),
            memory=Memory(boot_mb=2048, slots=1, maxmem_mb=4096),
            stop_at=EARLY_BOOT_STOP,
            stop_chain=(DEFERRED_INIT_STOP,),
        ),
        Scenario(
            "onlining",
            "a 512 MiB DIMM whose first block is being onlined, stopped before online_mem_sections()",
            _dimm_offline,
            cmdline=("memhp_default_state=offline", "nokaslr"),
            memory=_DIMM_MEMORY,
            trigger=_online_first_dimm_block,
            stop_chain=(ONLINING_STOP,),
            smp=2,
        ),
        Scenario(
            "pgmap-teardown",
            "pmem-collision's fsdax namespace being disabled, stopped inside memunmap_pages()",
            _pmem_collision,
            cmdline=(
                "memhp_default_state=offline",
                "nokaslr",
                f"memmap={COLLISION_SIZE >> 20}M!{COLLISION_START >> 20}M",
            ),
            memory=_PMEM_MEMORY,
            trigger=_disable_pmem_namespace,
            stop_chain=PGMAP_TEARDOWN_STOPS,
            smp=2,
        ),
    ]
}
