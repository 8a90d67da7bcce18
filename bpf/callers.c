/* Who calls pfn_to_online_page(), aggregated in the kernel: a stack map and a count map, no event per
 * call. Optionally split by its answer (NULL or a page), and the hand-out checks of bpf/pfn_active.c.
 *
 * kmi_p2op_entry (kprobe on entry, like bcc's stackcount) counts by (kernel stack, context) and, for a
 * return program, stashes the stack; with WITH_SPLIT the return program counts instead.
 *
 * Unwinding the kernel stack is most of a probe's cost, and a pfn walker calls from the same stack
 * thousands of times in a row. So each CPU keeps its last call's key (task, stack pointer, return
 * address, context) with its stack id and a pending count: a call with the same key only increments the
 * pending count; another key flushes it into `callers` and unwinds. Every VERIFY_EVERY-th reuse is
 * unwound anyway and a disagreement counted, so the shortcut's error is measured, never assumed. User
 * space adds the pending counts left in each CPU's entry. EXACT_STACKS unwinds every call.
 *
 * kmi_p2op_return (fexit where BTF trampolines exist, else kretprobe) sees pfn and result.
 */
#include "common.h"
#include "pfn_active.c"

#define RESULT_NULL 0
#define RESULT_PAGE 1
#define RESULT_UNKNOWN 2 /* counted at entry: no return probe */

struct caller_key {
	s64 stackid; /* <0: -errno of a failed capture, counted apart, never as an empty stack */
	u32 context; /* CTX_* */
	u32 result;  /* RESULT_* */
};
BPF_STACK_TRACE(stacks, STACK_ENTRIES);
BPF_HASH(callers, struct caller_key, u64, COUNT_ENTRIES);

struct stack_cache {
	u64 pid_tgid;
	u64 sp;
	u64 ret;
	s64 stackid;
	u32 context;
	u32 pad;
	u64 pending;  /* calls with this key not yet in `callers` (RESULT_UNKNOWN) */
	u64 reused;   /* calls that reused the stack id */
	u64 verified; /* reuses unwound anyway */
	u64 disagreed;
};
BPF_PERCPU_ARRAY(stack_cache, struct stack_cache, 1);

/* what the entry probe hands to the return probe of the same call */
struct stash {
	u64 pid_tgid;
	u64 pfn;
	s64 stackid;
	u32 context;
};
BPF_PERCPU_ARRAY(stash, struct stash, 1);
/* 0: unused, 1: returns without their entry's stash (nested or missed) */
BPF_PERCPU_ARRAY(call_stats, u64, 2);

static __always_inline void bump(void *map_lookup_result)
{
	u64 *n = map_lookup_result;
	if (n)
		(*n)++;
}

static __always_inline void add_calls(s64 stackid, u32 context, u32 result, u64 calls)
{
	struct caller_key key = {.stackid = stackid, .context = context, .result = result};
	u64 zero = 0;
	u64 *n = callers.lookup_or_try_init(&key, &zero);
	if (n)
		__sync_fetch_and_add(n, calls);
}

static __always_inline s64 capture_stack(void *ctx)
{
	s64 id = stacks.get_stackid(ctx, 0);
	if (id < 0)
		count_loss(LOSS_STACKS);
	return id;
}

/* The caller's stack id for this call; with count, the call is counted (RESULT_UNKNOWN) too. */
static __always_inline s64 caller_stack(struct pt_regs *ctx, u64 id, u32 context, int count)
{
#ifdef EXACT_STACKS
	s64 fresh = capture_stack(ctx);
	if (count)
		add_calls(fresh, context, RESULT_UNKNOWN, 1);
	return fresh;
#else
	int zero = 0;
	struct stack_cache *c = stack_cache.lookup(&zero);
	if (!c)
		return capture_stack(ctx);
	u64 sp = PT_REGS_SP(ctx);
	u64 ret = read_u64((const void *)sp);
	if (c->pid_tgid == id && c->sp == sp && c->ret == ret && c->context == context && c->stackid >= 0) {
		c->reused++;
		if (c->reused % VERIFY_EVERY == 0) {
			s64 fresh = capture_stack(ctx);
			c->verified++;
			if (fresh != c->stackid) {
				c->disagreed++;
				if (c->pending)
					add_calls(c->stackid, c->context, RESULT_UNKNOWN, c->pending);
				c->pending = 0;
				c->stackid = fresh;
			}
		}
		c->pending += count;
		return c->stackid;
	}
	if (c->pending)
		add_calls(c->stackid, c->context, RESULT_UNKNOWN, c->pending);
	c->pid_tgid = id;
	c->sp = sp;
	c->ret = ret;
	c->context = context;
	c->stackid = capture_stack(ctx);
	c->pending = count;
	return c->stackid;
#endif
}

int kmi_p2op_entry(struct pt_regs *ctx)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 context = current_context(id);
#if defined(WITH_CALLERS) && !defined(WITH_SPLIT)
	s64 stackid = caller_stack(ctx, id, context, 1);
#else
	s64 stackid = caller_stack(ctx, id, context, 0);
#endif
#ifdef WITH_RETURN
	int zero = 0;
	struct stash *s = stash.lookup(&zero);
	if (s) {
		s->pid_tgid = id;
		s->pfn = PT_REGS_PARM1(ctx);
		s->stackid = stackid;
		s->context = context;
	}
#endif
	return 0;
}

/* inactive hand-outs per subsection: the first one is an event, the others only counted */
BPF_F_TABLE("hash", u64, u64, inactive_handouts, PARTIAL_ENTRIES, BPF_F_NO_PREALLOC);

static __always_inline int first_inactive_handout(u64 pfn)
{
	u64 sub = pfn >> SUBSECTION_PFN_SHIFT, one = 1;
	u64 *n = inactive_handouts.lookup(&sub);
	if (n) {
		__sync_fetch_and_add(n, 1);
		return 0;
	}
	inactive_handouts.update(&sub, &one);
	return 1;
}

#ifdef WITH_RETURN
static __always_inline void on_return(void *ctx, u64 pfn, u64 page)
{
	u64 id = bpf_get_current_pid_tgid();
	int zero = 0;
	s64 stackid = -1;
	u32 context;
	struct stash *s = stash.lookup(&zero);
#ifdef WITH_ENTRY
	if (s && s->pid_tgid == id && s->pfn == pfn) {
		stackid = s->stackid;
		context = s->context;
		s->pid_tgid = 0;
	} else {
		int i = 1;
		bump(call_stats.lookup(&i));
		context = current_context(id);
	}
#else
	context = current_context(id);
#endif
#ifdef WITH_SPLIT
	add_calls(stackid, context, page ? RESULT_PAGE : RESULT_NULL, 1);
#endif
#ifdef WITH_ACTIVE
	if (page && seeded() && !pfn_is_active(pfn) && first_inactive_handout(pfn)) {
		if (stackid < 0)
			stackid = capture_stack(ctx);
		struct event e = {};
		fill_task(&e);
		e.kind = EV_HANDOUT_INACTIVE;
		e.context = context;
		e.pfn = pfn;
		e.nr_pages = 1;
		e.stackid = stackid;
		emit(&e);
	}
#endif
#ifdef WITH_RACES
	record_hold(id, pfn, page != 0, stackid, context);
#endif
}

#ifdef RETURN_FEXIT
KRETFUNC_PROBE(pfn_to_online_page, unsigned long pfn, void *ret)
{
	on_return(ctx, pfn, (u64)ret);
	return 0;
}
#else
/* without BTF trampolines: the pfn comes from the entry probe's stash */
int kmi_p2op_return(struct pt_regs *ctx)
{
	int zero = 0;
	struct stash *s = stash.lookup(&zero);
	if (!s || s->pid_tgid != bpf_get_current_pid_tgid())
		return 0;
	on_return(ctx, s->pfn, PT_REGS_RC(ctx));
	return 0;
}
#endif
#endif
