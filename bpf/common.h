/* Shared by every kmeminspect BPF program (the .c files here), compiled together by bcc in one object.
 *
 * Nothing here comes from kernel headers: struct field offsets, argument positions, the section and
 * subsection geometry and ZONE_DEVICE's index are read from the kernel's debug info by
 * kmeminspect/kernel/probepoints.py and passed as -D macros by kmeminspect/trace/plan.py, so one source
 * serves 6.1, 6.12 and 7.x.
 *
 * Macros the loader defines:
 *   KMI_PAGE_SHIFT                             PAGE_SHIFT
 *   SECTION_PFN_SHIFT, SUBSECTION_PFN_SHIFT    PFN_SECTION_SHIFT, PFN_SUBSECTION_SHIFT
 *   ZONE_DEVICE_IDX                            enum zone_type ZONE_DEVICE (or -1)
 *   OFF_ZONE_PGDAT, OFF_PGDAT_NODE_ZONES, OFF_PGDAT_NODE_ID, SIZEOF_ZONE
 *   OFF_DEVICE_ID                              struct device, id (a memory block's id)
 *   OFF_ALTMAP_{BASE,RESERVE,FREE}             struct vmem_altmap, base_pfn/reserve/free
 *   OFF_PGMAP_ALTMAP_{BASE,RESERVE,FREE}       struct dev_pagemap, altmap.base_pfn/.reserve/.free
 *   OFF_PGMAP_TYPE, OFF_PGMAP_NR_RANGE, OFF_PGMAP_RANGES, SIZEOF_RANGE
 *   OFF_TASK_MM                                struct task_struct, mm (NULL: a kernel thread)
 *   ARG_<function>_<parameter>                 PT_REGS_PARMn(ctx) of that parameter
 *   MAX_SECTIONS_PER_OP, HOLDER_SLOTS, HOLD_WINDOW_NS, VERIFY_EVERY, STACK_ENTRIES, COUNT_ENTRIES
 *   SECTION_ENTRIES, PARTIAL_ENTRIES
 */
#ifndef KMI_COMMON_H
#define KMI_COMMON_H
#include <uapi/linux/ptrace.h>

#define SUBSECTIONS_PER_SECTION (1UL << (SECTION_PFN_SHIFT - SUBSECTION_PFN_SHIFT))
#define PAGES_PER_SUBSECTION (1UL << SUBSECTION_PFN_SHIFT)

enum event_kind {
	EV_SECTION_ADD = 1,       /* sparse_add_section() returned: memmap allocated, subsections valid */
	EV_SECTION_REMOVE,        /* sparse_remove_section() entered: memmap about to be freed */
	EV_ONLINE_PAGES_BEGIN,    /* online_pages() entered */
	EV_ONLINE_PAGES_END,      /* online_pages() returned (ret, duration) */
	EV_OFFLINE_PAGES_BEGIN,
	EV_OFFLINE_PAGES_END,
	EV_MOVE_TO_ZONE,          /* move_pfn_range_to_zone() returned: memmap initialized (pfn_active) */
	EV_REMOVE_FROM_ZONE,      /* remove_pfn_range_from_zone() entered: memmap invalid from here on */
	EV_SECTIONS_ONLINE,       /* online_mem_sections(): SECTION_IS_ONLINE set */
	EV_SECTIONS_OFFLINE,      /* offline_mem_sections(): SECTION_IS_ONLINE cleared */
	EV_MEMREMAP_BEGIN,        /* memremap_pages() entered (pgmap range and type) */
	EV_MEMREMAP_END,
	EV_MEMUNMAP_BEGIN,
	EV_MEMUNMAP_END,
	EV_DEVICE_INIT_BEGIN,     /* memmap_init_zone_device() entered */
	EV_DEVICE_INIT_END,       /* ... returned: the device memmap past the altmap is initialized */
	EV_BLOCK_ONLINE_BEGIN,    /* memory_subsys_online(): a memory block goes online */
	EV_BLOCK_ONLINE_END,
	EV_BLOCK_OFFLINE_BEGIN,
	EV_BLOCK_OFFLINE_END,
	EV_HANDOUT_INACTIVE,      /* pfn_to_online_page() returned a page whose memmap is not active */
	EV_RACE,                  /* a subsection was invalidated while a task still held a page of it */
	EV_STATE_OVERFLOW,        /* a range too large for MAX_SECTIONS_PER_OP: tracked state incomplete */
};

/* call context of pfn_to_online_page() callers */
#define CTX_OTHER 0
#define CTX_HOTPLUG 1 /* between mem_hotplug_begin() and _done(), or in memremap/memunmap_pages() */

struct event {
	u64 ts;            /* bpf_ktime_get_ns() */
	u64 pid_tgid;
	char comm[16];
	u32 kind;          /* enum event_kind */
	s32 context;       /* CTX_* for hand-outs and races; zone index for zone events (-1: none) */
	u64 pfn;           /* start of the pfn range (or the pfn handed out) */
	u64 nr_pages;      /* length of the range */
	s64 ret;           /* return value where there is one */
	u64 duration_ns;   /* *_END: time since the matching *_BEGIN */
	u64 aux;           /* block id, pgmap address, pgmap type<<32|nid, or the holder's pid_tgid */
	u64 aux2;          /* initialized range start (device init), or the holder's hand-out time */
	s64 stackid;       /* hand-outs and races: kernel stack of the caller (<0: -errno of the capture) */
	char comm2[16];    /* races: the holder's comm */
	u64 holder_asleep; /* races: the holder has been asleep (S or D) since the hand-out */
};

BPF_RINGBUF_OUTPUT(events, 64);
/* 0: ring buffer full (events lost), 1: stack capture failed, 2: state ops approximated */
BPF_PERCPU_ARRAY(losses, u64, 4);
#define LOSS_EVENTS 0
#define LOSS_STACKS 1
#define LOSS_APPROX 2
#define LOSS_HOLDERS 3 /* a hold replaced by another task's in the same slot */

static __always_inline void count_loss(int what)
{
	u64 *n = losses.lookup(&what);
	if (n)
		(*n)++;
}

static __always_inline void fill_task(struct event *e)
{
	e->ts = bpf_ktime_get_ns();
	e->pid_tgid = bpf_get_current_pid_tgid();
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
}

static __always_inline void emit(struct event *e)
{
	if (events.ringbuf_output(e, sizeof(*e), 0) < 0)
		count_loss(LOSS_EVENTS);
}

static __always_inline u64 read_u64(const void *addr)
{
	u64 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), addr);
	return v;
}

/* zone_idx(zone) as the kernel computes it: zone - zone->zone_pgdat->node_zones */
static __always_inline s32 zone_index(const void *zone)
{
	if (!zone)
		return -1;
	u64 pgdat = read_u64((const char *)zone + OFF_ZONE_PGDAT);
	if (!pgdat)
		return -1;
	return ((u64)zone - (pgdat + OFF_PGDAT_NODE_ZONES)) / SIZEOF_ZONE;
}

/* tasks between mem_hotplug_begin() and mem_hotplug_done() (or in memremap/memunmap_pages()), with
 * their nesting depth; hotplug_tasks[0] counts them so that the common case costs one array lookup */
BPF_HASH(hotplug_depth, u64, u32, 1024);
BPF_ARRAY(hotplug_tasks, u64, 1);

static __always_inline u32 current_context(u64 id)
{
	u32 zero = 0;
	u64 *tasks = hotplug_tasks.lookup(&zero);
	if (!tasks || !*tasks)
		return CTX_OTHER;
	return hotplug_depth.lookup(&id) ? CTX_HOTPLUG : CTX_OTHER;
}
#endif
