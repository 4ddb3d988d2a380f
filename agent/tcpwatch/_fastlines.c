/* SPDX-License-Identifier: Apache-2.0
 *
 * _fastlines.c - the plain part of `tcpwatch trace`'s hot path, compiled.
 *
 * Under a connection churn most kernel events are transitions of sockets nobody tracks
 * (neither into nor out of CLOSE_WAIT): each only becomes one NDJSON `state` line. Python
 * spends ~1.5 us on such a line (fastpath.FastPath); this module writes it in ~0.1 us,
 * walking the records straight from the ring buffer's memory or from a list of bytes.
 *
 * It decides nothing Python would decide differently: an event it is not sure about is
 * handed back, as raw bytes, for FastPath to run as before, in order. Handed back:
 * anything about a socket the aggregator tracks (`by_sk`) or that an earlier handed-back
 * event of this scan may have made tracked; transitions into or out of CLOSE_WAIT; EOF and
 * owner news while pre-existing sockets wait to be bound; the first `room` transitions
 * (a rate-limited table shows them, so it needs their records); comms that need JSON
 * escaping; durations at a tie or beyond 1000 s; unknown kinds; short records.
 *
 * The lines are byte for byte what orjson writes for the general path's records
 * (tests/unit/test_fastpath.py runs both on random streams; FastPath checks the number
 * format against orjson when it starts). The record layout is the one in tcpwatch.h,
 * the same header the kernel programs are built from.
 *
 * scan_list(batch, by_sk, unbound, room) -> (items, first_ts)
 * scan_ring(buf, start, end, by_sk, unbound, room[, records, stop])
 *     -> (items, end_reached, first_ts)
 *   items: in order, raw `bytes` records handed back and `(lines, n_lines, n_events)`
 *   tuples for runs of events handled here (EOF/owner news of untracked sockets make no
 *   line); first_ts: ts_ns of the first record seen, None if none.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <linux/types.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "tcpwatch.h"

#define RB_BUSY (1u << 31)
#define RB_DISCARD (1u << 30)
#define RB_HDR 8
#define NS 1000000000LL
#define EXACT_BELOW_NS 1000000000000ULL /* as fastpath._EXACT_BELOW_NS */
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define CW_LINE_ROOM 1024 /* a close_wait line is at most ~620 bytes */
#define NAME_MAX_LEN 23
#define LINE_ROOM 512 /* a state line is at most ~330 bytes */
#define RUN_LINES 256 /* lines per run at most: the buffer stays ~80 kB, Python writes as
			 they come (a drain of the whole ring is ~58,000 events) */

/* A socket that entered CLOSE_WAIT in a run written here and that Python does not know
 * about yet: all the aggregator would keep of it (aggregate._Tracked). */
struct held {
	uint64_t sk;
	uint64_t since_ns;
	uint8_t addrs[32]; /* saddr, daddr as in the event */
	uint32_t netns, pid, tid; /* pid/tid/comm: the owner when `known` */
	uint16_t sport, dport;
	uint8_t v6, known, eof_read; /* known: the TW_F_OWNER / TW_F_OWNER_LISTENER bits */
	char comm[TW_COMM_LEN];
};

struct order {
	uint64_t sk, since_ns;
};

/* IPv6 addresses as text, cached (see ipv6_text). */
#define V6_CACHE_BITS 6
struct v6text {
	uint8_t addr[16];
	uint8_t used;
	char text[INET6_ADDRSTRLEN];
};

typedef struct {
	PyObject_HEAD
	char names[256][NAME_MAX_LEN + 1];
	unsigned char name_len[256];
	long long mono_to_wall_ns;
	long long sec; /* the wall-clock second `date` is for, -1: none */
	char date[19]; /* YYYY-MM-DDTHH:MM:SS */
	/* sockets of the events handed back in this scan: sk (open addressing, 0 = empty
	 * slot) -> TAKEN or LEFT */
	uint64_t *set;
	unsigned char *vals;
	size_t set_cap, set_n;
	int zero_val; /* sk 0's */
	/* the run being written */
	char *out;
	size_t out_len, out_cap;
	Py_ssize_t run_lines, run_events, run_trans, run_cw, run_routine;
	/* sockets in CLOSE_WAIT held here (see "held sockets"); off until configure() */
	int exits_on, causes_on;
	double slow_close_s;
	size_t held_max;
	struct held *held; /* open addressing on sk (0 = empty slot), backward-shift deletion */
	size_t held_cap, held_n;
	struct order *order; /* held sockets by entry time, oldest first; dead ones skipped */
	size_t order_head, order_len, order_cap;
	char exit_name[2][256][NAME_MAX_LEN + 1]; /* [new == LAST_ACK][outcome] */
	char exit_cause[2][256][NAME_MAX_LEN + 1];
	long long since_sec; /* the wall-clock second since_date is for, -1: none */
	char since_date[19];
	struct v6text v6[1 << V6_CACHE_BITS];
} Formatter;

/* ------------------------------------------------------ sockets seen in this scan */

/* What this scan knows of a socket from an event it handed back (Python runs those later,
 * and only events of a socket change whether the aggregator tracks that socket). */
enum { UNSEEN, TAKEN, LEFT };
/* TAKEN: Python may track it by the time its later events run: hand those back too.
 * LEFT: its last handed-back event took it out of CLOSE_WAIT, after which the aggregator
 * tracks it no more (whatever `by_sk` says now, before Python has run that event). */

static size_t slot_of(uint64_t sk, size_t mask)
{
	return (size_t)((sk >> 4) * 0x9E3779B97F4A7C15ULL >> 20) & mask;
}

static int seen_grow(Formatter *f)
{
	size_t cap = f->set_cap ? f->set_cap * 2 : 4096;
	uint64_t *keys = PyMem_Calloc(cap, sizeof(uint64_t));
	unsigned char *vals = PyMem_Calloc(cap, 1);
	if (!keys || !vals) {
		PyMem_Free(keys);
		PyMem_Free(vals);
		PyErr_NoMemory();
		return -1;
	}
	for (size_t i = 0; i < f->set_cap; i++) {
		if (f->set[i]) {
			size_t j = slot_of(f->set[i], cap - 1);
			while (keys[j])
				j = (j + 1) & (cap - 1);
			keys[j] = f->set[i];
			vals[j] = f->vals[i];
		}
	}
	PyMem_Free(f->set);
	PyMem_Free(f->vals);
	f->set = keys;
	f->vals = vals;
	f->set_cap = cap;
	return 0;
}

static int seen_get(const Formatter *f, uint64_t sk)
{
	if (!sk)
		return f->zero_val;
	if (!f->set_n)
		return UNSEEN;
	size_t mask = f->set_cap - 1;
	for (size_t i = slot_of(sk, mask); f->set[i]; i = (i + 1) & mask)
		if (f->set[i] == sk)
			return f->vals[i];
	return UNSEEN;
}

static int seen_put(Formatter *f, uint64_t sk, int val)
{
	if (!sk) {
		f->zero_val = val;
		return 0;
	}
	if ((f->set_n + 1) * 2 > f->set_cap && seen_grow(f) < 0)
		return -1;
	size_t mask = f->set_cap - 1;
	size_t i = slot_of(sk, mask);
	for (; f->set[i]; i = (i + 1) & mask)
		if (f->set[i] == sk) {
			f->vals[i] = (unsigned char)val;
			return 0;
		}
	f->set[i] = sk;
	f->vals[i] = (unsigned char)val;
	f->set_n++;
	return 0;
}

static void seen_clear(Formatter *f)
{
	if (f->set_n)
		memset(f->set, 0, f->set_cap * sizeof(uint64_t));
	f->set_n = 0;
	f->zero_val = UNSEEN;
}

/* ------------------------------------------------------------------ held sockets */

/* Under a churn every connection's server side goes through CLOSE_WAIT: its entry, EOF and
 * exit are 4 of its ~12 events, and Python spent ~6 us on them. With configure(), a socket
 * entering CLOSE_WAIT in a run written here is held here instead of in the aggregator; its
 * EOF and owner news update it here, and its exit writes the `state` and `close_wait`
 * lines here. Python gets a held socket (take(), or a "promote" item in a scan's items just
 * before an event of it that goes back) whenever it must see it:
 *  - its age reaches the leak threshold (Aggregator.take_due asks with take(limit));
 *  - anything else about it that is not written here (a table row, odd text, a stale or
 *    unknown event): promoted, then the event goes back, in order;
 *  - Aggregator.in_close_wait() or a /proc seed (take(None): all of them).
 * So the aggregator's view is the same as if it had tracked the socket all along. */

static struct held *held_find(const Formatter *f, uint64_t sk)
{
	if (!f->held_n || !sk)
		return NULL;
	size_t mask = f->held_cap - 1;
	for (size_t i = slot_of(sk, mask); f->held[i].sk; i = (i + 1) & mask)
		if (f->held[i].sk == sk)
			return &f->held[i];
	return NULL;
}

static int held_grow(Formatter *f)
{
	size_t cap = f->held_cap ? f->held_cap * 2 : 1024;
	struct held *t = PyMem_Calloc(cap, sizeof(*t));
	if (!t) {
		PyErr_NoMemory();
		return -1;
	}
	for (size_t i = 0; i < f->held_cap; i++) {
		if (f->held[i].sk) {
			size_t j = slot_of(f->held[i].sk, cap - 1);
			while (t[j].sk)
				j = (j + 1) & (cap - 1);
			t[j] = f->held[i];
		}
	}
	PyMem_Free(f->held);
	f->held = t;
	f->held_cap = cap;
	return 0;
}

/* A free slot for sk (not held yet), its sk set; NULL with an error set. */
static struct held *held_add(Formatter *f, uint64_t sk)
{
	if ((f->held_n + 1) * 2 > f->held_cap && held_grow(f) < 0)
		return NULL;
	size_t mask = f->held_cap - 1;
	size_t i = slot_of(sk, mask);
	while (f->held[i].sk)
		i = (i + 1) & mask;
	memset(&f->held[i], 0, sizeof(f->held[i]));
	f->held[i].sk = sk;
	f->held_n++;
	return &f->held[i];
}

/* Drop a held socket (linear probing: the entries after it move back into the gap). The
 * memory goes back when none is left: 100,000 leaked sockets move on to Python after
 * --leak-after, and their ~20 MB here must not stay for good. */
static void held_del(Formatter *f, struct held *h)
{
	size_t mask = f->held_cap - 1;
	size_t i = (size_t)(h - f->held), j = i;
	for (;;) {
		j = (j + 1) & mask;
		if (!f->held[j].sk)
			break;
		size_t k = slot_of(f->held[j].sk, mask);
		int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
		if (!stays) {
			f->held[i] = f->held[j];
			i = j;
		}
	}
	f->held[i].sk = 0;
	if (--f->held_n)
		return;
	f->order_head = f->order_len = 0; /* all dead */
	if (f->held_cap > 1024) {
		PyMem_Free(f->held);
		f->held = NULL;
		f->held_cap = 0;
	}
	if (f->order_cap > 4096) {
		PyMem_Free(f->order);
		f->order = NULL;
		f->order_cap = 0;
	}
}

/* The owner an event of a held socket carries, if it carries one (as Aggregator's
 * _event_owner: entry, EOF and owner news alike). */
static void held_owner(struct held *h, const struct tw_event *ev)
{
	const unsigned known = TW_F_OWNER | TW_F_OWNER_LISTENER;
	if (!(ev->flags & known))
		return;
	h->known = ev->flags & known;
	h->pid = ev->pid;
	h->tid = ev->tid;
	memcpy(h->comm, ev->comm, TW_COMM_LEN);
}

static int order_live(const Formatter *f, const struct order *o)
{
	const struct held *h = held_find(f, o->sk);
	return h && h->since_ns == o->since_ns;
}

/* Remember a held socket's entry time, keeping `order` sorted (events come nearly in time
 * order; a late one moves a few places back). Dead entries (sockets gone since) are dropped
 * when they outnumber the live ones, so a socket held for long does not make it grow. */
static int order_push(Formatter *f, uint64_t sk, uint64_t since_ns)
{
	if (f->order_len > 2 * f->held_n + 4096) {
		size_t n = 0;
		for (size_t i = 0; i < f->order_len; i++)
			if (order_live(f, &f->order[f->order_head + i]))
				f->order[n++] = f->order[f->order_head + i];
		f->order_head = 0;
		f->order_len = n;
	}
	if (f->order_head + f->order_len == f->order_cap) {
		if (f->order_head) {
			memmove(f->order, f->order + f->order_head, f->order_len * sizeof(*f->order));
			f->order_head = 0;
		}
		if (f->order_len == f->order_cap) {
			size_t cap = f->order_cap ? f->order_cap * 2 : 4096;
			struct order *o = PyMem_Realloc(f->order, cap * sizeof(*o));
			if (!o) {
				PyErr_NoMemory();
				return -1;
			}
			f->order = o;
			f->order_cap = cap;
		}
	}
	struct order *base = f->order + f->order_head;
	size_t i = f->order_len;
	while (i && base[i - 1].since_ns > since_ns) {
		base[i] = base[i - 1];
		i--;
	}
	base[i].sk = sk;
	base[i].since_ns = since_ns;
	f->order_len++;
	return 0;
}

/* (sk, since_ns, v6, addrs, sport, dport, netns, pid, tid, comm, known, eof_read): what
 * FastPath makes an aggregate._Tracked of. */
static PyObject *held_tuple(const struct held *h)
{
	return Py_BuildValue("(KKiy#iiIIIy#ii)", (unsigned long long)h->sk,
			     (unsigned long long)h->since_ns, (int)h->v6, (const char *)h->addrs,
			     (Py_ssize_t)32, (int)h->sport, (int)h->dport, h->netns, h->pid, h->tid,
			     h->comm, (Py_ssize_t)TW_COMM_LEN, (int)h->known, (int)h->eof_read);
}

/* ------------------------------------------------------------------------- text */

static char *put(char *o, const char *s, size_t n)
{
	memcpy(o, s, n);
	return o + n;
}

#define PUT(o, lit) put((o), (lit), sizeof(lit) - 1)

static char *put_u64(char *o, uint64_t v)
{
	char tmp[20];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*o++ = tmp[--n];
	return o;
}

static char *put_hex(char *o, uint64_t v)
{
	static const char hex[] = "0123456789abcdef";
	char tmp[16];
	int n = 0;
	do {
		tmp[n++] = hex[v & 15];
		v >>= 4;
	} while (v);
	while (n)
		*o++ = tmp[--n];
	return o;
}

static char *put_3(char *o, unsigned v)
{
	o[0] = (char)('0' + v / 100);
	o[1] = (char)('0' + v / 10 % 10);
	o[2] = (char)('0' + v % 10);
	return o + 3;
}

/* q microseconds as seconds, written as orjson writes the float q / 1e6 (shortest
 * round-trip digits, which for q < 10^12 are q's own digits less trailing zeros). */
static char *put_secs(char *o, uint64_t q)
{
	if (!q)
		return PUT(o, "0.0");
	char d[20];
	int n = 0, k = -6; /* value = digits * 10^k */
	while (q % 10 == 0) {
		q /= 10;
		k++;
	}
	char tmp[20];
	do {
		tmp[n++] = (char)('0' + q % 10);
		q /= 10;
	} while (q);
	for (int i = 0; i < n; i++)
		d[i] = tmp[n - 1 - i];
	int point = n + k; /* digits before the decimal point */
	if (k >= 0 && point <= 16) {
		o = put(o, d, (size_t)n);
		for (int i = 0; i < k; i++)
			*o++ = '0';
		return PUT(o, ".0");
	}
	if (point > 0 && point <= 16) {
		o = put(o, d, (size_t)point);
		*o++ = '.';
		return put(o, d + point, (size_t)(n - point));
	}
	if (point > -5 && point <= 0) {
		o = PUT(o, "0.");
		for (int i = 0; i < -point; i++)
			*o++ = '0';
		return put(o, d, (size_t)n);
	}
	*o++ = d[0];
	if (n > 1) {
		*o++ = '.';
		o = put(o, d + 1, (size_t)(n - 1));
	}
	*o++ = 'e';
	int e = point - 1;
	if (e < 0) {
		*o++ = '-';
		e = -e;
	}
	return put_u64(o, (uint64_t)e);
}

/* ------------------------------------------------------------------- one event */

enum { HANDLED, DEFER, FAIL, PROMOTE }; /* PROMOTE: the socket is held: hand it over, then DEFER */

struct scan {
	PyObject *by_sk;
	int unbound;      /* pre-existing sockets wait to be bound: EOF/owner news go back */
	Py_ssize_t room;  /* transitions still to hand back for the table's records */
	int records;      /* a table takes records: a close that is not routine goes back */
	PyObject *items;
	int have_first;
	uint64_t first_ts;
};

static int tracked(struct scan *s, uint64_t sk)
{
	if (!PyDict_GET_SIZE(s->by_sk))
		return 0;
	PyObject *key = PyLong_FromUnsignedLongLong(sk);
	if (!key)
		return -1;
	int r = PyDict_Contains(s->by_sk, key);
	Py_DECREF(key);
	return r;
}

static int out_reserve(Formatter *f, size_t n)
{
	if (f->out_len + n <= f->out_cap)
		return 0;
	size_t cap = f->out_cap ? f->out_cap : 65536;
	while (cap < f->out_len + n)
		cap *= 2;
	char *out = PyMem_Realloc(f->out, cap);
	if (!out) {
		PyErr_NoMemory();
		return -1;
	}
	f->out = out;
	f->out_cap = cap;
	return 0;
}

static char *put_2(char *o, unsigned v)
{
	o[0] = (char)('0' + v / 10 % 10);
	o[1] = (char)('0' + v % 10);
	return o + 2;
}

/* The date and time of wall-clock second `sec` (19 chars), as
 * time.strftime("%Y-%m-%dT%H:%M:%S"); -1 outside years 1000-9999. */
static int date_of(long long sec, char *out)
{
	time_t t = (time_t)sec;
	struct tm tm;
	if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 < 1000 || tm.tm_year + 1900 > 9999)
		return -1;
	char *o = out;
	o = put_2(o, (unsigned)(tm.tm_year + 1900) / 100);
	o = put_2(o, (unsigned)(tm.tm_year + 1900) % 100);
	*o++ = '-';
	o = put_2(o, (unsigned)tm.tm_mon + 1);
	*o++ = '-';
	o = put_2(o, (unsigned)tm.tm_mday);
	*o++ = 'T';
	o = put_2(o, (unsigned)tm.tm_hour);
	*o++ = ':';
	o = put_2(o, (unsigned)tm.tm_min);
	*o++ = ':';
	put_2(o, (unsigned)tm.tm_sec);
	return 0;
}

static int set_second(Formatter *f, long long sec)
{
	if (date_of(sec, f->date) < 0)
		return -1;
	f->sec = sec;
	return 0;
}

/* The length of a comm up to its NUL, or -1 if JSON needs escapes or it is not ASCII
 * (Python's text then). */
static int comm_plain(const char *comm)
{
	int n = 0;
	while (n < TW_COMM_LEN && comm[n]) {
		unsigned char c = (unsigned char)comm[n];
		if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
			return -1;
		n++;
	}
	return n;
}

/* A CLOCK_MONOTONIC time as wall-clock ns; -1 when it does not fit (Python then decides). */
static int wall_of(const Formatter *f, uint64_t mono_ns, long long *wall)
{
	if (mono_ns > (uint64_t)LLONG_MAX ||
	    __builtin_add_overflow((long long)mono_ns, f->mono_to_wall_ns, wall) || *wall < 0)
		return -1;
	return 0;
}

/* a.b.c.d, as inet_ntop writes it. glibc's inet_ntop goes through sprintf: under a churn
 * that was a third of the agent's CPU. */
static void ipv4_text(const uint8_t *a, char *o)
{
	for (int i = 0; i < 4; i++) {
		unsigned v = a[i];
		if (i)
			*o++ = '.';
		if (v >= 100)
			*o++ = (char)('0' + v / 100);
		if (v >= 10)
			*o++ = (char)('0' + v / 10 % 10);
		*o++ = (char)('0' + v % 10);
	}
	*o = '\0';
}

/* IPv6 text from inet_ntop (its zero compression and v4-mapped form, as Python's), cached by
 * address: a host's sockets share few addresses. 0, or -1 if inet_ntop refuses it. */
static int ipv6_text(Formatter *f, const uint8_t *a, char *out)
{
	uint32_t h = 0, w;
	struct v6text *c;
	for (int i = 0; i < 16; i += 4) {
		memcpy(&w, a + i, 4);
		h = (h ^ w) * 0x9e3779b1u;
	}
	c = &f->v6[h >> (32 - V6_CACHE_BITS)];
	if (!c->used || memcmp(c->addr, a, 16)) {
		c->used = 0;
		if (!inet_ntop(AF_INET6, a, c->text, sizeof(c->text)))
			return -1;
		memcpy(c->addr, a, 16);
		c->used = 1;
	}
	memcpy(out, c->text, strlen(c->text) + 1);
	return 0;
}

/* The local and remote addresses of ev as text; 0, or -1 if inet_ntop refuses them. */
static int addr_texts(Formatter *f, const struct tw_event *ev, char *laddr, char *raddr)
{
	if (ev->family != AF_INET6) {
		ipv4_text(ev->saddr, laddr);
		ipv4_text(ev->daddr, raddr);
		return 0;
	}
	return ipv6_text(f, ev->saddr, laddr) < 0 || ipv6_text(f, ev->daddr, raddr) < 0 ? -1 : 0;
}

/* A socket line up to its "netns" value: {"event":"<event>","ts":...,"rport":N,"netns":
 * (frac: ns into the second of f->date). */
static char *put_head(Formatter *f, char *o, const char *event, size_t event_len, long long frac,
		      const struct tw_event *ev, const char *laddr, const char *raddr)
{
	o = PUT(o, "{\"event\":\"");
	o = put(o, event, event_len);
	o = PUT(o, "\",\"ts\":\"");
	o = put(o, f->date, 19);
	*o++ = '.';
	o = put_3(o, (unsigned)(frac / 1000000));
	o = put_3(o, (unsigned)(frac / 1000 % 1000));
	o = PUT(o, "Z\",\"sk\":\"0x");
	o = put_hex(o, ev->sk);
	o = ev->family == AF_INET6 ? PUT(o, "\",\"family\":\"ipv6\",\"laddr\":\"")
				   : PUT(o, "\",\"family\":\"ipv4\",\"laddr\":\"");
	o = put(o, laddr, strlen(laddr));
	o = PUT(o, "\",\"lport\":");
	o = put_u64(o, ev->sport);
	o = PUT(o, ",\"raddr\":\"");
	o = put(o, raddr, strlen(raddr));
	o = PUT(o, "\",\"rport\":");
	o = put_u64(o, ev->dport);
	return PUT(o, ",\"netns\":");
}

/* Write the `state` line of `ev`, or say why not (DEFER). */
static int state_line(Formatter *f, const struct tw_event *ev)
{
	const unsigned known = TW_F_OWNER | TW_F_OWNER_LISTENER;
	size_t comm_len = 0;
	if (ev->flags & known) {
		int n = comm_plain(ev->comm);
		if (n < 0)
			return DEFER;
		comm_len = (size_t)n;
	}
	if (!(ev->flags & TW_F_PREV_UNKNOWN) &&
	    (ev->prev_ns >= EXACT_BELOW_NS || ev->prev_ns % 1000 == 500))
		return DEFER; /* round() decides: Python */
	long long wall;
	if (wall_of(f, ev->ts_ns, &wall) < 0)
		return DEFER;
	long long sec = wall / NS, frac = wall % NS;
	if (sec != f->sec && set_second(f, sec) < 0)
		return DEFER;
	char laddr[INET6_ADDRSTRLEN], raddr[INET6_ADDRSTRLEN];
	if (addr_texts(f, ev, laddr, raddr) < 0)
		return DEFER;
	if (out_reserve(f, LINE_ROOM) < 0)
		return FAIL;

	char *o = put_head(f, f->out + f->out_len, "state", 5, frac, ev, laddr, raddr);
	o = ev->netns ? put_u64(o, ev->netns) : PUT(o, "null");
	if (ev->flags & known) {
		o = PUT(o, ",\"pid\":");
		o = put_u64(o, ev->pid);
		o = PUT(o, ",\"tid\":");
		o = put_u64(o, ev->tid);
		o = PUT(o, ",\"comm\":\"");
		o = put(o, ev->comm, comm_len);
		*o++ = '"';
	} else {
		o = PUT(o, ",\"pid\":null,\"tid\":null,\"comm\":null");
	}
	o = PUT(o, ",\"old\":\"");
	o = put(o, f->names[ev->oldstate], f->name_len[ev->oldstate]);
	o = PUT(o, "\",\"new\":\"");
	o = put(o, f->names[ev->newstate], f->name_len[ev->newstate]);
	o = PUT(o, "\",\"duration_s\":");
	o = ev->flags & TW_F_PREV_UNKNOWN ? PUT(o, "null") : put_secs(o, (ev->prev_ns + 500) / 1000);
	if (ev->flags & TW_F_OWNER)
		o = PUT(o, ",\"owner\":\"socket\"}\n");
	else if (ev->flags & TW_F_OWNER_LISTENER)
		o = PUT(o, ",\"owner\":\"listener\"}\n");
	else
		o = PUT(o, ",\"owner\":null}\n");
	f->out_len = (size_t)(o - f->out);
	return HANDLED;
}

/* "pid":P,"tid":T,"comm":"C" with comm_len from comm_plain(); the keys given with their
 * leading comma or none ("pid" or "closer_pid"...). */
static char *put_who(char *o, const char *pre, size_t pre_len, uint32_t pid, uint32_t tid,
		     const char *comm, int comm_len)
{
	o = put(o, pre, pre_len);
	o = PUT(o, "pid\":");
	o = put_u64(o, pid);
	*o++ = ',';
	o = put(o, pre, pre_len);
	o = PUT(o, "tid\":");
	o = put_u64(o, tid);
	*o++ = ',';
	o = put(o, pre, pre_len);
	o = PUT(o, "comm\":\"");
	o = put(o, comm, (size_t)comm_len);
	*o++ = '"';
	return o;
}

/* The date and time of a wall-clock second for a `since` field (cached apart from the
 * line's own second: a socket's entry is usually in an earlier one); NULL if none. */
static const char *since_date(Formatter *f, long long sec)
{
	if (sec == f->sec)
		return f->date;
	if (sec != f->since_sec) {
		if (date_of(sec, f->since_date) < 0) {
			f->since_sec = -1;
			return NULL;
		}
		f->since_sec = sec;
	}
	return f->since_date;
}

/* Write the `close_wait` line of a held socket leaving CLOSE_WAIT with `ev` (after its
 * `state` line: f->date is the second of ev), as FastPath._close_wait does; or DEFER.
 * *routine: its cause is `closed` (a table does not show it unless it has room). */
static int close_line(Formatter *f, const struct scan *s, const struct tw_event *ev,
		      const struct held *h, int *routine)
{
	const unsigned known = TW_F_OWNER | TW_F_OWNER_LISTENER;
	uint64_t dur_ns;
	if (ev->flags & TW_F_CW_UNKNOWN) {
		if (ev->ts_ns < h->since_ns)
			return DEFER;
		dur_ns = ev->ts_ns - h->since_ns;
	} else {
		dur_ns = ev->cw_ns;
	}
	if (dur_ns >= EXACT_BELOW_NS || dur_ns % 1000 == 500)
		return DEFER; /* round() decides: Python */
	uint64_t q = (dur_ns + 500) / 1000;

	/* who: the event's owner, else the one seen before, else the closer itself */
	int who = 0, who_len = 0;
	uint32_t wpid = 0, wtid = 0;
	const char *wcomm = NULL;
	if (ev->flags & known) {
		who = 1, wpid = ev->pid, wtid = ev->tid, wcomm = ev->comm;
	} else if (h->known) {
		who = 1, wpid = h->pid, wtid = h->tid, wcomm = h->comm;
	} else if (ev->flags & TW_F_ACTOR) {
		who = 1, wpid = ev->actor_pid, wtid = ev->actor_tid, wcomm = ev->actor_comm;
	}
	if (who && (who_len = comm_plain(wcomm)) < 0)
		return DEFER;
	int actor = !!(ev->flags & TW_F_ACTOR), actor_len = 0;
	if (actor && (actor_len = comm_plain(ev->actor_comm)) < 0)
		return DEFER;

	int la = ev->newstate == TCP_LAST_ACK;
	const char *name = f->exit_name[la][ev->outcome];
	const char *cause = f->exit_cause[la][ev->outcome];
	if (!strcmp(cause, "closed") && (double)q / 1e6 > f->slow_close_s)
		cause = "slow_close"; /* classify.ended_cause (never leaked: see take()) */
	*routine = !strcmp(cause, "closed");
	if (s->records && !*routine)
		return DEFER; /* a table shows every close that is not routine: it needs the record */

	long long since_wall;
	if (wall_of(f, h->since_ns, &since_wall) < 0)
		return DEFER;
	const char *sdate = since_date(f, since_wall / NS);
	if (!sdate)
		return DEFER;
	long long sfrac = since_wall % NS;
	long long frac = ((long long)ev->ts_ns + f->mono_to_wall_ns) % NS; /* checked by state_line */

	char laddr[INET6_ADDRSTRLEN], raddr[INET6_ADDRSTRLEN];
	if (addr_texts(f, ev, laddr, raddr) < 0)
		return DEFER;
	if (out_reserve(f, CW_LINE_ROOM) < 0)
		return FAIL;

	char *o = put_head(f, f->out + f->out_len, "close_wait", 10, frac, ev, laddr, raddr);
	uint32_t netns = ev->netns ? ev->netns : h->netns;
	o = netns ? put_u64(o, netns) : PUT(o, "null");
	*o++ = ',';
	if (who)
		o = put_who(o, "\"", 1, wpid, wtid, wcomm, who_len);
	else
		o = PUT(o, "\"pid\":null,\"tid\":null,\"comm\":null");
	o = PUT(o, ",\"duration_s\":");
	o = put_secs(o, q);
	o = PUT(o, ",\"since\":\"");
	o = put(o, sdate, 19);
	*o++ = '.';
	o = put_3(o, (unsigned)(sfrac / 1000000));
	o = put_3(o, (unsigned)(sfrac / 1000 % 1000));
	o = PUT(o, "Z\",\"new\":\"");
	o = put(o, f->names[ev->newstate], f->name_len[ev->newstate]);
	o = PUT(o, "\",\"outcome\":\"");
	o = put(o, name, strlen(name));
	o = PUT(o, "\",");
	if (actor)
		o = put_who(o, "\"closer_", 8, ev->actor_pid, ev->actor_tid, ev->actor_comm,
			    actor_len);
	else
		o = PUT(o, "\"closer_pid\":null,\"closer_tid\":null,\"closer_comm\":null");
	o = (ev->flags & TW_F_EOF_READ) || h->eof_read ? PUT(o, ",\"eof_read\":true")
						       : PUT(o, ",\"eof_read\":false");
	o = PUT(o, ",\"leaked\":false,\"preexisting\":false");
	if (f->causes_on) {
		o = PUT(o, ",\"cause\":\"");
		o = put(o, cause, strlen(cause));
		o = PUT(o, "\"}\n");
	} else {
		o = PUT(o, "}\n");
	}
	f->out_len = (size_t)(o - f->out);
	return HANDLED;
}

/* An event of a held socket: news and its exit are handled here, anything else is PROMOTE. */
static int held_event(Formatter *f, struct scan *s, const struct tw_event *ev, struct held *h)
{
	if (ev->kind == TW_KIND_EOF || ev->kind == TW_KIND_OWNER) {
		if (ev->flags & TW_F_EOF_READ)
			h->eof_read = 1;
		held_owner(h, ev);
		f->run_events++;
		return HANDLED;
	}
	/* a stale transition (lost events, or sk reused), CLOSE_WAIT again, an unknown kind */
	if (ev->kind != TW_KIND_STATE || ev->oldstate != TCP_CLOSE_WAIT ||
	    ev->newstate == TCP_CLOSE_WAIT)
		return PROMOTE;
	if (s->room > 0) {
		s->room--;
		return PROMOTE;
	}
	size_t mark = f->out_len;
	int routine = 0;
	int r = state_line(f, ev);
	if (r == HANDLED)
		r = close_line(f, s, ev, h, &routine);
	if (r != HANDLED) {
		f->out_len = mark;
		return r == FAIL ? FAIL : PROMOTE;
	}
	held_del(f, h);
	f->run_lines += 2;
	f->run_events++;
	f->run_trans++;
	f->run_cw++;
	f->run_routine += routine;
	return HANDLED;
}

/* Handle the record at p here, or say it goes back to Python. A whole event is copied to
 * *evp on the way (a shorter record is not): step() reads its socket from there. */
static int one(Formatter *f, struct scan *s, const unsigned char *p, size_t len,
	       struct tw_event *evp)
{
	if (len < sizeof(*evp))
		return DEFER;
	memcpy(evp, p, sizeof(*evp));
	const struct tw_event *ev = evp;
	if (!s->have_first) {
		s->have_first = 1;
		s->first_ts = ev->ts_ns;
	}
	int seen = seen_get(f, ev->sk);
	if (seen == TAKEN)
		return DEFER;
	struct held *h = held_find(f, ev->sk);
	if (h)
		return held_event(f, s, ev, h);
	int entry = 0; /* it enters CLOSE_WAIT: hold it here */
	if (ev->kind == TW_KIND_STATE) {
		if (ev->oldstate == TCP_CLOSE_WAIT)
			return DEFER; /* a socket Python tracks, pre-existing or unknown */
		if (ev->newstate == TCP_CLOSE_WAIT) {
			/* unbound: it may be a pre-existing socket Python must bind */
			if (!f->exits_on || s->unbound || !ev->sk || f->held_n >= f->held_max)
				return DEFER;
			entry = 1;
		}
	} else if (ev->kind == TW_KIND_EOF || ev->kind == TW_KIND_OWNER) {
		if (s->unbound)
			return DEFER; /* it may bind a pre-existing socket */
	} else {
		return DEFER;
	}
	if (seen != LEFT) {
		int t = tracked(s, ev->sk);
		if (t < 0)
			return FAIL;
		if (t)
			return DEFER;
	}
	if (ev->kind != TW_KIND_STATE) {
		f->run_events++; /* news about a socket not in CLOSE_WAIT: nothing to say */
		return HANDLED;
	}
	if (s->room > 0) {
		s->room--;
		return DEFER;
	}
	int r = state_line(f, ev);
	if (r != HANDLED)
		return r;
	if (entry) {
		if (!(h = held_add(f, ev->sk)) || order_push(f, ev->sk, ev->ts_ns) < 0)
			return FAIL;
		h->since_ns = ev->ts_ns;
		memcpy(h->addrs, ev->saddr, 16);
		memcpy(h->addrs + 16, ev->daddr, 16);
		h->netns = ev->netns;
		h->sport = ev->sport;
		h->dport = ev->dport;
		h->v6 = ev->family == AF_INET6;
		held_owner(h, ev);
	}
	f->run_lines++;
	f->run_events++;
	f->run_trans++;
	return HANDLED;
}

static int flush_run(Formatter *f, struct scan *s)
{
	if (!f->run_events)
		return 0;
	PyObject *run = Py_BuildValue("(y#nnnnn)", f->out, (Py_ssize_t)f->out_len, f->run_lines,
				      f->run_events, f->run_trans, f->run_cw, f->run_routine);
	f->out_len = 0;
	f->run_lines = f->run_events = f->run_trans = f->run_cw = f->run_routine = 0;
	if (!run)
		return -1;
	int r = PyList_Append(s->items, run);
	Py_DECREF(run);
	return r;
}

/* One record at p: handled here, or appended to items as bytes. 0 or -1 (error set). */
static int step(Formatter *f, struct scan *s, const unsigned char *p, size_t len,
		PyObject *same)
{
	struct tw_event ev;
	int r = one(f, s, p, len, &ev);
	if (r == HANDLED)
		return f->run_lines < RUN_LINES ? 0 : flush_run(f, s);
	if (r == FAIL)
		return -1;
	if (r == PROMOTE) { /* Python tracks it from here on, before this event */
		struct held *h = held_find(f, ev.sk);
		if (flush_run(f, s) < 0)
			return -1;
		PyObject *t = held_tuple(h);
		if (!t)
			return -1;
		int a = PyList_Append(s->items, t);
		Py_DECREF(t);
		if (a < 0)
			return -1;
		held_del(f, h);
	}
	if (len >= sizeof(ev)) { /* one() copied it */
		int left = ev.kind == TW_KIND_STATE && ev.oldstate == TCP_CLOSE_WAIT &&
			   ev.newstate != TCP_CLOSE_WAIT;
		if (seen_put(f, ev.sk, left ? LEFT : TAKEN) < 0)
			return -1;
	}
	if (flush_run(f, s) < 0)
		return -1;
	PyObject *raw = same ? (Py_INCREF(same), same)
			     : PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)len);
	if (!raw)
		return -1;
	int a = PyList_Append(s->items, raw);
	Py_DECREF(raw);
	return a;
}

static int scan_begin(Formatter *f, struct scan *s, PyObject *by_sk, int unbound,
		      Py_ssize_t room, int records)
{
	if (!PyDict_Check(by_sk)) {
		PyErr_SetString(PyExc_TypeError, "by_sk must be a dict");
		return -1;
	}
	seen_clear(f);
	f->out_len = 0;
	f->run_lines = f->run_events = f->run_trans = f->run_cw = f->run_routine = 0;
	s->records = records;
	s->by_sk = by_sk;
	s->unbound = unbound;
	s->room = room;
	s->have_first = 0;
	s->first_ts = 0;
	s->items = PyList_New(0);
	return s->items ? 0 : -1;
}

static PyObject *first_ts(struct scan *s)
{
	if (!s->have_first)
		Py_RETURN_NONE;
	return PyLong_FromUnsignedLongLong(s->first_ts);
}

/* ----------------------------------------------------------------------- methods */

static PyObject *scan_list(Formatter *f, PyObject *args)
{
	PyObject *batch, *by_sk;
	int unbound, records = 0;
	Py_ssize_t room;
	if (!PyArg_ParseTuple(args, "O!Opn|p", &PyList_Type, &batch, &by_sk, &unbound, &room,
			      &records))
		return NULL;
	struct scan s;
	if (scan_begin(f, &s, by_sk, unbound, room, records) < 0)
		return NULL;
	for (Py_ssize_t i = 0; i < PyList_GET_SIZE(batch); i++) {
		PyObject *raw = PyList_GET_ITEM(batch, i);
		if (!PyBytes_Check(raw)) {
			PyErr_SetString(PyExc_TypeError, "batch items must be bytes");
			goto fail;
		}
		if (step(f, &s, (const unsigned char *)PyBytes_AS_STRING(raw),
			 (size_t)PyBytes_GET_SIZE(raw), raw) < 0)
			goto fail;
	}
	if (flush_run(f, &s) < 0)
		goto fail;
	PyObject *ts = first_ts(&s);
	if (!ts)
		goto fail;
	return Py_BuildValue("(NN)", s.items, ts);
fail:
	Py_DECREF(s.items);
	return NULL;
}

/* The records of a BPF ring buffer's data area that start between byte offsets start and
 * stop (default: end) of buf and end by `end` (laid out as ringbuf.walk() reads it: 8-byte
 * headers, records rounded up to 8 bytes; stops at a record still being written). Headers
 * are read with acquire loads: the kernel clears BUSY with a release store after writing
 * the record. */
static PyObject *scan_ring(Formatter *f, PyObject *args)
{
	PyObject *obj, *by_sk;
	Py_ssize_t start, end, room, stop = -1;
	int unbound, records = 0;
	if (!PyArg_ParseTuple(args, "OnnOpn|pn", &obj, &start, &end, &by_sk, &unbound, &room,
			      &records, &stop))
		return NULL;
	if (stop < 0 || stop > end)
		stop = end;
	Py_buffer view;
	if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
		return NULL;
	if (start < 0 || end < start || end > view.len || start % 8) {
		PyBuffer_Release(&view);
		PyErr_Format(PyExc_ValueError, "ring span %zd..%zd outside its %zd bytes", start,
			     end, view.len);
		return NULL;
	}
	struct scan s;
	if (scan_begin(f, &s, by_sk, unbound, room, records) < 0) {
		PyBuffer_Release(&view);
		return NULL;
	}
	const unsigned char *buf = view.buf;
	Py_ssize_t off = start;
	while (off < stop && off + RB_HDR <= end) {
		uint32_t hdr = __atomic_load_n((const uint32_t *)(buf + off), __ATOMIC_ACQUIRE);
		if (hdr & RB_BUSY)
			break;
		size_t len = hdr & ~(RB_BUSY | RB_DISCARD);
		Py_ssize_t next = (off + RB_HDR + (Py_ssize_t)len + 7) & ~(Py_ssize_t)7;
		if (next > end) {
			PyErr_Format(PyExc_ValueError, "ring record at %zd runs past %zd", off, end);
			goto fail;
		}
		if (!(hdr & RB_DISCARD) && step(f, &s, buf + off + RB_HDR, len, NULL) < 0)
			goto fail;
		off = next;
	}
	if (flush_run(f, &s) < 0)
		goto fail;
	PyBuffer_Release(&view);
	PyObject *ts = first_ts(&s);
	if (!ts) {
		Py_DECREF(s.items);
		return NULL;
	}
	return Py_BuildValue("(NnN)", s.items, off, ts);
fail:
	PyBuffer_Release(&view);
	Py_DECREF(s.items);
	return NULL;
}

static PyObject *secs(Formatter *f, PyObject *arg)
{
	(void)f;
	unsigned long long q = PyLong_AsUnsignedLongLong(arg);
	if (q == (unsigned long long)-1 && PyErr_Occurred())
		return NULL;
	char text[64];
	char *o = put_secs(text, q);
	return PyUnicode_FromStringAndSize(text, o - text);
}

/* configure(names, causes, causes_on, slow_close_s, held_max): hold sockets in CLOSE_WAIT
 * (see "held sockets"). names[la][outcome]: aggregate.outcome_name(outcome, new) with
 * la = new is LAST_ACK; causes[la][outcome]: classify.ended_cause(name, None); causes_on:
 * close_wait lines end with "cause"; slow_close_s: a `closed` stay longer than this is
 * `slow_close`; held_max: sockets held here at most (the others go to Python). */
static int copy_names(char (*dst)[NAME_MAX_LEN + 1], PyObject *names)
{
	if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) != 256) {
		PyErr_SetString(PyExc_ValueError, "exit names: a tuple of 256 per case");
		return -1;
	}
	for (int i = 0; i < 256; i++) {
		PyObject *name = PyTuple_GET_ITEM(names, i);
		Py_ssize_t n;
		const char *text = PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &n) : NULL;
		if (!text || n > NAME_MAX_LEN || comm_plain(text) != n) {
			PyErr_SetString(PyExc_ValueError, "exit names: short plain ASCII str");
			return -1;
		}
		memcpy(dst[i], text, (size_t)n + 1);
	}
	return 0;
}

static PyObject *configure(Formatter *f, PyObject *args)
{
	PyObject *n0, *n1, *c0, *c1;
	int causes_on;
	double slow;
	Py_ssize_t held_max;
	if (!PyArg_ParseTuple(args, "(OO)(OO)pdn", &n0, &n1, &c0, &c1, &causes_on, &slow,
			      &held_max))
		return NULL;
	if (copy_names(f->exit_name[0], n0) < 0 || copy_names(f->exit_name[1], n1) < 0 ||
	    copy_names(f->exit_cause[0], c0) < 0 || copy_names(f->exit_cause[1], c1) < 0)
		return NULL;
	f->causes_on = causes_on;
	f->slow_close_s = slow;
	f->held_max = held_max > 0 ? (size_t)held_max : 0;
	f->exits_on = 1;
	Py_RETURN_NONE;
}

/* take(limit) -> [held tuple, ...]: the held sockets that entered CLOSE_WAIT at or before
 * CLOCK_MONOTONIC ns `limit` (all with None), oldest first; they are not held any more. */
static PyObject *take(Formatter *f, PyObject *arg)
{
	int all = arg == Py_None;
	unsigned long long limit = 0;
	if (!all) {
		limit = PyLong_AsUnsignedLongLong(arg);
		if (limit == (unsigned long long)-1 && PyErr_Occurred())
			return NULL;
	}
	PyObject *out = PyList_New(0);
	if (!out)
		return NULL;
	while (f->order_len) {
		struct order o = f->order[f->order_head];
		struct held *h = held_find(f, o.sk);
		if (h && h->since_ns == o.since_ns) {
			if (!all && o.since_ns > limit)
				break;
			PyObject *t = held_tuple(h);
			if (!t || PyList_Append(out, t) < 0) {
				Py_XDECREF(t);
				Py_DECREF(out);
				return NULL;
			}
			Py_DECREF(t);
			f->order_head++; /* before held_del: with the last one it resets `order` */
			f->order_len--;
			held_del(f, h);
			continue;
		}
		f->order_head++;
		f->order_len--;
	}
	if (!f->order_len)
		f->order_head = 0;
	return out;
}

static PyObject *held_count(Formatter *f, PyObject *unused)
{
	(void)unused;
	return PyLong_FromSize_t(f->held_n);
}

static int init(Formatter *f, PyObject *args, PyObject *kwds)
{
	static char *kw[] = {"names", "mono_to_wall_ns", NULL};
	PyObject *names;
	long long m2w;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!L", kw, &PyTuple_Type, &names, &m2w))
		return -1;
	if (PyTuple_GET_SIZE(names) != 256) {
		PyErr_SetString(PyExc_ValueError, "names: one per state number 0-255");
		return -1;
	}
	for (int i = 0; i < 256; i++) {
		PyObject *name = PyTuple_GET_ITEM(names, i);
		Py_ssize_t n;
		const char *text = PyUnicode_Check(name) ? PyUnicode_AsUTF8AndSize(name, &n) : NULL;
		if (!text || n > NAME_MAX_LEN) {
			PyErr_SetString(PyExc_ValueError, "names: short str");
			return -1;
		}
		for (Py_ssize_t j = 0; j < n; j++)
			if (text[j] < 0x20 || text[j] > 0x7e || text[j] == '"' || text[j] == '\\') {
				PyErr_SetString(PyExc_ValueError, "names: plain ASCII only");
				return -1;
			}
		memcpy(f->names[i], text, (size_t)n);
		f->name_len[i] = (unsigned char)n;
	}
	f->mono_to_wall_ns = m2w;
	f->sec = -1;
	f->since_sec = -1;
	return 0;
}

static void dealloc(Formatter *f)
{
	PyMem_Free(f->set);
	PyMem_Free(f->vals);
	PyMem_Free(f->out);
	PyMem_Free(f->held);
	PyMem_Free(f->order);
	Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyMethodDef methods[] = {
	{"scan_list", (PyCFunction)scan_list, METH_VARARGS,
	 "scan_list(batch, by_sk, unbound, room) -> (items, first_ts)"},
	{"scan_ring", (PyCFunction)scan_ring, METH_VARARGS,
	 "scan_ring(buf, start, end, by_sk, unbound, room[, records, stop]) -> (items, end_reached, "
	 "first_ts)"},
	{"secs", (PyCFunction)secs, METH_O, "secs(q) -> q microseconds as orjson writes q / 1e6"},
	{"configure", (PyCFunction)configure, METH_VARARGS,
	 "configure((names, names_last_ack), (causes, causes_last_ack), causes_on, slow_close_s, "
	 "held_max): hold sockets in CLOSE_WAIT here"},
	{"take", (PyCFunction)take, METH_O,
	 "take(limit or None) -> held sockets that entered CLOSE_WAIT at or before limit"},
	{"held", (PyCFunction)held_count, METH_NOARGS, "held() -> how many sockets are held"},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject FormatterType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "tcpwatch._fastlines.Formatter",
	.tp_basicsize = sizeof(Formatter),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Formatter(names, mono_to_wall_ns): state lines of plain transitions",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)init,
	.tp_dealloc = (destructor)dealloc,
	.tp_methods = methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_fastlines", "The compiled part of trace's hot path.", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastlines(void)
{
	if (PyType_Ready(&FormatterType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&FormatterType);
	if (PyModule_AddObject(m, "Formatter", (PyObject *)&FormatterType) < 0) {
		Py_DECREF(&FormatterType);
		Py_DECREF(m);
		return NULL;
	}
	/* Where this build reads each field: checked against schema.layout() at start (the
	 * header may have changed since the module was built). */
#define FIELD(name) #name, (int)offsetof(struct tw_event, name), \
		    (int)sizeof(((struct tw_event *)0)->name)
	PyObject *layout = Py_BuildValue(
		"(i((sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)"
		"(sii)(sii)(sii)(sii)(sii)))",
		(int)sizeof(struct tw_event), FIELD(ts_ns), FIELD(sk), FIELD(prev_ns), FIELD(saddr),
		FIELD(daddr), FIELD(pid), FIELD(tid), FIELD(netns), FIELD(family), FIELD(sport),
		FIELD(dport), FIELD(kind), FIELD(oldstate), FIELD(newstate), FIELD(flags),
		FIELD(comm), FIELD(cw_ns), FIELD(actor_pid), FIELD(actor_tid), FIELD(outcome),
		FIELD(actor_comm));
#undef FIELD
	if (!layout || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
		Py_XDECREF(layout);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
