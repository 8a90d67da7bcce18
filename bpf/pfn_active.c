/* A live pfn_active(): "this pfn's memmap is initialized and sane", kept per subsection in BPF maps.
 *
 * The state is seeded from a snapshot by user space and then follows the points where the kernel really
 * makes a memmap valid or invalid (bpf/lifecycle.c calls range_op()):
 *   active    when move_pfn_range_to_zone() returns (RAM, self-hosted vmemmap pages, the altmap part of
 *             device memory) and when memmap_init_zone_device() returns;
 *   inactive  when remove_pfn_range_from_zone() is entered (successful offline, failed online, memunmap);
 *   gone      when sparse_remove_section() is entered.
 * A subsection only partly active (a device range's altmap reserve, a self-hosted vmemmap smaller than a
 * subsection) keeps its one active pfn range in `partial`.
 *
 * It checks, at every return of pfn_to_online_page(): a page handed out whose memmap is not active
 * (EV_HANDOUT_INACTIVE); and it remembers each task's latest hand-out so that an invalidation of that
 * pfn while the task is still in the same system call, and has not asked for another pfn since, is
 * reported (EV_RACE): a race when the task sleeps holding it, a race window when it is running.
 */
#ifndef KMI_PFN_ACTIVE_C
#define KMI_PFN_ACTIVE_C
#include "common.h"

#define SEC_PRESENT 1 /* sparse_add_section() done, sparse_remove_section() not yet */
#define SEC_ONLINE 2  /* SECTION_IS_ONLINE */

struct section_state {
	u64 active; /* bit i: subsection i's memmap is initialized */
	u64 flags;  /* SEC_* */
};
/* not preallocated: sized for 128 TiB, it holds what the machine has (and a failed insert is counted) */
BPF_F_TABLE("hash", u64, struct section_state, sections, SECTION_ENTRIES, BPF_F_NO_PREALLOC);

/* the active pfns [lo, hi) of a subsection that is not wholly active, keyed by pfn >> SUBSECTION_PFN_SHIFT */
struct partial_range {
	u64 lo;
	u64 hi;
};
BPF_F_TABLE("hash", u64, struct partial_range, partial, PARTIAL_ENTRIES, BPF_F_NO_PREALLOC);

/* set by user space once the maps hold the seed: before that every pfn would look inactive */
BPF_ARRAY(seed_done, u32, 1);

static __always_inline int seeded(void)
{
	int zero = 0;
	u32 *done = seed_done.lookup(&zero);
	return done && *done;
}

enum range_op { OP_ACTIVATE, OP_DEACTIVATE, OP_PRESENT, OP_REMOVE, OP_ONLINE, OP_OFFLINE };

/* pfn_active(pfn) as tracked */
static __always_inline int pfn_is_active(u64 pfn)
{
	u64 nr = pfn >> SECTION_PFN_SHIFT;
	struct section_state *s = sections.lookup(&nr);
	if (s && ((s->active >> ((pfn >> SUBSECTION_PFN_SHIFT) & (SUBSECTIONS_PER_SECTION - 1))) & 1))
		return 1;
	u64 sub = pfn >> SUBSECTION_PFN_SHIFT;
	struct partial_range *p = partial.lookup(&sub);
	return p && pfn >= p->lo && pfn < p->hi;
}

/* Make [a, b), inside one subsection and not the whole of it, active or inactive. */
static __always_inline void partial_op(u64 a, u64 b, int activate)
{
	u64 sub = a >> SUBSECTION_PFN_SHIFT;
	u64 sub_lo = sub << SUBSECTION_PFN_SHIFT, sub_hi = sub_lo + PAGES_PER_SUBSECTION;
	u64 nr = a >> SECTION_PFN_SHIFT;
	u64 bit = 1ULL << (sub & (SUBSECTIONS_PER_SECTION - 1));
	struct section_state zero = {};
	struct section_state *s = sections.lookup_or_try_init(&nr, &zero);
	if (!s)
		return;
	struct partial_range *p = partial.lookup(&sub);
	struct partial_range r = {};
	if (activate) {
		if (s->active & bit)
			return;
		r.lo = a;
		r.hi = b;
		if (p) {
			if (a <= p->hi && b >= p->lo) {
				r.lo = a < p->lo ? a : p->lo;
				r.hi = b > p->hi ? b : p->hi;
			} else if (p->hi - p->lo > b - a) {
				count_loss(LOSS_APPROX); /* two disjoint active pieces: keep the larger */
				return;
			} else {
				count_loss(LOSS_APPROX);
			}
		}
		if (r.lo == sub_lo && r.hi == sub_hi) {
			s->active |= bit;
			partial.delete(&sub);
		} else {
			partial.update(&sub, &r);
		}
		return;
	}
	if (s->active & bit) {
		s->active &= ~bit;
		r.lo = sub_lo;
		r.hi = sub_hi;
	} else if (p) {
		r = *p;
	} else {
		return;
	}
	/* what is left of [r.lo, r.hi) once [a, b) is taken out */
	if (b <= r.lo || a >= r.hi)
		return;
	if (a <= r.lo && b >= r.hi) {
		partial.delete(&sub);
		return;
	}
	if (a <= r.lo) {
		r.lo = b;
	} else if (b >= r.hi) {
		r.hi = a;
	} else {
		count_loss(LOSS_APPROX); /* a hole in the middle: keep the larger side */
		if (a - r.lo >= r.hi - b)
			r.hi = a;
		else
			r.lo = b;
	}
	partial.update(&sub, &r);
}

/* Apply op to the pfn range [start, end); whole subsections through the section bitmaps, the ragged
 * ends through partial_op(). */
static __always_inline void range_op(u64 start, u64 end, int op)
{
	if (end <= start)
		return;
	u64 lo = start, hi = end;
	if (op == OP_ACTIVATE || op == OP_DEACTIVATE || op == OP_REMOVE) {
		u64 mask = PAGES_PER_SUBSECTION - 1;
		u64 first_full = (start + mask) & ~mask, last_full = end & ~mask;
		if (first_full >= last_full) { /* within one subsection, or two ragged pieces */
			u64 mid = (start & ~mask) + PAGES_PER_SUBSECTION;
			if (end <= mid) {
				partial_op(start, end, op == OP_ACTIVATE);
			} else {
				partial_op(start, mid, op == OP_ACTIVATE);
				partial_op(mid, end, op == OP_ACTIVATE);
			}
			return;
		}
		if (start < first_full)
			partial_op(start, first_full, op == OP_ACTIVATE);
		if (last_full < end)
			partial_op(last_full, end, op == OP_ACTIVATE);
		lo = first_full;
		hi = last_full;
	}
	u64 first = lo >> SECTION_PFN_SHIFT, last = (hi - 1) >> SECTION_PFN_SHIFT;
	if (last - first >= MAX_SECTIONS_PER_OP) {
		struct event e = {};
		fill_task(&e);
		e.kind = EV_STATE_OVERFLOW;
		e.pfn = start;
		e.nr_pages = end - start;
		e.ret = op;
		emit(&e);
		last = first + MAX_SECTIONS_PER_OP - 1;
	}
	for (u32 i = 0; i < MAX_SECTIONS_PER_OP; i++) {
		u64 nr = first + i;
		if (nr > last)
			break;
		u64 sec_lo = nr << SECTION_PFN_SHIFT, sec_hi = sec_lo + (1ULL << SECTION_PFN_SHIFT);
		u64 a = lo > sec_lo ? lo : sec_lo, b = hi < sec_hi ? hi : sec_hi;
		u64 n = (b - a) >> SUBSECTION_PFN_SHIFT;
		u64 bits = n >= 64 ? ~0ULL : ((1ULL << n) - 1) << ((a - sec_lo) >> SUBSECTION_PFN_SHIFT);
		struct section_state zero = {};
		struct section_state *s;
		if (op == OP_ACTIVATE || op == OP_PRESENT || op == OP_ONLINE)
			s = sections.lookup_or_try_init(&nr, &zero);
		else
			s = sections.lookup(&nr);
		if (!s)
			continue;
		if (op == OP_ACTIVATE)
			s->active |= bits;
		else if (op == OP_DEACTIVATE)
			s->active &= ~bits;
		else if (op == OP_PRESENT)
			s->flags |= SEC_PRESENT;
		else if (op == OP_ONLINE)
			s->flags |= SEC_ONLINE;
		else if (op == OP_OFFLINE)
			s->flags &= ~(u64)SEC_ONLINE;
		else if (op == OP_REMOVE) {
			s->active &= ~bits;
			if (a == sec_lo && b == sec_hi)
				s->flags = 0;
		}
	}
}

#ifdef WITH_RACES
#define NO_PFN (~0ULL)
/* each task's latest pfn_to_online_page() answer, in slot pid % HOLDER_SLOTS */
struct hold {
	u64 pid_tgid;
	u64 pfn;      /* the pfn handed out, NO_PFN once it is no longer held */
	u64 ts;
	s64 stackid;
	u32 kthread;  /* no mm: not in a system call, the hold ends after HOLD_WINDOW_NS */
	u32 context;  /* CTX_* */
	u64 asleep;   /* switched out in S or D since the hand-out, not back yet */
	char comm[16];
};
BPF_ARRAY(holders, struct hold, HOLDER_SLOTS);

static __always_inline void record_hold(u64 id, u64 pfn, int handed_out, s64 stackid, u32 context)
{
	u32 slot = (u32)id & (HOLDER_SLOTS - 1);
	struct hold *h = holders.lookup(&slot);
	if (!h)
		return;
	if (!handed_out) { /* asked for another pfn: the previous page is no longer held */
		if (h->pid_tgid == id)
			h->pfn = NO_PFN;
		return;
	}
	if (h->pid_tgid != id) {
		if (h->pid_tgid && h->pfn != NO_PFN)
			count_loss(LOSS_HOLDERS);
		h->pid_tgid = id;
		bpf_get_current_comm(&h->comm, sizeof(h->comm));
		h->kthread = read_u64((const char *)bpf_get_current_task() + OFF_TASK_MM) == 0;
	}
	h->pfn = pfn;
	h->asleep = 0;
	h->ts = bpf_ktime_get_ns();
	h->stackid = stackid;
	h->context = context;
}

/* the end of a system call ends its task's hold */
TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 slot = (u32)id & (HOLDER_SLOTS - 1);
	struct hold *h = holders.lookup(&slot);
	if (h && h->pid_tgid == id)
		h->pfn = NO_PFN;
	return 0;
}

/* A holder switched out asleep (prev_state has a SLEEP_STATES bit: S or D in the tracepoint's print
 * format, read by the loader) is marked asleep until it runs again: e.g. a fault on the reader's buffer.
 * Switched out while runnable (preempted, or in cond_resched()) it keeps holding, awake: preemption can
 * come between the hand-out and that very sleep (might_fault(), a wake-up before schedule()). */
TRACEPOINT_PROBE(sched, sched_switch)
{
	u32 tid = args->prev_pid;
	u32 slot = tid & (HOLDER_SLOTS - 1);
	struct hold *h = holders.lookup(&slot);
	if (h && (u32)h->pid_tgid == tid && (args->prev_state & SLEEP_STATES))
		h->asleep = 1;
	tid = args->next_pid;
	slot = tid & (HOLDER_SLOTS - 1);
	h = holders.lookup(&slot);
	if (h && (u32)h->pid_tgid == tid)
		h->asleep = 0;
	return 0;
}

/* [start, end) is being invalidated (kind): report every other task still holding a page in it */
static __always_inline void check_holders(u64 start, u64 end, u32 kind)
{
	u64 now = bpf_ktime_get_ns(), me = bpf_get_current_pid_tgid();
	for (u32 i = 0; i < HOLDER_SLOTS; i++) {
		u32 slot = i;
		struct hold *h = holders.lookup(&slot);
		if (!h || h->pfn == NO_PFN || h->pfn < start || h->pfn >= end || h->pid_tgid == me)
			continue;
		if (h->kthread && now - h->ts > HOLD_WINDOW_NS)
			continue;
		struct event e = {};
		fill_task(&e);
		e.kind = EV_RACE;
		e.context = h->context;
		e.pfn = h->pfn;
		e.nr_pages = 1;
		e.ret = kind;
		e.aux = h->pid_tgid;
		e.aux2 = h->ts;
		e.stackid = h->stackid;
		e.holder_asleep = h->asleep;
		__builtin_memcpy(e.comm2, h->comm, sizeof(e.comm2));
		emit(&e);
	}
}
#else
static __always_inline void check_holders(u64 start, u64 end, u32 kind) {}
#endif
#endif
