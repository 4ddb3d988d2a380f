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
 * scan_ring(buf, start, end, by_sk, unbound, room) -> (items, end_reached, first_ts)
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
#define NAME_MAX_LEN 23
#define LINE_ROOM 512 /* a state line is at most ~330 bytes */
#define RUN_LINES 256 /* lines per run at most: the buffer stays ~80 kB, Python writes as
			 they come (a drain of the whole ring is ~58,000 events) */

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
	Py_ssize_t run_lines, run_events;
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

enum { HANDLED, DEFER, FAIL };

struct scan {
	PyObject *by_sk;
	int unbound;      /* pre-existing sockets wait to be bound: EOF/owner news go back */
	Py_ssize_t room;  /* transitions still to hand back for the table's records */
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

/* The date and time of wall-clock second `sec`, as time.strftime("%Y-%m-%dT%H:%M:%S"). */
static int set_second(Formatter *f, long long sec)
{
	time_t t = (time_t)sec;
	struct tm tm;
	if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 < 1000 || tm.tm_year + 1900 > 9999)
		return -1;
	char *o = f->date;
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
	f->sec = sec;
	return 0;
}

/* Write the `state` line of `ev`, or say why not (DEFER). */
static int state_line(Formatter *f, const struct tw_event *ev)
{
	const unsigned known = TW_F_OWNER | TW_F_OWNER_LISTENER;
	size_t comm_len = 0;
	if (ev->flags & known) {
		while (comm_len < TW_COMM_LEN && ev->comm[comm_len]) {
			unsigned char c = (unsigned char)ev->comm[comm_len];
			if (c < 0x20 || c > 0x7e || c == '"' || c == '\\')
				return DEFER; /* escapes or UTF-8: Python's text */
			comm_len++;
		}
	}
	if (!(ev->flags & TW_F_PREV_UNKNOWN) &&
	    (ev->prev_ns >= EXACT_BELOW_NS || ev->prev_ns % 1000 == 500))
		return DEFER; /* round() decides: Python */
	long long wall;
	if (ev->ts_ns > (uint64_t)LLONG_MAX ||
	    __builtin_add_overflow((long long)ev->ts_ns, f->mono_to_wall_ns, &wall) || wall < 0)
		return DEFER;
	long long sec = wall / NS, frac = wall % NS;
	if (sec != f->sec && set_second(f, sec) < 0)
		return DEFER;
	char laddr[INET6_ADDRSTRLEN], raddr[INET6_ADDRSTRLEN];
	int v6 = ev->family == AF_INET6;
	if (!inet_ntop(v6 ? AF_INET6 : AF_INET, ev->saddr, laddr, sizeof(laddr)) ||
	    !inet_ntop(v6 ? AF_INET6 : AF_INET, ev->daddr, raddr, sizeof(raddr)))
		return DEFER;
	if (out_reserve(f, LINE_ROOM) < 0)
		return FAIL;

	char *o = f->out + f->out_len;
	o = PUT(o, "{\"event\":\"state\",\"ts\":\"");
	o = put(o, f->date, 19);
	*o++ = '.';
	o = put_3(o, (unsigned)(frac / 1000000));
	o = put_3(o, (unsigned)(frac / 1000 % 1000));
	o = PUT(o, "Z\",\"sk\":\"0x");
	o = put_hex(o, ev->sk);
	o = v6 ? PUT(o, "\",\"family\":\"ipv6\",\"laddr\":\"")
	       : PUT(o, "\",\"family\":\"ipv4\",\"laddr\":\"");
	o = put(o, laddr, strlen(laddr));
	o = PUT(o, "\",\"lport\":");
	o = put_u64(o, ev->sport);
	o = PUT(o, ",\"raddr\":\"");
	o = put(o, raddr, strlen(raddr));
	o = PUT(o, "\",\"rport\":");
	o = put_u64(o, ev->dport);
	o = PUT(o, ",\"netns\":");
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
	if (ev->kind == TW_KIND_STATE) {
		if (ev->oldstate == TCP_CLOSE_WAIT || ev->newstate == TCP_CLOSE_WAIT)
			return DEFER;
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
	if (r == HANDLED) {
		f->run_lines++;
		f->run_events++;
	}
	return r;
}

static int flush_run(Formatter *f, struct scan *s)
{
	if (!f->run_events)
		return 0;
	PyObject *run = Py_BuildValue("(y#nn)", f->out, (Py_ssize_t)f->out_len, f->run_lines,
				      f->run_events);
	f->out_len = 0;
	f->run_lines = f->run_events = 0;
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
		      Py_ssize_t room)
{
	if (!PyDict_Check(by_sk)) {
		PyErr_SetString(PyExc_TypeError, "by_sk must be a dict");
		return -1;
	}
	seen_clear(f);
	f->out_len = 0;
	f->run_lines = f->run_events = 0;
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
	int unbound;
	Py_ssize_t room;
	if (!PyArg_ParseTuple(args, "O!Opn", &PyList_Type, &batch, &by_sk, &unbound, &room))
		return NULL;
	struct scan s;
	if (scan_begin(f, &s, by_sk, unbound, room) < 0)
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

/* The records of a BPF ring buffer's data area between byte offsets start and end of buf
 * (laid out as ringbuf.walk() reads it: 8-byte headers, records rounded up to 8 bytes;
 * stops at a record still being written). Headers are read with acquire loads: the
 * kernel clears BUSY with a release store after writing the record. */
static PyObject *scan_ring(Formatter *f, PyObject *args)
{
	PyObject *obj, *by_sk;
	Py_ssize_t start, end, room;
	int unbound;
	if (!PyArg_ParseTuple(args, "OnnOpn", &obj, &start, &end, &by_sk, &unbound, &room))
		return NULL;
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
	if (scan_begin(f, &s, by_sk, unbound, room) < 0) {
		PyBuffer_Release(&view);
		return NULL;
	}
	const unsigned char *buf = view.buf;
	Py_ssize_t off = start;
	while (off + RB_HDR <= end) {
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
	return 0;
}

static void dealloc(Formatter *f)
{
	PyMem_Free(f->set);
	PyMem_Free(f->vals);
	PyMem_Free(f->out);
	Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyMethodDef methods[] = {
	{"scan_list", (PyCFunction)scan_list, METH_VARARGS,
	 "scan_list(batch, by_sk, unbound, room) -> (items, first_ts)"},
	{"scan_ring", (PyCFunction)scan_ring, METH_VARARGS,
	 "scan_ring(buf, start, end, by_sk, unbound, room) -> (items, end_reached, first_ts)"},
	{"secs", (PyCFunction)secs, METH_O, "secs(q) -> q microseconds as orjson writes q / 1e6"},
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
		"(i((sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)(sii)))",
		(int)sizeof(struct tw_event), FIELD(ts_ns), FIELD(sk), FIELD(prev_ns), FIELD(saddr),
		FIELD(daddr), FIELD(pid), FIELD(tid), FIELD(netns), FIELD(family), FIELD(sport),
		FIELD(dport), FIELD(kind), FIELD(oldstate), FIELD(newstate), FIELD(flags),
		FIELD(comm));
#undef FIELD
	if (!layout || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
		Py_XDECREF(layout);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
