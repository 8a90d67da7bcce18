"""Runs in the rootfs guest: stall a /proc/kpageflags read right after pfn_to_online_page() handed out PFN.

kpageflags_read() asks pfn_to_online_page(pfn), reads the page's flags, then put_user()s them to the
reader's buffer. Here that buffer is an anonymous page registered with userfaultfd (missing mode), so the
put_user() of the first pfn faults and the reading thread sleeps inside its read system call, with PFN's
page just handed out: the walker of the 2019 race, held still. It prints "stalled", waits for a line on
file GO appears, then resolves the fault (UFFDIO_ZEROPAGE) and prints "resumed N" (bytes read).

Usage: python3 uffd_stall.py PFN GO
"""

import ctypes
import fcntl
import mmap
import os
import struct
import sys
import threading
import time

SYS_USERFAULTFD = 323  # x86_64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_ZEROPAGE = 0xC020AA04  # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
UFFDIO_REGISTER_MODE_MISSING = 1
PAGE = 4096
UFFD_MSG_SIZE = 32  # struct uffd_msg


def main() -> None:
    pfn = int(sys.argv[1], 0)
    libc = ctypes.CDLL(None, use_errno=True)
    uffd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC)
    if uffd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    fcntl.ioctl(uffd, UFFDIO_API, bytearray(struct.pack("QQQ", UFFD_API, 0, 0)))
    buffer = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    fcntl.ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack("QQQQ", address, PAGE, UFFDIO_REGISTER_MODE_MISSING, 0)))
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    result = []
    reader = threading.Thread(target=lambda: result.append(os.preadv(fd, [memoryview(buffer)[:64]], pfn * 8)))
    reader.start()
    os.read(uffd, UFFD_MSG_SIZE)  # the fault's message: the reader now sleeps in handle_userfault()
    print("stalled", reader.native_id, flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.05)
    fcntl.ioctl(uffd, UFFDIO_ZEROPAGE, bytearray(struct.pack("QQQq", address, PAGE, 0, 0)))
    reader.join()
    print("resumed", result[0], flush=True)


if __name__ == "__main__":
    main()
