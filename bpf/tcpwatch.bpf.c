// SPDX-License-Identifier: Apache-2.0
//
// tcpwatch kernel programs (bcc C). Compiled by agent/tcpwatch/loader.py, which picks
// the variant with -D defines from what the running kernel offers:
//   TW_STATE_TP      1: sock:inet_sock_set_state, 2: tcp:tcp_set_state (4.15), 3: kprobe tcp_set_state
//   TW_CLOSE_HOOK    0: none, 1: fentry tcp_close, 2: kprobe tcp_close
//   TW_HAVE_*        optional tracepoints that exist on this kernel
//   TW_STACKS        take kernel/user stacks (--stacks)
//   TW_PERF_BUFFER   perf buffer instead of the ring buffer (kernels before 5.8)
//   TW_RAW_SOCK_HOOKS 1: recv/send length hooks as raw tracepoints (see there), 0: classic
//   TW_RESCUE        1: a raw tracepoint program handles the firings the classic state
//                    program does not run for (see "rescue" below); top may then run on
//                    raw programs alone (TW_CFG_CW_RAW, see "top's raw path")
//   TW_HAVE_TASK_REGS the current syscall's number can be read (x86-64, 5.15+): at offset
//                    TW_REGS_NR_OFF of the saved registers, compared with TW_NR_CLOSE,
//                    TW_NR_CLOSE_RANGE, TW_NR_SHUTDOWN (see outcome_of)
//   TW_MAX_SOCKS, TW_RB_PAGES  map and ring buffer sizes
// User input never reaches this text: filters live in maps written after load.
//
// No kernel header is included on the tracepoint paths: tracepoint arguments carry
// everything except the network namespace, which is read through two offsets that
// the loader calibrates at start-up (TW_CFG_NET_OFF, TW_CFG_NETNS_OFF). The raw programs
// read the tuple from struct sock_common at offsets checked the same way.

#if TW_STATE_TP == 3 || TW_CLOSE_HOOK != 0
#include <net/sock.h>
#endif
#include "tcpwatch.h"

#ifndef TW_MAX_SOCKS
#define TW_MAX_SOCKS 262144
#endif
#ifndef TW_RB_PAGES
#define TW_RB_PAGES 2048
#endif

#define TW_AF_INET 2
#define TW_AF_INET6 10
#define TW_IPPROTO_TCP 6
#define TS_ESTABLISHED 1
#define TS_SYN_SENT 2
#define TS_SYN_RECV 3
#define TS_FIN_WAIT1 4
#define TS_CLOSE 7
#define TS_CLOSE_WAIT 8
#define TS_LISTEN 10

// What the current task is doing, to tell why a socket changes state in its context.
#define TASK_CLOSE 1
#define TASK_SHUTDOWN 2
#define TASK_EXIT 3
#define TASK_WINDOW_NS 1000000000ULL // a flag older than this is stale

// Per-socket state, keyed by the address of struct sock.
struct tw_sock {
	u64 state_ts;    // entry into the current state, 0 if before tracing
	u64 cw_ts;       // entry into CLOSE_WAIT, 0 if not in it or before tracing
	u64 fin_read_ts; // owner read EOF
	u64 close_ts;    // tcp_close() entered (close hook only)
	u32 pid;
	u32 tid;
	u32 netns;
	u16 sport;       // local port as last seen (the rescue program's fallback, see there)
	u8 state;        // current state, 0 if unknown
	u8 owner;        // 0, TW_F_OWNER or TW_F_OWNER_LISTENER
	u8 rst;          // RST received
	u8 flags;        // TW_F_EOF_READ | TW_F_READ_IN_CW
	u8 sent;         // its last transition passed the filters: its EOF event may go too
	char comm[TW_COMM_LEN];
};

// What a thread is doing, in a slot of `tasks` picked by its tid (a thread whose tid shares
// the slot overwrites it: then that close() is judged by the transition alone).
struct tw_task {
	u64 ts;
	u32 tid;
	u32 what;
};
#define TW_TASK_SLOTS 65536 // a power of two

struct tw_listen_key {
	u32 netns;
	u16 family;
	u16 port;
};

struct tw_owner {
	u32 pid;
	u32 tid;
	char comm[TW_COMM_LEN];
};

struct tw_err {
	u64 ts;
	u16 sport;
	u16 dport;
};

BPF_TABLE("lru_hash", u64, struct tw_sock, socks, TW_MAX_SOCKS);
// An array, not a hash: close() runs all the time on a busy host, and an array slot costs a
// fraction of an LRU hash update.
BPF_ARRAY(tasks, struct tw_task, TW_TASK_SLOTS);
BPF_TABLE("lru_hash", struct tw_listen_key, struct tw_owner, listeners, 65536);
// One element holding every setting: a single lookup per event reads them all.
struct tw_cfg {
	u64 v[TW_CFG_SLOTS];
};
BPF_ARRAY(config, struct tw_cfg, 1);
BPF_PERCPU_ARRAY(counters, u64, TW_CNT_SLOTS);
BPF_PERCPU_ARRAY(errs, struct tw_err, 1);
BPF_ARRAY(calib, struct tw_calib, 2);
// Sockets in CLOSE_WAIT now (TW_CFG_CW_MAP): top reads this instead of every event.
#ifndef TW_MAX_CW
#define TW_MAX_CW 262144
#endif
BPF_HASH(cw, u64, struct tw_cw, TW_MAX_CW);
// top's raw path, which keeps no socket map: the task last seen reading or writing a TCP
// socket not in CLOSE_WAIT yet (a server reads the request before the client's FIN), taken
// into its `cw` entry when the FIN comes, dropped when the socket closes.
BPF_TABLE("lru_hash", u64, struct tw_owner, seen_owner, TW_MAX_SOCKS);
BPF_HASH(pid_filter, u32, u8, 1024);
// --port: a bit per port (port p is bit p % 64 of word p / 64): an array lookup the JIT
// inlines, instead of a hash lookup for each end of every transition.
BPF_ARRAY(port_bits, u64, 1024);
#ifdef TW_STACKS
BPF_STACK_TRACE(stacks, 16384);
#endif

static __always_inline u64 count(int slot)
{
	u64 *v = counters.lookup(&slot);

	if (!v)
		return 0;
	// One atomic add: the rescue program may run in a softirq between a load and a store.
	__sync_fetch_and_add(v, 1);
	return *v;
}

// --- output: ring buffer (5.8+) or perf buffer, same event, same loss accounting ---
#ifdef TW_PERF_BUFFER
BPF_PERF_OUTPUT(events);
// One event under construction per nesting level of this CPU (task, softirq, hardirq, NMI):
// a raw recv/send hook does not hold bpf_prog_active, so a softirq state transition can run
// the state program in the middle of the hook's event; with one slot it would overwrite it.
#define TW_SCRATCH_LEVELS 4
BPF_PERCPU_ARRAY(scratch, struct tw_event, TW_SCRATCH_LEVELS);
BPF_PERCPU_ARRAY(scratch_level, u32, 1);

// A nested program that comes between the read and the write of the level takes the same
// slot, but it is done with it before this one goes on: a nested run ends before the one it
// interrupted resumes.
static __always_inline struct tw_event *event_reserve(void)
{
	int zero = 0;
	u32 *level = scratch_level.lookup(&zero);
	struct tw_event *e;
	u32 i;

	if (!level) {
		count(TW_CNT_LOST);
		return 0;
	}
	i = *level;
	e = i < TW_SCRATCH_LEVELS ? scratch.lookup(&i) : 0;
	if (!e) {
		count(TW_CNT_LOST);
		return 0;
	}
	*level = i + 1;
	return e;
}

// Userspace asks for a wakeup every N events per CPU (wakeup_events) and drains on a timer.
static __always_inline void event_submit(void *ctx, struct tw_event *e)
{
	int zero = 0;
	u32 *level;

	if (events.perf_submit(ctx, e, sizeof(*e)) < 0)
		count(TW_CNT_LOST);
	else
		count(TW_CNT_EVENTS);
	level = scratch_level.lookup(&zero);
	if (level && *level)
		*level -= 1;
}
#else
BPF_RINGBUF_OUTPUT(events, TW_RB_PAGES);

static __always_inline struct tw_event *event_reserve(void)
{
	struct tw_event *e = events.ringbuf_reserve(sizeof(struct tw_event));

	if (!e)
		count(TW_CNT_LOST);
	return e;
}

// Wake userspace once per TW_WAKE_EVERY events per CPU; between wakeups it drains on
// a timer. A wakeup per event costs ~15x the rest of this program (kernel-notes.md).
#define TW_WAKE_EVERY 4096
static __always_inline void event_submit(void *ctx, struct tw_event *e)
{
	u64 n = count(TW_CNT_EVENTS);

	events.ringbuf_submit(e, (n % TW_WAKE_EVERY) ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP);
}
#endif

// netns inode of a socket through the calibrated offsets; 0 while unknown.
static __always_inline u32 sock_netns(struct tw_cfg *cf, u64 sk)
{
	u64 net_off = cf->v[TW_CFG_NET_OFF], inum_off = cf->v[TW_CFG_NETNS_OFF];
	void *net = 0;
	u32 inum = 0;

	if (!net_off || !inum_off)
		return 0;
	bpf_probe_read_kernel(&net, sizeof(net), (void *)(sk + net_off));
	if (!net)
		return 0;
	bpf_probe_read_kernel(&inum, sizeof(inum), net + inum_off);
	return inum;
}

// TCP sockets point at tcp_prot or tcpv6_prot (skc_prot, checked on the calibration
// sockets); SCTP, MPTCP... go through the same tracepoints.
static __always_inline int tcp_prot(struct tw_cfg *cf, u64 prot)
{
	return prot && (prot == cf->v[TW_CFG_TCP_PROT] || prot == cf->v[TW_CFG_TCPV6_PROT]);
}

static __always_inline int is_tcp(struct tw_cfg *cf, u64 sk)
{
	u64 prot = 0;

	bpf_probe_read_kernel(&prot, sizeof(prot), (void *)(sk + cf->v[TW_CFG_PROT_OFF]));
	return tcp_prot(cf, prot);
}

#ifdef TW_HAVE_TASK_REGS
// The number of the syscall the current task is in, from the registers it entered the kernel
// with (x86-64: orig_ax, at an offset fixed by the user ABI; the loader passes it, and sets
// TW_HAVE_TASK_REGS only where the helpers load). Read as plain memory, and trusted
// (TW_CFG_SYSNR) only once the calibration has seen listen() and close() read right. It
// replaces the syscall tracepoints, which, once attached, send every syscall of every task
// on the host through the slow path. (No header for struct pt_regs: linux/ptrace.h alone
// adds half a second to the compile.)
static __always_inline s64 current_sysnr(void)
{
	void *regs = (void *)bpf_task_pt_regs(bpf_get_current_task_btf());
	s64 nr = -1;

	bpf_probe_read_kernel(&nr, sizeof(nr), regs + TW_REGS_NR_OFF);
	return nr;
}
#endif

// Dump the head of struct sock (and of its struct net) for the loader's calibration
// sockets, with the tracepoint's view of them, so the loader can find and check the
// offsets instead of trusting headers.
static __always_inline void calibrate(struct tw_cfg *cf, u64 sk, int old, int new, u16 family,
				      u16 sport, u16 dport, u8 *saddr, u8 *daddr)
{
	u64 port = cf->v[TW_CFG_CALIB_PORT];
	u64 net_off = cf->v[TW_CFG_NET_OFF];
	int idx;
	struct tw_calib *c;

	if (!port || sport != port)
		return;
	// The listen() of the loader's socket (bound, so the port is in place), and the
	// child it accepts (connected: every field of the tuple is set).
	if (old == TS_CLOSE && new == TS_LISTEN)
		idx = 0;
	else if (old == TS_SYN_RECV && new == TS_ESTABLISHED)
		idx = 1;
	else if (old == TS_ESTABLISHED && new == TS_FIN_WAIT1)
		idx = 1; // the loader's close() of the child: only the syscall is read
	else
		return;
	c = calib.lookup(&idx);
	if (!c)
		return;
#ifdef TW_HAVE_TASK_REGS
	c->sysnr = current_sysnr();
#endif
	if (new == TS_FIN_WAIT1)
		return;
	bpf_probe_read_kernel(c->sock, sizeof(c->sock), (void *)sk);
	bpf_probe_read_kernel(c->inet, sizeof(c->inet), (void *)(sk + TW_CALIB_INET_AT));
	__builtin_memcpy(c->saddr, saddr, 16);
	__builtin_memcpy(c->daddr, daddr, 16);
	c->family = family;
	c->sport = sport;
	c->dport = dport;
	if (idx || !net_off)
		return;
	bpf_probe_read_kernel(&c->net, sizeof(c->net), (void *)(sk + net_off));
	if (c->net)
		bpf_probe_read_kernel(c->bytes, sizeof(c->bytes), (void *)c->net);
}

static __always_inline void set_owner_current(struct tw_sock *s)
{
	u64 id = bpf_get_current_pid_tgid();

	s->pid = id >> 32;
	s->tid = (u32)id;
	s->owner = TW_F_OWNER;
	bpf_get_current_comm(&s->comm, sizeof(s->comm));
}

static __always_inline int port_bit(u16 port)
{
	u32 word = port >> 6;
	u64 *bits = port_bits.lookup(&word);

	return bits && ((*bits >> (port & 63)) & 1);
}

// --port: a local or remote port in `port_bits` (always, without the filter).
static __always_inline int port_wanted(struct tw_cfg *cf, u16 sport, u16 dport)
{
	return !cf->v[TW_CFG_FILTER_PORT] || port_bit(sport) || port_bit(dport);
}

static __always_inline int wanted(struct tw_cfg *cf, struct tw_sock *s, int old, int new,
				  u16 sport, u16 dport)
{
	u64 mask = cf->v[TW_CFG_STATE_MASK];

	if (mask && !(mask & ((1ULL << old) | (1ULL << new))))
		return 0;
	if (!port_wanted(cf, sport, dport))
		return 0;
	if (cf->v[TW_CFG_FILTER_PID]) {
		// An unknown owner may still be the wanted one: let CLOSE_WAIT traffic through
		// and let userspace decide from /proc who holds the socket.
		if (!s->owner)
			return old == TS_CLOSE_WAIT || new == TS_CLOSE_WAIT;
		if (!pid_filter.lookup(&s->pid))
			return 0;
	}
	return 1;
}

// Why did the socket leave CLOSE_WAIT? Judged from what happened to it and to the task.
static __always_inline u8 outcome_of(struct tw_cfg *cf, u8 rst, u64 close_ts, u64 now,
				     u16 sport, u16 dport)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct tw_task *t;
	struct tw_err *e;
	int zero = 0;

	// RST and errors arrive in softirq: current is unrelated, so these come first.
	if (rst)
		return TW_OUT_RESET;
	e = errs.lookup(&zero);
	if (e && e->ts && now - e->ts < 1000000 && e->sport == sport && e->dport == dport)
		return TW_OUT_ERROR;
	u32 slot = tid & (TW_TASK_SLOTS - 1);

	t = tasks.lookup(&slot);
	if (t && t->tid == tid && now - t->ts < TASK_WINDOW_NS) {
		if (t->what == TASK_EXIT)
			return TW_OUT_EXIT;
		if (t->what == TASK_SHUTDOWN)
			return TW_OUT_SHUTDOWN;
		if (t->what == TASK_CLOSE)
			return TW_OUT_CLOSE;
	}
#ifdef TW_HAVE_TASK_REGS
	// Without the syscall tracepoints: the syscall this task is in. A CLOSE_WAIT exit
	// without RST or error runs in process context (tcp_close(), tcp_shutdown(), or
	// tcp_disconnect()), so that is the closer's own syscall. (A 32-bit task numbers its
	// syscalls otherwise: its 3 is read() and 48 signal(), neither of which ends a
	// CLOSE_WAIT; the syscall tracepoints never saw its close() either.)
	if (cf->v[TW_CFG_SYSNR]) {
		s64 nr = current_sysnr();

		if (nr == TW_NR_CLOSE || nr == TW_NR_CLOSE_RANGE)
			return TW_OUT_CLOSE;
		if (nr == TW_NR_SHUTDOWN) // SHUT_RD changes no state: it never gets here
			return TW_OUT_SHUTDOWN;
	}
#endif
	// tcp_close() entry seen by the close hook, in the closing task.
	if (close_ts && now - close_ts < TASK_WINDOW_NS)
		return TW_OUT_CLOSE;
	return TW_OUT_NONE;
}

static __always_inline void emit_state(void *ctx, u64 sk, struct tw_sock *s, int old, int new,
				       u16 family, u16 sport, u16 dport, u8 *saddr, u8 *daddr,
				       u64 now, u64 prev_ns, u64 cw_ns, u8 flags, u8 outcome)
{
	struct tw_event *e;

	e = event_reserve();
	if (!e)
		return;
	e->ts_ns = now;
	e->sk = sk;
	e->prev_ns = prev_ns;
	e->cw_ns = cw_ns;
	e->fin_read_ns = s->fin_read_ts;
	__builtin_memcpy(e->saddr, saddr, 16);
	__builtin_memcpy(e->daddr, daddr, 16);
	e->pid = s->pid;
	e->tid = s->tid;
	__builtin_memcpy(e->comm, s->comm, TW_COMM_LEN);
	e->netns = s->netns;
	e->family = family;
	e->sport = sport;
	e->dport = dport;
	e->kind = TW_KIND_STATE;
	e->oldstate = old;
	e->newstate = new;
	e->outcome = outcome;
	e->pad = 0;
	e->flags = flags | s->owner | s->flags;
	e->kstack_id = -1;
	e->ustack_id = -1;
	if (flags & TW_F_ACTOR) {
		u64 id = bpf_get_current_pid_tgid();

		e->actor_pid = id >> 32;
		e->actor_tid = (u32)id;
		bpf_get_current_comm(&e->actor_comm, sizeof(e->actor_comm));
	} else {
		e->actor_pid = 0;
		e->actor_tid = 0;
		__builtin_memset(e->actor_comm, 0, TW_COMM_LEN);
	}
#ifdef TW_STACKS
	e->kstack_id = stacks.get_stackid(ctx, 0);
	if (flags & TW_F_ACTOR)
		e->ustack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
#endif
	event_submit(ctx, e);
}

static __always_inline void cw_enter(u64 sk, struct tw_sock *s, u16 family, u16 sport,
				     u16 dport, u8 *saddr, u8 *daddr, u64 now)
{
	struct tw_cw c = {};

	c.ts_ns = now;
	c.fin_read_ns = s->fin_read_ts;
	__builtin_memcpy(c.saddr, saddr, 16);
	__builtin_memcpy(c.daddr, daddr, 16);
	c.pid = s->pid;
	c.tid = s->tid;
	c.netns = s->netns;
	c.family = family;
	c.sport = sport;
	c.dport = dport;
	c.flags = s->owner | (s->flags & ~TW_F_READ_IN_CW);
	__builtin_memcpy(c.comm, s->comm, TW_COMM_LEN);
	if (cw.update(&sk, &c))
		count(TW_CNT_CW_FULL);
}

// The owner or the EOF flag of a socket in CLOSE_WAIT changed: refresh its `cw` entry.
static __always_inline void cw_refresh(u64 sk, struct tw_sock *s)
{
	struct tw_cw *c = cw.lookup(&sk);

	if (!c)
		return;
	c->pid = s->pid;
	c->tid = s->tid;
	__builtin_memcpy(c->comm, s->comm, TW_COMM_LEN);
	c->flags = s->owner | s->flags;
	c->fin_read_ns = s->fin_read_ts;
}

static __always_inline int on_state(void *ctx, u64 sk, int old, int new, u16 family, u16 sport,
				    u16 dport, u8 *saddr, u8 *daddr, u8 flags)
{
	u64 now = bpf_ktime_get_ns();
	u64 prev_ns = 0, cw_ns = 0;
	u8 outcome = TW_OUT_NONE;
	struct tw_sock *s, zero = {};

	int zero_key = 0;
	struct tw_cfg *cf = config.lookup(&zero_key);

	if (!cf)
		return 0;
	count(TW_CNT_TRANSITIONS);
	calibrate(cf, sk, old, new, family, sport, dport, saddr, daddr);
	// top (cw map): only what CLOSE_WAIT needs. Births (owner), entries and exits of
	// CLOSE_WAIT and deaths; the steps in between (SYN_SENT->ESTABLISHED, FIN_WAIT1->
	// FIN_WAIT2, ...) carry no time top shows, so they cost no socket lookup.
	if (cf->v[TW_CFG_CW_MAP] && old != TS_CLOSE && old != TS_LISTEN && new != TS_LISTEN &&
	    old != TS_CLOSE_WAIT && new != TS_CLOSE_WAIT && new != TS_CLOSE)
		return 0;

	s = socks.lookup(&sk);
	if (!s) {
		// A socket is born CLOSE -> SYN_SENT/LISTEN, or LISTEN -> SYN_RECV when a
		// listener clones a child. Anything else was already there before tracing.
		if (old == TS_CLOSE || (old == TS_LISTEN && new == TS_SYN_RECV))
			zero.state_ts = now;
		else
			count(TW_CNT_SOCK_MISS);
		zero.state = old;
		zero.netns = sock_netns(cf, sk);
		if (socks.update(&sk, &zero)) {
			count(TW_CNT_SOCK_FULL);
			return 0;
		}
		count(TW_CNT_SOCK_INSERT);
		s = socks.lookup(&sk);
		if (!s)
			return 0;
	}
	if (s->state_ts)
		prev_ns = now - s->state_ts;
	else
		flags |= TW_F_PREV_UNKNOWN;

	// Owner learnt from transitions that run in the owner's process context:
	// connect() moves CLOSE -> SYN_SENT, listen() CLOSE -> LISTEN. A child socket
	// inherits the owner of its listener (the FIN may arrive before accept()).
	if (old == TS_CLOSE && (new == TS_SYN_SENT || new == TS_LISTEN)) {
		set_owner_current(s);
		flags |= TW_F_ACTOR;
		if (new == TS_LISTEN) {
			struct tw_listen_key lk = {.netns = s->netns, .family = family, .port = sport};
			struct tw_owner o = {.pid = s->pid, .tid = s->tid};

			__builtin_memcpy(o.comm, s->comm, TW_COMM_LEN);
			listeners.update(&lk, &o);
		}
	} else if (old == TS_LISTEN && new == TS_SYN_RECV && !s->owner) {
		struct tw_listen_key lk = {.netns = s->netns, .family = family, .port = sport};
		struct tw_owner *o = listeners.lookup(&lk);

		if (o) {
			s->pid = o->pid;
			s->tid = o->tid;
			__builtin_memcpy(s->comm, o->comm, TW_COMM_LEN);
			s->owner = TW_F_OWNER_LISTENER;
		}
	}

	// Leaving CLOSE_WAIT: how long, why, and who did it. Only here is the current
	// task trusted as an actor: other transitions to CLOSE often run in softirq
	// inside the *peer's* close() on loopback.
	if (old == TS_CLOSE_WAIT) {
		if (s->cw_ts)
			cw_ns = now - s->cw_ts;
		else
			flags |= TW_F_CW_UNKNOWN;
		outcome = outcome_of(cf, s->rst, s->close_ts, now, sport, dport);
		// close/shutdown/exit run in the process that holds the socket.
		if (outcome == TW_OUT_CLOSE || outcome == TW_OUT_SHUTDOWN || outcome == TW_OUT_EXIT) {
			flags |= TW_F_ACTOR;
			if (!s->owner)
				set_owner_current(s);
		}
	}

	s->sent = cf->v[TW_CFG_ENABLED] && wanted(cf, s, old, new, sport, dport);
	if (cf->v[TW_CFG_CW_MAP]) {
		// top: the map holds who is in CLOSE_WAIT; only exits (with their duration and
		// outcome) travel. An exit is sent even if the map was full at its entry.
		if (old == TS_CLOSE_WAIT)
			cw.delete(&sk);
		else if (new == TS_CLOSE_WAIT && s->sent)
			cw_enter(sk, s, family, sport, dport, saddr, daddr, now);
		if (old != TS_CLOSE_WAIT)
			goto done;
	}
	if (s->sent)
		emit_state(ctx, sk, s, old, new, family, sport, dport, saddr, daddr, now, prev_ns,
			   cw_ns, flags, outcome);
	else
		count(TW_CNT_FILTERED);
done:

	if (new == TS_CLOSE) {
		if (old == TS_LISTEN) {
			struct tw_listen_key lk = {.netns = s->netns, .family = family, .port = sport};

			listeners.delete(&lk);
		}
		if (!socks.delete(&sk))
			count(TW_CNT_SOCK_DELETE);
		return 0;
	}
	s->state = new;
	s->state_ts = now;
	if (sport)
		s->sport = sport;
	if (new == TS_CLOSE_WAIT) {
		s->cw_ts = now;
		s->flags &= ~TW_F_READ_IN_CW;
	}
	return 0;
}

#if TW_STATE_TP == 1
#if TW_RESCUE
// --- rescue: the firings the classic state program does not run for -------------------
// A classic tracepoint program is skipped when another classic BPF program already runs
// on this CPU: a softirq transition interrupting our close, exit or state program, about
// 0.1-0.3 % of transitions in a saturating churn (the kernel counts them: recursion
// misses). A raw tracepoint program on the same event guards only against itself, and
// runs after the classic one for each firing (probes run in the order they were attached;
// the loader attaches it last and checks the order at start-up). So the classic program
// records every firing it runs for in `ran` (per CPU), and the raw one takes the record
// out; a firing it finds no record of, it handles itself: that is a skip. Records are
// kept in small sets keyed by the firing, not in one slot, because a softirq can fire
// between the two programs of one firing, adding and taking out records of its own.
// Records can stay behind: when the rescue program is itself skipped (a firing nested in
// its own run, which the state program handled), or while the loader puts the rescue program
// back after a raw state program. A free way is used first, so such a record could stay for
// good, and a later skipped firing matching it (the same socket address, reused by a new
// socket, making the same transition; freed sockets' memory is reused at once) was taken
// for handled: 2-6 in 3 million transitions. So the rescue program, as it ends, drops the
// records pushed during its run (the firings nested in it are over by then: a record of one
// still there is one whose rescue was skipped), and a record older than TW_RAN_RECENT pushes
// is taken for one left behind. A firing's own record is at most a softirq run of nested
// firings old (their pushes come in between), far fewer. The rescue program is also skipped
// in the kernel's own instructions just before and after it (empty programs are skipped there
// too: scripts/bench's floor modes), out of reach of the drop; so a record that is not the
// last push is checked against trace's socket map or top's `cw` map (see rescue()).
#define TW_RAN_SETS 16 // a power of two
#define TW_RAN_RECENT 4096
struct tw_ran_way {
	u64 sk;  // 0: free
	u32 seq; // push order: the older way of a full set is reused
	u16 st;  // old << 8 | new
	u16 pad;
};
struct tw_ran {
	struct tw_ran_way w[TW_RAN_SETS][2];
	u32 seq;
};
BPF_PERCPU_ARRAY(ran, struct tw_ran, 1);

static __always_inline u32 ran_set(u64 sk, u16 st)
{
	return ((sk >> 6) ^ (sk >> 11) ^ st) & (TW_RAN_SETS - 1);
}

static __always_inline void ran_push(u64 sk, u16 st)
{
	int zero = 0;
	struct tw_ran *r = ran.lookup(&zero);
	struct tw_ran_way *w;
	u32 set = ran_set(sk, st), seq;

	if (!r)
		return;
	seq = ++r->seq;
	w = &r->w[set][0];
	if (w->sk && (!r->w[set][1].sk || (s32)(r->w[set][1].seq - w->seq) < 0))
		w = &r->w[set][1];
	w->sk = sk;
	w->st = st;
	w->seq = seq;
}

// How many pushes ago the state program recorded this socket and transition (0: the last
// push, as for a firing with nothing nested in it), -1 if it did not recently; the records
// are forgotten.
static __always_inline s32 ran_pop(struct tw_ran *r, u64 sk, u16 st)
{
	u32 set = ran_set(sk, st);
	s32 age = -1;

#pragma unroll
	for (int i = 0; i < 2; i++) {
		struct tw_ran_way *w = &r->w[set][i];

		if (w->sk == sk && w->st == st) {
			u32 d = r->seq - w->seq;

			w->sk = 0;
			if (d < TW_RAN_RECENT && (age < 0 || d < (u32)age))
				age = d;
		}
	}
	return age;
}

// Forget the records pushed after `seq0`: called as the rescue program ends, when every
// firing nested in its run is over.
static __always_inline void ran_drop_after(struct tw_ran *r, u32 seq0)
{
	if (r->seq == seq0)
		return;
#pragma unroll
	for (int i = 0; i < TW_RAN_SETS; i++) {
		if ((s32)(r->w[i][0].seq - seq0) > 0)
			r->w[i][0].sk = 0;
		if ((s32)(r->w[i][1].seq - seq0) > 0)
			r->w[i][1].sk = 0;
	}
}
#endif

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	u8 saddr[16] = {}, daddr[16] = {};

#if TW_RESCUE
	ran_push((u64)args->skaddr, (u16)(args->oldstate << 8 | args->newstate));
#endif
	if (args->protocol != TW_IPPROTO_TCP)
		return 0;
	if (args->family == TW_AF_INET) {
		__builtin_memcpy(saddr, args->saddr, 4);
		__builtin_memcpy(daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(saddr, args->saddr_v6, 16);
		__builtin_memcpy(daddr, args->daddr_v6, 16);
	}
	return on_state(args, (u64)args->skaddr, args->oldstate, args->newstate, args->family,
			args->sport, args->dport, saddr, daddr, 0);
}

#if TW_RESCUE
// The raw tracepoint has no tuple: it comes from struct sock_common, at offsets the loader
// checked on its calibration sockets (TW_CFG_RESCUE stays 0 otherwise: the skips stay
// counted, missed = the kernel's skips - rescued).
// The head of struct sock_common (loader.check_rescue_layout() reads the same "=IIIHHH").
struct tw_skc_head {
	u32 daddr;
	u32 rcv_saddr;
	u32 hash;
	u16 dport; // network byte order
	u16 num;   // host byte order
	u16 family;
};

// The head of struct sock_common up to and including skc_prot, in one read: a raw state
// program reads each socket once per firing instead of twice (the protocol, then the tuple);
// each probe read costs ~30 ns. TW_SKC_PROT_AT is the loader's SKC_PROT_OFFSET, the offset it
// checks on the calibration sockets and sets in TW_CFG_PROT_OFF with their protocols; until
// then TW_CFG_TCP_PROT and TW_CFG_TCPV6_PROT are 0 and no socket passes for TCP here.
#ifndef TW_SKC_PROT_AT
#define TW_SKC_PROT_AT 40
#endif
struct tw_skc_wide {
	struct tw_skc_head h;
	u8 pad[TW_SKC_PROT_AT - sizeof(struct tw_skc_head)];
	u64 prot;
};

// The tuple of a TCP socket from its struct sock_common, at the offsets the loader checked on
// its calibration sockets (TW_CFG_RESCUE); 0 if the socket is not TCP or its family unchecked.
static __always_inline int skc_tuple(struct tw_cfg *cf, u64 sk, struct tw_skc_head *h,
				     u8 *saddr, u8 *daddr)
{
	u64 mode = cf->v[TW_CFG_RESCUE];
	struct tw_skc_wide w;

	if (bpf_probe_read_kernel(&w, sizeof(w), (void *)sk) || !tcp_prot(cf, w.prot))
		return 0;
	__builtin_memcpy(h, &w.h, sizeof(*h));
	// On the way to CLOSE, inet_put_port() zeroes skc_num of a socket bound without an
	// explicit port; inet_sport (what the tracepoint shows) stays: read it where the loader
	// found it.
	if (!h->num && cf->v[TW_CFG_SPORT_OFF]) {
		u16 sport = 0;

		bpf_probe_read_kernel(&sport, sizeof(sport), (void *)(sk + cf->v[TW_CFG_SPORT_OFF]));
		h->num = ntohs(sport);
	}
	if (h->family == TW_AF_INET && (mode & 1)) {
		__builtin_memcpy(saddr, &h->rcv_saddr, 4);
		__builtin_memcpy(daddr, &h->daddr, 4);
		return 1;
	}
	if (h->family == TW_AF_INET6 && (mode & 2)) {
		u64 off = cf->v[TW_CFG_V6_OFF];

		bpf_probe_read_kernel(daddr, 16, (void *)(sk + off));
		bpf_probe_read_kernel(saddr, 16, (void *)(sk + off + 16));
		return 1;
	}
	return 0;
}

// --- top's raw path (TW_CFG_CW_RAW) -----------------------------------------------------
// top needs the sockets in CLOSE_WAIT and their exits, nothing else. Once the calibration
// has checked the struct reads, the loader replaces the classic program with a raw one,
// tw_top: no perf copy of every firing, no socket map; the other eight transitions of a
// connection cost a few compares. Short stays are counted in the `exits` map instead of
// sent. A raw program is skipped only while it is itself running on the CPU (a softirq
// transition nested in it, ~1 in 10,000 firings here), so tw_rescue stays attached after it
// and takes over every firing tw_top left no record of, as it does for the classic program:
// missed = tw_top's recursion misses - what tw_rescue took over.
#ifndef TW_MAX_EXIT_KEYS
#define TW_MAX_EXIT_KEYS 4096
#endif
BPF_HASH(exits, struct tw_exit_key, struct tw_exit_agg, TW_MAX_EXIT_KEYS);
BPF_ARRAY(exit_zero, struct tw_exit_agg, 1); // never written: a new key's first value

// Histogram bucket of a duration (see TW_EXIT_* in tcpwatch.h; schema.exit_bucket() is the
// same computation in Python: keep the two alike).
static __always_inline u64 exit_bucket(u64 ns)
{
	u64 v = ns >> TW_EXIT_SHIFT, x;
	u32 log = 0;

	if (v < TW_EXIT_SUB)
		return v;
	if (v >> TW_EXIT_MAX_LOG)
		return TW_EXIT_BUCKETS - 1;
	x = v;
	if (x >> 32) { log += 32; x >>= 32; }
	if (x >> 16) { log += 16; x >>= 16; }
	if (x >> 8) { log += 8; x >>= 8; }
	if (x >> 4) { log += 4; x >>= 4; }
	if (x >> 2) { log += 2; x >>= 2; }
	if (x >> 1)
		log += 1;
	return (log - TW_EXIT_SUB_BITS + 1) * TW_EXIT_SUB +
	       ((v >> (log - TW_EXIT_SUB_BITS)) & (TW_EXIT_SUB - 1));
}

// Count an exit in `exits`; 0 if the map is full (the caller sends it instead).
static __always_inline int exit_count(struct tw_cfg *cf, struct tw_sock *s, u8 who, u8 *daddr,
				      u16 family, u16 sport, u16 dport, u8 outcome, int new,
				      u64 cw_ns)
{
	struct tw_exit_key k;
	struct tw_exit_agg *a, *z;
	u64 lo = cf->v[TW_CFG_EPH_LO], hi = cf->v[TW_CFG_EPH_HI], b;
	int zero = 0;

	__builtin_memset(&k, 0, sizeof(k));
	__builtin_memcpy(k.daddr, daddr, 16);
	k.netns = s->netns;
	k.family = family;
	k.sport = sport;
	// A server socket's peer port is a client's ephemeral one: one key per connection
	// otherwise. top groups those by the peer's address alone anyway (model.remote_group).
	k.dport = (lo <= dport && dport <= hi && !(lo <= sport && sport <= hi)) ? 0 : dport;
	k.outcome = outcome;
	k.newstate = new;
	k.who = who;
	if (who == TW_F_OWNER) {
		k.pid = s->pid;
		__builtin_memcpy(k.comm, s->comm, TW_COMM_LEN);
	} else {
		k.pid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(&k.comm, sizeof(k.comm));
	}
	z = exit_zero.lookup(&zero);
	if (!z)
		return 0;
	a = exits.lookup_or_try_init(&k, z);
	if (!a)
		return 0;
	b = exit_bucket(cw_ns);
	asm volatile("" : "+r"(b)); // one register for the check and the index (verifier)
	if (b >= TW_EXIT_BUCKETS)
		return 0;
	__sync_fetch_and_add(&a->count, 1);
	__sync_fetch_and_add(&a->hist[b], 1);
	return 1;
}

// Does tw_top keep this socket's CLOSE_WAIT entry? Tracing on, a TCP socket (its tuple read
// into h, saddr, daddr), on a wanted port.
static __always_inline int cw_entry_wanted(struct tw_cfg *cf, u64 sk, struct tw_skc_head *h,
					   u8 *saddr, u8 *daddr)
{
	return cf->v[TW_CFG_ENABLED] && skc_tuple(cf, sk, h, saddr, daddr) &&
	       port_wanted(cf, h->num, ntohs(h->dport));
}

static __always_inline int cw_raw_enter(struct tw_cfg *cf, u64 sk)
{
	struct tw_skc_head h = {};
	struct tw_listen_key lk = {};
	struct tw_owner *o;
	struct tw_cw c = {};
	u16 dport;
	u8 how = TW_F_OWNER;

	if (!cw_entry_wanted(cf, sk, &h, c.saddr, c.daddr))
		return 0;
	dport = ntohs(h.dport);
	c.ts_ns = bpf_ktime_get_ns();
	c.family = h.family;
	c.sport = h.num;
	c.dport = dport;
	c.netns = sock_netns(cf, sk);
	// The task seen on the socket before; else, until the owner touches it (cw_seen), the
	// socket is charged to its listener's owner.
	o = seen_owner.lookup(&sk);
	if (!o) {
		how = TW_F_OWNER_LISTENER;
		lk.netns = c.netns;
		lk.family = h.family;
		lk.port = h.num;
		o = listeners.lookup(&lk);
	}
	if (o) {
		c.pid = o->pid;
		c.tid = o->tid;
		__builtin_memcpy(c.comm, o->comm, TW_COMM_LEN);
		c.flags = how;
		if (how == TW_F_OWNER)
			seen_owner.delete(&sk); // the `cw` entry has it now
	}
	if (cw.update(&sk, &c))
		count(TW_CNT_CW_FULL);
	return 0;
}

static __always_inline int cw_raw_exit(void *ctx, struct tw_cfg *cf, u64 sk, int new)
{
	u64 now = bpf_ktime_get_ns(), cw_ns = 0;
	struct tw_cw *c = cw.lookup(&sk);
	struct tw_skc_head h = {};
	u8 saddr[16] = {}, daddr[16] = {};
	struct tw_sock s = {};
	u16 family, sport, dport;
	u8 flags = 0, outcome, who = 0;

	if (!cf->v[TW_CFG_ENABLED])
		return 0;
	if (c) {
		cw_ns = now - c->ts_ns;
		__builtin_memcpy(saddr, c->saddr, 16);
		__builtin_memcpy(daddr, c->daddr, 16);
		family = c->family;
		sport = c->sport;
		dport = c->dport;
		s.pid = c->pid;
		s.tid = c->tid;
		s.netns = c->netns;
		s.fin_read_ts = c->fin_read_ns;
		s.owner = c->flags & (TW_F_OWNER | TW_F_OWNER_LISTENER);
		s.flags = c->flags & (TW_F_EOF_READ | TW_F_READ_IN_CW);
		s.rst = c->rst;
		__builtin_memcpy(s.comm, c->comm, TW_COMM_LEN);
	} else {
		// In CLOSE_WAIT since before tracing (or the map was full at its entry).
		if (!skc_tuple(cf, sk, &h, saddr, daddr))
			return 0;
		family = h.family;
		sport = h.num;
		dport = ntohs(h.dport);
		if (!port_wanted(cf, sport, dport))
			return 0;
		s.netns = sock_netns(cf, sk);
		flags = TW_F_CW_UNKNOWN | TW_F_PREV_UNKNOWN;
	}
	outcome = outcome_of(cf, s.rst, 0, now, sport, dport);
	if (outcome == TW_OUT_CLOSE || outcome == TW_OUT_SHUTDOWN || outcome == TW_OUT_EXIT)
		flags |= TW_F_ACTOR;
	if (s.owner == TW_F_OWNER)
		who = TW_F_OWNER;
	else if (!s.owner && (flags & TW_F_ACTOR))
		who = TW_F_ACTOR;
	if (c) {
		cw.delete(&sk); // everything needed of it is copied above
		if (who && cw_ns < cf->v[TW_CFG_EXIT_DETAIL_NS]) {
			if (exit_count(cf, &s, who, daddr, family, sport, dport, outcome, new, cw_ns)) {
				count(TW_CNT_EXIT_AGG);
				return 0;
			}
			count(TW_CNT_EXIT_FULL);
		}
	}
	if (!s.owner && (flags & TW_F_ACTOR))
		set_owner_current(&s);
	emit_state(ctx, sk, &s, TS_CLOSE_WAIT, new, family, sport, dport, saddr, daddr, now,
		   cw_ns, cw_ns, flags, outcome);
	return 0;
}

static __always_inline int cw_raw(void *ctx, struct tw_cfg *cf, u64 sk, int old, int new)
{
	count(TW_CNT_TRANSITIONS); // top's events/s
	// Few sockets have an entry (most hand theirs to `cw`): look before deleting, since a
	// delete takes the bucket's lock even when there is nothing to delete.
	if (new == TS_CLOSE && seen_owner.lookup(&sk))
		seen_owner.delete(&sk);
	if (old == TS_CLOSE_WAIT)
		return cw_raw_exit(ctx, cf, sk, new);
	if (new == TS_CLOSE_WAIT)
		return cw_raw_enter(cf, sk);
	// Listeners: the owner a child is charged to until its own owner touches it.
	if (new == TS_LISTEN || old == TS_LISTEN && new == TS_CLOSE) {
		struct tw_skc_head h = {};
		u8 saddr[16], daddr[16];
		struct tw_listen_key lk = {};

		if (!skc_tuple(cf, sk, &h, saddr, daddr))
			return 0;
		lk.netns = sock_netns(cf, sk);
		lk.family = h.family;
		lk.port = h.num;
		if (new == TS_LISTEN) {
			u64 id = bpf_get_current_pid_tgid();
			struct tw_owner o = {.pid = id >> 32, .tid = (u32)id};

			bpf_get_current_comm(&o.comm, sizeof(o.comm));
			listeners.update(&lk, &o);
		} else {
			listeners.delete(&lk);
		}
	}
	return 0;
}

// top's state program (attached by the loader, before tw_rescue, only for top).
int tw_top(struct bpf_raw_tracepoint_args *ctx)
{
	int zero = 0, old = (int)ctx->args[1], new = (int)ctx->args[2];
	u64 sk = ctx->args[0];
	struct tw_cfg *cf;

	ran_push(sk, (u16)(old << 8 | new));
	cf = config.lookup(&zero);
	if (!cf || !cf->v[TW_CFG_CW_RAW])
		return 0;
	return cw_raw(ctx, cf, sk, old, new);
}

// --- trace's raw path (TW_CFG_RAW_STATE) ----------------------------------------------
// The same on_state() as the classic program, with the tuple read from struct sock_common
// (checked at start-up): no perf copy of the arguments, and no skips when another tracepoint
// program of ours runs on the CPU (a raw program is skipped only when it runs itself there),
// so far fewer firings for tw_rescue to take over. The local port is skc_num, or inet_sport
// (what the tracepoint reports) once skc_num is zeroed: see skc_tuple().
int tw_trace(struct bpf_raw_tracepoint_args *ctx)
{
	int zero = 0, old = (int)ctx->args[1], new = (int)ctx->args[2];
	u64 sk = ctx->args[0];
	u8 saddr[16] = {}, daddr[16] = {};
	struct tw_skc_head h = {};
	struct tw_cfg *cf;

	ran_push(sk, (u16)(old << 8 | new));
	cf = config.lookup(&zero);
	// Only with inet_sport's offset: skc_tuple() needs it for the port of a socket on its
	// way to CLOSE.
	if (!cf || !cf->v[TW_CFG_RAW_STATE] || !cf->v[TW_CFG_SPORT_OFF] ||
	    !skc_tuple(cf, sk, &h, saddr, daddr))
		return 0;
	return on_state(ctx, sk, old, new, h.family, h.num, ntohs(h.dport), saddr, daddr, 0);
}

// top: 1 if a record of tw_top's in `ran` that is not the last push is one left behind and
// tw_top did not run for this firing, by what tw_top would have done to the `cw` map: an exit
// deletes the socket's entry; an entry makes one where cw_entry_wanted() (unless the map is
// full). 0 where that cannot tell: take the record.
static __always_inline int top_ran_stale(struct tw_cfg *cf, u64 sk, int old, int new)
{
	struct tw_skc_head h = {};
	u8 saddr[16], daddr[16];

	if (!cf->v[TW_CFG_ENABLED] || old == new)
		return 0;
	if (old == TS_CLOSE_WAIT)
		return cw.lookup(&sk) != 0;
	if (new != TS_CLOSE_WAIT || cw.lookup(&sk))
		return 0;
	return cw_entry_wanted(cf, sk, &h, saddr, daddr);
}

// The rescue program, for the classic state program, tw_top or tw_trace. Attached by the loader
// after that one (not by bcc's autoload, whose order is not the source's).
static __always_inline int rescue(struct bpf_raw_tracepoint_args *ctx, struct tw_ran *r)
{
	int zero = 0, old = (int)ctx->args[1], new = (int)ctx->args[2];
	u64 sk = ctx->args[0];
	u8 saddr[16] = {}, daddr[16] = {};
	struct tw_skc_head h = {};
	struct tw_sock *s;
	struct tw_cfg *cf;

	s32 age = ran_pop(r, sk, (u16)(old << 8 | new));

	if (age == 0)
		return 0;
	cf = config.lookup(&zero);
	if (!cf)
		return 0;
	// A record older than the last push: firings nested between the two programs pushed
	// theirs after it (the state program ran), or it is one left behind, when the rescue
	// program was skipped for an earlier socket at this address making the same transition
	// (it is skipped in the kernel's own instructions around it too, where ran_drop_after()
	// cannot see), and the state program was skipped now. trace's socket map tells them
	// apart below; top's `cw` map for the transitions top keeps (top_ran_stale()); the
	// classic program with the `cw` map keeps no state to tell by, and takes the record.
	if (age > 0 && cf->v[TW_CFG_CW_MAP]) { // top (tw_top comes only with the `cw` map)
		if (!cf->v[TW_CFG_CW_RAW] || !top_ran_stale(cf, sk, old, new))
			return 0;
		count(TW_CNT_STALE_RAN);
	}
	if (cf->v[TW_CFG_CW_RAW]) {
		// An exit of a socket with no `cw` entry: tw_top handled it already (two nested
		// firings pushed its record out of `ran`), or the socket entered CLOSE_WAIT before
		// tracing. Not counted twice: left out of `rescued`, so it shows in `missed`.
		if (old == TS_CLOSE_WAIT && !cw.lookup(&sk))
			return 0;
		count(TW_CNT_RESCUED); // any transition: tw_top's skips are counted as a whole
		return cw_raw(ctx, cf, sk, old, new);
	}
	if (!cf->v[TW_CFG_RESCUE]) {
		if (age < 0) // no record: TCP or not, nothing here can tell without the layout
			count(TW_CNT_UNRAN);
		return 0;
	}
	if (!skc_tuple(cf, sk, &h, saddr, daddr))
		return 0;
	// Already in the new state: the state program did run, but its record in `ran` was
	// lost. Not a transition to handle twice. A transition to CLOSE leaves no entry to tell
	// by: without one, the state program ran for it (and deleted the entry), or the socket
	// was never seen (older than tracing, or evicted); a true skip of the latter is left
	// counted in `missed` rather than risk the former twice.
	s = socks.lookup(&sk);
	if (age > 0) {
		// The state program, had it run, would have moved the socket out of `old` (or
		// deleted it, for CLOSE); a socket still in `old` was skipped. Anything else
		// cannot tell, and the record is taken.
		if (!s || s->state != old || old == new)
			return 0;
		count(TW_CNT_STALE_RAN);
	} else if (s ? s->state == new : new == TS_CLOSE) {
		return 0;
	}
	count(TW_CNT_UNRAN);
	// skc_num zeroed on the way to CLOSE and inet_sport not found: the port this socket had.
	if (!h.num && new == TS_CLOSE && s)
		h.num = s->sport;
	count(TW_CNT_RESCUED);
	on_state(ctx, sk, old, new, h.family, h.num, ntohs(h.dport), saddr, daddr, TW_F_RESCUED);
	return 0;
}

int tw_rescue(struct bpf_raw_tracepoint_args *ctx)
{
	int zero = 0;
	struct tw_ran *r = ran.lookup(&zero);
	u32 seq0;

	if (!r)
		return 0;
	seq0 = r->seq;
	rescue(ctx, r);
	ran_drop_after(r, seq0);
	return 0;
}
#endif
#elif TW_STATE_TP == 2
// Linux 4.15: no family field; an IPv4 socket shows a v4-mapped or empty saddr_v6.
TRACEPOINT_PROBE(tcp, tcp_set_state)
{
	u8 saddr[16] = {}, daddr[16] = {};
	u16 family = TW_AF_INET6;
	u32 w0, w1, w2;

	__builtin_memcpy(&w0, args->saddr_v6, 4);
	__builtin_memcpy(&w1, args->saddr_v6 + 4, 4);
	__builtin_memcpy(&w2, args->saddr_v6 + 8, 4);
	if (w0 == 0 && w1 == 0 && (w2 == 0 || w2 == 0xffff0000))
		family = TW_AF_INET;
	if (family == TW_AF_INET) {
		__builtin_memcpy(saddr, args->saddr, 4);
		__builtin_memcpy(daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(saddr, args->saddr_v6, 16);
		__builtin_memcpy(daddr, args->daddr_v6, 16);
	}
	return on_state(args, (u64)args->skaddr, args->oldstate, args->newstate, family,
			args->sport, args->dport, saddr, daddr, 0);
}
#elif TW_STATE_TP == 3
// Last resort: kprobe on tcp_set_state(sk, state), fields read through the headers'
// struct layout (the loader checks the result on its calibration connection).
int kprobe__tcp_set_state(struct pt_regs *ctx, struct sock *sk, int state)
{
	u8 saddr[16] = {}, daddr[16] = {};
	u16 family = sk->__sk_common.skc_family;
	u16 sport = sk->__sk_common.skc_num;
	u16 dport = sk->__sk_common.skc_dport;
	int old = sk->__sk_common.skc_state;

	dport = ntohs(dport);
	if (family == TW_AF_INET) {
		bpf_probe_read_kernel(saddr, 4, &sk->__sk_common.skc_rcv_saddr);
		bpf_probe_read_kernel(daddr, 4, &sk->__sk_common.skc_daddr);
	} else if (family == TW_AF_INET6) {
		bpf_probe_read_kernel(saddr, 16, &sk->__sk_common.skc_v6_rcv_saddr);
		bpf_probe_read_kernel(daddr, 16, &sk->__sk_common.skc_v6_daddr);
	} else {
		return 0;
	}
	return on_state(ctx, (u64)sk, old, state, family, sport, dport, saddr, daddr, 0);
}
#endif

// --- owner: process-context hooks on the socket itself ----------------------------

// A per-socket event (EOF read, owner learnt) for a socket the filters let through:
// userspace ignores sockets it does not track, and unwanted ones must not crowd the
// buffer or the lost count.
static __always_inline void emit_sock(void *ctx, u64 sk, struct tw_sock *s, u8 kind, u64 ts)
{
	struct tw_event *e;
	int zero_key = 0;
	struct tw_cfg *cf;

	if (!s->sent)
		return;
	cf = config.lookup(&zero_key);
	if (cf && cf->v[TW_CFG_CW_MAP]) {
		cw_refresh(sk, s);
		return;
	}
	e = event_reserve();
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = ts;
	e->sk = sk;
	e->kind = kind;
	e->pid = s->pid;
	e->tid = s->tid;
	__builtin_memcpy(e->comm, s->comm, TW_COMM_LEN);
	e->netns = s->netns;
	e->oldstate = s->state;
	e->newstate = s->state;
	e->flags = s->owner | s->flags;
	e->fin_read_ns = s->fin_read_ts;
	e->kstack_id = -1;
	e->ustack_id = -1;
	event_submit(ctx, e);
}

// top's raw path: the socket's `cw` entry is all there is (only sockets in CLOSE_WAIT matter).
static __always_inline void cw_seen(struct tw_cfg *cf, u64 sk, int ret, int is_recv)
{
	struct tw_cw *c = cw.lookup(&sk);
	u64 id = bpf_get_current_pid_tgid();

	if (!c) {
		struct tw_owner *o = seen_owner.lookup(&sk), n = {};

		// Any socket's recv() comes here: remember TCP ones only.
		if ((o && o->pid == (id >> 32)) || !is_tcp(cf, sk))
			return;
		n.pid = id >> 32;
		n.tid = (u32)id;
		bpf_get_current_comm(&n.comm, sizeof(n.comm));
		seen_owner.update(&sk, &n);
		return;
	}
	if (!(c->flags & TW_F_OWNER) || c->pid != (id >> 32)) {
		c->pid = id >> 32;
		c->tid = (u32)id;
		bpf_get_current_comm(&c->comm, sizeof(c->comm));
		c->flags = (c->flags & ~TW_F_OWNER_LISTENER) | TW_F_OWNER;
	}
	if (!is_recv || ret < 0)
		return;
	if (ret > 0) {
		c->flags |= TW_F_READ_IN_CW;
	} else if (!(c->flags & TW_F_EOF_READ)) {
		c->flags |= TW_F_EOF_READ;
		c->fin_read_ns = bpf_ktime_get_ns();
	}
}

static __always_inline void seen_in_process(void *ctx, u64 sk, int ret, int is_recv)
{
	int zero_key = 0;
	struct tw_cfg *cf = config.lookup(&zero_key);
	struct tw_sock *s;
	u64 id;

	if (cf && cf->v[TW_CFG_CW_RAW]) {
		cw_seen(cf, sk, ret, is_recv);
		return;
	}
	s = socks.lookup(&sk);
	if (!s)
		return;
	id = bpf_get_current_pid_tgid();
	if (s->owner != TW_F_OWNER || s->pid != (id >> 32)) {
		set_owner_current(s);
		// The FIN often comes before the owner first touches the socket (accepted
		// late, listener older than tracing): say who it is, once it is known. If
		// this very call reads the EOF, the EOF event below carries the owner: one
		// event instead of two.
		if (s->state == TS_CLOSE_WAIT &&
		    !(is_recv && ret == 0 && !(s->flags & TW_F_EOF_READ)))
			emit_sock(ctx, sk, s, TW_KIND_OWNER, bpf_ktime_get_ns());
	}
	if (!is_recv || ret < 0)
		return;
	if (ret > 0) {
		if (s->state == TS_CLOSE_WAIT)
			s->flags |= TW_F_READ_IN_CW;
		return;
	}
	// recv() returned 0: the application saw EOF. Report it once per socket.
	if (s->flags & TW_F_EOF_READ)
		return;
	s->flags |= TW_F_EOF_READ;
	s->fin_read_ts = bpf_ktime_get_ns();
	emit_sock(ctx, sk, s, TW_KIND_EOF, s->fin_read_ts);
}

#if TW_RAW_SOCK_HOOKS
// Raw tracepoints (TP_PROTO(struct sock *sk, int ret, int flags)): a classic tracepoint
// program holds the per-CPU bpf_prog_active while it runs, and a softirq state transition
// arriving meanwhile would skip the state program (a recursion miss, left to the rescue
// program, which reads the tuple from the struct). Raw tracepoint programs only guard
// against themselves. No struct is read: sockets that are not TCP have no `socks` entry,
// so the lookup in seen_in_process() ends there.
#ifdef TW_HAVE_RECV_LENGTH
RAW_TRACEPOINT_PROBE(sock_recv_length)
{
	// MSG_PEEK (2) reads nothing; it says nothing about EOF handling.
	if ((int)ctx->args[2] & 2)
		return 0;
	seen_in_process(ctx, (u64)ctx->args[0], (int)ctx->args[1], 1);
	return 0;
}
#endif

#ifdef TW_HAVE_SEND_LENGTH
RAW_TRACEPOINT_PROBE(sock_send_length)
{
	seen_in_process(ctx, (u64)ctx->args[0], (int)ctx->args[1], 0);
	return 0;
}
#endif
#else
#ifdef TW_HAVE_RECV_LENGTH
TRACEPOINT_PROBE(sock, sock_recv_length)
{
	if (args->protocol != TW_IPPROTO_TCP)
		return 0;
	// MSG_PEEK (2) reads nothing; it says nothing about EOF handling.
	if (args->flags & 2)
		return 0;
	seen_in_process(args, (u64)args->sk, args->ret, 1);
	return 0;
}
#endif

#ifdef TW_HAVE_SEND_LENGTH
TRACEPOINT_PROBE(sock, sock_send_length)
{
	if (args->protocol != TW_IPPROTO_TCP)
		return 0;
	seen_in_process(args, (u64)args->sk, args->ret, 0);
	return 0;
}
#endif
#endif

// --- outcome: what the current task is doing --------------------------------------

static __always_inline void task_doing(u32 what)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	u32 slot = tid & (TW_TASK_SLOTS - 1);
	struct tw_task *t = tasks.lookup(&slot);

	if (!t)
		return;
	t->ts = bpf_ktime_get_ns();
	t->tid = tid;
	t->what = what;
}

// The syscall tracepoints, where the syscall's number cannot be read (see current_sysnr()):
// not autoloaded, the loader attaches them only then (attached, they slow every syscall on
// the host; detached, each costs ~70 ms of start-up).
#ifdef TW_HAVE_SYS_CLOSE
int tw_sys_close(void *ctx)
{
	task_doing(TASK_CLOSE);
	return 0;
}
#endif

#ifdef TW_HAVE_SYS_CLOSE_RANGE
int tw_sys_close_range(void *ctx)
{
	task_doing(TASK_CLOSE);
	return 0;
}
#endif

#ifdef TW_HAVE_SYS_SHUTDOWN
// `how` at the offset the tracepoint's format gives (TW_SHUTDOWN_HOW_OFF, read by the loader).
int tw_sys_shutdown(void *ctx)
{
	u64 how = 0;

	bpf_probe_read_kernel(&how, sizeof(how), ctx + TW_SHUTDOWN_HOW_OFF);
	// SHUT_RD (0) sends nothing and changes no state.
	if (how == 1 || how == 2)
		task_doing(TASK_SHUTDOWN);
	return 0;
}
#endif

#ifdef TW_HAVE_PROCESS_EXIT
// Fires before exit_files(): the descriptors a dying task releases come after this.
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	task_doing(TASK_EXIT);
	return 0;
}
#endif

#ifdef TW_HAVE_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
	u64 sk = (u64)args->skaddr;
	struct tw_sock *s = socks.lookup(&sk);

	if (s) {
		s->rst = 1;
	} else {
		struct tw_cw *c = cw.lookup(&sk); // top's raw path keeps it there

		if (c)
			c->rst = 1;
	}
	return 0;
}
#endif

#ifdef TW_HAVE_ERROR_REPORT
// tcp_write_err() reports the error just before tcp_done() closes the socket, on the
// same CPU; the tracepoint has no socket address, so remember the ports per CPU.
TRACEPOINT_PROBE(sock, inet_sk_error_report)
{
	int zero = 0;
	struct tw_err *e;

	if (args->protocol != TW_IPPROTO_TCP)
		return 0;
	e = errs.lookup(&zero);
	if (e) {
		e->ts = bpf_ktime_get_ns();
		e->sport = args->sport;
		e->dport = args->dport;
	}
	return 0;
}
#endif

// --- optional tcp_close hook: exact closer even where syscall tracepoints are absent --

static __always_inline void on_tcp_close(u64 sk)
{
	struct tw_sock *s = socks.lookup(&sk);

	if (s)
		s->close_ts = bpf_ktime_get_ns();
}

#if TW_CLOSE_HOOK == 1
KFUNC_PROBE(tcp_close, struct sock *sk, long timeout)
{
	on_tcp_close((u64)sk);
	return 0;
}
#elif TW_CLOSE_HOOK == 2
int kprobe__tcp_close(struct pt_regs *ctx, struct sock *sk)
{
	on_tcp_close((u64)sk);
	return 0;
}
#endif
