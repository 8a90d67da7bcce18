"""Runs inside the rootfs guest (python3 + bcc): what pfn_to_online_page() answers for every pfn.

``/proc/kpageflags`` asks ``pfn_to_online_page(pfn)`` once per pfn it reports, in increasing pfn order
(``kpageflags_read``; from 7.2 on a tail call to ``kpage_read``). A probe on the function's return,
limited to this process and to the time it reads the file, records (pfn, result != NULL). The BPF side
aggregates consecutive calls with the same answer into runs (``runs``), so user space reads a few
hundred map entries instead of one event per pfn. A non-consecutive pfn closes a run too and is counted
(``gaps``), so the runs stay correct whatever the call order; user space checks that they tile
``[0, pfns walked)`` exactly once.

Prints one JSON object on stdout. Usage: ``python3 pfn_oracle.py fexit|kretprobe [KPAGEFLAGS_COPY]``, or
``python3 pfn_oracle.py fexit --wait GO``: attach, touch ``GO.attached``, walk once ``GO`` exists, print,
and only then detach (for a guest one of whose CPUs is stopped: detaching a trampoline waits for every
CPU, so the answer is printed first).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

from bcc import BPF  # type: ignore[import-not-found,import-untyped,unused-ignore]

MAX_RUNS = 1 << 16
CHUNK = 1 << 16  # bytes per read(): 8192 pfns; /proc/kpageflags wants multiples of 8

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>

struct page;
struct run { u64 start; u64 end; u64 online; };
struct state { u64 calls; u64 next; u64 start; u64 online; u64 nruns; u64 gaps; u64 overflow; u64 armed; };

BPF_ARRAY(state, struct state, 1);
BPF_ARRAY(runs, struct run, MAX_RUNS);

/* one pfn_to_online_page(pfn) call of ours returned online (non-NULL) or not */
static __always_inline void record(u64 pfn, u64 online)
{
    int zero = 0;
    struct state *s = state.lookup(&zero);
    if (!s || !s->armed)
        return;
    if (s->calls && (pfn != s->next || online != s->online)) {
        u32 i = s->nruns;
        struct run *r = runs.lookup(&i);
        if (r) {
            r->start = s->start;
            r->end = s->next;
            r->online = s->online;
            s->nruns++;
        } else {
            s->overflow++;
        }
        if (pfn != s->next)
            s->gaps++;
        s->start = pfn;
    } else if (!s->calls) {
        s->start = pfn;
    }
    s->next = pfn + 1;
    s->online = online;
    s->calls++;
}

#ifdef MODE_FEXIT
KRETFUNC_PROBE(pfn_to_online_page, unsigned long pfn, struct page *ret)
{
    if ((bpf_get_current_pid_tgid() >> 32) == TGID)
        record(pfn, ret != 0);
    return 0;
}
#else
BPF_HASH(entry_pfn, u64, u64);

int on_entry(struct pt_regs *ctx, u64 pfn)
{
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) == TGID)
        entry_pfn.update(&id, &pfn);
    return 0;
}

int on_return(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 *pfn = entry_pfn.lookup(&id);
    if (!pfn)
        return 0;
    record(*pfn, PT_REGS_RC(ctx) != 0);
    entry_pfn.delete(&id);
    return 0;
}
#endif
"""


def walk(copy: str | None) -> int:
    """Read /proc/kpageflags from start to end; return the bytes read (8 per pfn)."""
    total = 0
    out = open(copy, "wb") if copy else None
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        while chunk := os.read(fd, CHUNK):
            total += len(chunk)
            if out:
                out.write(chunk)
    finally:
        os.close(fd)
        if out:
            out.close()
    return total


def main() -> None:
    mode = sys.argv[1]
    go = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--wait" else None
    copy = sys.argv[2] if len(sys.argv) > 2 and go is None else None
    timings: dict[str, float] = {}
    t = time.monotonic()
    walk(None)
    timings["walk_unprobed"] = time.monotonic() - t
    cflags = [f"-DTGID={os.getpid()}", f"-DMAX_RUNS={MAX_RUNS}"] + (["-DMODE_FEXIT"] if mode == "fexit" else [])
    t = time.monotonic()
    bpf = BPF(text=BPF_TEXT, cflags=cflags)  # compiles; a kretfunc__ function is attached here
    timings["compile_and_load"] = time.monotonic() - t
    t = time.monotonic()
    if mode == "kretprobe":
        bpf.attach_kprobe(event="pfn_to_online_page", fn_name="on_entry")
        bpf.attach_kretprobe(event="pfn_to_online_page", fn_name="on_return", maxactive=16)
    elif mode != "fexit":
        raise SystemExit(f"unknown mode {mode}")
    state_map = bpf["state"]
    key = ctypes.c_int(0)
    armed = state_map.Leaf()
    armed.armed = 1
    state_map[key] = armed
    timings["attach"] = time.monotonic() - t
    if go:
        open(go + ".attached", "w").close()
        while not os.path.exists(go):
            time.sleep(0.1)
    t = time.monotonic()
    nbytes = walk(copy)
    timings["walk_probed"] = time.monotonic() - t
    if go:
        s = state_map[key]
        print(json.dumps(result(bpf, s, mode, nbytes, timings)), flush=True)
        bpf.cleanup()
        return
    t = time.monotonic()
    if mode == "kretprobe":
        bpf.detach_kretprobe(event="pfn_to_online_page", fn_name="on_return")
        bpf.detach_kprobe(event="pfn_to_online_page", fn_name="on_entry")
    else:
        bpf.detach_kretfunc(fn_name="pfn_to_online_page")
    s = state_map[key]
    answer = result(bpf, s, mode, nbytes, timings)
    bpf.cleanup()
    timings["detach_and_read"] = time.monotonic() - t
    print(json.dumps(answer))


def result(bpf: BPF, s: object, mode: str, nbytes: int, timings: dict[str, float]) -> dict[str, object]:
    """The JSON answer: the runs the BPF side recorded, and the counters to check them by."""
    runs_map = bpf["runs"]
    runs = []
    for i in range(s.nruns):  # type: ignore[attr-defined]
        r = runs_map[ctypes.c_int(i)]
        runs.append([r.start, r.end, r.online])
    if s.calls:  # type: ignore[attr-defined]  # the run still open when the walk ended
        runs.append([s.start, s.next, s.online])  # type: ignore[attr-defined]
    with open("/proc/sys/kernel/osrelease") as f:
        release = f.read().strip()
    return {
        "release": release,
        "mode": mode,
        "bytes": nbytes,
        "calls": s.calls,  # type: ignore[attr-defined]
        "gaps": s.gaps,  # type: ignore[attr-defined]
        "overflow": s.overflow,  # type: ignore[attr-defined]
        "runs": runs,
        "seconds": timings,
    }


if __name__ == "__main__":
    main()
