/* The memory-hotplug lifecycle: one event per step, with task, time and pfn range, and the live
 * pfn_active state (bpf/pfn_active.c) updated where the kernel makes a memmap valid or invalid.
 *
 * Every probe is a kprobe or kretprobe: these functions run a few times per hotplug operation, so the
 * probe's cost does not matter, and PT_REGS_PARMn lets the loader pick each argument by the parameter
 * name in the kernel's debug info (ARG_<function>_<parameter>): sparse_remove_section() lost its first
 * parameter (ms) in v6.3, move_pfn_range_to_zone() gained one in v6.15. A *_BEGIN event is emitted at
 * entry and the arguments stashed in `inflight` for the matching return.
 */
#include "common.h"
#include "pfn_active.c"

struct inflight_key {
	u64 pid_tgid;
	u32 kind;
	u32 pad;
};
struct inflight {
	u64 ts;
	u64 pfn;
	u64 nr_pages;
	u64 aux;
	u64 ptr; /* an argument needed at return: altmap or pgmap */
	s32 zone;
	u32 emitted; /* a *_BEGIN event was emitted */
};
BPF_HASH(inflight, struct inflight_key, struct inflight, 4096);

static __always_inline void begin(struct pt_regs *ctx, u32 kind, u64 pfn, u64 nr, s32 zone, u64 aux, u64 ptr,
				  int emit_begin)
{
	struct inflight v = {};
	v.ts = bpf_ktime_get_ns();
	v.pfn = pfn;
	v.nr_pages = nr;
	v.aux = aux;
	v.ptr = ptr;
	v.zone = zone;
	v.emitted = emit_begin;
	struct inflight_key k = {.pid_tgid = bpf_get_current_pid_tgid(), .kind = kind};
	inflight.update(&k, &v);
	if (emit_begin) {
		struct event e = {};
		fill_task(&e);
		e.kind = kind;
		e.pfn = pfn;
		e.nr_pages = nr;
		e.context = zone;
		e.aux = aux;
		emit(&e);
	}
}

/* The stashed arguments of the current task's call of kind, consumed; NULL if its entry was not seen. */
static __always_inline int end(u32 kind, struct inflight *out)
{
	struct inflight_key k = {.pid_tgid = bpf_get_current_pid_tgid(), .kind = kind};
	struct inflight *v = inflight.lookup(&k);
	if (!v)
		return 0;
	*out = *v;
	inflight.delete(&k);
	return 1;
}

static __always_inline void emit_end(u32 kind, struct inflight *v, s64 ret, u64 aux2)
{
	struct event e = {};
	fill_task(&e);
	e.kind = kind;
	e.pfn = v->pfn;
	e.nr_pages = v->nr_pages;
	e.context = v->zone;
	e.aux = v->aux;
	e.aux2 = aux2;
	e.ret = ret;
	e.duration_ns = e.ts - v->ts;
	emit(&e);
}

static __always_inline void emit_now(u32 kind, u64 pfn, u64 nr, s32 zone, u64 aux)
{
	struct event e = {};
	fill_task(&e);
	e.kind = kind;
	e.pfn = pfn;
	e.nr_pages = nr;
	e.context = zone;
	e.aux = aux;
	emit(&e);
}

/* the task enters or leaves the hotplug lock (or memremap_pages/memunmap_pages) */
static __always_inline void hotplug_context(int enter)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 zero = 0, one = 1;
	u32 *depth = hotplug_depth.lookup(&id);
	u64 *tasks = hotplug_tasks.lookup(&zero);
	if (!tasks)
		return;
	if (enter) {
		if (depth) {
			(*depth)++;
		} else {
			hotplug_depth.update(&id, &one);
			__sync_fetch_and_add(tasks, 1);
		}
	} else if (depth) {
		if (*depth > 1) {
			(*depth)--;
		} else {
			hotplug_depth.delete(&id);
			__sync_fetch_and_add(tasks, -1);
		}
	}
}

int kmi_mem_hotplug_begin(struct pt_regs *ctx)
{
	hotplug_context(1);
	return 0;
}

int kmi_mem_hotplug_done(struct pt_regs *ctx)
{
	hotplug_context(0);
	return 0;
}

int kmi_sparse_add_section(struct pt_regs *ctx)
{
	begin(ctx, EV_SECTION_ADD, ARG_sparse_add_section_start_pfn, ARG_sparse_add_section_nr_pages, -1,
	      ARG_sparse_add_section_nid, 0, 0);
	return 0;
}

int kmi_sparse_add_section_ret(struct pt_regs *ctx)
{
	struct inflight v;
	if (!end(EV_SECTION_ADD, &v))
		return 0;
	s64 ret = (int)PT_REGS_RC(ctx);
	if (ret == 0)
		range_op(v.pfn, v.pfn + v.nr_pages, OP_PRESENT);
	emit_end(EV_SECTION_ADD, &v, ret, 0);
	return 0;
}

int kmi_sparse_remove_section(struct pt_regs *ctx)
{
	u64 pfn = ARG_sparse_remove_section_pfn, nr = ARG_sparse_remove_section_nr_pages;
	emit_now(EV_SECTION_REMOVE, pfn, nr, -1, 0);
	check_holders(pfn, pfn + nr, EV_SECTION_REMOVE);
	range_op(pfn, pfn + nr, OP_REMOVE);
	return 0;
}

/* a call with BEGIN at entry (pfn range, zone or block) and END at return (ret, duration) */
#define TIMED_CALL(function, BEGIN, END, pfn, nr, zone, aux)                              \
	int kmi_##function(struct pt_regs *ctx)                                           \
	{                                                                                 \
		begin(ctx, BEGIN, pfn, nr, zone, aux, 0, 1);                              \
		return 0;                                                                 \
	}                                                                                 \
	int kmi_##function##_ret(struct pt_regs *ctx)                                     \
	{                                                                                 \
		struct inflight v;                                                        \
		if (end(BEGIN, &v))                                                       \
			emit_end(END, &v, (int)PT_REGS_RC(ctx), 0);                       \
		return 0;                                                                 \
	}

TIMED_CALL(online_pages, EV_ONLINE_PAGES_BEGIN, EV_ONLINE_PAGES_END, ARG_online_pages_pfn,
	   ARG_online_pages_nr_pages, zone_index((void *)ARG_online_pages_zone), 0)

TIMED_CALL(offline_pages, EV_OFFLINE_PAGES_BEGIN, EV_OFFLINE_PAGES_END, ARG_offline_pages_start_pfn,
	   ARG_offline_pages_nr_pages, zone_index((void *)ARG_offline_pages_zone), 0)

/* struct vmem_altmap's base_pfn, reserve and free: at an altmap pointer (READ_ALTMAP(p, OFF_ALTMAP)) or
 * embedded in a struct dev_pagemap (READ_ALTMAP(p, OFF_PGMAP_ALTMAP)) */
struct altmap_span {
	u64 base, reserve, free;
};

static __always_inline struct altmap_span read_altmap(const char *p, u64 off_base, u64 off_reserve, u64 off_free)
{
	struct altmap_span a = {
		.base = read_u64(p + off_base),
		.reserve = read_u64(p + off_reserve),
		.free = read_u64(p + off_free),
	};
	return a;
}

#define READ_ALTMAP(p, OFF) read_altmap((const char *)(p), OFF##_BASE, OFF##_RESERVE, OFF##_FREE)

int kmi_move_pfn_range_to_zone(struct pt_regs *ctx)
{
	begin(ctx, EV_MOVE_TO_ZONE, ARG_move_pfn_range_to_zone_start_pfn, ARG_move_pfn_range_to_zone_nr_pages,
	      zone_index((void *)ARG_move_pfn_range_to_zone_zone), 0, ARG_move_pfn_range_to_zone_altmap, 0);
	return 0;
}

/* memmap_init_range() initializes RAM wholly; for ZONE_DEVICE only the altmap's free part (the pages
 * holding the memmap itself), and nothing without an altmap (mm/mm_init.c) */
int kmi_move_pfn_range_to_zone_ret(struct pt_regs *ctx)
{
	struct inflight v;
	if (!end(EV_MOVE_TO_ZONE, &v))
		return 0;
	u64 lo = v.pfn, hi = v.pfn + v.nr_pages;
	if (v.zone == ZONE_DEVICE_IDX) {
		if (v.ptr) {
			struct altmap_span a = READ_ALTMAP(v.ptr, OFF_ALTMAP);
			if (a.base + a.reserve > lo)
				lo = a.base + a.reserve;
			if (a.base + a.reserve + a.free < hi)
				hi = a.base + a.reserve + a.free;
		} else {
			hi = lo;
		}
	}
	if (lo < hi)
		range_op(lo, hi, OP_ACTIVATE);
	emit_end(EV_MOVE_TO_ZONE, &v, hi > lo ? hi - lo : 0, lo);
	return 0;
}

int kmi_remove_pfn_range_from_zone(struct pt_regs *ctx)
{
	u64 pfn = ARG_remove_pfn_range_from_zone_start_pfn, nr = ARG_remove_pfn_range_from_zone_nr_pages;
	emit_now(EV_REMOVE_FROM_ZONE, pfn, nr, zone_index((void *)ARG_remove_pfn_range_from_zone_zone), 0);
	check_holders(pfn, pfn + nr, EV_REMOVE_FROM_ZONE);
	range_op(pfn, pfn + nr, OP_DEACTIVATE);
	return 0;
}

int kmi_online_mem_sections(struct pt_regs *ctx)
{
	u64 start = ARG_online_mem_sections_start_pfn, end_pfn = ARG_online_mem_sections_end_pfn;
	emit_now(EV_SECTIONS_ONLINE, start, end_pfn - start, -1, 0);
	range_op(start, end_pfn, OP_ONLINE);
	return 0;
}

int kmi_offline_mem_sections(struct pt_regs *ctx)
{
	u64 start = ARG_offline_mem_sections_start_pfn, end_pfn = ARG_offline_mem_sections_end_pfn;
	emit_now(EV_SECTIONS_OFFLINE, start, end_pfn - start, -1, 0);
	range_op(start, end_pfn, OP_OFFLINE);
	return 0;
}

/* a pgmap's first range in pfns, and type << 32 | nr_range */
static __always_inline void pgmap_range(const void *pgmap, u64 *pfn, u64 *nr, u64 *type)
{
	u64 start = read_u64((const char *)pgmap + OFF_PGMAP_RANGES);
	u64 end_inclusive = read_u64((const char *)pgmap + OFF_PGMAP_RANGES + 8);
	u32 t = 0, n = 0;
	bpf_probe_read_kernel(&t, sizeof(t), (const char *)pgmap + OFF_PGMAP_TYPE);
	bpf_probe_read_kernel(&n, sizeof(n), (const char *)pgmap + OFF_PGMAP_NR_RANGE);
	*pfn = start >> KMI_PAGE_SHIFT;
	*nr = (end_inclusive + 1 - start) >> KMI_PAGE_SHIFT;
	*type = (u64)t << 32 | n;
}

/* memremap_pages() / memunmap_pages(): the pgmap's range at entry, the caller in the hotplug context
 * until the return (RET: what the return reports) */
#define PGMAP_CALL(function, BEGIN, END, RET)                                             \
	int kmi_##function(struct pt_regs *ctx)                                           \
	{                                                                                 \
		u64 pfn, nr, type;                                                        \
		void *pgmap = (void *)ARG_##function##_pgmap;                             \
		pgmap_range(pgmap, &pfn, &nr, &type);                                     \
		hotplug_context(1);                                                       \
		begin(ctx, BEGIN, pfn, nr, -1, type, (u64)pgmap, 1);                      \
		return 0;                                                                 \
	}                                                                                 \
	int kmi_##function##_ret(struct pt_regs *ctx)                                     \
	{                                                                                 \
		struct inflight v;                                                        \
		hotplug_context(0);                                                       \
		if (end(BEGIN, &v))                                                       \
			emit_end(END, &v, RET, v.ptr);                                    \
		return 0;                                                                 \
	}

PGMAP_CALL(memremap_pages, EV_MEMREMAP_BEGIN, EV_MEMREMAP_END, PT_REGS_RC(ctx))

PGMAP_CALL(memunmap_pages, EV_MEMUNMAP_BEGIN, EV_MEMUNMAP_END, 0) /* void */

int kmi_memmap_init_zone_device(struct pt_regs *ctx)
{
	begin(ctx, EV_DEVICE_INIT_BEGIN, ARG_memmap_init_zone_device_start_pfn,
	      ARG_memmap_init_zone_device_nr_pages, zone_index((void *)ARG_memmap_init_zone_device_zone), 0,
	      ARG_memmap_init_zone_device_pgmap, 1);
	return 0;
}

/* memmap_init_zone_device() starts past the altmap (base + reserve + free) when the pgmap has one
 * (pgmap_altmap(): PGMAP_ALTMAP_VALID; an unused embedded altmap is all zeros) */
int kmi_memmap_init_zone_device_ret(struct pt_regs *ctx)
{
	struct inflight v;
	if (!end(EV_DEVICE_INIT_BEGIN, &v))
		return 0;
	u64 lo = v.pfn, hi = v.pfn + v.nr_pages;
	struct altmap_span a = READ_ALTMAP(v.ptr, OFF_PGMAP_ALTMAP);
	if ((a.base || a.reserve || a.free) && a.base + a.reserve + a.free > lo)
		lo = a.base + a.reserve + a.free;
	if (lo < hi)
		range_op(lo, hi, OP_ACTIVATE);
	emit_end(EV_DEVICE_INIT_END, &v, 0, lo);
	return 0;
}

static __always_inline u64 device_id(const void *dev)
{
	u32 id = 0;
	bpf_probe_read_kernel(&id, sizeof(id), (const char *)dev + OFF_DEVICE_ID);
	return id;
}

TIMED_CALL(memory_subsys_online, EV_BLOCK_ONLINE_BEGIN, EV_BLOCK_ONLINE_END, 0, 0, -1,
	   device_id((void *)ARG_memory_subsys_online_dev))

TIMED_CALL(memory_subsys_offline, EV_BLOCK_OFFLINE_BEGIN, EV_BLOCK_OFFLINE_END, 0, 0, -1,
	   device_id((void *)ARG_memory_subsys_offline_dev))
